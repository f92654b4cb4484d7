"""The checked-in SDL is fresh, carries the DESIGN §6 contract, and the example
operations in `schema/examples.graphql` are valid against it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from graphql import (
    GraphQLArgument,
    GraphQLInputObjectType,
    GraphQLObjectType,
    OperationDefinitionNode,
    build_schema,
    parse,
    validate,
    value_from_ast,
)
from graphql.language import DocumentNode

from app.graphql.schema import schema

ROOT = Path(__file__).resolve().parents[2]
SDL_PATH = ROOT / "schema" / "schema.graphql"
EXAMPLES_PATH = ROOT / "schema" / "examples.graphql"

# DESIGN §6, field by field.
CONTRACT_ROOT_FIELDS = {
    "Query": {"viewer", "item", "items", "job", "jobs"},
    "Mutation": {
        "createItem", "updateItem", "addComment", "submitJob", "ingestItemAsJob",
        "echoJobToItem", "claimNextJob", "heartbeat", "transitionJob", "cancelJob", "retryJob",
        "releaseJob",
    },
    "Subscription": {"jobStageChanged", "itemStatusChanged"},
}
CONTRACT_ARGUMENTS = {
    ("Query", "item"): {"id"},
    ("Query", "items"): {"status", "label", "first", "after"},
    ("Query", "job"): {"id"},
    ("Query", "jobs"): {"stage", "trackerItemId", "first", "after"},
    ("Mutation", "createItem"): {"input"},
    ("Mutation", "updateItem"): {"id", "input"},
    ("Mutation", "addComment"): {"itemId", "body"},
    ("Mutation", "submitJob"): {"input"},
    ("Mutation", "ingestItemAsJob"): {"itemId", "options"},
    ("Mutation", "echoJobToItem"): {"jobId"},
    ("Mutation", "claimNextJob"): {"worker"},
    ("Mutation", "heartbeat"): {"jobId", "fence", "leaseSeconds"},
    ("Mutation", "transitionJob"): {"jobId", "fence", "to", "metrics", "reason", "retryable"},
    ("Mutation", "cancelJob"): {"jobId", "reason"},
    ("Mutation", "releaseJob"): {"jobId", "fence", "reason"},
    ("Mutation", "retryJob"): {"jobId"},
    ("Subscription", "jobStageChanged"): {"jobId", "after"},
    ("Subscription", "itemStatusChanged"): {"itemId", "after"},
}
CONTRACT_TYPE_FIELDS = {
    "Viewer": {"productId", "role"},
    "Item": {"id", "title", "description", "status", "labels", "comments", "jobs",
             "createdAt", "updatedAt"},
    "Comment": {"id", "itemId", "body", "author", "kind", "createdAt"},
    "Job": {"id", "title", "bodyMd", "kind", "stage", "priority", "capabilities",
            "engineClass", "profile", "budget", "attempts", "maxAttempts", "trackerItemId",
            "item", "idempotencyKey", "lease", "metrics", "lastEchoedStatus", "notBefore",
            "failureReason", "createdAt", "updatedAt", "startedAt", "finishedAt"},
    "Lease": {"workerId", "fence", "expiresAt"},
    "JobMetrics": {"costUsd", "tokensIn", "tokensOut", "durationMs"},
    "ItemConnection": {"nodes", "pageInfo"},
    "JobConnection": {"nodes", "pageInfo"},
    "CommentConnection": {"nodes", "pageInfo"},
    "PageInfo": {"endCursor", "hasNextPage"},
    "SubmitJobPayload": {"job", "outcome"},
    "EchoPayload": {"echoed", "error", "item"},
    "ClaimPayload": {"job", "lease"},
    "JobStageEvent": {"cursor", "jobId", "from", "to", "at", "job"},
    "ItemStatusEvent": {"cursor", "itemId", "from", "to", "at", "item"},
}
CONTRACT_INPUT_FIELDS = {
    "CreateItemInput": {"title", "description", "labels", "status"},
    "UpdateItemInput": {"title", "description", "labels", "status"},
    "SubmitJobInput": {"title", "bodyMd", "kind", "priority", "capabilities", "engineClass",
                       "profile", "budget", "maxAttempts", "idempotencyKey", "trackerItemId"},
    "IngestOptions": {"priority", "capabilities", "engineClass", "profile", "kind",
                      "maxAttempts", "budget"},
    "WorkerInput": {"workerId", "capabilities", "engineClasses", "profiles", "leaseSeconds"},
    "JobMetricsInput": {"costUsd", "tokensIn", "tokensOut"},
}
CONTRACT_ENUMS = {
    "ItemStatus": {"TODO", "IN_PROGRESS", "BLOCKED", "DONE", "CANCELLED"},
    "JobStage": {"QUEUED", "ASSIGNED", "BUILDING", "REVIEW", "TESTING", "SHIPPED", "FAILED",
                 "CANCELLED"},
    "Priority": {"LOW", "NORMAL", "HIGH", "URGENT"},
    "CommentKind": {"USER", "SYSTEM"},
    "SubmitOutcome": {"CREATED", "DEDUPED"},
}


def _load_export_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "export_schema", ROOT / "scripts" / "export_schema.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checked_in_schema():
    return build_schema(SDL_PATH.read_text(encoding="utf-8"))


def _operations(document: DocumentNode) -> list[OperationDefinitionNode]:
    return [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]


def test_checked_in_sdl_is_fresh():
    assert SDL_PATH.read_text(encoding="utf-8") == schema.as_str() + "\n", (
        "schema/schema.graphql is stale: run `make schema`"
    )


def test_export_check_mode_detects_a_stale_file(tmp_path, capsys):
    export = _load_export_script()
    assert export.main(["--check"]) == 0
    stale = tmp_path / "schema.graphql"
    stale.write_text(schema.as_str().replace("createItem", "makeItem") + "\n")
    assert export.main(["--check", "--path", str(stale)]) == 1
    assert export.main(["--check", "--path", str(tmp_path / "missing.graphql")]) == 1
    assert "stale" in capsys.readouterr().err
    # writing fixes it, and --check then passes
    assert export.main(["--path", str(stale)]) == 0
    assert stale.read_text() == schema.as_str() + "\n"
    assert export.main(["--check", "--path", str(stale)]) == 0


@pytest.mark.parametrize("root", sorted(CONTRACT_ROOT_FIELDS))
def test_root_fields_of_the_contract_exist(checked_in_schema, root):
    root_type = checked_in_schema.get_type(root)
    assert isinstance(root_type, GraphQLObjectType)
    missing = CONTRACT_ROOT_FIELDS[root] - set(root_type.fields)
    assert not missing, f"{root} lacks {sorted(missing)}"


def test_root_field_arguments_of_the_contract_exist(checked_in_schema):
    for (root, field), arguments in CONTRACT_ARGUMENTS.items():
        root_type = checked_in_schema.get_type(root)
        assert isinstance(root_type, GraphQLObjectType)
        missing = arguments - set(root_type.fields[field].args)
        assert not missing, f"{root}.{field} lacks arguments {sorted(missing)}"


def _default_of(argument: GraphQLArgument) -> object:
    assert argument.ast_node is not None
    assert argument.ast_node.default_value is not None
    return value_from_ast(argument.ast_node.default_value, argument.type)


def test_first_arguments_are_nullable_ints_defaulting_to_fifty(checked_in_schema):
    query = checked_in_schema.query_type
    item = checked_in_schema.get_type("Item")
    assert query is not None
    assert isinstance(item, GraphQLObjectType)
    for argument in (query.fields["items"].args["first"], query.fields["jobs"].args["first"],
                     item.fields["comments"].args["first"], item.fields["jobs"].args["first"]):
        assert str(argument.type) == "Int"
        assert _default_of(argument) == 50


def test_object_and_input_types_of_the_contract(checked_in_schema):
    for name, fields in CONTRACT_TYPE_FIELDS.items():
        object_type = checked_in_schema.get_type(name)
        assert isinstance(object_type, GraphQLObjectType), name
        missing = fields - set(object_type.fields)
        assert not missing, f"{name} lacks {sorted(missing)}"
    for name, fields in CONTRACT_INPUT_FIELDS.items():
        input_type = checked_in_schema.get_type(name)
        assert isinstance(input_type, GraphQLInputObjectType), name
        missing = fields - set(input_type.fields)
        assert not missing, f"{name} lacks {sorted(missing)}"


def test_enums_of_the_contract(checked_in_schema):
    for name, values in CONTRACT_ENUMS.items():
        enum_type = checked_in_schema.get_type(name)
        assert enum_type is not None, name
        assert set(enum_type.values) == values, name  # type: ignore[union-attr]


def test_example_operations_validate_against_the_schema(checked_in_schema):
    document = parse(EXAMPLES_PATH.read_text(encoding="utf-8"))
    operations = _operations(document)
    names = {op.name.value for op in operations if op.name}
    assert len(names) == len(operations), "every example operation has a unique name"
    # the examples the README promises
    assert {"CreateItem", "IngestItem", "ClaimNextJob", "TransitionJob", "EchoJobToItem",
            "JobStageChanged", "ItemStatusChanged"} <= names
    errors = validate(checked_in_schema, document)
    assert not errors, [str(error) for error in errors]
    # and with the live schema object too (the SDL is not the only source of truth)
    assert not validate(schema._schema, document)


def test_examples_cover_every_root_field():
    document = parse(EXAMPLES_PATH.read_text(encoding="utf-8"))
    used = {
        selection.name.value  # type: ignore[attr-defined]
        for op in _operations(document)
        for selection in op.selection_set.selections
    }
    expected = set().union(*CONTRACT_ROOT_FIELDS.values())
    assert expected <= used, f"no example for {sorted(expected - used)}"
