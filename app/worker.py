"""The reference worker: claims jobs through `FleetClient` and runs a command for each.

For every claimed job the worker:

1. moves the job to BUILDING;
2. runs the command with the job's fields in environment variables (`FLEET_JOB_ID`,
   `FLEET_JOB_TITLE`, `FLEET_JOB_KIND`, `FLEET_JOB_PRIORITY`, `FLEET_JOB_CAPABILITIES`
   (comma separated), `FLEET_JOB_ENGINE_CLASS`, `FLEET_JOB_PROFILE`, `FLEET_JOB_BUDGET`,
   `FLEET_JOB_ATTEMPT`, `FLEET_JOB_MAX_ATTEMPTS`, `FLEET_JOB_TRACKER_ITEM_ID`,
   `FLEET_JOB_FENCE`, `FLEET_WORKER_ID`, `FLEET_METRICS_FILE`) and the job's `bodyMd` on
   stdin.  The worker's bearer token (`FLEET_TOKEN`) is *not* passed on;
3. heartbeats the lease every `leaseSeconds / 3` while the command runs.  A `CONFLICT`
   (or `NOT_FOUND`) answer means the service ended the lease — the job was cancelled
   (perhaps with its item), failed (`budget exceeded`) or reaped — so the command is
   killed and the job's stage and reason are read and reported;
4. when the command exits: 0 → SHIPPED; anything else → FAILED with the reason
   `exit code N` (`killed by signal N`).  Exit code 75 (`EX_TEMPFAIL` of sysexits.h)
   reports the failure as retryable, so the job is queued again while it has attempts
   left.  The service's answer is reported (a budget overrun ends FAILED).

The command may write `{"costUsd": 0.1, "tokensIn": 10, "tokensOut": 5}` to the file
named by `FLEET_METRICS_FILE`; those figures are sent with the final transition.

Never fatal: transient failures (service unavailable, unreachable, slow) are retried
with capped, jittered exponential backoff by the client, one warning line each.
Fatal: a command that cannot be started (`CommandError`; the job is released first, its
attempt not counted) and an answer that will not change (a refused token).  Stopping
(SIGINT/SIGTERM → `Worker.stop`) kills the command and releases the held job, its
attempt not counted; the CLI then exits 130/143.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import tempfile
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from app.client import (
    ClaimedJob,
    FleetApiError,
    FleetClient,
    JobState,
    RetryPolicy,
    describe,
)
from app.worker_command import feed_stdin, job_environment, kill, read_metrics
from app.worker_report import Reporter

T = TypeVar("T")

EX_TEMPFAIL = 75
STOP_GRACE_SECONDS = 5.0  # how long a request in flight may finish after a stop
RELEASE_SECONDS = 15.0  # how long a release is retried after a stop
LEASE_LOST_CODES = frozenset({"CONFLICT", "NOT_FOUND"})
# how a command ends when the terminal's SIGINT (or a SIGTERM to the group) reached it
INTERRUPTED_EXITS = frozenset({-signal.SIGINT, -signal.SIGTERM, 130, 143})


class CommandError(Exception):
    """The command could not be started; the job was released (see `released`)."""

    def __init__(self, message: str, released: JobState | None) -> None:
        super().__init__(message)
        self.released = released


class Stopped(Exception):
    """The worker was stopped while a request was in flight."""


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
    """What happened to one claimed job.  `state` is the job as the service last
    answered it (None when it could not be read); `lease_lost` when the service ended
    the lease before the worker reported; `released` when the worker gave it back."""

    job_id: str
    exit_code: int | None
    state: JobState | None
    lease_lost: bool = False
    released: bool = False

    @property
    def stage(self) -> str | None:
        return None if self.state is None else self.state.stage


def failure_reason(exit_code: int) -> str:
    if exit_code < 0:
        return f"killed by signal {-exit_code}"
    return f"exit code {exit_code}"


class Worker:
    """Claim, run, report — until stopped (or after one claim with `once`)."""

    def __init__(self, client: FleetClient, config: WorkerConfig,
                 reporter: Reporter | None = None) -> None:
        self.client = client
        self.config = config
        self.reporter = reporter or Reporter(live=False)
        self.stopping = asyncio.Event()
        self.stop_reason: str | None = None
        self.signal: signal.Signals | None = None
        # a stop interrupts the client's retry waits at once
        client.retry = RetryPolicy(
            client.retry.initial_seconds, client.retry.max_seconds,
            client.retry.jitter_seconds, client.retry.give_up_after, interrupt=self.stopping,
        )

    def stop(self, signum: signal.Signals | None = None) -> None:
        self.signal = signum
        self.stop_reason = f"worker stopped by {signum.name}" if signum else "worker stopped"
        self.stopping.set()

    async def run(self) -> list[JobOutcome]:
        """Returns the outcomes; raises CommandError, or FleetApiError for an answer that
        will not change (a refused token)."""
        outcomes: list[JobOutcome] = []
        while not self.stopping.is_set():
            self.reporter.status("claiming a job")
            try:
                job = await self._guarded(self.client.claim(
                    self.config.worker_id, capabilities=self.config.capabilities,
                    engine_classes=self.config.engine_classes, profiles=self.config.profiles,
                    lease_seconds=self.config.lease_seconds,
                ))
            except Stopped:
                break
            if job is not None:
                outcomes.append(await self.process(job))
            elif self.config.once:
                self.reporter.line("no job in the queue")
            if self.config.once:
                break
            if job is None:
                self.reporter.status(f"waiting for a job (next try in "
                                     f"{self.config.poll_seconds:g}s)")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.config.poll_seconds)
        return outcomes

    async def _guarded(self, call: Awaitable[T]) -> T:
        """`await call`; once stopped, the call gets STOP_GRACE_SECONDS to finish.  A
        failure after the stop (the retries were interrupted) is `Stopped` too."""
        task = asyncio.ensure_future(call)
        stopper = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)
            if not task.done():
                task.cancel()
                raise Stopped
            if task.exception() is not None and self.stopping.is_set():
                raise Stopped from task.exception()
            return task.result()
        finally:
            stopper.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, stopper, return_exceptions=True)

    async def process(self, job: ClaimedJob) -> JobOutcome:
        started = time.monotonic()
        fence = job.lease.fence
        self.reporter.claimed(job)
        if self.stopping.is_set():
            return await self._release(job, None, self.stop_reason or "worker stopped")
        try:
            await self._guarded(self.client.transition(job.id, fence, "BUILDING"))
        except Stopped:
            return await self._release(job, None, self.stop_reason or "worker stopped")
        except FleetApiError as exc:
            if exc.code not in LEASE_LOST_CODES:
                raise
            return await self._ended_by_service(job, exc, None, started)
        self.reporter.stage(job, "BUILDING")

        with tempfile.TemporaryDirectory(prefix="fleet-job-") as scratch:
            metrics_file = Path(scratch) / "metrics.json"
            piped = asyncio.subprocess.PIPE if self.reporter.live else None
            try:
                process = await asyncio.create_subprocess_exec(
                    *self.config.command, stdin=asyncio.subprocess.PIPE, stdout=piped,
                    stderr=piped, env=job_environment(job, self.config.worker_id, metrics_file),
                )
            except OSError as exc:
                message = f"cannot run the command {list(self.config.command)!r}: {exc}"
                outcome = await self._release(job, None, message)
                raise CommandError(message, outcome.state) from exc
            exit_code, lost = await self._supervise(job, process)
            metrics = read_metrics(metrics_file)

        if lost is not None:
            return await self._ended_by_service(job, lost, exit_code, started)
        if exit_code in INTERRUPTED_EXITS and not self.stopping.is_set():
            # Ctrl-C on a terminal reaches the command too, and it may exit first:
            # give the worker's own signal a moment to arrive before reporting.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 1.0)
        if self.stopping.is_set() and exit_code != 0:
            return await self._release(job, exit_code, self.stop_reason or "worker stopped")
        reason = None if exit_code == 0 else failure_reason(exit_code)
        try:
            state = await self.client.transition(
                job.id, fence, "SHIPPED" if reason is None else "FAILED", reason=reason,
                retryable=exit_code == EX_TEMPFAIL, metrics=metrics,
            )
        except FleetApiError as exc:
            if exc.code in LEASE_LOST_CODES:
                return await self._ended_by_service(job, exc, None, started)
            if not self.stopping.is_set():
                raise
            return self._unreported(job, exit_code, exc)
        except Exception as exc:  # retries interrupted by a stop
            if not self.stopping.is_set():
                raise
            return self._unreported(job, exit_code, exc)
        self.reporter.finished(job, exit_code, state, time.monotonic() - started)
        return JobOutcome(job.id, exit_code, state)

    def _unreported(self, job: ClaimedJob, exit_code: int, exc: Exception) -> JobOutcome:
        self.reporter.line(f"job {job.id}: exit {exit_code} could not be reported "
                           f"({describe(exc)}); stopped, its lease will run out")
        return JobOutcome(job.id, exit_code, None)

    async def _supervise(
        self, job: ClaimedJob, process: asyncio.subprocess.Process
    ) -> tuple[int, FleetApiError | None]:
        """Run until the command exits, the lease is lost or the worker is stopped;
        the command is killed in the last two cases.  (exit code, the lease-loss)."""
        helpers = [asyncio.create_task(feed_stdin(process, str(job.fields.get("bodyMd") or "")))]
        if process.stdout is not None and process.stderr is not None:
            helpers += [asyncio.create_task(self._forward(process.stdout)),
                        asyncio.create_task(self._forward(process.stderr))]
        lease = asyncio.create_task(self._keep_lease(job))
        waiter = asyncio.create_task(process.wait())
        stopper = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({waiter, lease, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not waiter.done():
                await kill(process)
            if not lease.done():
                lease.cancel()
            await asyncio.gather(lease, stopper, return_exceptions=True)
            await asyncio.gather(*helpers, return_exceptions=True)
        lost = lease.result() if lease.done() and not lease.cancelled() else None
        return await waiter, lost

    async def _forward(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.reporter.output(raw.decode(errors="replace").rstrip("\n"))

    async def _keep_lease(self, job: ClaimedJob) -> FleetApiError:
        """Heartbeat until cancelled; returns the refusal when the lease is lost."""
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
                    return exc
                raise

    async def _ended_by_service(
        self, job: ClaimedJob, refusal: FleetApiError, killed: int | None, started: float
    ) -> JobOutcome:
        """The service ended the lease: read why, and say so."""
        state: JobState | None = None
        with contextlib.suppress(Exception):
            state = await self.client.job(job.id, retry=self.client.retry.bounded(10.0))
        self.reporter.ended_by_service(job, state, refusal.message, killed,
                                       time.monotonic() - started)
        return JobOutcome(job.id, killed, state, lease_lost=True)

    async def _release(self, job: ClaimedJob, exit_code: int | None, reason: str) -> JobOutcome:
        """Give the job back (its attempt not counted); retried for a while even when
        the worker is stopping, and then left to the lease's expiry."""
        state: JobState | None = None
        try:
            state = await self.client.release(
                job.id, job.lease.fence, reason, retry=self.client.retry.bounded(RELEASE_SECONDS)
            )
        except FleetApiError as exc:
            if exc.code not in LEASE_LOST_CODES:
                raise
            return await self._ended_by_service(job, exc, exit_code, time.monotonic())
        except Exception as exc:  # unreachable even after retrying: the lease will expire
            self.reporter.released(job, f"{reason}; {exc}", None)
            return JobOutcome(job.id, exit_code, None)
        self.reporter.released(job, reason, state)
        return JobOutcome(job.id, exit_code, state, released=True)


async def run_worker(client: FleetClient, config: WorkerConfig, reporter: Reporter) -> Worker:
    """The `fleetbridge worker` loop: runs until SIGINT/SIGTERM (or one claim with
    `once`); the finished Worker tells which signal stopped it.  Raises CommandError
    and FleetApiError as `Worker.run` does."""
    worker = Worker(client, config, reporter)
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, worker.stop, signum)
            installed.append(signum)
    ticker = asyncio.create_task(_tick(reporter))
    reporter.line(f"worker {config.worker_id} started: jobs from {client.url}, "
                  f"command {_one_line(shlex.join(config.command))}")
    try:
        async with client:
            await worker.run()
        return worker
    finally:
        ticker.cancel()
        for signum in installed:
            loop.remove_signal_handler(signum)


def _one_line(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


async def _tick(reporter: Reporter) -> None:
    while True:
        await asyncio.sleep(1.0)
        reporter.tick()
