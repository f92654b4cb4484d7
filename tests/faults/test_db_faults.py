"""Database faults end in SERVICE_UNAVAILABLE within a bounded time (DESIGN §8).

PostgreSQL is reached through a TCP proxy the test controls (tests.faults.tcp_proxy):
connections cut again and again under load, a silent partition, and the pool
timeout; on SQLite the write lock held elsewhere.  Never an HTTP 500, never
INTERNAL_SERVER_ERROR; after the fault heals requests succeed and no failed
request left a half-written change (every item has exactly its creation event).

Reduced size by default; FLEET_FAULT_FULL=1 runs the full size (more requests,
more and longer cuts).  Figures are printed (`-s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import func, select, text

from app.auth.models import Role
from app.events.models import Event, EventType
from app.tracker.models import Item
from tests.conftest import PG_DSN, LiveServer, TokenFactory, _pg_admin, error_codes
from tests.faults.tcp_proxy import FaultProxy

FULL = os.environ.get("FLEET_FAULT_FULL", "").lower() in {"1", "true", "yes"}
TIMEOUT = 1.0  # FLEET_DB_TIMEOUT_SECONDS for these servers
# The longest a request may take while the store fails: the auth read and the
# operation, each a pool wait or a connect or a statement (plus a test-side margin).
BOUND = 4 * TIMEOUT + 1.5
CUTS = 6 if FULL else 3
CUT_SECONDS = 1.5 if FULL else 0.6
REQUESTS = 300 if FULL else 40
CLIENTS = 8 if FULL else 4

CREATE = "mutation($t: String!) { createItem(input: {title: $t}) { id } }"
LIST = "{ viewer { eventCursor } items(first: 20) { nodes { id title } } }"


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    created: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def check(self) -> None:
        assert self.statuses[500] == 0, self
        assert all(status < 500 for status in self.statuses), self
        assert set(self.codes) <= {"SERVICE_UNAVAILABLE"}, self


async def post(http: httpx.AsyncClient, token: str, query: str, tally: Tally,
               **variables: Any) -> dict[str, Any] | None:
    started = time.monotonic()
    response = await http.post(
        "/graphql", json={"query": query, "variables": variables},
        headers={"Authorization": f"Bearer {token}"},
    )
    tally.slowest = max(tally.slowest, time.monotonic() - started)
    tally.statuses[response.status_code] += 1
    assert "Traceback" not in response.text
    if response.status_code >= 500:
        return None
    body: dict[str, Any] = response.json()
    for error in body.get("errors") or []:
        tally.codes[error.get("extensions", {}).get("code")] += 1
    return body


def answered(body: dict[str, Any] | None) -> bool:
    return body is not None and not body.get("errors")


def proxied_url(port: int, database_url: str) -> str:
    database = database_url.rsplit("/", 1)[1]
    return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{database}"


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    host, _, port = PG_DSN.split("://", 1)[1].split("@")[-1].partition(":")
    fault_proxy = FaultProxy(host, int(port or 5432))
    await fault_proxy.start()
    yield fault_proxy
    await fault_proxy.stop()


ServerFactory = Callable[..., Awaitable[LiveServer]]


async def assert_consistent(server: LiveServer, created: list[str]) -> None:
    """Every acknowledged item exists, and every item has exactly one creation event."""
    async with server.services.db.read() as session:
        items = set((await session.execute(select(Item.id))).scalars())
        events = Counter((await session.execute(
            select(Event.entity_id).where(Event.type == EventType.ITEM_CREATED)
        )).scalars())
        orphans = (await session.execute(select(func.count()).select_from(Event).where(
            Event.type == EventType.ITEM_CREATED, Event.entity_id.not_in(items or {0})
        ))).scalar_one()
    assert {int(i) for i in created} <= items
    assert all(events[item] == 1 for item in items), events
    assert orphans == 0


@pytest.mark.postgres
@pytest.mark.parametrize("store", ["postgres"])
async def test_connections_cut_again_and_again_under_load(
    live_server: ServerFactory, proxy: FaultProxy, database_url: str, make_token: TokenFactory,
) -> None:
    token = await make_token("acme", Role.MEMBER)
    server = await live_server(database_url=proxied_url(proxy.port, database_url),
                               db_timeout_seconds=TIMEOUT)
    tally = Tally()
    sent = 0
    cutting = asyncio.Event()  # set once the last cut has healed

    async def client(http: httpx.AsyncClient, n: int) -> None:
        nonlocal sent
        # The load lasts through every cut, however fast the requests are.
        while sent < REQUESTS or not cutting.is_set():
            sent += 1
            body = await post(http, token, CREATE, tally, t=f"load {n}-{sent}")
            if body and not body.get("errors"):
                tally.created.append(body["data"]["createItem"]["id"])
            await post(http, token, LIST, tally)

    async def faults() -> None:
        for _ in range(CUTS):
            await asyncio.sleep(CUT_SECONDS / 2)
            proxy.refusing = True
            proxy.cut()
            await asyncio.sleep(CUT_SECONDS)
            proxy.refusing = False
        cutting.set()

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await asyncio.gather(faults(), *(client(http, n) for n in range(CLIENTS)))
        print(f"\ncuts={proxy.cuts} statuses={dict(tally.statuses)} codes={dict(tally.codes)} "
              f"created={len(tally.created)} slowest={tally.slowest:.2f}s")
        tally.check()
        assert tally.codes["SERVICE_UNAVAILABLE"] > 0, "the cuts never reached a request"
        # Healed: everything answers again.
        after = Tally()
        body = await post(http, token, CREATE, after, t="after the cuts")
        assert answered(body), body
        assert (await http.get("/readyz")).status_code == 200
    await assert_consistent(server, tally.created)


@pytest.mark.postgres
@pytest.mark.parametrize("store", ["postgres"])
async def test_a_silent_partition_is_service_unavailable_within_the_bound(
    live_server: ServerFactory, proxy: FaultProxy, database_url: str, make_token: TokenFactory,
) -> None:
    token = await make_token("acme", Role.MEMBER)
    server = await live_server(database_url=proxied_url(proxy.port, database_url),
                               db_timeout_seconds=TIMEOUT)
    tally = Tally()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        body = await post(http, token, CREATE, tally, t="before")  # warm the pool
        assert answered(body), body
        proxy.partition()
        started = time.monotonic()
        answers = await asyncio.gather(
            post(http, token, CREATE, tally, t="during"), post(http, token, LIST, tally),
            http.get("/readyz"),
        )
        took = time.monotonic() - started
        print(f"\npartition: {took:.2f}s statuses={dict(tally.statuses)} "
              f"codes={dict(tally.codes)}")
        assert took < BOUND
        assert answers[2].status_code == 503
        tally.check()
        for answer in answers[:2]:  # both requests (LIST: each field that reads)
            assert answer is not None
            assert set(error_codes(answer)) == {"SERVICE_UNAVAILABLE"}, answer
        proxy.heal()
        deadline = time.monotonic() + BOUND
        while True:  # connections cut off by the partition are replaced
            body = await post(http, token, CREATE, tally, t="after")
            if body and not body.get("errors"):
                tally.created.append(body["data"]["createItem"]["id"])
                break
            assert time.monotonic() < deadline, body
        tally.check()
    await assert_consistent(server, tally.created)


async def test_the_pool_timeout_is_service_unavailable(
    live_server: ServerFactory, make_token: TokenFactory,
) -> None:
    token = await make_token("acme", Role.MEMBER)
    server = await live_server(db_timeout_seconds=TIMEOUT, db_pool_size=1, db_max_overflow=0)
    tally = Tally()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        async with server.services.db.engine.connect():  # the pool's only connection
            started = time.monotonic()
            await post(http, token, LIST, tally)
            took = time.monotonic() - started
        assert TIMEOUT * 0.9 <= took < BOUND
        assert tally.codes == Counter({"SERVICE_UNAVAILABLE": 1})
        body = await post(http, token, LIST, tally)
        assert answered(body), body
    tally.check()


@pytest.mark.parametrize("store", ["sqlite"])
async def test_the_sqlite_write_lock_held_elsewhere_is_service_unavailable(
    live_server: ServerFactory, make_token: TokenFactory, database_url: str,
) -> None:
    token = await make_token("acme", Role.MEMBER)
    server = await live_server(db_timeout_seconds=TIMEOUT)
    tally = Tally()
    path = database_url.split("///", 1)[1]
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            started = time.monotonic()
            await post(http, token, CREATE, tally, t="blocked")
            assert time.monotonic() - started < BOUND
            assert tally.codes == Counter({"SERVICE_UNAVAILABLE": 1})
            other.execute("ROLLBACK")
            body = await post(http, token, CREATE, tally, t="free again")
            assert answered(body), body
    finally:
        other.close()
    tally.check()
    async with server.services.db.read() as session:
        titles = list((await session.execute(select(Item.title))).scalars())
    assert titles == ["free again"]


@pytest.mark.postgres
@pytest.mark.parametrize("store", ["postgres"])
async def test_a_statement_past_the_timeout_is_service_unavailable(database_url: str) -> None:
    from app.db import create_engine
    from app.errors import StoreUnavailableError
    from app.uow import Database

    db = Database(create_engine(database_url, timeout_seconds=TIMEOUT))
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as raised:
            async with db.read() as session:
                await session.execute(text("SELECT pg_sleep(30)"))
        assert time.monotonic() - started < BOUND
        assert raised.value.__cause__ is not None  # raised from the driver's error
        async with db.read() as session:  # the pool still serves
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await db.dispose()


async def _backends(database_url: str) -> set[int]:
    """Server pids of this database's connections (other than the asking one)."""
    import asyncpg

    database = database_url.rsplit("/", 1)[1]
    connection = await asyncpg.connect(f"{PG_DSN}/{database}", timeout=5)
    try:
        rows = await connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            database)
        return {row["pid"] for row in rows}
    finally:
        await connection.close()


