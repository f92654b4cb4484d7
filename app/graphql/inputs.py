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
from app.tracker.models import ItemStatus
from app.tracker.service import ItemChanges, NewItem


@strawberry.input
class CreateItemInput:
    title: str
    description: str | None = None
    labels: list[str] | None = None
    status: ItemStatus | None = None

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


@strawberry.input
class UpdateItemInput:
    title: str | None = None
    description: str | None = None
    labels: list[str] | None = None
    status: ItemStatus | None = None

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


@strawberry.input
class SubmitJobInput:
    title: str
    body_md: str
    kind: str | None = None
    priority: Priority | None = None
    capabilities: list[str] | None = None
    engine_class: str | None = None
    profile: str | None = None
    budget: float | None = None
    max_attempts: int | None = None
    idempotency_key: str | None = None
    tracker_item_id: strawberry.ID | None = None

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
            idempotency_key=limits.optional_text(
                "input.idempotencyKey", self.idempotency_key, max_len=limits.IDEMPOTENCY_KEY_MAX
            ),
            tracker_item_id=tracker_item_id,
        )


@strawberry.input
class IngestOptions:
    priority: Priority | None = None
    capabilities: list[str] | None = None
    engine_class: str | None = None
    profile: str | None = None
    kind: str | None = None
    max_attempts: int | None = None
    budget: float | None = None

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


@strawberry.input
class WorkerInput:
    worker_id: str
    capabilities: list[str] | None = None
    engine_classes: list[str] | None = None
    profiles: list[str] | None = None
    lease_seconds: int | None = None

    def to_profile(self) -> WorkerProfile:
        return WorkerProfile(
            worker_id=limits.text(
                "worker.workerId", self.worker_id, max_len=limits.WORKER_ID_MAX, required=True
            ),
            capabilities=frozenset(limits.names("worker.capabilities", self.capabilities)),
            engine_classes=frozenset(limits.names("worker.engineClasses", self.engine_classes)),
            profiles=frozenset(limits.names("worker.profiles", self.profiles)),
        )


@strawberry.input
class JobMetricsInput:
    cost_usd: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None

    def to_delta(self) -> MetricsDelta:
        return MetricsDelta(
            cost_usd=limits.number("metrics.costUsd", self.cost_usd or 0.0, lo=0,
                                   hi=limits.COST_MAX),
            tokens_in=limits.integer("metrics.tokensIn", self.tokens_in or 0, lo=0,
                                     hi=limits.TOKENS_MAX),
            tokens_out=limits.integer("metrics.tokensOut", self.tokens_out or 0, lo=0,
                                      hi=limits.TOKENS_MAX),
        )
