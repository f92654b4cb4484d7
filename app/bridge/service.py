"""The tracker bridge: an item becomes a job, a job's progress is echoed onto its item.

Ingest runs inside the caller's unit of work, through `FleetService.submit_job`.
An echo is downstream and best-effort: it always runs in a unit of work of its own,
after the job's change has committed, and a failure to write the item is logged,
returned as `EchoResult(echoed=None, error=…)` and retried later by the sweeper.
It never raises into, or undoes, the job's lifecycle.

The item-writing step is a seam (`ItemEchoWriter`) so that a fault can be injected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Protocol

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.bridge import steering
from app.bridge.mapping import JobFigures, echo_comment, item_status_for_stage, plan_echo
from app.bridge.steering import IngestOptions as IngestOptions
from app.bridge.steering import job_spec_for_item as job_spec_for_item
from app.db import utcnow
from app.errors import FleetError, NotFoundError
from app.events.models import EventType
from app.events.outbox import EventRecord
from app.fleet import repository as fleet_repository
from app.fleet.models import Job, JobStage
from app.fleet.service import FleetService, SubmitResult
from app.fleet.stages import is_terminal
from app.tracker import repository as tracker_repository
from app.tracker import service as tracker_service
from app.tracker.models import CommentKind, Item, ItemStatus
from app.tracker.service import ItemChanges, NewItem
from app.uow import Database

logger = logging.getLogger(__name__)

SYSTEM_AUTHOR = "fleetbridge"
_JOB_EVENTS = frozenset({EventType.JOB_CREATED, EventType.JOB_STAGE_CHANGED})


@dataclass(frozen=True, slots=True)
class EchoResult:
    echoed: ItemStatus | None
    error: str | None
    item: Item | None


class ItemEchoWriter(Protocol):
    async def __call__(
        self, session: AsyncSession, item: Item, status: ItemStatus | None, comment: str
    ) -> None: ...


async def write_status_and_comment(
    session: AsyncSession, item: Item, status: ItemStatus | None, comment: str
) -> None:
    """Set the item's status (`None`: leave it as it is) and add the metrics comment."""
    if status is not None:
        await tracker_service.set_status(session, item, status)
    await tracker_service.add_comment(
        session, item.product_id, item.id, body=comment, author=SYSTEM_AUTHOR,
        kind=CommentKind.SYSTEM,
    )


