"""Prometheus metrics, fed from committed events (so they count what really happened)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter

from app.events.models import EventType
from app.events.outbox import EventRecord


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.events = Counter(
            "fleetbridge_events_total", "Committed events by type", ["type"],
            registry=self.registry,
        )
        self.job_stage_changes = Counter(
            "fleetbridge_job_stage_changes_total", "Job stage changes by target stage", ["to"],
            registry=self.registry,
        )

    def observe(self, records: Sequence[EventRecord]) -> None:
        for record in records:
            self.events.labels(type=record.type.value).inc()
            if record.type == EventType.JOB_STAGE_CHANGED and record.to_state:
                self.job_stage_changes.labels(to=record.to_state).inc()
