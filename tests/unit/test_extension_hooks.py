"""The extension hooks wrapped once per class (app.graphql.hooks) behave exactly as
strawberry's own runner: the same hooks entered and left in the same order, the same
exceptions seen and suppressed, the same results — and the wrapping is built once
per extension class and step, not per request."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import strawberry
from strawberry.extensions import SchemaExtension
from strawberry.extensions.runner import SchemaExtensionsRunner
from strawberry.types import ExecutionContext

from app.graphql import hooks
from app.graphql.hooks import CachedHooksRunner
from app.graphql.schema import schema as fleet_schema

TRACE: list[str] = []


class Generators(SchemaExtension):
    def on_operation(self) -> Iterator[None]:
        TRACE.append("gen operation in")
        try:
            yield
        except Exception as exc:  # a hook inside failed on the way in
            TRACE.append(f"gen operation saw {exc!r}")
            raise
        TRACE.append("gen operation out")

    def on_parse(self) -> Iterator[None]:
        TRACE.append("gen parse in")
        yield
        TRACE.append("gen parse out")

    def on_validate(self) -> Iterator[None]:
        TRACE.append("gen validate in")
        yield
        TRACE.append("gen validate out")

    def on_execute(self) -> Iterator[None]:
        TRACE.append("gen execute in")
        try:
            yield
        finally:
            TRACE.append("gen execute out")


class AsyncGenerators(SchemaExtension):
    async def on_operation(self) -> AsyncIterator[None]:
        TRACE.append("async operation in")
        yield
        TRACE.append("async operation out")

    async def on_execute(self) -> AsyncIterator[None]:
        TRACE.append("async execute in")
        variables = self.execution_context.variables or {}
        if variables.get("refuse"):
            raise ValueError("refused before execution")
        if variables.get("loud"):
            raise RuntimeError("not swallowed")
        yield
        TRACE.append("async execute out")


class PlainFunctions(SchemaExtension):
    def on_parse(self) -> None:  # type: ignore[override]
        TRACE.append("plain parse")

    async def on_validate(self) -> None:  # type: ignore[override]
        TRACE.append("coroutine validate")


class Swallows(SchemaExtension):
    """Suppresses what its inner hooks raise (the context manager protocol)."""

    def on_execute(self) -> Iterator[None]:
        TRACE.append("swallow in")
        try:
            yield
        except ValueError as exc:
            TRACE.append(f"swallowed {exc}")


class Results(SchemaExtension):
    def get_results(self) -> dict[str, Any]:
        return {"counted": len(TRACE)}


@strawberry.type
class Query:
    @strawberry.field
    def hello(self, name: str | None = None) -> str:
        if name == "boom":
            raise RuntimeError("resolver failed")
        return f"hello {name}"


EXTENSIONS = [Generators, Swallows, AsyncGenerators, PlainFunctions, Results]


class CachedSchema(strawberry.Schema):
    def create_extensions_runner(
        self, execution_context: ExecutionContext, extensions: list[SchemaExtension]
    ) -> SchemaExtensionsRunner:
        return CachedHooksRunner(execution_context=execution_context, extensions=extensions)


STRAWBERRY = strawberry.Schema(query=Query, extensions=EXTENSIONS)
CACHED = CachedSchema(query=Query, extensions=EXTENSIONS)

CASES: list[tuple[str, dict[str, Any] | None]] = [
    ("{ hello }", None),
    ('query($n: String) { hello(name: $n) }', {"n": "boom"}),  # a resolver error
    # a hook raises: swallowed by an outer hook, or not (an error result)
    ("query($refuse: Boolean!) { hello @include(if: $refuse) }", {"refuse": True}),
    ("query($loud: Boolean!) { hello @include(if: $loud) }", {"loud": True}),
    ("{ hello(", None),  # a parse error
    ("{ nope }", None),  # a validation error
]


async def _run(schema: strawberry.Schema, query: str,
               variables: dict[str, Any] | None) -> tuple[list[str], Any]:
    gc.collect()  # a hook left unfinished by the last request ends now, not in this trace
    TRACE.clear()
    result = await schema.execute(query, variable_values=variables)
    shape = (result.data, [error.formatted for error in result.errors or []],
             result.extensions)
    return list(TRACE), shape


async def test_the_cached_runner_behaves_as_strawberrys() -> None:
    for query, variables in CASES:
        expected = await _run(STRAWBERRY, query, variables)
        for _ in range(2):  # the first request builds the wrapping, the second reuses it
            assert await _run(CACHED, query, variables) == expected, query


async def test_the_wrapping_is_built_once_per_class_and_step() -> None:
    await fleet_schema.execute("{ __typename }")
    await CACHED.execute("{ hello }")
    built = hooks.stats["built"]
    for _ in range(3):
        await fleet_schema.execute("{ __typename }")
        await CACHED.execute("{ hello }")
    assert hooks.stats["built"] == built
