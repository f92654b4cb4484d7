"""An echo's decisions and writes, inside the unit of work that read its rows under
lock (DESIGN §4): `apply_echoes` decides each echo by the rules (`mapping.decide_echo`)
and writes what it decided; the item write goes through a seam (`ItemEchoWriter`) so
that a fault can be injected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.bridge.echo_rows import EchoRow
from app.bridge.echo_writes import (
    EchoRecord,
    record_echoes,
    write_bridge_status,
    write_onto_item,
)
from app.bridge.mapping import (
    EchoPlan,
    JobFigures,
    decide_echo,
    echo_comment,
    item_status_for_stage,
    same_status_move,
)
from app.db import utcnow
from app.errors import FleetError
from app.events.models import EventType
from app.events.outbox import EventRecord
from app.fleet.models import JobStage
from app.fleet.statements import KEYS
from app.tracker.models import CommentKind, ItemStatus

if TYPE_CHECKING:
    from app.fleet.changes import EchoSeen

SYSTEM_AUTHOR = "fleetbridge"


@dataclass(frozen=True, slots=True)
class EchoTarget:
    """The item an echo writes onto, as the echo read it under the item's row lock, and
    the echo's record for its job, which the item write stores with it."""

    id: int
    product_id: str
    status: ItemStatus
    record: EchoRecord | None = None


class ItemEchoWriter(Protocol):
    """The echo's item-writing step: it sets `status` (None: leaves the status as it
    is) and adds `comment` on `item`, and stores `item.record` on the job — all of which
    `write_status_and_comment` does; a seam that injects a fault wraps it."""

    async def __call__(
        self, session: AsyncSession, item: EchoTarget, status: ItemStatus | None, comment: str
    ) -> None: ...


async def write_status_and_comment(
    session: AsyncSession, item: EchoTarget, status: ItemStatus | None, comment: str
) -> None:
    """Set the item's status (`None`: leave it as it is), recorded as the status the
    bridge owns, and add the metrics comment, with the events of both, and the job's
    echo record (`item.record`): one statement on PostgreSQL
    (`write_onto_item`)."""
    await write_onto_item(
        session, item.product_id, item.id, previous=item.status,
        status=status if status != item.status else None, body=comment,
        author=SYSTEM_AUTHOR, kind=CommentKind.SYSTEM, now=utcnow(), record=item.record,
    )


@dataclass(slots=True)
class ItemSeen:
    """An item's status as the echoes of one unit of work have left it so far."""

    status: ItemStatus
    bridge_status: ItemStatus | None


async def apply_echoes(
    session: AsyncSession, product_id: str,
    echoes: Sequence[tuple[EchoRow, JobStage]], writer: ItemEchoWriter,
) -> list[ItemStatus | None]:
    """Write the echoes of `echoes` with `writer` (each a row read under lock and the stage to
    echo), in order, and record them on their jobs; return the status each set on
    its item (None: none).  Echoes of one item see what the earlier ones decided.

    Everything is decided first; then the records of jobs whose echo writes nothing
    on the item and the bridge's take-backs of a status are written, and the item
    writes (each with its events and its job's record) last: appending
    an event locks the product's row until commit (it orders the product's
    events), and every other change of the product waits for that lock, so it is
    held for the commit's round trip only.  (A take-back never follows a status
    write of the same item in one batch: the item then shows the bridge's own
    status.)"""
    items: dict[int, ItemSeen] = {}
    records: list[EchoRecord] = []
    take_backs: list[tuple[int, ItemStatus | None]] = []
    writes: list[tuple[EchoTarget, ItemStatus | None, str]] = []
    echoed: list[ItemStatus | None] = []
    for row, stage in echoes:
        item = items.setdefault(row.item_id, ItemSeen(row.item_status, row.bridge_status))
        plan = decide(row, stage, item)
        if plan is None:
            echoed.append(None)
            continue
        bridge_status = item.bridge_status
        status = item_status_for_stage(stage)
        record = EchoRecord(
            row.job_id, stage, status if status is not None else row.last_echoed_status
        )
        if plan.comment:  # the item write stores the job's record too
            comment = echo_comment(figures(row, stage), plan.set_status, utcnow())
            writes.append((EchoTarget(row.item_id, product_id, item.status, record),
                           plan.set_status, comment))
            if plan.set_status is not None:  # the writer records it as the bridge's
                item.status = bridge_status = plan.set_status
        else:
            records.append(record)
        if plan.bridge_status != bridge_status:
            take_backs.append((row.item_id, plan.bridge_status))
        item.bridge_status = plan.bridge_status
        echoed.append(plan.set_status)
    await record_echoes(session, product_id, records)
    for item_id, bridge_status in take_backs:
        await write_bridge_status(session, product_id, item_id,
                                                    bridge_status)
    for target, status, comment in writes:
        await writer(session, target, status, comment)
    return echoed


