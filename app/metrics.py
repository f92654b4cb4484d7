"""Prometheus metrics (issue 10 item 6).  Every series is listed in the README.

Three sources:

* counters fed from what really happened: committed and published events, stage
  changes, reaped leases, echo failures, claims, HTTP requests;
* gauges read from the database when /metrics is scraped (`refresh`): queue depth
  by (stage, priority), leases held, the echo sweeper's backlog.  They are
  fleet-wide (every product, every instance sees the same values: aggregate them
  with `max`, not `sum`), and one failed read leaves them empty for that scrape;
* the process and GC collectors of prometheus-client, and the number of live
  subscribers of this instance's event hub.

Labels never carry a product: their values come from fixed sets (stages,
priorities, event types, error codes) or are bounded (`operation_label`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from app.db import utcnow
from app.events.models import EventType
from app.events.outbox import EventRecord
from app.fleet.service import ReapResult
from app.fleet.stats import fleet_stats
from app.uow import Database

logger = logging.getLogger(__name__)

SCRAPE_TIMEOUT_SECONDS = 5.0
MAX_OPERATION_LABELS = 200
_OPERATION_NAME = re.compile(r"^[_A-Za-z][_0-9A-Za-z]{0,63}$")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Children:
    """A labelled metric's children by label values, each looked up once.

    `metric.labels(...)` takes a lock, checks the values and builds a key on every
    call — about as much as the `inc()` or `observe()` that follows; the counters of
    every request and event go through here instead.  prometheus-client hands out one
    child per label values, so this holds the very children `labels` returns; the
    series kept here are never removed (bounded label values: operation names are
    capped by `operation_label`, the rest come from fixed sets)."""

    __slots__ = ("children", "metric")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


class ServiceMetrics:
    """The metrics of one running app, in a registry of its own (so several apps can
    run in one process, as the tests do)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self._operations: set[str] = set()

        self.events = Counter(
            "fleetbridge_events_total", "Committed events by type", ["type"], registry=registry
        )
        self.events_published = Counter(
            "fleetbridge_events_published_total",
            "Events handed to this instance's hub after their commit, by type", ["type"],
            registry=registry,
        )
        self.job_stage_changes = Counter(
            "fleetbridge_job_stage_changes_total", "Job stage changes by target stage", ["to"],
            registry=registry,
        )
        self.reaped_leases = Counter(
            "fleetbridge_reaped_leases_total",
            "Expired leases taken back by this instance's reaper, by what became of the job",
            ["outcome"], registry=registry,
        )
        self.echo_failures = Counter(
            "fleetbridge_echo_failures_total",
            "Echoes of a job onto its tracker item that failed (the sweeper retries them)",
            registry=registry,
        )
        self.claims = Histogram(
            "fleetbridge_claim_duration_seconds",
            "Time to claim a job (claimNextJob's unit of work), by outcome", ["outcome"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.http_requests = Counter(
            "fleetbridge_http_requests_total",
            "HTTP requests by GraphQL operation name (or path) and outcome",
            ["operation", "outcome"], registry=registry,
        )
        self.http_latency = Histogram(
            "fleetbridge_http_request_duration_seconds",
            "HTTP request duration by GraphQL operation name (or path)", ["operation"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.queue_depth = Gauge(
            "fleetbridge_jobs",
            "Jobs that have not ended, by stage and priority (fleet-wide, read on scrape)",
            ["stage", "priority"], registry=registry,
        )
        self.leases_held = Gauge(
            "fleetbridge_leases_held",
            "Active jobs whose lease has not expired (fleet-wide, read on scrape)",
            registry=registry,
        )
        self.echo_backlog = Gauge(
            "fleetbridge_echo_backlog",
            "Jobs whose echo failed and awaits the sweeper (fleet-wide, read on scrape)",
            registry=registry,
        )
        self.database_up = Gauge(
            "fleetbridge_metrics_database_up",
            "1 when the last scrape could read the database's gauges, else 0",
            registry=registry,
        )
        self.subscribers = Gauge(
            "fleetbridge_subscribers",
            "Live subscriptions on this instance's event hub", registry=registry,
        )

        self._events = Children(self.events)
        self._published = Children(self.events_published)
        self._stage_changes = Children(self.job_stage_changes)
        self._claims = Children(self.claims)
        self._requests = Children(self.http_requests)
        self._latency = Children(self.http_latency)

    # -- fed by the app ------------------------------------------------------------

    def observe(self, records: Sequence[EventRecord]) -> None:
        """Committed events (before they are published)."""
        for record in records:
            self._events(record.type.value).inc()
            if record.type == EventType.JOB_STAGE_CHANGED and record.to_state:
                self._stage_changes(record.to_state).inc()

    def published(self, records: Sequence[EventRecord]) -> None:
        for record in records:
            self._published(record.type.value).inc()

    def reaped(self, result: ReapResult) -> None:
        self.reaped_leases.labels(outcome="requeued").inc(len(result.requeued))
        self.reaped_leases.labels(outcome="failed").inc(len(result.failed))

    def claimed(self, seconds: float, *, found: bool) -> None:
        self._claims("claimed" if found else "empty").observe(seconds)

    def request(self, operation: str, outcome: str, seconds: float) -> None:
        self._requests(operation, outcome).inc()
        self._latency(operation).observe(seconds)

    def count_subscribers(self, count: Callable[[], float]) -> None:
        """Read the hub's live subscriber count at every scrape."""
        self.subscribers.set_function(count)

    def operation_label(self, name: str | None) -> str:
        """A client's operation name as a label value, bounded: a name that is not a
        GraphQL name is `invalid`, none is `anonymous`, and once MAX_OPERATION_LABELS
        names have been seen any new one is `other`."""
        if not name:
            return "anonymous"
        if not _OPERATION_NAME.match(name):
            return "invalid"
        if name not in self._operations:
            if len(self._operations) >= MAX_OPERATION_LABELS:
                return "other"
            self._operations.add(name)
        return name

    # -- read on scrape --------------------------------------------------------------

    async def refresh(self, db: Database) -> None:
        """Read the database gauges (one bounded read, at most SCRAPE_TIMEOUT_SECONDS).
        A failure is one warning line; the gauges are then left empty."""
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT_SECONDS):
                async with db.read() as session:
                    stats = await fleet_stats(session, utcnow())
        except Exception as exc:
            logger.warning("metrics: could not read the database: %s", describe_failure(exc))
            self.queue_depth.clear()
            self.database_up.set(0)
            return
        for (stage, priority), count in stats.depth.items():
            self.queue_depth.labels(stage=stage.value, priority=priority.value).set(count)
        self.leases_held.set(stats.leases_held)
        self.echo_backlog.set(stats.echo_backlog)
        self.database_up.set(1)


def describe_failure(exc: BaseException) -> str:
    """One line about a failure, for a warning that carries no traceback."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
