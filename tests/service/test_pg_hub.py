"""The PostgreSQL hub between instances (DESIGN §5, issue 4 §3).

Two runtimes built on one PostgreSQL database are two instances: separate engines,
separate hubs, separate LISTEN connections.  PostgreSQL only: LISTEN/NOTIFY has
no SQLite counterpart (on SQLite one process serves and the local hub suffices).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest

from app.auth.models import Role
from app.events.outbox import EventRecord
from app.events.pg_hub import (
    CHANNEL,
    PostgresHub,
    decode_wakeup,
    encode_wakeup,
    listen_dsn,
)
from app.events.service import JOB_STAGE_EVENTS, filter_for
from app.fleet.models import JobStage
from app.fleet.scheduler import WorkerProfile
from app.fleet.service import JobSpec
from app.main import Runtime
from tests.conftest import PG_DSN

pytestmark = pytest.mark.postgres
postgres_only = pytest.mark.parametrize("store", ["postgres"])

DEADLINE = 10.0
QUIET = 60.0  # a poll interval long enough that only NOTIFY or a reconnect can deliver


class Watcher:
    """A live job-stage stream on one runtime, read in the background."""

    def __init__(self, runtime: Runtime, product_id: str) -> None:
        self.received: asyncio.Queue[EventRecord] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._stream = runtime.services.streams.stream(
            product_id, filter_for(JOB_STAGE_EVENTS, None), on_ready=self._ready.set
        )
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for record in self._stream:
            await self.received.put(record)

    async def ready(self) -> Watcher:
        await asyncio.wait_for(self._ready.wait(), DEADLINE)
        return self

    async def take(self, count: int) -> list[EventRecord]:
        return [await asyncio.wait_for(self.received.get(), DEADLINE) for _ in range(count)]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._stream.aclose()


@pytest.fixture
async def watch() -> AsyncIterator[object]:
    watchers: list[Watcher] = []

    async def start(runtime: Runtime, product_id: str = "acme") -> Watcher:
        watcher = await Watcher(runtime, product_id).ready()
        watchers.append(watcher)
        return watcher

    yield start
    for watcher in watchers:
        await watcher.close()


def hub_of(runtime: Runtime) -> PostgresHub:
    hub = runtime.services.hub
    assert isinstance(hub, PostgresHub)
    return hub


async def submit(runtime: Runtime, product_id: str, title: str) -> int:
    async with runtime.services.db.unit_of_work() as session:
        result = await runtime.services.fleet.submit_job(
            session, product_id, JobSpec(title=title, body_md="body")
        )
        return result.job.id


async def claim(runtime: Runtime, product_id: str) -> int:
    async with runtime.services.db.unit_of_work() as session:
        job = await runtime.services.fleet.claim_next_job(
            session, product_id, WorkerProfile(worker_id="w")
        )
        assert job is not None
        return job.id


def summary(records: Sequence[EventRecord]) -> list[tuple[str, int, str | None]]:
    return [(record.cursor, record.entity_id, record.to_state) for record in records]


@postgres_only
async def test_a_change_through_one_instance_reaches_the_other_in_order(
    make_runtime, make_token, watch
):
    await make_token("acme", Role.MEMBER)
    await make_token("globex", Role.MEMBER)
    instance_a = await make_runtime(hub_poll_seconds=QUIET)
    instance_b = await make_runtime(hub_poll_seconds=QUIET)
    on_a, on_b = await watch(instance_a), await watch(instance_b)

    first = await submit(instance_a, "acme", "made on A")
    await submit(instance_a, "globex", "another product")
    second = await submit(instance_b, "acme", "made on B")
    assert await claim(instance_a, "acme") == first

    seen_on_b = await on_b.take(3)
    seen_on_a = await on_a.take(3)
    assert [(r.entity_id, r.to_state) for r in seen_on_b] == [
        (first, JobStage.QUEUED.value), (second, JobStage.QUEUED.value),
        (first, JobStage.ASSIGNED.value),
    ]
    assert [r.seq for r in seen_on_b] == [1, 2, 3]
    assert summary(seen_on_a) == summary(seen_on_b)  # identical cursors on both
    assert hub_of(instance_b).notifications_received >= 1
    assert on_b.received.empty()  # nothing of globex, nothing twice


@postgres_only
async def test_a_lost_notification_is_delivered_by_the_poll(make_runtime, make_token, watch):
    await make_token("acme", Role.MEMBER)
    instance_a = await make_runtime(hub_poll_seconds=QUIET)
    instance_b = await make_runtime(hub_poll_seconds=0.2)
    heard: list[tuple[str, int]] = []

    def lose(product_id: str, seq: int) -> None:
        heard.append((product_id, seq))  # heard, then lost before it woke anything

    hub_of(instance_b).on_wakeup = lose
    on_b = await watch(instance_b)
    job_id = await submit(instance_a, "acme", "never announced")

    [record] = await on_b.take(1)
    assert (record.entity_id, record.seq) == (job_id, 1)
    assert hub_of(instance_b).polls_that_found_news >= 1


@postgres_only
async def test_the_wakeup_is_sent_by_the_committing_transaction_only(make_runtime, make_token):
    """The NOTIFY is part of the statement that appends the event (app.events.outbox),
    so it is heard when that transaction commits — not before, and never when it
    rolls back — on the lean claim/transition path as on the general one."""
    await make_token("acme", Role.WORKER)
    await make_token("globex", Role.WORKER)
    runtime = await make_runtime(hub_poll_seconds=QUIET)
    db, fleet = runtime.services.db, runtime.services.fleet
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(listen_dsn(runtime.services.settings.database_url))
    try:
        await listener.add_listener(CHANNEL, lambda *args: heard.put_nowait(args[-1]))
        job_id = await submit(runtime, "acme", "committed")
        assert await asyncio.wait_for(heard.get(), DEADLINE) == "acme:1"

        async def claim_and_build_then_fail() -> None:
            async with db.unit_of_work() as session:
                job = await fleet.claim_next_job(session, "acme", WorkerProfile("w"))
                assert job is not None
                assert job.id == job_id
                await fleet.transition_job(session, "acme", job_id, job.lease_fence,
                                           JobStage.BUILDING)
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            await claim_and_build_then_fail()

        async with db.unit_of_work() as session:
            await fleet.submit_job(session, "globex", JobSpec(title="t", body_md="b"))
            await listener.execute("SELECT 1")  # whatever was sent has reached us
            assert heard.empty()  # not before the commit
        # Wake-ups arrive in commit order: the rolled-back acme:2 and acme:3 never were.
        assert await asyncio.wait_for(heard.get(), DEADLINE) == "globex:1"
        await listener.execute("SELECT 1")
        assert heard.empty()
    finally:
        await listener.close()


@postgres_only
async def test_events_missed_while_not_listening_arrive_after_reconnect(
    make_runtime, make_token, watch
):
    await make_token("acme", Role.MEMBER)
    instance_a = await make_runtime(hub_poll_seconds=QUIET)
    instance_b = await make_runtime(hub_poll_seconds=QUIET)
    hub_b = hub_of(instance_b)
    hub_b.on_wakeup = lambda product_id, seq: None  # deaf until it reconnects
    on_b = await watch(instance_b)
    job_id = await submit(instance_a, "acme", "committed while B was deaf")
    assert on_b.received.empty()

    # Cut B's LISTEN connection from the server side; B must reconnect and catch up.
    pid = hub_b.listener_pid
    assert pid is not None
    admin = await asyncpg.connect(f"{PG_DSN}/postgres")
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()

    [record] = await on_b.take(1)
    assert record.entity_id == job_id
    assert hub_b.connections_opened == 2
    assert hub_b.listener_pid not in (None, pid)

    # and it listens again: a normally announced change arrives without a poll
    hub_b.on_wakeup = hub_b.wake_for
    second = await submit(instance_a, "acme", "announced again")
    assert [r.entity_id for r in await on_b.take(1)] == [second]


@postgres_only
async def test_a_subscriber_that_joins_late_gets_only_new_events(make_runtime, make_token, watch):
    await make_token("acme", Role.MEMBER)
    instance_a = await make_runtime(hub_poll_seconds=QUIET)
    instance_b = await make_runtime(hub_poll_seconds=QUIET)
    for n in range(3):
        await submit(instance_a, "acme", f"before anyone listened {n}")

    on_b = await watch(instance_b)
    late = await submit(instance_a, "acme", "after")
    [record] = await on_b.take(1)
    assert (record.entity_id, record.seq) == (late, 4)


def test_wakeup_payload_and_dsn() -> None:
    assert decode_wakeup(encode_wakeup("team:a", 42)) == ("team:a", 42)
    assert decode_wakeup("garbage") is None
    assert decode_wakeup("acme:-1") is None
    assert listen_dsn("postgresql+asyncpg://u:p@h:5/db") == "postgresql://u:p@h:5/db"


@postgres_only
async def test_a_wake_up_reads_at_once_unless_this_instance_publishes_the_product(
    make_runtime, make_token, watch
):
    await make_token("acme", Role.MEMBER)
    instance_a = await make_runtime(hub_poll_seconds=QUIET)
    instance_b = await make_runtime(hub_poll_seconds=QUIET)
    on_a, on_b = await watch(instance_a), await watch(instance_b)
    await submit(instance_a, "acme", "made on A")  # A publishes acme's events itself
    await on_a.take(1)
    await on_b.take(1)
    hub_a, hub_b = hub_of(instance_a), hub_of(instance_b)
    ahead = (hub_b.delivered("acme") or 0) + 1
    assert hub_a.delivered("acme") == ahead - 1

    # B commits nothing to acme: a wake-up is another instance's, read at once
    # (no grace to wait out on every cross-instance delivery).
    hub_b.wake_for("acme", ahead)
    assert "acme" in hub_b._pending
    # A published acme's events a moment ago: its wake-up may be its own commit's,
    # whose events it is about to publish itself, so it waits for the grace first.
    hub_a.wake_for("acme", ahead)
    assert "acme" not in hub_a._pending
