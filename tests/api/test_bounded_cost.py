"""Bounded cost per client (DESIGN §8, issue 11) over real HTTP and websockets: the
body cap before reading or authenticating (413), the body and head read timeouts, the
query cost limit, per-token and per-address rate limits (429 / RATE_LIMITED),
per-token websocket and subscription quotas, and the introspection switch."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.auth.models import Role
from app.graphql.guards import operation_cost
from app.graphql.schema import schema
from tests.api.ws_client import JOB_EVENTS, LEGACY_WS, TRANSPORT_WS, InitRefusedError, ws_connect
from tests.conftest import error_codes

# Transport-level behaviour: one store is enough (the database plays no part).
sqlite_only = pytest.mark.parametrize("store", ["sqlite"], indirect=True)

HEAVY = "{ " + " ".join(
    f"a{n}: items(first: 200) {{ nodes {{ comments(first: 200) {{ nodes {{ body }} }} }} }}"
    for n in range(50)
) + " }"


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _response_head(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection, which it must do
    within `seconds` (else TimeoutError fails the test)."""
    return await asyncio.wait_for(reader.read(), seconds)


@sqlite_only
async def test_body_cap_refuses_before_reading_or_authenticating(live_server, http_client):
    server = await live_server(max_body_bytes=4_096)
    # a declared length above the cap: 413 at once, with no body sent at all
    reader, writer = await _open(server.port)
    writer.write(b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 209715200\r\n\r\n")
    await writer.drain()
    head = await _response_head(reader)
    assert head.startswith(b"HTTP/1.1 413"), head
    writer.close()
    # chunked, no length: refused once the running count passes the cap
    reader, writer = await _open(server.port)
    writer.write(b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 1_024
    for _ in range(5):
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    await writer.drain()
    head = await _response_head(reader)
    assert head.startswith(b"HTTP/1.1 413"), head
    writer.close()
    # at the cap it is an ordinary request again (anonymous: answered, not refused)
    anonymous = http_client(server, None)
    small = await anonymous.http.post("/graphql", json={"query": "{ __typename }"})
    assert small.status_code == 200
    big = await anonymous.http.post("/graphql", content=b" " * 5_000,
                                    headers={"Content-Type": "application/json"})
    assert big.status_code == 413
    assert error_codes(big.json()) == ["PAYLOAD_TOO_LARGE"]


@sqlite_only
async def test_half_sent_requests_are_dropped_within_the_read_timeout(live_server):
    server = await live_server(http_read_timeout_seconds=1.0)
    loop = asyncio.get_running_loop()
    # half a body: 408 and closed
    reader, writer = await _open(server.port)
    writer.write(b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"query\":")
    await writer.drain()
    started = loop.time()
    answer = await _closed_within(reader, 5)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert loop.time() - started < 5
    writer.close()
    # half a request head: closed without an answer
    reader, writer = await _open(server.port)
    writer.write(b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Le")
    await writer.drain()
    assert await _closed_within(reader, 5) == b""
    writer.close()
    # nothing at all after connecting, and after a first complete exchange
    reader, writer = await _open(server.port)
    assert await _closed_within(reader, 5) == b""
    writer.close()
    reader, writer = await _open(server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert (await _response_head(reader)).startswith(b"HTTP/1.1 200")
    writer.write(b"GET /heal")
    await writer.drain()
    await _closed_within(reader, 5)
    writer.close()


def test_cost_multiplies_page_sizes():
    from graphql import parse

    def cost(query: str, **variables: Any) -> int:
        document = parse(query)
        operation = document.definitions[0]
        return operation_cost(schema._schema, document, operation, variables)  # type: ignore[arg-type]

    assert cost("{ viewer { role } }") == 2
    assert cost("{ items(first: 10) { nodes { id title } } }") == 1 + 10 * 3
    assert cost("{ items { nodes { id } } }") == 1 + 50 * 2  # the default page
    assert cost("query($n: Int) { items(first: $n) { nodes { id } } }", n=200) == 1 + 200 * 2
    nested = "{ items(first: 200) { nodes { comments(first: 200) { nodes { body } } } } }"
    assert cost(nested) == 1 + 200 * (1 + 1 + 200 * 2)
    fragment = """query { ...F } fragment F on Query { items(first: 5) { nodes { id } } }"""
    assert cost(fragment) == 1 + 5 * 2
    assert cost(HEAVY) == 50 * cost(nested)


@sqlite_only
async def test_the_fifty_alias_query_is_refused_before_execution(
    live_server, http_client, make_token
):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    await member.data('mutation { createItem(input: {title: "x"}) { id } }')
    body = await member.execute(HEAVY)
    assert error_codes(body) == ["GRAPHQL_VALIDATION_FAILED"], body
    assert body["errors"][0]["extensions"]["cost"] > body["errors"][0]["extensions"]["maxCost"]
    assert not body.get("data")
    # one of them is an ordinary query
    single = HEAVY.split(" a1:")[0] + " }"
    assert (await member.data(single))["a0"]["nodes"] == [{"comments": {"nodes": []}}]
    # the limit is a setting
    strict = http_client(await live_server(max_query_cost=50), member.token)
    assert error_codes(await strict.execute("{ items(first: 50) { nodes { id } } }")) == [
        "GRAPHQL_VALIDATION_FAILED"]


@sqlite_only
async def test_rate_limit_per_address(live_server, http_client, make_token):
    server = await live_server(rate_limit_per_token="", rate_limit_per_ip="4/minute")
    anonymous = http_client(server, None)
    member = http_client(server, await make_token("acme", Role.MEMBER))
    query = {"query": "{ __typename }"}
    statuses = [(await anonymous.http.post("/graphql", json=query)).status_code
                for _ in range(4)]
    assert statuses == [200] * 4
    refused = await anonymous.http.post("/graphql", json=query)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert error_codes(refused.json()) == ["RATE_LIMITED"]
    # a token does not lift its address's limit; probes are never limited
    assert error_codes(await member.execute("{ viewer { role } }")) == ["RATE_LIMITED"]
    assert (await anonymous.http.get("/healthz")).status_code == 200


@sqlite_only
async def test_rate_limit_per_token_leaves_other_tokens_alone(live_server, http_client,
                                                              make_token):
    server = await live_server(rate_limit_per_token="3/minute", rate_limit_per_ip="")
    first = http_client(server, await make_token("acme", Role.MEMBER))
    second = http_client(server, await make_token("acme", Role.MEMBER))
    for _ in range(3):
        await first.data("{ viewer { role } }")
    body = await first.execute("{ viewer { role } }")
    assert error_codes(body) == ["RATE_LIMITED"]
    assert (await second.data("{ viewer { role } }"))["viewer"]["role"] == "MEMBER"


@sqlite_only
async def test_websockets_and_subscriptions_per_token(live_server, make_token):
    server = await live_server(max_websockets_per_token=2, max_subscriptions_per_token=3)
    token = await make_token("acme", Role.MEMBER)
    other = await make_token("acme", Role.MEMBER)
    for protocol in (TRANSPORT_WS, LEGACY_WS):
        async with ws_connect(server.ws_url, protocol, token), \
                ws_connect(server.ws_url, protocol, token):
            with pytest.raises(InitRefusedError) as refused:
                async with ws_connect(server.ws_url, protocol, token):
                    pass
            assert refused.value.code == 4429, refused.value
            async with ws_connect(server.ws_url, protocol, other):  # its own quota
                pass
        # closed connections give their slots back
        async with ws_connect(server.ws_url, protocol, token), \
                ws_connect(server.ws_url, protocol, token):
            pass

    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as client:
        live = [await client.subscribe(JOB_EVENTS) for _ in range(3)]
        over = await client.subscribe(JOB_EVENTS)
        errors = await client.operation_errors(over)
        assert [e.get("extensions", {}).get("code") for e in errors] == ["RATE_LIMITED"]
        await client.stop(live[0])
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # the slot comes back once the stopped stream has ended
            again = await client.subscribe(JOB_EVENTS)
            try:
                errors = await client.operation_errors(again, timeout=0.5)
            except TimeoutError:
                break  # no error: it is live
            assert asyncio.get_running_loop().time() < deadline, errors


@sqlite_only
async def test_introspection_can_be_switched_off(live_server, http_client, make_token):
    token = await make_token("acme", Role.MEMBER)
    on = http_client(await live_server(), token)
    assert (await on.data("{ __schema { queryType { name } } }"))["__schema"]
    off = http_client(await live_server(introspection=False), token)
    for query in ("{ __schema { queryType { name } } }", '{ __type(name: "Item") { name } }'):
        body = await off.execute(query)
        assert set(error_codes(body)) == {"GRAPHQL_VALIDATION_FAILED"}, body
        assert body["data"] is None
        assert "introspection" in body["errors"][0]["message"].lower()
    assert (await off.data("{ __typename viewer { role } }"))["__typename"] == "Query"


def test_settings_defaults_and_rate_strings():
    from pydantic import ValidationError

    from app.config import Settings

    settings = Settings()
    assert settings.max_body_bytes == 1_048_576
    assert settings.introspection is True
    assert Settings(rate_limit_per_ip="6000/minute;200/second", rate_limit_per_token="")
    with pytest.raises(ValidationError, match="rate limit"):
        Settings(rate_limit_per_token="lots")
