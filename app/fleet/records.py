"""The fleet service's value records: its policy, what a caller hands it, what it
returns.  Immutable (`frozen=True`); importable from `app.fleet.service` as well."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from app.fleet.models import Job, Priority


class SubmitOutcome(enum.StrEnum):
    CREATED = "CREATED"
    DEDUPED = "DEDUPED"


@dataclass(frozen=True, slots=True)
class FleetPolicy:
    lease_seconds: int = 300
    aging_seconds: int = 600
    retry_backoff_seconds: float = 30.0
    retry_backoff_max_seconds: float = 3_600.0
    # The random fraction of each backoff (0 none, 0.5 equal jitter, 1 full jitter).
    retry_backoff_jitter: float = 0.5
    # PostgreSQL: a transition's statement also reads its tracker item for the echo
    # (FLEET_TRACKER_ECHO on; app.fleet.changes.EchoSeen).
    echo_reads: bool = False


@dataclass(frozen=True, slots=True)
class JobSpec:
    title: str
    body_md: str
    kind: str = "code"
    priority: Priority = Priority.NORMAL
    capabilities: tuple[str, ...] = ()
    engine_class: str | None = None
    profile: str | None = None
    budget: float | None = None
    max_attempts: int = 3
    idempotency_key: str | None = None
    tracker_item_id: int | None = None


@dataclass(frozen=True, slots=True)
class MetricsDelta:
    cost_usd: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0


@dataclass(frozen=True, slots=True)
class SubmitResult:
    job: Job
    outcome: SubmitOutcome


@dataclass(frozen=True, slots=True)
class ReapResult:
    requeued: tuple[int, ...] = ()
    failed: tuple[int, ...] = ()