@pytest.mark.postgres
@pytest.mark.parametrize("store", ["postgres"])
async def test_killed_pooled_connections_are_replaced_without_an_error(
    live_server: ServerFactory, database_url: str, make_token: TokenFactory,
) -> None:
    """No pre-ping, yet a pool whose server ends were all killed (as by a restart)
    serves the next requests: a connection known closed is replaced at checkout, one
    not yet known fails its first statement, which runs again on a fresh one."""
    from app.uow import FleetSession

    token = await make_token("acme", Role.MEMBER)
    server = await live_server(db_timeout_seconds=TIMEOUT, token_cache_seconds=0)
    tally = Tally()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        # several pooled connections, each used at least once
        bodies = await asyncio.gather(*(post(http, token, CREATE, tally, t=f"warm {n}")
                                        for n in range(6)))
        assert all(answered(body) for body in bodies), bodies
        tally.created += [body["data"]["createItem"]["id"] for body in bodies if body]
        killed = await _backends(database_url)
        assert len(killed) >= 3
        await _pg_admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        f"WHERE pid IN ({', '.join(map(str, killed))})")
        deadline = time.monotonic() + BOUND
        while await _backends(database_url) & killed:  # until those backends are gone
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        retried = FleetSession.retried
        for round_ in range(3):  # one at a time, then concurrently
            body = await post(http, token, CREATE, tally, t=f"after {round_}")
            assert answered(body), body
            tally.created.append(body["data"]["createItem"]["id"])  # type: ignore[index]
            assert answered(await post(http, token, LIST, tally))
        answers = await asyncio.gather(*(post(http, token, LIST, tally) for _ in range(6)))
        assert all(answered(body) for body in answers), answers
        print(f"\nkilled={len(killed)} first statements retried="
              f"{FleetSession.retried - retried} statuses={dict(tally.statuses)}")
    assert tally.codes == Counter()
    tally.check()
    await assert_consistent(server, tally.created)


