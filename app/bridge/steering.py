"""The tracker steers the fleet (DESIGN §4, "Tracker → fleet").

Everything here runs inside the caller's unit of work, so an item change and the
fleet changes it causes commit (or roll back) together:

- `ingest_item`: an item becomes a job through `FleetService.submit_job` — the first
  job under the key `tracker-<itemId>`, a follow-up under `tracker-<itemId>-<n>` once
  the latest job has ended and the item is open again;
- `create_item` / `update_item`: the tracker's item writes, plus what they cause: an
  item that becomes CANCELLED cancels its jobs that have not ended; an item created
  with the auto-ingest label, or updated to carry it, is ingested.

Lock order (PostgreSQL): the item first, then its jobs — the same order as the echo,
so an item write and an echo never deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sqlalchemy.ext.asyncio import AsyncSession

from app.bridge.mapping import hints_from_labels
from app.errors import ConflictError, NotFoundError
from app.fleet import repository as fleet_repository
from app.fleet.models import Priority
from app.fleet.service import FleetService, JobSpec, SubmitOutcome, SubmitResult
from app.limits import TRACKER_KEY_PREFIX
from app.tracker import repository as tracker_repository
from app.tracker import service as tracker_service
from app.tracker.models import Item, ItemStatus
from app.tracker.service import ItemChanges, NewItem

OPEN_STATUSES = frozenset({ItemStatus.TODO, ItemStatus.IN_PROGRESS, ItemStatus.BLOCKED})


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


def idempotency_key(item_id: int, follow_up: int = 0) -> str:
    """`tracker-<itemId>` for an item's first job, `tracker-<itemId>-<n>` for its n-th
    follow-up (DESIGN §4)."""
    key = f"{TRACKER_KEY_PREFIX}{item_id}"
    return key if follow_up == 0 else f"{key}-{follow_up}"


def job_spec_for_item(
    item: Item, options: IngestOptions, *, follow_up: int = 0, labels_field: str = "labels"
) -> JobSpec:
    """DESIGN §4's mapping of an item to a job; options override label hints.

    Raises BAD_USER_INPUT (field `labels_field`) naming a label whose hint is wrong.
    """
    hints = hints_from_labels(item.labels, labels_field)
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
        idempotency_key=idempotency_key(item.id, follow_up),
    )
    if options.kind is not None:
        spec = replace(spec, kind=options.kind)
    if options.max_attempts is not None:
        spec = replace(spec, max_attempts=options.max_attempts)
    return spec


async def ingest_item(
    session: AsyncSession, fleet: FleetService, product_id: str, item_id: int,
    options: IngestOptions, *, labels_field: str = "labels",
) -> SubmitResult:
    """`ingestItemAsJob`: the item's job, created or found (DESIGN §4).

    - a CANCELLED item: CONFLICT, nothing written; a wrong label hint: BAD_USER_INPUT;
    - a job of the item has not ended: that job (the latest such), DEDUPED;
    - no job yet: the first job (key `tracker-<itemId>`), CREATED — or DEDUPED when
      that key is taken already;
    - the latest job ended and the item is open (TODO, IN_PROGRESS, BLOCKED): a
      follow-up job (key `tracker-<itemId>-<n>`), so concurrent ingests create one;
      the bridge takes the status the item was reopened to as its own, so the
      follow-up's stages show on the item again;
    - the latest job ended and the item is DONE: that job, DEDUPED, status untouched.

    Raises NOT_FOUND (unknown item), CONFLICT, BAD_USER_INPUT (a label hint).
    """
    item = await tracker_repository.get_item(session, product_id, item_id, for_update=True)
    if item is None:
        raise NotFoundError("item", item_id)
    if item.status == ItemStatus.CANCELLED:
        raise ConflictError(f"item {item_id} is CANCELLED; reopen it to ingest it")
    hints_from_labels(item.labels, labels_field)  # a wrong hint is refused, job or not
    running = await fleet_repository.latest_job_of_item(
        session, product_id, item_id, open_only=True
    )
    if running is not None:
        return SubmitResult(running, SubmitOutcome.DEDUPED)
    latest = await fleet_repository.latest_job_of_item(session, product_id, item_id)
    if latest is None:
        spec = job_spec_for_item(item, options, labels_field=labels_field)
        return await fleet.submit_job(session, product_id, spec)
    if item.status not in OPEN_STATUSES:  # DONE
        return SubmitResult(latest, SubmitOutcome.DEDUPED)
    jobs = await fleet_repository.count_jobs_of_item(session, product_id, item_id)
    spec = job_spec_for_item(item, options, follow_up=jobs, labels_field=labels_field)
    result = await fleet.submit_job(session, product_id, spec)
    if result.outcome == SubmitOutcome.CREATED:
        item.bridge_status = item.status
    return result


async def create_item(
    session: AsyncSession, fleet: FleetService, product_id: str, new: NewItem,
    *, auto_ingest_label: str, labels_field: str = "labels",
) -> Item:
    """`createItem`, and its auto-ingest when it carries the label (and is open)."""
    item = await tracker_service.create_item(session, product_id, new)
    if auto_ingest_label and auto_ingest_label in item.labels and item.status in OPEN_STATUSES:
        await ingest_item(session, fleet, product_id, item.id, IngestOptions(),
                          labels_field=labels_field)
    return item


async def update_item(
    session: AsyncSession, fleet: FleetService, product_id: str, item_id: int,
    changes: ItemChanges, *, auto_ingest_label: str, labels_field: str = "labels",
) -> Item:
    """`updateItem`, and what it causes in the fleet (DESIGN §4):

    - the item became CANCELLED: every job of it that has not ended is cancelled
      (reason `item cancelled`, fence raised, one event each), echo flag on or off;
    - the update added the auto-ingest label to an open item: it is ingested through
      `ingest_item` (idempotent: a running job is found, not doubled).  Removing the
      label cancels nothing.

    Raises NOT_FOUND, BAD_USER_INPUT (a label hint, naming the label): nothing written.
    """
    before = await tracker_repository.get_item(session, product_id, item_id, for_update=True)
    if before is None:
        raise NotFoundError("item", item_id)
    was_cancelled = before.status == ItemStatus.CANCELLED
    had_label = bool(auto_ingest_label) and auto_ingest_label in before.labels
    item = await tracker_service.update_item(session, product_id, item_id, changes)
    if item.status == ItemStatus.CANCELLED and not was_cancelled:
        await fleet.cancel_jobs_of_item(session, product_id, item.id)
    if (auto_ingest_label and not had_label and auto_ingest_label in item.labels
            and item.status in OPEN_STATUSES):
        await ingest_item(session, fleet, product_id, item.id, IngestOptions(),
                          labels_field=labels_field)
    return item
