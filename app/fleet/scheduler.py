"""The scheduler: which queued job a worker gets (DESIGN §3).  Pure functions only.

A job is eligible for a worker when it is QUEUED, its `not_before` has passed, its
capabilities are a subset of the worker's, and its engine class and profile are
each unset or among the worker's.

Among eligible jobs the highest *effective priority* wins: the priority's weight
(LOW 0, NORMAL 1, HIGH 2, URGENT 3) plus one level for every `aging_seconds` the
job has waited, so nothing starves.  A job waits from `eligible_since`: its
creation, or the end of its backoff after a retry.  Ties go to the job that has
waited longest (the oldest `eligible_since`), then to the smallest id.

Within one priority the effective priority can only fall as `eligible_since`
grows, so the best eligible job of each priority is the first eligible one in
`(eligible_since, id)` order.  The claim path relies on that: it asks the store
for the head of each priority's queue and lets `select_job` decide among them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from app.fleet.models import JobStage, Priority

DEFAULT_AGING_SECONDS = 600

PRIORITY_WEIGHT: dict[Priority, int] = {
    Priority.LOW: 0,
    Priority.NORMAL: 1,
    Priority.HIGH: 2,
    Priority.URGENT: 3,
}


@dataclass(frozen=True, slots=True)
class Candidate:
    id: int
    stage: JobStage
    priority: Priority
    capabilities: frozenset[str]
    engine_class: str | None
    profile: str | None
    eligible_since: datetime
    not_before: datetime | None = None


@dataclass(frozen=True, slots=True)
class WorkerProfile:
    worker_id: str
    capabilities: frozenset[str] = frozenset()
    engine_classes: frozenset[str] = frozenset()
    profiles: frozenset[str] = frozenset()


def is_eligible(job: Candidate, worker: WorkerProfile, now: datetime) -> bool:
    return (
        job.stage == JobStage.QUEUED
        and (job.not_before is None or job.not_before <= now)
        and job.capabilities <= worker.capabilities
        and (job.engine_class is None or job.engine_class in worker.engine_classes)
        and (job.profile is None or job.profile in worker.profiles)
    )


def effective_priority(
    job: Candidate, now: datetime, aging_seconds: float = DEFAULT_AGING_SECONDS
) -> int:
    waited = max(0.0, (now - job.eligible_since).total_seconds())
    return PRIORITY_WEIGHT[job.priority] + math.floor(waited / aging_seconds)


def rank(
    job: Candidate, now: datetime, aging_seconds: float = DEFAULT_AGING_SECONDS
) -> tuple[int, datetime, int]:
    """Sort key: the smallest rank is claimed first."""
    return (-effective_priority(job, now, aging_seconds), job.eligible_since, job.id)


def select_job(
    candidates: Iterable[Candidate],
    worker: WorkerProfile,
    now: datetime,
    aging_seconds: float = DEFAULT_AGING_SECONDS,
) -> Candidate | None:
    """The job `worker` should claim now, or None when no candidate is eligible."""
    eligible = [job for job in candidates if is_eligible(job, worker, now)]
    if not eligible:
        return None
    return min(eligible, key=lambda job: rank(job, now, aging_seconds))
