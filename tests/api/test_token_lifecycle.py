"""Token lifecycle over real HTTP and websockets, on both stores (issue 10 §2).

Expired and revoked tokens are UNAUTHENTICATED on their next request; their open
websockets are closed with 4403 within seconds; the revoke is the real
`fleetbridge token revoke` process.  On PostgreSQL the periodic re-check is set to a
minute, so only the NOTIFY can close the socket in time (and invalidate the cache).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from app.auth.models import Role, Token
from app.auth.service import create_token
from app.db import create_engine, utcnow
from app.uow import Database
from tests.api.test_cli import cli_env, run_cli
from tests.api.ws_client import JOB_EVENTS, PROTOCOLS, TRANSPORT_WS, ws_connect
from tests.conftest import error_codes

VIEWER = "query { viewer { productId role } }"
CLOSED_WITHIN = 5.0


async def _token(database_url: str, *, expires_in: timedelta | None = None,
                 role: Role = Role.MEMBER, name: str | None = None) -> tuple[int, str]:
    db = Database(create_engine(database_url))
    try:
        async with db.unit_of_work() as session:
            secret = await create_token(session, product_id="acme", role=role, name=name,
                                        expires_in=expires_in)
            token = (await session.execute(select(Token).order_by(Token.id.desc()))).scalar()
            assert token is not None
            return token.id, secret
    finally:
        await db.dispose()


async def _tokens_table(database_url: str) -> dict[int, Token]:
    db = Database(create_engine(database_url))
    try:
        async with db.read() as session:
            return {t.id: t for t in (await session.execute(select(Token))).scalars()}
    finally:
        await db.dispose()


def _server_settings(store: str) -> dict[str, float]:
    # PostgreSQL: a minute between re-checks, so a close within 5 s is the NOTIFY's doing.
    return {"token_check_seconds": 60.0 if store == "postgres" else 0.2}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_revoke_closes_open_websockets_and_refuses_the_next_request(
    store, database_url, live_server, http_client, protocol
):
    server = await live_server(**_server_settings(store))
    token_id, secret = await _token(database_url)
    _, other = await _token(database_url)
    client, bystander = http_client(server, secret), http_client(server, other)
    assert (await client.data(VIEWER))["viewer"] == {"productId": "acme", "role": "MEMBER"}
    assert (await client.data(VIEWER))["viewer"]["role"] == "MEMBER"  # from the cache

    async with ws_connect(server.ws_url, protocol, secret) as socket, \
            ws_connect(server.ws_url, protocol, other) as survivor:
        await socket.subscribe(JOB_EVENTS)
        await survivor.subscribe(JOB_EVENTS)
        code, _, err = await run_cli("token", "revoke", str(token_id),
                                     env=cli_env(DATABASE_URL=database_url))
        assert code == 0, err
        assert f"revoked token {token_id}" in err
        started = time.monotonic()
        close_code, reason = await socket.wait_closed(timeout=CLOSED_WITHIN)
        assert close_code == 4403, (close_code, reason)
        assert time.monotonic() - started < CLOSED_WITHIN
        # the next request is refused (the cache was invalidated), others go on
        assert error_codes(await client.execute(VIEWER)) == ["UNAUTHENTICATED"]
        assert (await bystander.data(VIEWER))["viewer"]["role"] == "MEMBER"
        assert not survivor.connection.close_code
    # a new connection with the revoked token is refused at connection_init
    with pytest.raises(Exception, match="refused"):
        async with ws_connect(server.ws_url, TRANSPORT_WS, secret):
            pass
    assert server.services.tokens.open_sockets(token_id) == 0
    # revoking again says so, an unknown id is an error
    code, _, err = await run_cli("token", "revoke", str(token_id),
                                 env=cli_env(DATABASE_URL=database_url))
    assert (code, "already revoked" in err) == (0, True)
    code, _, err = await run_cli("token", "revoke", "9999",
                                 env=cli_env(DATABASE_URL=database_url))
    assert (code, err.strip()) == (2, "error: token 9999 not found")


async def test_an_expired_token_is_refused_and_its_websocket_closed(
    database_url, live_server, http_client
):
    server = await live_server(token_check_seconds=0.2)
    _, secret = await _token(database_url, expires_in=timedelta(seconds=2))
    client = http_client(server, secret)
    assert (await client.data(VIEWER))["viewer"]["role"] == "MEMBER"
    async with ws_connect(server.ws_url, TRANSPORT_WS, secret) as socket:
        await socket.subscribe(JOB_EVENTS)
        close_code, _ = await socket.wait_closed(timeout=2 + CLOSED_WITHIN)
        assert close_code == 4403
    assert error_codes(await client.execute(VIEWER)) == ["UNAUTHENTICATED"]


async def test_a_deleted_token_loses_its_websocket(database_url, live_server):
    server = await live_server(token_check_seconds=0.2)
    token_id, secret = await _token(database_url)
    async with ws_connect(server.ws_url, TRANSPORT_WS, secret) as socket:
        await socket.subscribe(JOB_EVENTS)
        async with server.services.db.unit_of_work() as session:
            await session.delete(await session.get(Token, token_id))
        assert (await socket.wait_closed(timeout=CLOSED_WITHIN))[0] == 4403


async def test_last_use_is_recorded_without_a_write_per_request(
    database_url, live_server, http_client
):
    server = await live_server(token_check_seconds=0.2)
    token_id, secret = await _token(database_url)
    client = http_client(server, secret)
    for _ in range(5):
        await client.data(VIEWER)
    deadline = time.monotonic() + CLOSED_WITHIN
    while (await _tokens_table(database_url))[token_id].last_used_at is None:
        assert time.monotonic() < deadline, "last use was never recorded"
        await asyncio.sleep(0.05)
    first = (await _tokens_table(database_url))[token_id].last_used_at
    # Mark it older in the database: further requests within the minute write nothing.
    async with server.services.db.unit_of_work() as session:
        await session.execute(update(Token).where(Token.id == token_id)
                              .values(last_used_at=utcnow() - timedelta(seconds=30)))
    for _ in range(5):
        await client.data(VIEWER)
    await server.services.tokens.check_open_sockets()
    await server.stop()  # flushes what is pending
    again = (await _tokens_table(database_url))[token_id].last_used_at
    assert again is not None
    assert first is not None
    assert again < first


async def test_token_list_shows_the_lifecycle_and_never_the_secret(database_url):
    env = cli_env(DATABASE_URL=database_url)
    code, secret, err = await run_cli("token", "create", "--product", "acme", "--role",
                                      "worker", "--name", "ci", "--expires-in", "30d", env=env)
    assert code == 0, err
    code, replacement, err = await run_cli(
        "token", "create", "--product", "acme", "--role", "worker", "--name", "ci",
        "--replace", env=env)
    assert code == 0, err
    await _token(database_url, role=Role.MEMBER, name="other-product-check")
    code, out, err = await run_cli("token", "list", "--product", "acme", "--json", env=env)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    # --replace revoked the first "ci" token: only the replacement and the other remain
    assert [(r["name"], r["role"], r["state"]) for r in rows] == [
        ("ci", "worker", "active"), ("other-product-check", "member", "active")]
    assert rows[0]["expires"] == "-"
    code, out, _ = await run_cli("token", "list", "--all", "--json", env=env)
    everything = [json.loads(line) for line in out.splitlines()]
    assert next((r["name"], r["state"]) for r in everything) == ("ci", "revoked")
    assert everything[0]["expires"] != "-"
    code, table, _ = await run_cli("token", "list", env=env)
    assert code == 0
    assert "last used" in table
    assert "ci" in table
    for text in (out, table):
        assert secret.strip() not in text
        assert replacement.strip() not in text


@pytest.mark.parametrize("store", ["sqlite"])
async def test_sqlite_caches_token_checks_and_a_revoke_elsewhere_ends_them_at_once(
    database_url, live_server, http_client
):
    """The cache is on for SQLite too; `fleetbridge token revoke` (another process)
    bumps the database's sidecar after its commit, and the very next request is
    refused — with the periodic re-check a minute away, only the sidecar can do it."""
    server = await live_server(token_check_seconds=60.0)
    guard = server.services.tokens
    token_id, secret = await _token(database_url)
    _, other = await _token(database_url)
    client, bystander = http_client(server, secret), http_client(server, other)
    for _ in range(3):
        assert (await client.data(VIEWER))["viewer"]["role"] == "MEMBER"
    assert (await bystander.data(VIEWER))["viewer"]["role"] == "MEMBER"
    hits = guard.cache_hits
    assert hits >= 2  # the token was read once, then served from the cache

    code, _, err = await run_cli("token", "revoke", str(token_id),
                                 env=cli_env(DATABASE_URL=database_url))
    assert code == 0, err
    assert error_codes(await client.execute(VIEWER)) == ["UNAUTHENTICATED"]
    assert (await bystander.data(VIEWER))["viewer"]["role"] == "MEMBER"

    # `token create --replace` revokes too, from another process
    env = cli_env(DATABASE_URL=database_url)
    code, first, err = await run_cli("token", "create", "--product", "acme", "--role",
                                     "worker", "--name", "ci", env=env)
    assert code == 0, err
    replaced = http_client(server, first.strip())
    for _ in range(2):
        assert (await replaced.data(VIEWER))["viewer"]["role"] == "WORKER"
    code, _, err = await run_cli("token", "create", "--product", "acme", "--role", "worker",
                                 "--name", "ci", "--replace", env=env)
    assert code == 0, err
    assert error_codes(await replaced.execute(VIEWER)) == ["UNAUTHENTICATED"]
    assert guard.cache_hits > hits


async def test_a_deleted_token_is_refused_at_once(store, database_url, live_server, http_client):
    """Deleting a token row through the ORM is announced like a revoke (a NOTIFY on
    PostgreSQL, the sidecar on SQLite): its cached check does not outlive it."""
    server = await live_server(token_check_seconds=60.0)
    token_id, secret = await _token(database_url)
    client = http_client(server, secret)
    for _ in range(2):
        assert (await client.data(VIEWER))["viewer"]["role"] == "MEMBER"
    db = Database(create_engine(database_url))  # as another process would
    try:
        async with db.unit_of_work() as session:
            await session.delete(await session.get(Token, token_id))
    finally:
        await db.dispose()
    deadline = time.monotonic() + CLOSED_WITHIN
    while store == "postgres" and token_id in {
        entry.principal.token_id for entry in server.services.tokens._cache.values()
    }:  # the NOTIFY arrives asynchronously on PostgreSQL
        assert time.monotonic() < deadline, "the deletion was never announced"
        await asyncio.sleep(0.02)
    assert error_codes(await client.execute(VIEWER)) == ["UNAUTHENTICATED"]
