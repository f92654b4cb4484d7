"""The real Relay compiler (npm `relay-compiler`, pinned in tools/relay) accepts
`@connection` on every connection of the checked-in SDL (schema/schema.graphql),
and rejects it once `pageInfo.hasPreviousPage` is missing: the connections are
Relay's shape (issue 10 item 5).  Installed by `.ci/run` (`npm ci --prefix
tools/relay`); skipped elsewhere when it is not installed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SDL = ROOT / "schema" / "schema.graphql"
COMPILER = ROOT / "tools" / "relay" / "node_modules" / ".bin" / "relay-compiler"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

FRAGMENTS = '''
import { graphql } from "react-relay";
export const items = graphql`
  fragment Board_query on Query
  @argumentDefinitions(count: {type: "Int", defaultValue: 10}, cursor: {type: "String"})
  @refetchable(queryName: "BoardItemsPaginationQuery") {
    items(first: $count, after: $cursor) @connection(key: "Board_items") {
      edges { node { id title ...Board_item } }
    }
  }
`;
export const jobs = graphql`
  fragment Board_jobs on Query
  @argumentDefinitions(count: {type: "Int", defaultValue: 10}, cursor: {type: "String"})
  @refetchable(queryName: "BoardJobsPaginationQuery") {
    jobs(first: $count, after: $cursor) @connection(key: "Board_jobs") {
      edges { node { id stage } }
    }
  }
`;
export const item = graphql`
  fragment Board_item on Item {
    comments(first: 5) @connection(key: "Board_comments") { edges { node { id body } } }
    jobs(first: 5) @connection(key: "BoardItem_jobs") { edges { node { id stage } } }
  }
`;
'''


def compile_against(sdl: str, project: Path) -> subprocess.CompletedProcess[str]:
    (project / "src").mkdir(parents=True, exist_ok=True)
    (project / "schema.graphql").write_text(sdl, encoding="utf-8")
    (project / "src" / "Board.ts").write_text(FRAGMENTS, encoding="utf-8")
    (project / "relay.config.json").write_text(json.dumps(
        {"src": "./src", "schema": "./schema.graphql", "language": "typescript"}
    ))
    return subprocess.run(
        [str(COMPILER)], cwd=project, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def compiler() -> Path:
    if not COMPILER.exists():
        message = "relay-compiler is not installed: npm ci --prefix tools/relay"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return COMPILER


@pytest.mark.usefixtures("compiler")
def test_relay_compiler_accepts_connection_on_every_connection(tmp_path: Path) -> None:
    sdl = SDL.read_text(encoding="utf-8")
    accepted = compile_against(sdl, tmp_path / "ok")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    generated = tmp_path / "ok" / "src" / "__generated__"
    assert (generated / "BoardItemsPaginationQuery.graphql.ts").exists()

    # The check is real: without hasPreviousPage the same fragments are refused.
    broken = compile_against(sdl.replace("hasPreviousPage", "hasPrevPage"), tmp_path / "bad")
    assert broken.returncode != 0
    assert "hasPreviousPage" in broken.stdout + broken.stderr
