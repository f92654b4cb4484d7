"""Parse and validation caches hit for a repeated query, and every error keeps the
shape it has without them (issue 12 item 3: the limit rules are built once, not per
request; a parse error goes through strawberry's own error handling, never the cache)."""

from __future__ import annotations

from typing import Any

import pytest
from graphql import GraphQLError

from app.graphql.documents import DOCUMENTS, DocumentCache
from app.graphql.schema import MAX_ALIASES, MAX_TOKENS, schema


def _shape(errors: list[GraphQLError] | None) -> list[dict[str, object]]:
    return [error.formatted for error in errors or []]


async def test_a_repeated_query_is_parsed_and_validated_once() -> None:
    query = "{ first: __typename second: __typename }"
    await schema.execute(query)
    stats = DOCUMENTS.stats
    parsed, validated = stats.parse_hits, stats.validation_hits
    for _ in range(3):
        result = await schema.execute(query)
        assert result.errors is None
        assert result.data == {"first": "Query", "second": "Query"}
    assert (stats.parse_hits, stats.validation_hits) == (parsed + 3, validated + 3)


async def test_a_cached_refusal_is_still_a_refusal() -> None:
    aliases = " ".join(f"a{n}: __typename" for n in range(MAX_ALIASES + 1))
    shapes = []
    for _ in range(3):
        result = await schema.execute(f"{{ {aliases} }}")
        assert result.data is None
        assert result.errors is not None
        assert [error.extensions for error in result.errors] == [
            {"code": "GRAPHQL_VALIDATION_FAILED"}]
        assert "aliases" in result.errors[0].message
        shapes.append(_shape(result.errors))
    assert shapes[0] == shapes[1] == shapes[2]


async def test_validation_errors_are_formatted_alike_every_time() -> None:
    """The formatting shortens long messages and adds codes in place: the cached errors
    themselves are never handed out."""
    query = "{ " + "x" * 400 + " }"
    first = await schema.execute(query)
    again = await schema.execute(query)
    assert _shape(first.errors) == _shape(again.errors)
    assert first.errors is not None
    assert first.errors[0].extensions == {"code": "GRAPHQL_VALIDATION_FAILED"}
    assert first.errors[0].message.endswith("…")  # shortened, once


async def test_parse_errors_keep_their_code_and_shape_when_repeated() -> None:
    for query, code in (
        ("{ viewer { ", "GRAPHQL_PARSE_FAILED"),
        ("{ " + "a: __typename " * MAX_TOKENS + "}", "GRAPHQL_VALIDATION_FAILED"),
    ):
        shapes = []
        for _ in range(3):
            result = await schema.execute(query)
            assert result.data is None
            assert result.errors is not None
            assert [error.extensions for error in result.errors] == [{"code": code}]
            shapes.append(_shape(result.errors))
        assert shapes[0] == shapes[1] == shapes[2]


def test_the_cache_is_bounded() -> None:
    cache = DocumentCache(maxsize=3, max_chars=50)
    documents = [cache.parse(f"{{ a{n}: __typename }}", {}) for n in range(5)]
    assert all(document is not None for document in documents)
    assert len(cache._entries) == 3
    assert len(cache._by_document) == 3
    assert cache.parse("{ " + "b: __typename " * 10 + "}", {}) is None  # too long: not kept
    assert len(cache._entries) == 3
    assert cache.parse("{ a4: __typename }", {}) is documents[4]  # a hit: the same object


def test_a_documents_cost_is_kept_unless_a_page_size_is_a_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cost guard walks a repeated document once; one whose page sizes come from
    variables is costed for each request's variables."""
    from graphql import OperationDefinitionNode

    from app.graphql import guards

    walks = []
    real = guards.operation_cost

    def counted(*args: Any) -> int:
        walks.append(args[2])
        return real(*args)

    monkeypatch.setattr(guards, "operation_cost", counted)

    def cost(query: str, **variables: Any) -> int:
        document = DOCUMENTS.parse(query, {})
        assert document is not None
        operation = document.definitions[0]
        assert isinstance(operation, OperationDefinitionNode)
        return guards.request_cost(schema._schema, document, operation, variables)

    fixed = "{ items(first: 10) { nodes { id title } } viewer { role } }"
    assert [cost(fixed) for _ in range(3)] == [1 + 10 * 3 + 2] * 3
    assert len(walks) == 1
    paged = "query($n: Int) { items(first: $n) { nodes { id } } }"
    assert [cost(paged, n=n) for n in (200, 5, 200)] == [1 + 200 * 2, 1 + 5 * 2, 1 + 200 * 2]
    assert len(walks) == 4
