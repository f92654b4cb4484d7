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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from app.bridge.mapping import JobFigures, echo_comment, hints_from_labels, item_status_for_stage
from app.db import utcnow
from app.errors import FleetError, NotFoundError
from app.events.models import EventType
from app.events.outbox import EventRecord
from app.fleet import repository as fleet_repository
from app.fleet.models import Job, Priority
from app.fleet.service import FleetService, JobSpec, SubmitResult
from app.tracker import repository as tracker_repository
from app.tracker import service as tracker_service
from app.tracker.models import CommentKind, Item, ItemStatus
from app.uow import Database

logger = logging.getLogger(__name__)

SYSTEM_AUTHOR = "fleetbridge"
_JOB_EVENTS = frozenset({EventType.JOB_CREATED, EventType.JOB_STAGE_CHANGED})


@dataclass(frozen=True, slots=True)
class IngestOptions:
    """Explicit hints; each one that is set overrides what the labels say."""

    priority: Priority | None = None
    capabilities: tuple[str, ...] | None = None
    engine_class: str | None = None
    profile: str | None = None
    kind: str | None = None
    max_attempts: int | None = None
    budget: float | None = None


@dataclass(frozen=True, slots=True)
class EchoResult:
    echoed: ItemStatus | None
    error: str | None
    item: Item | None


class ItemEchoWriter(Protocol):
    async def __call__(
        self, session: AsyncSession, item: Item, status: ItemStatus, comment: str
    ) -> None: ...


async def write_status_and_comment(
    session: AsyncSession, item: Item, status: ItemStatus, comment: str
) -> None:
    """Set the item's status and, when it changed, add the metrics comment."""
    if await tracker_service.set_status(session, item, status):
        await tracker_service.add_comment(
            session, item.product_id, item.id, body=comment, author=SYSTEM_AUTHOR,
            kind=CommentKind.SYSTEM,
        )


def job_spec_for_item(item: Item, options: IngestOptions) -> JobSpec:
    """DESIGN §4's mapping of an item to a job; options override label hints."""
    hints = hints_from_labels(item.labels)
    spec = JobSpec(
        title=item.title,
        body_md=item.description if item.description else item.title,
        priority=options.priority or hints.priority or Priority.NORMAL,
        capabilities=(
            options.capabilities if options.capabilities is not None else hints.capabilities
        ),
        engine_class=options.engine_class or hints.engine_class,
        profile=options.profile or hints.profile,
        budget=options.budget,
        tracker_item_id=item.id,
        idempotency_key=f"tracker-{item.id}",
    )
    if options.kind is not None:
        spec = replace(spec, kind=options.kind)
    if options.max_attempts is not None:
        spec = replace(spec, max_attempts=options.max_attempts)
    return spec


class BridgeService:
    def __init__(
        self,
        db: Database,
        fleet: FleetService,
        *,
        echo_writer: ItemEchoWriter = write_status_and_comment,
        retry_base_seconds: float = 5.0,
        retry_max_seconds: float = 300.0,
    ) -> None:
        self.db = db
        self.fleet = fleet
        self.echo_writer = echo_writer
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds

    async def ingest_item(
        self, session: AsyncSession, product_id: str, item_id: int, options: IngestOptions
    ) -> SubmitResult:
        item = await tracker_repository.get_item(session, product_id, item_id)
        if item is None:
            raise NotFoundError("item", item_id)
        return await self.fleet.submit_job(session, product_id, job_spec_for_item(item, options))

    async def echo_job(self, product_id: str, job_id: int) -> EchoResult:
        """Echo a job's stage onto its item, in a transaction of its own."""
        try:
            async with self.db.unit_of_work() as session:
                return await self._echo(session, product_id, job_id)
        except NotFoundError:
            raise
        except Exception as exc:
            logger.warning("echo of job %s onto its item failed: %s", job_id, exc, exc_info=True)
            await self._schedule_retry(product_id, job_id)
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
        for product_id, job_id in backlog:
            try:
                result = await self.echo_job(product_id, job_id)
            except NotFoundError:
                continue
            caught_up += result.error is None
        return caught_up

    async def _echo(self, session: AsyncSession, product_id: str, job_id: int) -> EchoResult:
        job = await fleet_repository.get_job(session, product_id, job_id, for_update=True)
        if job is None:
            raise NotFoundError("job", job_id)
        if job.tracker_item_id is None:
            return EchoResult(echoed=None, error=None, item=None)
        item = await tracker_repository.get_item(
            session, product_id, job.tracker_item_id, for_update=True
        )
        if item is None:
            return EchoResult(echoed=None, error=None, item=None)
        status = item_status_for_stage(job.stage)
        if status is None or item.status == ItemStatus.CANCELLED:
            return EchoResult(echoed=None, error=None, item=item)
        if job.last_echoed_status == status:
            return EchoResult(echoed=None, error=None, item=item)
        now = utcnow()
        await self.echo_writer(session, item, status, echo_comment(_figures(job), status, now))
        job.last_echoed_status = status
        job.echo_attempts = 0
        job.echo_retry_at = None
        await session.flush()
        return EchoResult(echoed=status, error=None, item=item)

    async def _schedule_retry(self, product_id: str, job_id: int) -> None:
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
        except Exception:
            logger.exception("could not schedule an echo retry for job %s", job_id)


def _echo_error(exc: Exception) -> str:
    """What a client is told about a failed echo: our own errors' messages, otherwise
    only the kind of failure (the details, which may hold internals, are logged)."""
    detail = exc.message if isinstance(exc, FleetError) else type(exc).__name__
    return f"the item could not be updated ({detail}); the echo will be retried"


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