class BridgeService:
    def __init__(
        self,
        db: Database,
        fleet: FleetService,
        *,
        echo_writer: ItemEchoWriter = write_status_and_comment,
        retry_base_seconds: float = 5.0,
        retry_max_seconds: float = 300.0,
        auto_ingest_label: str = "",
    ) -> None:
        self.db = db
        self.fleet = fleet
        self.auto_ingest_label = auto_ingest_label
        self.echo_writer = echo_writer
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        # Called once per failed echo (app.metrics counts them).
        self.on_echo_failure: Callable[[], None] | None = None

    async def ingest_item(
        self, session: AsyncSession, product_id: str, item_id: int, options: IngestOptions
    ) -> SubmitResult:
        """`ingestItemAsJob` (see `app.bridge.steering.ingest_item`)."""
        return await steering.ingest_item(session, self.fleet, product_id, item_id, options)

    async def create_item(
        self, session: AsyncSession, product_id: str, new: NewItem,
        *, labels_field: str = "labels",
    ) -> Item:
        """`createItem` with its auto-ingest (see `app.bridge.steering.create_item`)."""
        return await steering.create_item(
            session, self.fleet, product_id, new, auto_ingest_label=self.auto_ingest_label,
            labels_field=labels_field,
        )

    async def update_item(
        self, session: AsyncSession, product_id: str, item_id: int, changes: ItemChanges,
        *, labels_field: str = "labels",
    ) -> Item:
        """`updateItem` with what it causes in the fleet (cancel, auto-ingest; see
        `app.bridge.steering.update_item`)."""
        return await steering.update_item(
            session, self.fleet, product_id, item_id, changes,
            auto_ingest_label=self.auto_ingest_label, labels_field=labels_field,
        )

    async def echo_job(
        self, product_id: str, job_id: int, stage: JobStage | None = None
    ) -> EchoResult:
        """Echo a job's stage (`stage`, default its current one) onto its item, in a
        transaction of its own, by DESIGN §4's echo rules (`mapping.plan_echo`).

        `echoed` is the status set on the item (None when none was: nothing to
        change, or a person's status wins).  A failure to write the item is logged,
        returned as `error` and retried later by the sweeper for the stage attempted.
        Raises NOT_FOUND for a job not in `product_id`.
        """
        attempted = stage
        try:
            async with self.db.unit_of_work() as session:
                job = await fleet_repository.get_job(session, product_id, job_id)
                if job is None:
                    raise NotFoundError("job", job_id)
                attempted = stage or job.stage
                return await self._echo(session, job, attempted)
        except NotFoundError:
            raise
        except Exception as exc:
            logger.warning("echo of job %s onto its item failed: %s", job_id, exc, exc_info=True)
            if self.on_echo_failure is not None:
                self.on_echo_failure()
            await self._schedule_retry(product_id, job_id, attempted)
            return EchoResult(echoed=None, error=_echo_error(exc), item=None)

    async def echo_stage_changes(self, records: Sequence[EventRecord]) -> None:
        """After-commit reaction (FLEET_TRACKER_ECHO on): echo every tracker-linked job
        whose stage just changed.  A job's creation counts as its move to QUEUED."""
        jobs = {
            (r.product_id, r.entity_id): None
            for r in records
            if r.type in _JOB_EVENTS and r.payload.get("trackerItemId") is not None
        }
        for product_id, job_id in jobs:
            try:
                await self.echo_job(product_id, job_id)
            except Exception:  # an echo never fails the change that caused it
                logger.exception("echo of job %s failed", job_id)

    async def sweep_echoes(self, *, every_stage_change: bool, limit: int = 100) -> int:
        """Retry echoes whose items have not caught up; return how many succeeded."""
        async with self.db.read() as session:
            backlog = await fleet_repository.echo_backlog(
                session, utcnow(), limit, every_stage_change=every_stage_change
            )
        caught_up = 0
        for product_id, job_id, stage in backlog:
            try:
                result = await self.echo_job(product_id, job_id, stage)
            except NotFoundError:
                continue
            caught_up += result.error is None
        return caught_up

    async def _echo(self, session: AsyncSession, job: Job, stage: JobStage) -> EchoResult:
        if job.tracker_item_id is None:
            return EchoResult(echoed=None, error=None, item=None)
        # The item first, then the job: the lock order of every item write.
        item = await tracker_repository.get_item(
            session, job.product_id, job.tracker_item_id, for_update=True
        )
        await session.refresh(job, with_for_update=True)
        if item is None:
            return EchoResult(echoed=None, error=None, item=None)
        terminal_pending = is_terminal(stage) and stage == job.stage and job.echoed_stage != stage
        if job.echoed_stage == stage:  # this stage's echo is done: nothing to write
            return EchoResult(echoed=None, error=None, item=item)
        latest = await fleet_repository.latest_job_id_of_item(
            session, job.product_id, item.id
        ) == job.id
        plan = plan_echo(
            stage=stage, job_last_status=job.last_echoed_status,
            terminal_pending=terminal_pending, item_status=item.status,
            bridge_status=item.bridge_status, latest=latest,
        )
        if plan.comment:
            figures = replace(_figures(job), stage=stage)
            await self.echo_writer(
                session, item, plan.set_status, echo_comment(figures, plan.set_status, utcnow())
            )
        item.bridge_status = plan.bridge_status
        status = item_status_for_stage(stage)
        if status is not None:
            job.last_echoed_status = status
        job.echoed_stage = stage
        job.echo_attempts = 0
        job.echo_retry_at = None
        job.echo_retry_stage = None
        await session.flush()
        return EchoResult(echoed=plan.set_status, error=None, item=item)

    async def _schedule_retry(
        self, product_id: str, job_id: int, stage: JobStage | None
    ) -> None:
        try:
            async with self.db.unit_of_work() as session:
                job = await fleet_repository.get_job(session, product_id, job_id, for_update=True)
                if job is None:
                    return
                job.echo_attempts += 1
                delay = min(
                    self.retry_max_seconds,
                    self.retry_base_seconds * 2 ** min(job.echo_attempts - 1, 16),
                )
                job.echo_retry_at = utcnow() + timedelta(seconds=delay)
                job.echo_retry_stage = stage or job.stage
        except Exception:
            logger.exception("could not schedule an echo retry for job %s", job_id)


def _echo_error(exc: Exception) -> str:
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


def _figures(job: Job) -> JobFigures:
    return JobFigures(
        job_id=job.id,
        stage=job.stage,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        started_at=job.started_at,
        finished_at=job.finished_at,
        cost_usd=job.cost_usd,
        tokens_in=job.tokens_in,
        tokens_out=job.tokens_out,
    )
