"""Pure rules of the tracker bridge (DESIGN §4): labels → job hints, stage → status,
and the metrics-only echo comment."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from app.errors import BadUserInputError
from app.fleet.models import JobStage, Priority
from app.fleet.stages import is_terminal
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


@dataclass(frozen=True, slots=True)
class EchoPlan:
    """What one echo writes: the status to set on the item (None: leave it), whether
    to add the metrics comment, and what to record as the bridge's own status."""

    set_status: ItemStatus | None
    comment: bool
    bridge_status: ItemStatus | None


def plan_echo(
    *,
    stage: JobStage,
    job_last_status: ItemStatus | None,
    terminal_pending: bool,
    item_status: ItemStatus,
    bridge_status: ItemStatus | None,
    latest: bool,
) -> EchoPlan:
    """DESIGN §4's echo rules for one job echoing `stage` onto its item.

    - the stage maps to a status (`item_status_for_stage`); it is news when the job
      has not echoed that status before (`job_last_status`);
    - the bridge owns the item's status only while the item shows what the bridge
      last wrote (`bridge_status`), or TODO before the first echo, and the item is not
      CANCELLED; only the item's `latest` job sets a status;
    - news the item does not show yet adds the metrics comment, with the status set
      when the bridge owns it and left alone otherwise;
    - a terminal stage whose comment is not written yet (`terminal_pending`) always
      adds it, once (the caller records that it did);
    - when the latest job's status is what the item already shows, the bridge takes
      that as its own again (`bridge_status` in the plan).
    """
    status = item_status_for_stage(stage)
    cancelled = item_status == ItemStatus.CANCELLED
    owns = latest and not cancelled and (
        item_status == bridge_status or (bridge_status is None and item_status == ItemStatus.TODO)
    )
    news = status is not None and status != job_last_status and status != item_status
    set_status = status if news and owns else None
    adopted = latest and not cancelled and status is not None and item_status == status
    return EchoPlan(
        set_status=set_status,
        comment=terminal_pending or (news and not cancelled),
        bridge_status=status if set_status is not None or adopted else bridge_status,
    )


def same_status_stages() -> dict[ItemStatus, frozenset[JobStage]]:
    """The stages that have not ended, grouped by the item status they echo as.  A
    move within one group shows nothing new on the item (QUEUED → ASSIGNED → BUILDING
    are all IN_PROGRESS)."""
    groups: dict[ItemStatus, set[JobStage]] = {}
    for stage, status in _STAGE_TO_STATUS.items():
        if status is not None and not is_terminal(stage):
            groups.setdefault(status, set()).add(stage)
    return {status: frozenset(stages) for status, stages in groups.items()}


def same_status_move(source: JobStage | None, target: JobStage) -> bool:
    """True when a job's move from `source` to `target` (neither ended) shows as the
    same item status, so its echo is likely to have nothing to write."""
    return (
        source is not None and not is_terminal(source) and not is_terminal(target)
        and item_status_for_stage(source) == item_status_for_stage(target)
    )


def echo_covered(
    *, stage: JobStage, echoed_stage: JobStage | None, job_last_status: ItemStatus | None,
    retry_pending: bool,
) -> bool:
    """True when an earlier, completed echo of this job already says what echoing
    `stage` would: the job last echoed a stage that has not ended and shows as the
    same status (`job_last_status`), and no failed echo awaits a retry.  A terminal
    stage is never covered (its final comment is still owed).

    The sweeper's backlog leaves covered jobs out (`app.bridge.repository`), so an
    echo that `decide_echo` found had nothing to write need not be recorded."""
    if retry_pending or echoed_stage is None or is_terminal(stage) or is_terminal(echoed_stage):
        return False
    status = item_status_for_stage(stage)
    return status is not None and item_status_for_stage(echoed_stage) == status == job_last_status


def decide_echo(
    *,
    stage: JobStage,
    job_stage: JobStage,
    echoed_stage: JobStage | None,
    job_last_status: ItemStatus | None,
    retry_pending: bool,
    item_status: ItemStatus,
    bridge_status: ItemStatus | None,
    latest: bool,
) -> EchoPlan | None:
    """What echoing `stage` of a job (now in `job_stage`) writes, from what the echo
    read: the job's record of its echoes (`echoed_stage`, `job_last_status`, whether
    a failed echo awaits a retry) and the item.  None when there is nothing to write
    at all, not even on the job:

    - `stage` is the stage echoed last (idempotence: an unchanged outcome writes
      nothing);
    - or the echo is `echo_covered` and its plan changes nothing on the item (no
      status, no comment, the bridge's status as it is): a move within one status,
      such as ASSIGNED → BUILDING, once the item shows it.

    A terminal stage that is the job's current one and not echoed yet is
    `terminal_pending`: its comment with the totals is written, once (`plan_echo`).
    """
    if echoed_stage == stage:
        return None
    plan = plan_echo(
        stage=stage, job_last_status=job_last_status,
        terminal_pending=is_terminal(stage) and stage == job_stage,
        item_status=item_status, bridge_status=bridge_status, latest=latest,
    )
    unchanged = EchoPlan(set_status=None, comment=False, bridge_status=bridge_status)
    if plan == unchanged and echo_covered(
        stage=stage, echoed_stage=echoed_stage, job_last_status=job_last_status,
        retry_pending=retry_pending,
    ):
        return None
    return plan


def echo_comment(figures: JobFigures, status: ItemStatus | None, now: datetime) -> str:
    """The SYSTEM comment of an echo: metrics only.  `status` is the status the echo
    set on the item, None when it left the item's status alone.  A job that has
    ended (SHIPPED, FAILED, CANCELLED) always shows its cost and token totals."""
    stage = figures.stage.value
    if status is not None:
        header = f"fleetbridge: job {figures.job_id} is {stage}; item set to {status.value}."
    else:
        header = f"fleetbridge: job {figures.job_id} is {stage}; the item's status is left as is."
    lines = [
        header,
        f"- stage: {stage}",
        f"- attempts: {figures.attempts}/{figures.max_attempts}",
    ]
    final = figures.stage in _FINAL_STAGES
    if figures.started_at is not None:
        end = figures.finished_at or now
        lines.append(f"- duration: {max(0.0, (end - figures.started_at).total_seconds()):.1f}s")
    if figures.cost_usd or final:
        lines.append(f"- cost: ${figures.cost_usd:.4f}")
    if figures.tokens_in or figures.tokens_out or final:
        lines.append(f"- tokens: {figures.tokens_in} in / {figures.tokens_out} out")
    return "\n".join(lines)


_FINAL_STAGES = frozenset({JobStage.SHIPPED, JobStage.FAILED, JobStage.CANCELLED})
