"""The reference worker: claims jobs over the GraphQL API and runs a command for each.

`FleetClient` is the whole of the GraphQL talking (httpx, async); `Worker` is the loop.

For every claimed job the worker:

1. moves the job to BUILDING;
2. runs the command with the job's fields in environment variables (`FLEET_JOB_ID`,
   `FLEET_JOB_TITLE`, `FLEET_JOB_KIND`, `FLEET_JOB_PRIORITY`, `FLEET_JOB_CAPABILITIES`
   (comma separated), `FLEET_JOB_ENGINE_CLASS`, `FLEET_JOB_PROFILE`, `FLEET_JOB_BUDGET`,
   `FLEET_JOB_ATTEMPT`, `FLEET_JOB_MAX_ATTEMPTS`, `FLEET_JOB_TRACKER_ITEM_ID`,
   `FLEET_JOB_FENCE`, `FLEET_WORKER_ID`, `FLEET_METRICS_FILE`) and the job's `bodyMd` on
   stdin.  The worker's bearer token (`FLEET_TOKEN`) is *not* passed on: the command
   cannot act on the lease behind the worker's back;
3. heartbeats the lease every `leaseSeconds / 3` while the command runs; a `CONFLICT`
   (or `NOT_FOUND`) answer means the lease is lost — the job was cancelled, reaped or
   claimed again — and the command is killed, with nothing more reported;
4. when the command exits: 0 → SHIPPED; anything else → FAILED with the reason
   `exit code N` (`killed by signal N`).  Exit code 75 (`EX_TEMPFAIL` of sysexits.h)
   reports the failure as retryable, so the job is queued again while it has attempts
   left.  Stopping the worker (SIGINT/SIGTERM) kills the command and reports a
   retryable failure too, as does a command that cannot be started.

The command may write `{"costUsd": 0.1, "tokensIn": 10, "tokensOut": 5}` to the file
named by `FLEET_METRICS_FILE`; those figures are sent with the final transition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)

EX_TEMPFAIL = 75
DEFAULT_URL = "http://127.0.0.1:8000/graphql"
KILL_GRACE_SECONDS = 5.0
LEASE_LOST_CODES = frozenset({"CONFLICT", "NOT_FOUND"})

JOB_FIELDS = """
  id title bodyMd kind priority capabilities engineClass profile budget attempts
  maxAttempts trackerItemId stage
