"""The tracker bridge at the service level (both stores): ingest, label hints, the
echo of job stages onto items, its fault tolerance and the echo sweeper.

Faults are injected only at the bridge's item-writing seam (`echo_writer`).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.models import Role
from app.bridge.service import EchoResult, IngestOptions, write_status_and_comment
from app.db import utcnow
from app.errors import BadUserInputError, NotFoundError
from app.events.models import Event, EventType
from app.fleet.models import Job, JobStage, Priority
from app.fleet.scheduler import WorkerProfile
from app.fleet.service import MetricsDelta, SubmitOutcome, SubmitResult
from app.main import Runtime
from app.tracker import service as tracker_service
from app.tracker.models import Comment, CommentKind, Item, ItemStatus
from app.tracker.service import ItemChanges, NewItem

PRODUCT = "acme"
OTHER_PRODUCT = "globex"
MAC_CODER = WorkerProfile(
    "mac-coder", capabilities=frozenset({"os:mac"}), engine_classes=frozenset({"agentic-coder"})
)
SECRET = "sk-THIS-MUST-NOT-LEAK"
DESCRIPTION = (
    "## Plan\n\n- rotate the key `" + SECRET + "` **today**\n"
    "- naïve café — 日本語 ✓ 🚀\n\ttabbed line   \n\n"
)
LABELS = ("engine-class:agentic-coder", "priority:high", "cap:os:mac")


class CountingWriter:
    """The real item writer behind a seam that counts calls and fails the first
    `failures` of them."""

    def __init__(self, failures: int = 0) -> None:
        self.calls = 0
        self.failures = failures

    async def __call__(
        self, session: AsyncSession, item: Item, status: ItemStatus, comment: str
    ) -> None:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("the tracker is down")
        await write_status_and_comment(session, item, status, comment)


@pytest.fixture
async def start(make_runtime: Any, make_token: Any) -> Any:
    """`await start(**settings)`: a runtime over a store holding both products."""
    await make_token(PRODUCT, Role.MEMBER)
    await make_token(OTHER_PRODUCT, Role.MEMBER)
    return make_runtime


async def new_item(rt: Runtime, **fields: Any) -> Item:
    fields.setdefault("title", "Ship the thing")
    fields["labels"] = tuple(fields.get("labels", ()))
    async with rt.services.db.unit_of_work() as session:
        return await tracker_service.create_item(session, PRODUCT, NewItem(**fields))


async def ingest(rt: Runtime, item_id: int, product: str = PRODUCT,
                 options: IngestOptions | None = None) -> SubmitResult:
    async with rt.services.db.unit_of_work() as session:
        return await rt.services.bridge.ingest_item(
            session, product, item_id, options or IngestOptions()
        )


async def claim(rt: Runtime, worker: WorkerProfile = MAC_CODER,
                product: str = PRODUCT) -> Job | None:
    async with rt.services.db.unit_of_work() as session:
        return await rt.services.fleet.claim_next_job(session, product, worker)


async def move(rt: Runtime, job: Job, to: JobStage, **options: Any) -> Job:
    async with rt.services.db.unit_of_work() as session:
        return await rt.services.fleet.transition_job(
            session, PRODUCT, job.id, job.lease_fence, to, **options
        )


async def linked_jobs(rt: Runtime, item_id: int) -> list[int]:
    async with rt.services.db.read() as session:
        page = await rt.services.fleet.list_jobs(session, PRODUCT, tracker_item_id=item_id)
    return [job.id for job in page.nodes]


async def load_job(rt: Runtime, job_id: int) -> Job:
    async with rt.services.db.read() as session:
        return await rt.services.fleet.get_job(session, PRODUCT, job_id)


async def comments(rt: Runtime, item_id: int) -> list[Comment]:
    async with rt.services.db.read() as session:
        page = await tracker_service.list_comments(session, PRODUCT, item_id, first=100,
                                                   after=None)
    return list(page.nodes)


async def event_counts(rt: Runtime) -> Counter[EventType]:
    async with rt.services.db.read() as session:
        rows = (await session.execute(
            select(Event.type, func.count()).group_by(Event.type))).all()
    return Counter({row[0]: int(row[1]) for row in rows})


async def status_changes(rt: Runtime, item_id: int) -> list[tuple[str | None, str | None]]:
    async with rt.services.db.read() as session:
        rows = (await session.execute(
            select(Event.from_state, Event.to_state)
            .where(Event.type == EventType.ITEM_STATUS_CHANGED, Event.entity_id == item_id)
            .order_by(Event.seq))).all()
    return [(row[0], row[1]) for row in rows]


class ItemState(NamedTuple):
    status: ItemStatus
    updated_at: datetime
    comments: int


async def item_state(rt: Runtime, item_id: int) -> ItemState:
    async with rt.services.db.read() as session:
        item = await tracker_service.get_item(session, PRODUCT, item_id)
    return ItemState(item.status, item.updated_at, len(await comments(rt, item_id)))


async def job_state(rt: Runtime, job_id: int) -> tuple[Any, ...]:
    job = await load_job(rt, job_id)
    return job.stage, job.lease_fence, job.attempts, job.updated_at, job.last_echoed_status


async def test_ingest_creates_one_claimable_job_with_the_description_verbatim(start: Any) -> None:
    rt: Runtime = await start()
    item = await new_item(rt, description=DESCRIPTION)
    result = await ingest(rt, item.id)
    assert result.outcome == SubmitOutcome.CREATED

    job = await load_job(rt, result.job.id)
    assert job.body_md == DESCRIPTION
    assert (job.tracker_item_id, job.idempotency_key, job.title) == (
        item.id, f"tracker-{item.id}", "Ship the thing")
    assert await linked_jobs(rt, item.id) == [job.id]

    untitled = await new_item(rt, title="Only a title")
    assert (await ingest(rt, untitled.id)).job.body_md == "Only a title"

    claimed = await claim(rt, WorkerProfile("plain"))
    assert claimed is not None
    assert (claimed.id, claimed.stage) == (job.id, JobStage.ASSIGNED)


async def test_label_hints_map_to_the_job_and_gate_the_claim(start: Any) -> None:
    rt: Runtime = await start()
    item = await new_item(rt, labels=[*LABELS, "frontend"])
    job = (await ingest(rt, item.id)).job
    assert (job.engine_class, job.priority, job.capabilities) == (
        "agentic-coder", Priority.HIGH, ["os:mac"])

    no_mac = WorkerProfile("linux", capabilities=frozenset({"os:linux"}),
                           engine_classes=frozenset({"agentic-coder"}))
    wrong_engine = WorkerProfile("mac-reviewer", capabilities=frozenset({"os:mac"}),
                                 engine_classes=frozenset({"reviewer"}))
    assert await claim(rt, no_mac) is None
    assert await claim(rt, wrong_engine) is None
    claimed = await claim(rt, MAC_CODER)
    assert claimed is not None
    assert claimed.id == job.id

    # explicit options override what the labels say
    item = await new_item(rt, labels=[*LABELS, "profile:fast"])
    options = IngestOptions(priority=Priority.LOW, capabilities=("gpu",),
                            engine_class="reviewer", profile="thorough", kind="review",
                            max_attempts=5, budget=2.5)
    job = (await ingest(rt, item.id, options=options)).job
    assert (job.priority, job.capabilities, job.engine_class, job.profile) == (
        Priority.LOW, ["gpu"], "reviewer", "thorough")
    assert (job.kind, job.max_attempts, job.budget) == ("review", 5, 2.5)


async def test_unknown_priority_label_is_bad_input_and_writes_nothing(start: Any) -> None:
    rt: Runtime = await start()
    item = await new_item(rt, labels=["cap:os:mac", "priority:asap"])
    before = await event_counts(rt)
    with pytest.raises(BadUserInputError, match="priority:asap") as raised:
        await ingest(rt, item.id)
    assert raised.value.extensions["code"] == "BAD_USER_INPUT"
    assert await event_counts(rt) == before
    assert await linked_jobs(rt, item.id) == []


async def test_ingesting_the_same_item_twice_dedupes(start: Any) -> None:
    rt: Runtime = await start()
    item = await new_item(rt, labels=LABELS)
    first = await ingest(rt, item.id)
    counts = await event_counts(rt)
    second = await ingest(rt, item.id)
    assert (first.outcome, second.outcome) == (SubmitOutcome.CREATED, SubmitOutcome.DEDUPED)
    assert second.job.id == first.job.id
    assert await event_counts(rt) == counts
    assert await linked_jobs(rt, item.id) == [first.job.id]


async def test_echo_round_trip_moves_the_item_with_metrics_only_comments(start: Any) -> None:
    writer = CountingWriter()
    rt: Runtime = await start(tracker_echo=True, echo_writer=writer)
    item = await new_item(rt, description=DESCRIPTION, labels=LABELS)
    job = (await ingest(rt, item.id)).job
    assert (await item_state(rt, item.id)).status == ItemStatus.IN_PROGRESS

    lease = await claim(rt)
    assert lease is not None
    building = await move(rt, lease, JobStage.BUILDING)
    assert building.stage == JobStage.BUILDING
    assert (await item_state(rt, item.id)).comments == 1  # still IN_PROGRESS: no new note
    await move(rt, lease, JobStage.SHIPPED,
               metrics=MetricsDelta(cost_usd=0.25, tokens_in=1000, tokens_out=200))

    state = await item_state(rt, item.id)
    assert (state.status, state.comments) == (ItemStatus.DONE, 2)
    assert await status_changes(rt, item.id) == [("TODO", "IN_PROGRESS"), ("IN_PROGRESS", "DONE")]
    assert (await load_job(rt, job.id)).last_echoed_status == ItemStatus.DONE
    notes = await comments(rt, item.id)
    assert all(note.kind == CommentKind.SYSTEM for note in notes)
    leaks = (DESCRIPTION.strip(), SECRET, "naïve café", "Plan")
    assert not [text for note in notes for text in leaks if text in note.body]
    assert "IN_PROGRESS" in notes[0].body
    assert "DONE" in notes[1].body
    assert "$0.2500" in notes[1].body
    assert "1000 in / 200 out" in notes[1].body
    assert writer.calls == 2  # QUEUED → IN_PROGRESS, SHIPPED → DONE


async def test_re_echo_of_an_unchanged_stage_writes_nothing(start: Any) -> None:
    writer = CountingWriter()
    rt: Runtime = await start(tracker_echo=True, echo_writer=writer)
    job = (await ingest(rt, (item := await new_item(rt, labels=LABELS)).id)).job
    lease = await claim(rt)
    assert lease is not None
    await move(rt, lease, JobStage.SHIPPED)
    before = (await item_state(rt, item.id), await job_state(rt, job.id), await event_counts(rt))
    calls = writer.calls

    result = await rt.services.bridge.echo_job(PRODUCT, job.id)
    assert (result.echoed, result.error, writer.calls) == (None, None, calls)
    assert before == (await item_state(rt, item.id), await job_state(rt, job.id),
                      await event_counts(rt))


async def test_failed_job_blocks_the_item_with_a_note(start: Any) -> None:
    rt: Runtime = await start(tracker_echo=True)
    item = await new_item(rt, labels=LABELS)
    await ingest(rt, item.id)
    lease = await claim(rt)
    assert lease is not None
    failed = await move(rt, lease, JobStage.FAILED, reason="compiler exploded", retryable=False)
    assert failed.stage == JobStage.FAILED

    state = await item_state(rt, item.id)
    assert state.status == ItemStatus.BLOCKED
    note = (await comments(rt, item.id))[-1]
    assert note.kind == CommentKind.SYSTEM
    assert "BLOCKED" in note.body
    assert "FAILED" in note.body


async def test_a_failing_item_write_never_fails_or_touches_the_transition(start: Any) -> None:
    writer = CountingWriter()
    rt: Runtime = await start(tracker_echo=True, echo_writer=writer)
    item = await new_item(rt, labels=LABELS)
    job = (await ingest(rt, item.id)).job  # this echo succeeds: IN_PROGRESS
    lease = await claim(rt)
    assert lease is not None
    await move(rt, lease, JobStage.BUILDING)
    item_before = await item_state(rt, item.id)
    assert (item_before.status, item_before.comments) == (ItemStatus.IN_PROGRESS, 1)

    writer.failures = 1_000
    calls = writer.calls
    shipped = await move(rt, lease, JobStage.SHIPPED, metrics=MetricsDelta(cost_usd=0.5))
    assert shipped.stage == JobStage.SHIPPED
    assert writer.calls == calls + 1  # the echo ran, and failed
    expected = (JobStage.SHIPPED, lease.lease_fence, 1, shipped.updated_at,
                ItemStatus.IN_PROGRESS)
    assert await job_state(rt, job.id) == expected
    assert await item_state(rt, item.id) == item_before

    result = await rt.services.bridge.echo_job(PRODUCT, job.id)
    assert isinstance(result, EchoResult)
    assert (result.echoed, type(result.error)) == (None, str)
    assert "an unexpected error" in str(result.error)  # the kind of failure only
    assert "RuntimeError" not in str(result.error)  # no exception class names
    assert "the tracker is down" not in str(result.error)  # internals stay in the log
    assert writer.calls == calls + 2
    assert await job_state(rt, job.id) == expected
    assert await item_state(rt, item.id) == item_before


async def test_with_echo_off_a_full_cycle_writes_nothing_to_the_item(start: Any) -> None:
    writer = CountingWriter()
    rt: Runtime = await start(echo_writer=writer)  # FLEET_TRACKER_ECHO defaults off
    assert rt.services.settings.tracker_echo is False
    item = await new_item(rt, labels=LABELS, description=DESCRIPTION)
    item_before = await item_state(rt, item.id)
    job = (await ingest(rt, item.id)).job
    lease = await claim(rt)
    assert lease is not None
    await move(rt, lease, JobStage.BUILDING)
    await move(rt, lease, JobStage.SHIPPED, metrics=MetricsDelta(cost_usd=1.0))

    assert writer.calls == 0
    assert await item_state(rt, item.id) == item_before
    counts = await event_counts(rt)
    assert counts[EventType.ITEM_STATUS_CHANGED] == counts[EventType.COMMENT_ADDED] == 0
    assert (await load_job(rt, job.id)).last_echoed_status is None
    assert await rt.loops.sweep_echoes_once() == 0  # no retries are pending either
    assert writer.calls == 0

    # the manual echo works either way, and goes through the counted seam
    result = await rt.services.bridge.echo_job(PRODUCT, job.id)
    assert (result.echoed, writer.calls) == (ItemStatus.DONE, 1)
    assert (await item_state(rt, item.id)).status == ItemStatus.DONE


async def test_echo_never_reopens_a_cancelled_item_and_a_cancelled_job_writes_no_status(
    start: Any,
) -> None:
    writer = CountingWriter()
    rt: Runtime = await start(tracker_echo=True, echo_writer=writer)
    item = await new_item(rt, labels=LABELS)
    job = (await ingest(rt, item.id)).job
    # the tracker alone (not through the bridge, which would cancel the job too)
    async with rt.services.db.unit_of_work() as session:
        await tracker_service.update_item(session, PRODUCT, item.id,
                                          ItemChanges(status=ItemStatus.CANCELLED))
    cancelled = await item_state(rt, item.id)
    calls = writer.calls

    lease = await claim(rt)
    assert lease is not None
    await move(rt, lease, JobStage.BUILDING)  # no comment: nothing to say on a closed item
    assert writer.calls == calls
    await move(rt, lease, JobStage.SHIPPED)  # the final figures still arrive, once
    assert (await rt.services.bridge.echo_job(PRODUCT, job.id)).echoed is None
    assert await rt.loops.sweep_echoes_once() == 0
    after = await item_state(rt, item.id)
    assert (after.status, after.comments) == (ItemStatus.CANCELLED, cancelled.comments + 1)
    assert await status_changes(rt, item.id) == [("TODO", "IN_PROGRESS"),
                                                 ("IN_PROGRESS", "CANCELLED")]
    assert writer.calls == calls + 1

    # a CANCELLED job writes no status, only its final comment
    other = await new_item(rt, title="another")
    other_job = (await ingest(rt, other.id)).job
    before = await item_state(rt, other.id)
    assert (before.status, writer.calls) == (ItemStatus.IN_PROGRESS, calls + 2)
    async with rt.services.db.unit_of_work() as session:
        await rt.services.fleet.cancel_job(session, PRODUCT, other_job.id)
    assert (await rt.services.bridge.echo_job(PRODUCT, other_job.id)).echoed is None
    after = await item_state(rt, other.id)
    assert (after.status, after.comments) == (ItemStatus.IN_PROGRESS, before.comments + 1)
    assert (await load_job(rt, other_job.id)).last_echoed_status == ItemStatus.IN_PROGRESS
    assert "CANCELLED" in (await comments(rt, other.id))[-1].body
    assert writer.calls == calls + 3


async def test_another_product_cannot_ingest_or_echo_ours(start: Any) -> None:
    rt: Runtime = await start(tracker_echo=True)
    item = await new_item(rt, labels=LABELS)
    job = (await ingest(rt, item.id)).job
    item_before, counts = await item_state(rt, item.id), await event_counts(rt)

    with pytest.raises(NotFoundError):
        await ingest(rt, item.id, product=OTHER_PRODUCT)
    with pytest.raises(NotFoundError):
        await rt.services.bridge.echo_job(OTHER_PRODUCT, job.id)
    foreign = WorkerProfile("foreign", MAC_CODER.capabilities, MAC_CODER.engine_classes)
    assert await claim(rt, foreign, product=OTHER_PRODUCT) is None
    assert await item_state(rt, item.id) == item_before
    assert await event_counts(rt) == counts


async def _sweep_until(rt: Runtime, job_id: int, item_id: int, status: ItemStatus) -> int:
    """Run sweeper passes (bounded) until the item shows `status`; return the passes.

    Each pass first checks that the stored backoff is respected, then lets it run
    out without sleeping by moving the job's `echo_retry_at` into the past (the
    only column the test touches; it is what the sweeper reads to pick work)."""
    for passes in range(1, 11):
        job = await load_job(rt, job_id)
        assert job.echo_retry_at is not None
        assert job.echo_retry_at > utcnow()  # backing off: a pass now does nothing
        assert await rt.loops.sweep_echoes_once() == 0
        async with rt.services.db.unit_of_work() as session:
            await session.execute(update(Job).where(Job.id == job_id).values(
                echo_retry_at=utcnow() - timedelta(seconds=1)))
        await rt.loops.sweep_echoes_once()
        if (await item_state(rt, item_id)).status == status:
            return passes
    raise AssertionError(f"the echo sweeper did not converge to {status}")


async def test_echo_sweeper_converges_after_item_write_failures(start: Any) -> None:
    writer = CountingWriter(failures=4)
    rt: Runtime = await start(tracker_echo=True, echo_writer=writer)
    item = await new_item(rt, labels=LABELS, description=DESCRIPTION)
    job = (await ingest(rt, item.id)).job  # echo 1 fails
    lease = await claim(rt)  # echo 2 fails
    assert lease is not None
    await move(rt, lease, JobStage.BUILDING)  # echo 3 fails
    assert (await item_state(rt, item.id)).status == ItemStatus.TODO
    job_before = (await job_state(rt, job.id))[:4]

    assert await _sweep_until(rt, job.id, item.id, ItemStatus.IN_PROGRESS) == 2  # 4 fails
    assert (await job_state(rt, job.id))[:4] == job_before

    writer.failures = 2
    await move(rt, lease, JobStage.SHIPPED, metrics=MetricsDelta(cost_usd=0.5))  # fails
    job_before = (await job_state(rt, job.id))[:4]
    assert await _sweep_until(rt, job.id, item.id, ItemStatus.DONE) == 2  # one more fails

    calls = writer.calls
    assert await rt.loops.sweep_echoes_once() == 0  # converged: nothing left to do
    assert writer.calls == calls
    stored = await load_job(rt, job.id)
    assert (stored.last_echoed_status, stored.echo_retry_at) == (ItemStatus.DONE, None)
    assert (await job_state(rt, job.id))[:4] == job_before
    assert job_before[:3] == (JobStage.SHIPPED, lease.lease_fence, 1)
    notes = await comments(rt, item.id)
    assert [note.kind for note in notes] == [CommentKind.SYSTEM] * 2
    assert await status_changes(rt, item.id) == [("TODO", "IN_PROGRESS"), ("IN_PROGRESS", "DONE")]
    assert all(SECRET not in note.body for note in notes)
