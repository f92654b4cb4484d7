"""GraphQL input types and their conversion to validated domain inputs.

Every bound of DESIGN §8 is checked here, and a broken one is a BAD_USER_INPUT
naming the field as the client wrote it (`input.title`, `worker.leaseSeconds`…).
"""

from __future__ import annotations

import strawberry

from app import limits
from app.bridge.service import IngestOptions as IngestOptionsSpec
from app.errors import BadUserInputError
from app.fleet.models import Priority
from app.fleet.scheduler import WorkerProfile
from app.fleet.service import JobSpec, MetricsDelta
from app.graphql import enums as _enums  # noqa: F401  (registers the GraphQL enums)
from app.tracker.models import ItemStatus
from app.tracker.service import ItemChanges, NewItem


@strawberry.input(description="A new tracker item.")
class CreateItemInput:
    title: str = strawberry.field(description="One-line summary (required, not blank).")
    description: str | None = strawberry.field(
        default=None, description="The full text (Markdown)."
    )
    labels: list[str] | None = strawberry.field(
        default=None, description="Labels; `engine-class:X`, `cap:X`… carry job hints."
    )
    status: ItemStatus | None = strawberry.field(
        default=None, description="Initial status; TODO when null."
    )

    def to_spec(self) -> NewItem:
        return NewItem(
            title=limits.text("input.title", self.title, max_len=limits.TITLE_MAX, required=True),
            description=limits.text(
                "input.description", self.description or "", max_len=limits.DESCRIPTION_MAX
            ),
            labels=limits.names(
                "input.labels", self.labels, max_items=limits.LABELS_MAX, max_len=limits.LABEL_MAX
            ),
            status=self.status or ItemStatus.TODO,
        )


@strawberry.input(description="Changes to a tracker item; a null field is left as it is.")
class UpdateItemInput:
    title: str | None = strawberry.field(default=None, description="New one-line summary.")
    description: str | None = strawberry.field(
        default=None, description="New full text (Markdown)."
    )
    labels: list[str] | None = strawberry.field(
        default=None, description="New labels (replace the old ones)."
    )
    status: ItemStatus | None = strawberry.field(default=None, description="New status.")

    def to_spec(self) -> ItemChanges:
        return ItemChanges(
            title=limits.optional_text("input.title", self.title, max_len=limits.TITLE_MAX),
            description=(
                None if self.description is None else limits.text(
                    "input.description", self.description, max_len=limits.DESCRIPTION_MAX
                )
            ),
            labels=(
                None if self.labels is None else limits.names(
                    "input.labels", self.labels, max_items=limits.LABELS_MAX,
                    max_len=limits.LABEL_MAX,
                )
            ),
            status=self.status,
        )


def _max_attempts(field: str, value: int | None) -> int | None:
    return None if value is None else limits.integer(
        field, value, lo=1, hi=limits.MAX_ATTEMPTS_MAX
    )


def _budget(field: str, value: float | None) -> float | None:
    """A job's budget in USD: > 0 (DESIGN §4), at most BUDGET_MAX."""
    if value is None:
        return None
    value = limits.number(field, value, lo=0, hi=limits.BUDGET_MAX)
    if not value > 0:
        raise BadUserInputError(field, "must be greater than 0 (USD)")
    return value


@strawberry.input(description="A new job.")
class SubmitJobInput:
    title: str = strawberry.field(description="One-line summary (required, not blank).")
    body_md: str = strawberry.field(description="What to do (Markdown; required, not blank).")
    kind: str | None = strawberry.field(default=None, description="Kind of work; `code` when null.")
    priority: Priority | None = strawberry.field(
        default=None, description="How urgent; NORMAL when null."
    )
    capabilities: list[str] | None = strawberry.field(
        default=None, description="Capabilities a worker must all have to claim it."
    )
    engine_class: str | None = strawberry.field(
        default=None, description="Engine class a worker must offer; null for any."
    )
    profile: str | None = strawberry.field(
        default=None, description="Profile a worker must offer; null for any."
    )
    budget: float | None = strawberry.field(
        default=None, description="Spending limit in USD: a reported cost beyond it fails the job."
    )
    max_attempts: int | None = strawberry.field(
        default=None, description="Attempts allowed (default 3)."
    )
    idempotency_key: str | None = strawberry.field(
        default=None, description="Your key: a second submit with it answers the first job."
    )
    tracker_item_id: strawberry.ID | None = strawberry.field(
        default=None, description="The tracker item the job is for, if any."
    )

    def to_spec(self, tracker_item_id: int | None) -> JobSpec:
        return JobSpec(
            title=limits.text("input.title", self.title, max_len=limits.TITLE_MAX, required=True),
            body_md=limits.text(
                "input.bodyMd", self.body_md, max_len=limits.BODY_MD_MAX, required=True
            ),
            kind=limits.optional_text("input.kind", self.kind, max_len=limits.KIND_MAX) or "code",
            priority=self.priority or Priority.NORMAL,
            capabilities=limits.names("input.capabilities", self.capabilities),
            engine_class=limits.optional_text(
                "input.engineClass", self.engine_class, max_len=limits.NAME_MAX
            ),
            profile=limits.optional_text("input.profile", self.profile, max_len=limits.NAME_MAX),
            budget=_budget("input.budget", self.budget),
            max_attempts=_max_attempts("input.maxAttempts", self.max_attempts) or 3,
            idempotency_key=limits.idempotency_key("input.idempotencyKey", self.idempotency_key),
            tracker_item_id=tracker_item_id,
        )