"""
CLAIM = f"""
mutation($worker: WorkerInput!) {{ claimNextJob(worker: $worker) {{
  job {{ {JOB_FIELDS} }} lease {{ workerId fence expiresAt }}
}} }}
"""
HEARTBEAT = """
mutation($jobId: ID!, $fence: Int!, $leaseSeconds: Int) {
  heartbeat(jobId: $jobId, fence: $fence, leaseSeconds: $leaseSeconds) { fence expiresAt }
}
"""
TRANSITION = """
mutation($jobId: ID!, $fence: Int!, $to: JobStage!, $metrics: JobMetricsInput,
         $reason: String, $retryable: Boolean) {
  transitionJob(jobId: $jobId, fence: $fence, to: $to, metrics: $metrics, reason: $reason,
                retryable: $retryable) { id stage attempts failureReason }
}
"""


class FleetApiError(Exception):
    """A GraphQL error answer; `code` is its `extensions.code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Lease:
    fence: int
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    fields: dict[str, Any]
    lease: Lease

    @property
    def id(self) -> str:
        return str(self.fields["id"])


class FleetClient:
    """The GraphQL calls a worker makes, over one pooled httpx client."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self.url = url
        self._http = httpx.AsyncClient(
            timeout=timeout, headers={"Authorization": f"Bearer {token}"}
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def execute(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        response = await self._http.post(self.url, json={"query": query, "variables": variables})
        try:
            body = response.json()
        except ValueError:
            response.raise_for_status()
            raise
        errors = body.get("errors") if isinstance(body, dict) else None
        if errors:
            first = errors[0]
            code = (first.get("extensions") or {}).get("code") or "INTERNAL_SERVER_ERROR"
            raise FleetApiError(str(code), str(first.get("message", "")))
        response.raise_for_status()
        data: dict[str, Any] = body["data"]
        return data

    async def claim(
        self, worker_id: str, *, capabilities: Sequence[str] = (),
        engine_classes: Sequence[str] = (), profiles: Sequence[str] = (),
        lease_seconds: int | None = None,
    ) -> ClaimedJob | None:
        worker = {
            "workerId": worker_id, "capabilities": list(capabilities),
            "engineClasses": list(engine_classes), "profiles": list(profiles),
            "leaseSeconds": lease_seconds,
        }
        payload = (await self.execute(CLAIM, {"worker": worker}))["claimNextJob"]
        if payload["job"] is None:
            return None
        return ClaimedJob(payload["job"], _lease(payload["lease"]))

    async def heartbeat(self, job_id: str, fence: int, lease_seconds: int | None) -> Lease:
        data = await self.execute(
            HEARTBEAT, {"jobId": job_id, "fence": fence, "leaseSeconds": lease_seconds}
        )
        return _lease(data["heartbeat"])

    async def transition(
        self, job_id: str, fence: int, to: str, *, reason: str | None = None,
        retryable: bool = False, metrics: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        data = await self.execute(TRANSITION, {
            "jobId": job_id, "fence": fence, "to": to, "reason": reason,
            "retryable": retryable, "metrics": metrics,
        })
        job: dict[str, Any] = data["transitionJob"]
        return job


def _lease(payload: dict[str, Any]) -> Lease:
    expires_at = datetime.fromisoformat(str(payload["expiresAt"]))
    if expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    return Lease(fence=int(payload["fence"]), expires_at=expires_at)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    command: Sequence[str]
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    capabilities: Sequence[str] = ()
    engine_classes: Sequence[str] = ()
    profiles: Sequence[str] = ()
    lease_seconds: int | None = None
    poll_seconds: float = 5.0
    once: bool = False


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What happened to one claimed job.  `stage` is the stage the worker reported
    (None when it could not report: the lease was lost)."""

    job_id: str
    exit_code: int | None
    stage: str | None
    lease_lost: bool = False
    reason: str | None = None


def job_environment(job: ClaimedJob, worker_id: str, metrics_file: Path) -> dict[str, str]:
    """The command's environment: the worker's own, minus its token, plus the job."""
    env = {key: value for key, value in os.environ.items() if key != "FLEET_TOKEN"}
    fields = job.fields

    def text(value: Any) -> str:
        return "" if value is None else str(value)

    env.update({
        "FLEET_JOB_ID": text(fields.get("id")),
        "FLEET_JOB_TITLE": text(fields.get("title")),
        "FLEET_JOB_KIND": text(fields.get("kind")),
        "FLEET_JOB_PRIORITY": text(fields.get("priority")),
        "FLEET_JOB_CAPABILITIES": ",".join(fields.get("capabilities") or ()),
        "FLEET_JOB_ENGINE_CLASS": text(fields.get("engineClass")),
        "FLEET_JOB_PROFILE": text(fields.get("profile")),
        "FLEET_JOB_BUDGET": text(fields.get("budget")),
        "FLEET_JOB_ATTEMPT": text(fields.get("attempts")),
        "FLEET_JOB_MAX_ATTEMPTS": text(fields.get("maxAttempts")),
        "FLEET_JOB_TRACKER_ITEM_ID": text(fields.get("trackerItemId")),
        "FLEET_JOB_FENCE": str(job.lease.fence),
        "FLEET_WORKER_ID": worker_id,
        "FLEET_METRICS_FILE": str(metrics_file),
    })
    return env


def read_metrics(path: Path) -> dict[str, Any] | None:
    """The metrics the command left in FLEET_METRICS_FILE; unusable content is ignored."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    metrics: dict[str, Any] = {}
    for key, kind in (("costUsd", float), ("tokensIn", int), ("tokensOut", int)):
        value = raw.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            metrics[key] = kind(value)
    return metrics or None


def failure_reason(exit_code: int) -> str:
    if exit_code < 0:
        return f"killed by signal {-exit_code}"
    return f"exit code {exit_code}"


class Worker:
    """Claim, run, report — until stopped (or after one job with `once`)."""

    def __init__(self, client: FleetClient, config: WorkerConfig) -> None:
        self.client = client
        self.config = config
        self.stopping = asyncio.Event()

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> list[JobOutcome]:
        outcomes: list[JobOutcome] = []
        while not self.stopping.is_set():
            try:
                job = await self.client.claim(
                    self.config.worker_id, capabilities=self.config.capabilities,
                    engine_classes=self.config.engine_classes, profiles=self.config.profiles,
                    lease_seconds=self.config.lease_seconds,
                )
                if job is not None:
                    outcomes.append(await self.process(job))
            except httpx.HTTPError as exc:
                # The service is unreachable: a held lease runs out and the reaper
                # requeues the job.  A single-shot worker gives up; a loop tries again.
                if self.config.once:
                    raise
                logger.warning("the service did not answer (%s); retrying", exc)
                job = None
            if self.config.once:
                break
            if job is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.config.poll_seconds)
        return outcomes

    async def process(self, job: ClaimedJob) -> JobOutcome:
        fence = job.lease.fence
        logger.info("claimed job %s (fence %s)", job.id, fence)
        try:
            await self.client.transition(job.id, fence, "BUILDING")
        except FleetApiError as exc:
            if exc.code not in LEASE_LOST_CODES:
                raise
            logger.warning("job %s: lease lost before it started: %s", job.id, exc)
            return JobOutcome(job.id, None, None, lease_lost=True, reason=exc.message)

        with tempfile.TemporaryDirectory(prefix="fleet-job-") as scratch:
            metrics_file = Path(scratch) / "metrics.json"
            try:
                process = await asyncio.create_subprocess_exec(
                    *self.config.command, stdin=asyncio.subprocess.PIPE,
                    env=job_environment(job, self.config.worker_id, metrics_file),
                )
            except OSError as exc:  # not found, not executable: another worker may do
                return await self._report(job, -1, f"cannot run the command: {exc}", True, None)
            feeder = asyncio.create_task(_feed_stdin(process, str(job.fields.get("bodyMd") or "")))
            lease_lost = asyncio.create_task(self._keep_lease(job))
            waiter = asyncio.create_task(process.wait())
            stopper = asyncio.create_task(self.stopping.wait())
            try:
                await asyncio.wait({waiter, lease_lost, stopper},
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not waiter.done():
                    await _kill(process)
                lease_lost.cancel()
                feeder.cancel()
                await asyncio.gather(feeder, lease_lost, stopper, return_exceptions=True)
            exit_code = await waiter
            metrics = read_metrics(metrics_file)

        if lease_lost.done() and not lease_lost.cancelled() and lease_lost.result() is not None:
            reason = lease_lost.result()
            logger.warning("job %s: lease lost (%s); command killed", job.id, reason)
            return JobOutcome(job.id, exit_code, None, lease_lost=True, reason=reason)
        if self.stopping.is_set() and exit_code != 0:
            return await self._report(job, exit_code, "worker stopped", True, metrics)
        if exit_code == 0:
            return await self._report(job, exit_code, None, False, metrics)
        return await self._report(
            job, exit_code, failure_reason(exit_code), exit_code == EX_TEMPFAIL, metrics
        )

    async def _report(
        self, job: ClaimedJob, exit_code: int, reason: str | None, retryable: bool,
        metrics: dict[str, Any] | None,
    ) -> JobOutcome:
        to = "SHIPPED" if reason is None else "FAILED"
        try:
            result = await self.client.transition(
                job.id, job.lease.fence, to, reason=reason, retryable=retryable, metrics=metrics
            )
        except FleetApiError as exc:
            if exc.code not in LEASE_LOST_CODES:
                raise
            logger.warning("job %s: could not report %s: %s", job.id, to, exc)
            return JobOutcome(job.id, exit_code, None, lease_lost=True, reason=exc.message)
        logger.info("job %s: exit %s -> %s", job.id, exit_code, result["stage"])
        return JobOutcome(job.id, exit_code, str(result["stage"]), reason=reason)

    async def _keep_lease(self, job: ClaimedJob) -> str | None:
        """Heartbeat until cancelled; returns the reason when the lease is lost."""
        lease_seconds = self.config.lease_seconds
        period = (lease_seconds if lease_seconds is not None else max(
            3.0, (job.lease.expires_at - datetime.now(UTC)).total_seconds()
        )) / 3
        while True:
            await asyncio.sleep(period)
            try:
                await self.client.heartbeat(job.id, job.lease.fence, lease_seconds)
            except FleetApiError as exc:
                if exc.code in LEASE_LOST_CODES:
                    return exc.message
                logger.warning("job %s: heartbeat refused: %s", job.id, exc)
            except httpx.HTTPError as exc:
                logger.warning("job %s: heartbeat failed, will retry: %s", job.id, exc)


async def _feed_stdin(process: asyncio.subprocess.Process, body: str) -> None:
    assert process.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        process.stdin.write(body.encode())
        await process.stdin.drain()
    process.stdin.close()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await process.stdin.wait_closed()


async def _kill(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after a grace period."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), KILL_GRACE_SECONDS)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def run_worker(url: str, token: str, config: WorkerConfig) -> list[JobOutcome]:
    """The `fleetbridge worker` entry point: runs until SIGINT/SIGTERM (or one job)."""
    client = FleetClient(url, token)
    worker = Worker(client, config)
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, worker.stop)
            installed.append(signum)
    try:
        return await worker.run()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        await client.aclose()
