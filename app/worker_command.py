"""The command a worker runs for a job: its environment, its stdin, its metrics file, and
how it is stopped (SIGTERM, then SIGKILL after KILL_GRACE_SECONDS).  See app/worker.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

from app.client import ClaimedJob

KILL_GRACE_SECONDS = 5.0


def job_environment(job: ClaimedJob, worker_id: str, metrics_file: Path) -> dict[str, str]:
    """The command's environment: the worker's own, minus its token, plus the job."""
    env = {key: value for key, value in os.environ.items() if key != "FLEET_TOKEN"}
    fields = job.fields

    def text(value: Any) -> str:
        return "" if value is None else str(value)

    env.update({
        "FLEET_JOB_ID": job.id,
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



async def feed_stdin(process: asyncio.subprocess.Process, body: str) -> None:
    assert process.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        process.stdin.write(body.encode())
        await process.stdin.drain()
    process.stdin.close()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await process.stdin.wait_closed()


async def kill(process: asyncio.subprocess.Process) -> None:
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
