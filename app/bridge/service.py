"""The tracker bridge: an item becomes a job, a job's progress is echoed onto its item.

Ingest runs inside the caller's unit of work, through `FleetService.submit_job`.
An echo is downstream and best-effort: it always runs in a unit of work of its own,
after the job's change has committed, and a failure to write the item is logged,
returned as `EchoResult(echoed=None, error=…)` and retried later by the sweeper.
It never raises into, or undoes, the job's lifecycle.

The item-writing step is a seam (`ItemEchoWriter`, `app.bridge.echo_apply`) so that
a fault can be injected.

On SQLite the after-commit echoes that wait for the one writer connection at the
same moment share one unit of work (`app.bridge.group_commit`): each caller still
awaits its own echo's commit, and when that unit of work fails, nothing of it is
written and each of its jobs is echoed on its own, exactly as it would have been
alone.  PostgreSQL runs concurrent units of work side by side: there each commit's
echo keeps a transaction of its own; with the bridge's own writer, a commit's one job of
a product is one guarded statement (`app.bridge.echo_lean`), locked only if it refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from app.bridge import echo_lean, steering
from app.bridge import repository as bridge_repository
from app.bridge.echo_apply import EchoTarget as EchoTarget
from app.bridge.echo_apply import ItemEchoWriter as ItemEchoWriter
from app.bridge.echo_apply import (
    Probe,
    apply_echoes,
    echo_error,
    nothing_to_write_seen,
    same_status_event,
)
from app.bridge.echo_apply import write_status_and_comment as write_status_and_comment
from app.bridge.echo_probes import ProbeReader
from app.bridge.group_commit import GroupCommit, Take
from app.bridge.steering import IngestOptions as IngestOptions
from app.bridge.steering import job_spec_for_item as job_spec_for_item
from app.db import utcnow
from app.errors import NotFoundError
from app.events.models import EventType
from app.events.outbox import EventRecord
from app.fleet import repository as fleet_repository
from app.fleet.models import JobStage
from app.fleet.service import FleetService, SubmitResult
from app.tracker import repository as tracker_repository
from app.tracker.models import Item, ItemStatus
from app.tracker.service import ItemChanges, NewItem
from app.uow import Database

logger = logging.getLogger(__name__)

_JOB_EVENTS = frozenset({EventType.JOB_CREATED, EventType.JOB_STAGE_CHANGED})
Echoes = list[tuple[str, list[int]]]  # (product, job ids) of one commit, in its order
# Set in a group commit run's task (and so in the tasks it starts, such as its commit's
# after-commit hook): an echo started from there never waits for the group itself.
_IN_GROUP_RUN: ContextVar[bool] = ContextVar("fleet_echo_group_run", default=False)


@dataclass(frozen=True, slots=True)
class EchoResult:
    echoed: ItemStatus | None
    error: str | None
    item: Item | None


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
        # SQLite: after-commit echoes waiting for the writer share its next unit of
        # work, and unlocked reads pending at the same moment one hop, on a connection
        # the bridge keeps until `aclose`.  (PostgreSQL runs them side by side, each
        # on a connection of its own: a shared one would queue their round trips.)
        sqlite = db.dialect == "sqlite"
        self.group_commit: GroupCommit[Echoes] | None = (
            GroupCommit(self._echo_group) if sqlite else None)
        self._probe_reader = ProbeReader(db)
        self.probes: GroupCommit[Probe] | None = (
            GroupCommit(self._probe_reader.run) if sqlite else None)

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
        transaction of its own, by DESIGN §4's echo rules (`mapping.decide_echo`).

        `echoed` is the status set on the item (None when none was: nothing to
        change, or a person's status wins); `item` the item as the echo left it.  A
        failure to write the item is logged, returned as `error` and retried later by
        the sweeper for the stage attempted.  Raises NOT_FOUND for a job not in
        `product_id`.
        """
        return await self._echo_one(product_id, job_id, stage, with_item=True)

    async def echo_stage_changes(self, records: Sequence[EventRecord]) -> None:
        """After-commit reaction (FLEET_TRACKER_ECHO on): echo every tracker-linked job
        whose stage just changed, at its current stage.  A job's creation counts as its
        move to QUEUED.

        The events carry the job and product, so the echo starts with its one read of
        item and job — or with none: a move whose change read the item itself
        (`EventRecord.seen`) and has nothing to write ends here.  The jobs of one
        commit (an item's cancelled jobs, a reaper pass) are echoed together in one
        unit of work, in the commit's order — on SQLite with those of the other commits
        whose echoes wait for the writer at the same moment (`group_commit`); when that
        fails, each is echoed on its own, so one item's failure never holds back
        another's echo and is retried by itself.
        """
        by_product: dict[str, dict[int, bool]] = {}
        for r in records:
            if r.type in _JOB_EVENTS and r.payload.get("trackerItemId") is not None:
                jobs = by_product.setdefault(r.product_id, {})
                jobs[r.entity_id] = jobs.get(r.entity_id, True) and same_status_event(r)
        for product_id, jobs in by_product.items():  # decided on what the change read
            for job_id in nothing_to_write_seen(records, product_id, list(jobs)):
                del jobs[job_id]
        by_product = {product_id: jobs for product_id, jobs in by_product.items() if jobs}
        if not by_product:
            return
        group = None if _IN_GROUP_RUN.get() else self.group_commit
        if group is not None and group.waiting():
            # A unit of work is waiting for the writer anyway: a move the item already
            # shows costs it one more statement of its read, and writes nothing.
            await group.submit([(product, list(jobs)) for product, jobs in by_product.items()])
            return
        echoes: Echoes = []
        lean = self.db.dialect == "postgresql" and self.echo_writer is write_status_and_comment
        for product_id, jobs in by_product.items():
            job_ids = list(jobs)
            if lean and len(job_ids) == 1:
                await self._echo_lean(product_id, job_ids[0], records)
                continue
            probe = [job_id for job_id, same in jobs.items() if same]
            if probe:
                done = await self._nothing_to_write(product_id, probe)
                job_ids = [job_id for job_id in job_ids if job_id not in done]
            if job_ids:
                echoes.append((product_id, job_ids))
        if echoes and group is not None:
            await group.submit(echoes)
            return
        for product_id, job_ids in echoes:
            if len(job_ids) > 1 and await self._echo_together(product_id, job_ids):
                continue
            await self._echo_each([(product_id, job_id) for job_id in job_ids])

    async def sweep_echoes(self, *, every_stage_change: bool, limit: int = 100) -> int:
        """Retry echoes whose items have not caught up; return how many succeeded."""
        async with self.db.read() as session:
            backlog = await bridge_repository.echo_backlog(
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

    async def _echo_one(
        self, product_id: str, job_id: int, stage: JobStage | None, *, with_item: bool
    ) -> EchoResult:
        """One job's echo in a unit of work of its own; a failure is logged, counted
        and scheduled for a retry of the stage attempted (see `echo_job`)."""
        attempted = stage
        try:
            async with self.db.unit_of_work() as session:
                rows = await bridge_repository.echo_rows(session, product_id, [job_id])
                if not rows:  # no item (any more), or no such job in this product
                    if not await bridge_repository.job_exists(session, product_id, job_id):
                        raise NotFoundError("job", job_id)
                    return EchoResult(echoed=None, error=None, item=None)
                row = rows[0]
                attempted = stage or row.stage
                [echoed] = await apply_echoes(session, product_id, [(row, attempted)],
                                              self.echo_writer)
                item = (
                    await tracker_repository.get_item(session, product_id, row.item_id)
                    if with_item else None
                )
            return EchoResult(echoed=echoed, error=None, item=item)
        except NotFoundError:
            raise
        except Exception as exc:
            return await self._failed(product_id, job_id, attempted, exc)

    async def _echo_lean(
        self, product_id: str, job_id: int, records: Sequence[EventRecord]
    ) -> None:
        """PostgreSQL: one job's echo by a guarded statement (`echo_lean.echo_alone`,
        on what its stage change read when its last event carries it); under lock
        (`_echo_one`) when its guard refused; a failure as `_echo_one`'s."""
        seen = next((r.seen for r in reversed(records)
                     if r.type in _JOB_EVENTS and r.entity_id == job_id), None)
        try:
            if await echo_lean.echo_alone(self.db, product_id, job_id, seen):
                return
        except Exception as exc:
            await self._failed(product_id, job_id, None, exc)
            return
        await self._echo_each([(product_id, job_id)])

    async def _failed(
        self, product_id: str, job_id: int, attempted: JobStage | None, exc: Exception
    ) -> EchoResult:
        """A failed echo: logged, counted and scheduled for a retry of the stage
        attempted (None: the job's current one)."""
        logger.warning("echo of job %s onto its item failed: %s", job_id, exc, exc_info=True)
        if self.on_echo_failure is not None:
            self.on_echo_failure()
        await self._schedule_retry(product_id, job_id, attempted)
        return EchoResult(echoed=None, error=echo_error(exc), item=None)

    async def _nothing_to_write(self, product_id: str, job_ids: list[int]) -> set[int]:
        """The jobs among `job_ids` whose echo has nothing to write (`decide_echo`), found
        by one read without locks, so that a move within one item status (ASSIGNED →
        BUILDING) costs one statement and no write transaction.  Nothing is written for
        them, not even on the job (see `mapping.echo_covered`).  On SQLite the reads
        pending at the same moment share one hop (`probes`).

        Deciding on an unlocked read is safe because nothing is written: a concurrent
        change the read missed is one the echo ordered itself before, and a job whose
        stage moved on meanwhile gets its own echo from that move's commit.  When one
        job of an item has something to write, all of that item's jobs are echoed
        under lock.  A failed read decides nothing (every job is echoed as usual)."""
        probe = Probe(product_id, job_ids)
        if self.probes is not None:
            await self.probes.submit(probe)
            return probe.done
        try:
            rows = await bridge_repository.echo_rows_unlocked(self.db.engine, product_id, job_ids)
        except Exception:
            logger.info("reading the echo state of jobs %s failed", job_ids, exc_info=True)
            return set()
        probe.decide(rows)
        return probe.done

    async def aclose(self) -> None:
        """Wait for the echoes under way, and give back the connection of the unlocked
        reads (the runtime's stop)."""
        for group in (self.group_commit, self.probes):
            if group is not None:
                await group.idle()
        await self._probe_reader.drop_connection()

    async def _echo_together(self, product_id: str, job_ids: list[int]) -> bool:
        """The current stages of `job_ids` (one commit's, in its order) echoed in one
        unit of work; False, with nothing written, when that failed."""
        try:
            async with self.db.unit_of_work() as session:
                rows = await bridge_repository.echo_rows(session, product_id, job_ids)
                await apply_echoes(session, product_id, [(row, row.stage) for row in rows],
                                   self.echo_writer)
        except Exception:
            logger.info("echoing %d jobs together failed; echoing each on its own",
                        len(job_ids), exc_info=True)
            return False
        return True

    async def _echo_group(self, take: Take[Echoes]) -> None:
        """A group commit's run (SQLite): once the unit of work holds the writer, the
        echoes pending then (`take`), each job once, at its current stage, in the
        order they came, in that one unit of work; when it fails, nothing of it is
        written and each job is echoed on its own (`_echo_each`) — or, when it was
        one job's alone, that echo failed, as `_echo_one`'s would have."""
        keys: list[bridge_repository.EchoKey] | None = None
        _IN_GROUP_RUN.set(True)  # this run's own commit must not wait for its group
        try:
            async with self.db.unit_of_work() as session:
                await session.connection()  # the writer: echoes pending meanwhile join in
                keys = _unique(take())
                rows = await bridge_repository.echo_rows_of(session, keys)
                by_product: dict[str, list[bridge_repository.EchoRow]] = {}
                for row in rows:
                    by_product.setdefault(row.product_id, []).append(row)
                for product_id, product_rows in by_product.items():
                    await apply_echoes(session, product_id,
                                       [(row, row.stage) for row in product_rows],
                                       self.echo_writer)
            return
        except Exception as exc:
            if keys is None:
                keys = _unique(take())
            if len(keys) == 1:  # it was that echo's own unit of work: it failed
                [(product_id, job_id)] = keys
                await self._failed(product_id, job_id, None, exc)
                return
            logger.info("echoing %d jobs together failed; echoing each on its own",
                        len(keys), exc_info=True)
        await self._echo_each(keys)

    async def _echo_each(self, keys: Sequence[bridge_repository.EchoKey]) -> None:
        """Each job of `keys` echoed at its current stage in a unit of work of its own."""
        for product_id, job_id in keys:
            try:
                await self._echo_one(product_id, job_id, None, with_item=False)
            except Exception:  # an echo never fails the change that caused it
                logger.exception("echo of job %s failed", job_id)

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


def _unique(requests: list[Echoes]) -> list[bridge_repository.EchoKey]:
    """The (product, job) pairs of `requests`, each once, in the order they came."""
    return list(dict.fromkeys(
        (product_id, job_id)
        for echoes in requests for product_id, job_ids in echoes for job_id in job_ids))
