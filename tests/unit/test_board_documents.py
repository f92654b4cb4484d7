"""Every GraphQL document the fleet board sends validates against the server's schema,
so a schema change that would break the board fails CI (issue 9)."""

from __future__ import annotations

import re
from pathlib import Path

from graphql import OperationDefinitionNode, parse, validate

from app.graphql.schema import schema

BOARD = Path(__file__).resolve().parents[2] / "web" / "src" / "board"


def test_board_documents_validate_against_the_schema():
    document = parse((BOARD / "board.graphql").read_text())
    errors = validate(schema._schema, document)
    assert not errors, [error.message for error in errors]


def test_every_operation_the_board_runs_is_in_its_documents():
    document = parse((BOARD / "board.graphql").read_text())
    defined = {
        node.name.value for node in document.definitions
        if isinstance(node, OperationDefinitionNode) and node.name
    }
    used: set[str] = set()
    for source in BOARD.glob("*.ts"):
        text = source.read_text()
        used |= set(re.findall(r"""\.run<[^(]*>\(\s*"(\w+)\"""", text))
        used |= set(re.findall(r"""operation\("(\w+)"\)""", text))
        used |= set(re.findall(r"""this\.mutate\("(\w+)\"""", text))
    assert used, "no operation names found in the board's sources"
    assert used <= defined, f"the board runs operations its documents lack: {used - defined}"
