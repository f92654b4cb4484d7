"""Property-based fuzzing of every query and mutation argument, driven by the schema
itself (DESIGN §8, issue 11), over real HTTP on both stores.

For each example hypothesis picks a root field, a caller (member, worker, anonymous)
and values for every argument from the argument's GraphQL type — strings of any
alphabet (NUL, lone surrogates, right-to-left marks, emoji, very long), numbers far
outside their bounds, unknown enum values, nulls, real and foreign ids — and posts it.
Whatever comes back: never a 5xx, never `INTERNAL_SERVER_ERROR`, and a refused
request leaves every table's row count as it was.

Reduced size by default (bounded examples); `FLEET_FUZZ_FULL=1` runs the full size.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from graphql import (
    GraphQLEnumType,
    GraphQLField,
    GraphQLInputObjectType,
    GraphQLInputType,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLScalarType,
    get_named_type,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from app.auth.models import Role
from app.config import Settings
from app.graphql.schema import schema
from app.main import create_app
from app.server import server_options
from tests.conftest import free_port

T = TypeVar("T")

FULL = os.environ.get("FLEET_FUZZ_FULL", "") not in {"", "0", "false"}
EXAMPLES = 2_000 if FULL else 50
GRAPHQL_SCHEMA = schema._schema
TABLES = ("items", "comments", "jobs", "events", "products", "tokens")
STATS: Counter[str] = Counter()  # inputs tried, answers seen (printed at the end)

SPECIAL_TEXT = [
    "", " ", "\x00", "nul\x00inside", "\ud800", "a\udfffb", "\u202eevil\u202c", "\u200f",
    "مرحبا", "😀" * 50, "\ufeff", "tracker-1", "x" * 10_001, "y" * 200_001, "\n\t\r",
    "' OR 1=1 --", "<script>", "%s%n", "\\", '"', "9" * 40, "-1", "0", "1",
]
texts = st.one_of(
    st.sampled_from(SPECIAL_TEXT),
    st.text(max_size=40),
    st.text(st.characters(codec=None, categories=["Cs", "Cc", "Cf", "So"]), max_size=20),
    st.text(st.characters(codec="utf-8"), min_size=150, max_size=400),
)
ints = st.one_of(
    st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, -(2**31), 2**53, 10**30, 5, 200, 201]),
    st.integers(-(2**40), 2**40),
)
floats = st.one_of(
    st.sampled_from([0.0, -0.0, -1e-9, 1e308, -1e308, 1e6, 1e6 + 1]),
    st.floats(allow_nan=False, allow_infinity=False),
)


int32 = st.one_of(
    st.sampled_from([0, -1, 1, 2**31 - 1, -(2**31), 4, 5, 200, 201, 21_600, 21_601]),
    st.integers(-(2**31), 2**31 - 1),
)


def _scalar(named: GraphQLScalarType, ids: st.SearchStrategy[str],
            wild: bool) -> st.SearchStrategy[Any]:
    """Values of a scalar: of its type (out of our bounds, any alphabet) or, when
    `wild`, of any type GraphQL must refuse."""
    typed: dict[str, st.SearchStrategy[Any]] = {
        "ID": st.one_of(ids, ids, texts),
        "Int": int32,
        "Float": st.one_of(floats, int32),
        "Boolean": st.booleans(),
    }
    value = typed.get(named.name, texts)  # String
    if wild:
        return st.one_of(value, ints, texts, st.sampled_from(["7", 1.5, True, None, [1]]))
    return value


def value_of(kind: GraphQLInputType, ids: st.SearchStrategy[str], wild: bool = False,
             depth: int = 0) -> st.SearchStrategy[Any]:
    """Values for a GraphQL input type, well-typed unless `wild`."""
    if isinstance(kind, GraphQLNonNull):
        inner = value_of(kind.of_type, ids, wild, depth)
        return st.one_of(inner, st.just(None)) if wild and depth == 0 else inner
    if isinstance(kind, GraphQLList):
        items = st.lists(value_of(kind.of_type, ids, wild, depth + 1), max_size=60)
        return st.one_of(items, st.just(None))
    if isinstance(kind, GraphQLEnumType):
        names = st.sampled_from(sorted(kind.values))
        return st.one_of(names, texts) if wild else names
    if isinstance(kind, GraphQLInputObjectType):
        required = {name: value_of(field.type, ids, wild, depth + 1)
                    for name, field in kind.fields.items()
                    if isinstance(field.type, GraphQLNonNull)}
        optional = {name: value_of(field.type, ids, wild, depth + 1)
                    for name, field in kind.fields.items()
                    if not isinstance(field.type, GraphQLNonNull)}
        return st.fixed_dictionaries(required, optional=optional)
    assert isinstance(kind, GraphQLScalarType), kind
    return _scalar(kind, ids, wild)


def _selection(field: GraphQLField) -> str:
    named = get_named_type(field.type)
    if isinstance(named, GraphQLObjectType):
        return "{ __typename }"
    return ""


ROOT_FIELDS = [
    (operation, name, field)
    for operation, root in (("query", GRAPHQL_SCHEMA.query_type),
                            ("mutation", GRAPHQL_SCHEMA.mutation_type))
    if root is not None
    for name, field in root.fields.items()
]


def document_of(operation: str, name: str, field: GraphQLField) -> str:
    """`mutation($a: T!, …) { name(a: $a, …) { __typename } }` for every argument."""
    if not field.args:
        return f"{operation} {{ {name} {_selection(field)} }}"
    declared = ", ".join(f"${arg}: {kind.type}" for arg, kind in field.args.items())
    passed = ", ".join(f"{arg}: ${arg}" for arg in field.args)
    return f"{operation}({declared}) {{ {name}({passed}) {_selection(field)} }}"


def test_every_root_field_and_argument_is_fuzzed():
    """The fuzzer covers what the schema has, so a new field or argument is fuzzed
    without anyone writing a case."""
    names = {name for _, name, _ in ROOT_FIELDS}
    assert {"createItem", "submitJob", "transitionJob", "items", "item"} <= names
    for _, name, field in ROOT_FIELDS:
        for arg in field.args.values():
            for wild in (False, True):  # every argument type is handled
                assert value_of(arg.type, st.just("1"), wild) is not None
        assert document_of("query", name, field)


class ThreadedServer:
    """The real app under uvicorn in a thread with its own event loop, so hypothesis
    can drive it from a plain (synchronous) test."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on", **server_options(settings))
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve()

        asyncio.run(serve())

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn stopped before it started"
            assert time.monotonic() < deadline, "uvicorn did not start in time"
            time.sleep(0.01)

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    async def row_counts(self) -> dict[str, int]:
        services = self.app.state.services
        async with services.db.read() as session:
            return {table: (await session.execute(text(f"SELECT count(*) FROM {table}")))
                    .scalar_one() for table in TABLES}