@pytest.mark.postgres
@pytest.mark.parametrize("store", ["postgres"])
async def test_only_a_first_statement_on_a_dead_connection_runs_again(database_url: str) -> None:
    """The seam is the pool's checkout event: the connection handed out is killed
    there (its backend terminated) before the session's first statement, as a server
    restart nobody noticed yet would leave it.  That statement runs again on a fresh
    connection; a connection that dies after the first statement is
    SERVICE_UNAVAILABLE, as before (nothing is run twice)."""
    from sqlalchemy import event
    from sqlalchemy.util import await_

    from app.db import create_engine
    from app.errors import StoreUnavailableError
    from app.uow import Database, FleetSession

    db = Database(create_engine(database_url, timeout_seconds=TIMEOUT))
    kill_next = [False]

    @event.listens_for(db.engine.sync_engine, "checkout")
    def kill(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if kill_next:
            kill_next.clear()
            with contextlib.suppress(Exception):
                await_(record.driver_connection.execute(
                    "SELECT pg_terminate_backend(pg_backend_pid())"))

    try:
        for work in ("read", "unit_of_work", "snapshot"):
            retried = FleetSession.retried
            kill_next[:] = [True]
            async with getattr(db, work)() as session:
                assert (await session.execute(text("SELECT 41 + 1"))).scalar_one() == 42
            assert not kill_next
            assert FleetSession.retried == retried + 1, work
        async with db.unit_of_work() as session:  # the pool serves as usual
            assert await session.scalar(text("SELECT 1")) == 1

        async def killed_after_the_first_statement() -> None:
            async with db.read() as session:
                pid = await session.scalar(text("SELECT pg_backend_pid()"))
                await _pg_admin(f"SELECT pg_terminate_backend({pid})")
                await session.execute(text("SELECT 1"))

        retried = FleetSession.retried
        with pytest.raises(StoreUnavailableError):
            await killed_after_the_first_statement()
        assert FleetSession.retried == retried
    finally:
        await db.dispose()


@pytest.mark.parametrize("store", ["sqlite"])
async def test_sqlite_units_of_work_queue_for_one_writer_connection(database_url: str) -> None:
    """SQLite: units of work have one connection of their own; many at once queue for
    it (none sees "database is locked"), reads go on while it is held, and a wait for
    it past the timeout is SERVICE_UNAVAILABLE."""
    from app.auth.models import Product
    from app.db import create_engine
    from app.errors import StoreUnavailableError
    from app.uow import Database

    db = Database(create_engine(database_url, timeout_seconds=TIMEOUT))
    try:
        async def write(n: int) -> None:
            async with db.unit_of_work() as session:
                session.add(Product(id=f"p{n}"))
                await session.flush()
                await asyncio.sleep(0)  # let the others queue meanwhile

        sent: list[str] = []  # listeners on the main engine see the writer's statements

        def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            sent.append(statement)

        sa_event.listen(db.engine.sync_engine, "before_cursor_execute", record)
        try:
            await asyncio.gather(*(write(n) for n in range(30)))
        finally:
            sa_event.remove(db.engine.sync_engine, "before_cursor_execute", record)
        assert sum(statement.startswith("INSERT INTO products") for statement in sent) == 30
        assert db.writer_engine is not None
        assert db.writer_engine.pool is not db.engine.pool
        assert db.writer_engine.pool.size() == 1  # type: ignore[attr-defined]
        async with db.read() as session:
            count = await session.scalar(select(func.count()).select_from(Product))
        assert count == 30

        async def blocked() -> None:
            async with db.unit_of_work() as session:
                session.add(Product(id="late"))

        async with db.unit_of_work() as holder:  # holds the writer connection
            holder.add(Product(id="held"))
            await holder.flush()
            async with db.read() as session:  # WAL: reads are not blocked
                assert await session.scalar(select(func.count()).select_from(Product)) == 30
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                await blocked()
            assert TIMEOUT * 0.9 <= time.monotonic() - started < BOUND
        await blocked()  # free again
        async with db.read() as session:
            assert await session.scalar(select(func.count()).select_from(Product)) == 32
    finally:
        await db.dispose()
