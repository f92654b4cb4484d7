"""Pure rules of the tracker bridge (DESIGN §4): labels → job hints, stage → status,
and the metrics-only echo comment."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from app.errors import BadUserInputError
from app.fleet.models import JobStage, Priority
from app.tracker.models import ItemStatus

ENGINE_CLASS_LABEL = "engine-class:"
PROFILE_LABEL = "profile:"
PRIORITY_LABEL = "priority:"
CAPABILITY_LABEL = "cap:"


@dataclass(frozen=True, slots=True)
class LabelHints:
    engine_class: str | None = None
    profile: str | None = None
    priority: Priority | None = None
    capabilities: tuple[str, ...] = ()


def hints_from_labels(labels: Sequence[str], field: str = "labels") -> LabelHints:
    """Read job hints from item labels; labels without a known prefix are ignored.

    `priority:` takes low, normal, high or urgent (any case); anything else is a
    BAD_USER_INPUT naming the label.  Two different values for the same
    single-valued hint are ambiguous and refused the same way.
    """
    single: dict[str, tuple[str, str]] = {}
    capabilities: dict[str, None] = {}
    for label in labels:
        for prefix in (ENGINE_CLASS_LABEL, PROFILE_LABEL, PRIORITY_LABEL, CAPABILITY_LABEL):
            if not label.startswith(prefix):
                continue
            value = label[len(prefix) :].strip()
            if not value:
                raise BadUserInputError(field, f"label '{label}' has no value")
            if prefix == PRIORITY_LABEL:
                value = value.lower()  # any case: `priority:HIGH` agrees with `priority:high`
            if prefix == CAPABILITY_LABEL:
                capabilities.setdefault(value, None)
            elif prefix in single and single[prefix][1] != value:
                raise BadUserInputError(
                    field, f"labels '{single[prefix][0]}' and '{label}' contradict each other"
                )
            else:
                single[prefix] = (label, value)
            break
    priority: Priority | None = None
    if PRIORITY_LABEL in single:
        label, value = single[PRIORITY_LABEL]
        try:
            priority = Priority(value.upper())
        except ValueError:
            raise BadUserInputError(
                field, f"label '{label}': priority must be low, normal, high or urgent"
            ) from None
    return LabelHints(
        engine_class=single.get(ENGINE_CLASS_LABEL, (None, None))[1],
        profile=single.get(PROFILE_LABEL, (None, None))[1],
        priority=priority,
        capabilities=tuple(capabilities),
    )


_STAGE_TO_STATUS: dict[JobStage, ItemStatus | None] = {
    JobStage.QUEUED: ItemStatus.IN_PROGRESS,
    JobStage.ASSIGNED: ItemStatus.IN_PROGRESS,
    JobStage.BUILDING: ItemStatus.IN_PROGRESS,
    JobStage.REVIEW: ItemStatus.IN_PROGRESS,
    JobStage.TESTING: ItemStatus.IN_PROGRESS,
    JobStage.SHIPPED: ItemStatus.DONE,
    JobStage.FAILED: ItemStatus.BLOCKED,
    JobStage.CANCELLED: None,
}


def item_status_for_stage(stage: JobStage) -> ItemStatus | None:
    """The item status a job stage echoes as; None (CANCELLED) writes no status."""
    return _STAGE_TO_STATUS[stage]


@dataclass(frozen=True, slots=True)
class JobFigures:
    """What an echo comment may say about a job: metrics, never content."""

    job_id: int
    stage: JobStage
    attempts: int
    max_attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    cost_usd: float
    tokens_in: int
    tokens_out: int


def echo_comment(figures: JobFigures, status: ItemStatus, now: datetime) -> str:
    """The SYSTEM comment written with an echoed status change: metrics only."""
    lines = [
        f"fleetbridge: job {figures.job_id} is {figures.stage.value}; item set to {status.value}.",
        f"- stage: {figures.stage.value}",
        f"- attempts: {figures.attempts}/{figures.max_attempts}",
    ]
    if figures.started_at is not None:
        end = figures.finished_at or now
        lines.append(f"- duration: {max(0.0, (end - figures.started_at).total_seconds()):.1f}s")
    if figures.cost_usd:
        lines.append(f"- cost: ${figures.cost_usd:.4f}")
    if figures.tokens_in or figures.tokens_out:
        lines.append(f"- tokens: {figures.tokens_in} in / {figures.tokens_out} out")
    return "\n".join(lines)