def decide(
    row: EchoRow, stage: JobStage, item: ItemSeen
) -> EchoPlan | None:
    """`mapping.decide_echo` for a row read by `echo_rows`, with `item` as seen now."""
    return decide_echo(
        stage=stage, job_stage=row.stage, echoed_stage=row.echoed_stage,
        job_last_status=row.last_echoed_status,
        retry_pending=row.echo_attempts > 0 or row.echo_retry_at is not None
        or row.echo_retry_stage is not None,
        item_status=item.status, bridge_status=item.bridge_status, latest=row.latest,
    )


def figures(row: EchoRow, stage: JobStage) -> JobFigures:
    return JobFigures(
        job_id=row.job_id,
        stage=stage,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        started_at=row.started_at,
        finished_at=row.finished_at,
        cost_usd=row.cost_usd,
        tokens_in=row.tokens_in,
        tokens_out=row.tokens_out,
    )


@dataclass(slots=True)
class Probe:
    """One commit's jobs of one product whose moves stay within one item status, and
    those among them whose echo has nothing to write (`BridgeService._nothing_to_write`)."""

    product_id: str
    job_ids: list[int]
    done: set[int] = field(default_factory=set)

    def decide(self, rows: Sequence[EchoRow]) -> None:
        """`done` from the rows read for `job_ids`: a job with no item, and the jobs of
        items none of whose jobs here has anything to write."""
        linked = {row.job_id for row in rows}
        busy = {
            row.item_id for row in rows
            if decide(row, row.stage, ItemSeen(row.item_status, row.bridge_status)) is not None
        }
        self.done = {job_id for job_id in self.job_ids if job_id not in linked} | {
            row.job_id for row in rows if row.item_id not in busy}


def echo_error(exc: Exception) -> str:
    """What a client is told about a failed echo: our own errors' messages, otherwise
    only the kind of failure, never a driver's exception class or text (the details
    are logged)."""
    if isinstance(exc, FleetError):
        kind = exc.message
    elif isinstance(exc, IntegrityError):
        kind = "the write conflicted with stored data"
    elif isinstance(exc, DBAPIError | OSError | TimeoutError):
        kind = "the database was unavailable"
    else:
        kind = "an unexpected error"
    return f"the item could not be updated ({kind}); the echo will be retried"


_KEY = {key: index for index, key in enumerate(KEYS)}


def seen_row(seen: EchoSeen) -> EchoRow:
    """The `EchoRow` of what a stage change's statement read (`EchoSeen`)."""
    job = seen.job

    def of(key: str) -> Any:
        return job[_KEY[key]]

    return EchoRow(
        product_id=of("product_id"), job_id=of("id"), item_id=of("tracker_item_id"),
        item_status=ItemStatus(seen.item_status),
        bridge_status=None if seen.bridge_status is None else ItemStatus(seen.bridge_status),
        latest=seen.latest, stage=of("stage"), echoed_stage=of("echoed_stage"),
        last_echoed_status=of("last_echoed_status"), echo_attempts=of("echo_attempts"),
        echo_retry_at=of("echo_retry_at"), echo_retry_stage=of("echo_retry_stage"),
        attempts=of("attempts"), max_attempts=of("max_attempts"),
        started_at=of("started_at"), finished_at=of("finished_at"),
        cost_usd=of("cost_usd"), tokens_in=of("tokens_in"), tokens_out=of("tokens_out"))


def nothing_to_write_seen(
    records: Sequence[EventRecord], product_id: str, job_ids: Sequence[int]
) -> set[int]:
    """Of `job_ids` (jobs of `product_id`), those whose last stage change in `records`
    carries what its own statement read of the job's item (`EventRecord.seen`,
    FLEET_TRACKER_ECHO on) and whose echo, decided on that (`decide`), writes nothing:
    settled without any read, as the probe's unlocked read settles them
    (`BridgeService._nothing_to_write`, whose argument holds: nothing is written, and
    a move the read did not see gets its own echo from its own commit)."""
    wanted = set(job_ids)
    last: dict[int, EchoSeen | None] = {}
    for record in records:
        if (record.type == EventType.JOB_STAGE_CHANGED and record.product_id == product_id
                and record.entity_id in wanted):
            last[record.entity_id] = record.seen
    settled: set[int] = set()
    for job_id, seen in last.items():
        if seen is None:
            continue
        row = seen_row(seen)
        if decide(row, row.stage, ItemSeen(row.item_status, row.bridge_status)) is None:
            settled.add(job_id)
    _SETTLED[0] += len(settled)
    return settled


_SETTLED = [0]


def settled_count() -> int:
    """Echoes settled by `nothing_to_write_seen` in this process (tests, diagnostics)."""
    return _SETTLED[0]


def same_status_event(record: EventRecord) -> bool:
    """The event is a job's move within one item status (`mapping.same_status_move`)."""
    if record.type != EventType.JOB_STAGE_CHANGED or not record.from_state:
        return False
    try:
        return same_status_move(JobStage(record.from_state), JobStage(record.to_state or ""))
    except ValueError:
        return False
