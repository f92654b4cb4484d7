"""The validation cache hits for a repeated query, and the limits still refuse
from the cache (issue 12 item 3: the limit rules are built once, not per request)."""

from __future__ import annotations

from strawberry.extensions.validation_cache import _get_validate_cache

from app.graphql.schema import DOCUMENT_CACHE_SIZE, MAX_ALIASES, schema


async def test_a_repeated_query_is_validated_once() -> None:
    query = "{ first: __typename second: __typename }"
    await schema.execute(query)
    validated = _get_validate_cache(DOCUMENT_CACHE_SIZE).cache_info().hits
    for _ in range(3):
        result = await schema.execute(query)
        assert result.errors is None
        assert result.data == {"first": "Query", "second": "Query"}
    assert _get_validate_cache(DOCUMENT_CACHE_SIZE).cache_info().hits == validated + 3


async def test_a_cached_refusal_is_still_a_refusal() -> None:
    aliases = " ".join(f"a{n}: __typename" for n in range(MAX_ALIASES + 1))
    for _ in range(2):
        result = await schema.execute(f"{{ {aliases} }}")
        assert result.data is None
        assert result.errors is not None
        assert [error.extensions for error in result.errors] == [
            {"code": "GRAPHQL_VALIDATION_FAILED"}]
        assert "aliases" in result.errors[0].message