@pytest.fixture
def fuzz_target(make_settings, make_token) -> Iterator[dict[str, Any]]:
    # no rate limits: the fuzzer is one fast client; the rate limits are tested elsewhere
    server = ThreadedServer(make_settings(rate_limit_per_ip="", rate_limit_per_token=""))
    server.start()
    tokens = {
        "member": asyncio.run(make_token("acme", Role.MEMBER)),
        "worker": asyncio.run(make_token("acme", Role.WORKER)),
        "rival": asyncio.run(make_token("rival", Role.MEMBER)),
        "anonymous": None,
    }
    http = httpx.Client(base_url=server.url, timeout=60)

    def data(token: str | None, query: str) -> dict[str, Any]:
        response = http.post("/graphql", json={"query": query},
                             headers={"Authorization": f"Bearer {token}"})
        body: dict[str, Any] = response.json()
        assert not body.get("errors"), body
        return body["data"]

    item_id = data(tokens["member"], 'mutation { createItem(input: {title: "seed"}) { id } }')[
        "createItem"]["id"]
    data(tokens["member"], f'mutation {{ ingestItemAsJob(itemId: "{item_id}") {{ outcome }} }}')
    other = data(tokens["rival"], 'mutation { createItem(input: {title: "theirs"}) { id } }')
    ids = [item_id, "1", "2", other["createItem"]["id"]]
    try:
        yield {"server": server, "http": http, "tokens": tokens, "ids": ids}
    finally:
        http.close()
        server.stop()
        print(f"\nfuzz: {dict(sorted(STATS.items()))}")


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_every_argument_from_the_schema(fuzz_target, data):
    server: ThreadedServer = fuzz_target["server"]
    ids = st.sampled_from(fuzz_target["ids"])
    operation, name, field = data.draw(st.sampled_from(ROOT_FIELDS), label="field")
    wild = data.draw(st.booleans(), label="wild") and data.draw(st.booleans())  # 1 in 4
    variables = {arg: data.draw(value_of(kind.type, ids, wild), label=arg)
                 for arg, kind in field.args.items()}
    caller = data.draw(st.sampled_from(sorted(fuzz_target["tokens"])), label="caller")
    token = fuzz_target["tokens"][caller]
    before = server.call(server.row_counts())
    body = json.dumps({"query": document_of(operation, name, field), "variables": variables})
    headers = {"Content-Type": "application/json"}  # ASCII JSON: surrogates as \u escapes
    if token:
        headers["Authorization"] = f"Bearer {token}"
    response = fuzz_target["http"].post("/graphql", content=body.encode(), headers=headers)
    STATS["inputs"] += 1
    STATS[f"http {response.status_code}"] += 1
    assert response.status_code < 500, (name, caller, body[:300], response.text[:300])
    answer = response.json()
    errors = answer.get("errors") or []
    codes = [e.get("extensions", {}).get("code") for e in errors]
    STATS.update(f"code {code}" for code in codes)
    STATS["500s and masked errors"] += codes.count("INTERNAL_SERVER_ERROR")
    assert "INTERNAL_SERVER_ERROR" not in codes, (name, caller, body[:300], answer)
    assert None not in codes, (name, caller, body[:300], answer)  # every error has a code
    if errors and not answer.get("data"):
        assert server.call(server.row_counts()) == before, (name, caller, body[:300], answer)