@strawberry.input(description="Hints for `ingestItemAsJob`; each overrides the item's label hint.")
class IngestOptions:
    priority: Priority | None = strawberry.field(default=None, description="How urgent.")
    capabilities: list[str] | None = strawberry.field(
        default=None, description="Capabilities a worker must all have."
    )
    engine_class: str | None = strawberry.field(
        default=None, description="Engine class a worker must offer."
    )
    profile: str | None = strawberry.field(default=None, description="Profile a worker must offer.")
    kind: str | None = strawberry.field(default=None, description="Kind of work.")
    max_attempts: int | None = strawberry.field(default=None, description="Attempts allowed.")
    budget: float | None = strawberry.field(default=None, description="Spending limit in USD.")

    def to_spec(self) -> IngestOptionsSpec:
        return IngestOptionsSpec(
            priority=self.priority,
            capabilities=(
                None if self.capabilities is None
                else limits.names("options.capabilities", self.capabilities)
            ),
            engine_class=limits.optional_text(
                "options.engineClass", self.engine_class, max_len=limits.NAME_MAX
            ),
            profile=limits.optional_text("options.profile", self.profile, max_len=limits.NAME_MAX),
            kind=limits.optional_text("options.kind", self.kind, max_len=limits.KIND_MAX),
            max_attempts=_max_attempts("options.maxAttempts", self.max_attempts),
            budget=_budget("options.budget", self.budget),
        )


def lease_seconds(field: str, value: int | None) -> int | None:
    return None if value is None else limits.integer(
        field, value, lo=limits.LEASE_SECONDS_MIN, hi=limits.LEASE_SECONDS_MAX
    )


@strawberry.input(description="A worker asking for a job, and what it offers.")
class WorkerInput:
    worker_id: str = strawberry.field(
        description="The worker's name, stored on the lease (required)."
    )
    capabilities: list[str] | None = strawberry.field(
        default=None, description="Capabilities the worker has."
    )
    engine_classes: list[str] | None = strawberry.field(
        default=None, description="Engine classes the worker runs."
    )
    profiles: list[str] | None = strawberry.field(
        default=None, description="Profiles the worker offers."
    )
    lease_seconds: int | None = strawberry.field(
        default=None, description="Lease length in seconds; null for FLEET_LEASE_SECONDS."
    )

    def to_profile(self) -> WorkerProfile:
        return WorkerProfile(
            worker_id=limits.text(
                "worker.workerId", self.worker_id, max_len=limits.WORKER_ID_MAX, required=True
            ),
            capabilities=frozenset(limits.names("worker.capabilities", self.capabilities)),
            engine_classes=frozenset(limits.names("worker.engineClasses", self.engine_classes)),
            profiles=frozenset(limits.names("worker.profiles", self.profiles)),
        )


@strawberry.input(description="Usage to add to a job's totals.")
class JobMetricsInput:
    cost_usd: float | None = strawberry.field(default=None, description="Cost in USD to add.")
    tokens_in: int | None = strawberry.field(default=None, description="Input tokens to add.")
    tokens_out: int | None = strawberry.field(default=None, description="Output tokens to add.")

    def to_delta(self) -> MetricsDelta:
        return MetricsDelta(
            cost_usd=limits.number("metrics.costUsd", self.cost_usd or 0.0, lo=0,
                                   hi=limits.COST_MAX),
            tokens_in=limits.integer("metrics.tokensIn", self.tokens_in or 0, lo=0,
                                     hi=limits.TOKENS_MAX),
            tokens_out=limits.integer("metrics.tokensOut", self.tokens_out or 0, lo=0,
                                      hi=limits.TOKENS_MAX),
        )
