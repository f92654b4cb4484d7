"""Shared by the worker and watch tests: `fleetbridge worker` as a real process, polled
with deadlines (never a bare sleep hoping for timing)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.api.test_cli import ROOT, cli_env

DEADLINE = 60.0

CREATE_ITEM = "mutation($input: CreateItemInput!) { createItem(input: $input) { id } }"
INGEST = "mutation($id: ID!) { ingestItemAsJob(itemId: $id) { job { id } } }"
JOB = """query($id: ID!) { job(id: $id) { stage attempts failureReason lease { fence }
  metrics { costUsd tokensIn tokensOut } item { status } } }"""
CLAIM = """mutation($worker: WorkerInput!) { claimNextJob(worker: $worker) {
  job { id } lease { fence } } }"""
TRANSITION = """mutation($id: ID!, $fence: Int!, $to: JobStage!) {
  transitionJob(jobId: $id, fence: $fence, to: $to) { stage } }"""
CANCEL = "mutation($id: ID!, $reason: String) { cancelJob(jobId: $id, reason: $reason) { stage } }"
SLEEPING_COMMAND = (sys.executable, "-c", "import time; time.sleep(120)")


async def ingested_job(member: Any, description: str, labels: list[str]) -> tuple[str, str]:
    item = (await member.data(CREATE_ITEM, input={
        "title": "Ship it", "description": description, "labels": labels,
    }))["createItem"]
    job = (await member.data(INGEST, id=item["id"]))["ingestItemAsJob"]["job"]
    return item["id"], job["id"]


async def job_of(member: Any, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = (await member.data(JOB, id=job_id))["job"]
    return job


async def until(check: Callable[[], Awaitable[bool]], what: str,
                process: asyncio.subprocess.Process | None = None,
                deadline: float = DEADLINE) -> None:
    """Poll `check` until it is true; fail after `deadline` s or if `process` exits."""
    end = time.monotonic() + deadline
    while not await check():
        if process is not None:
            assert process.returncode is None, f"the worker exited early waiting for {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def stage_is(member: Any, job_id: str, stage: str) -> bool:
    return bool((await job_of(member, job_id))["stage"] == stage)


class WorkerProcess:
    """`fleetbridge worker … -- COMMAND` with its stderr collected line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, url: str, token: str, *args: str,
                    command: tuple[str, ...] = SLEEPING_COMMAND,
                    **env: str) -> WorkerProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app.cli", "worker", "--url", url, *args, "--", *command,
            cwd=ROOT, env=cli_env(FLEET_TOKEN=token, **env),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, as on a terminal
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode().rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    async def said(self, fragment: str) -> bool:
        return any(fragment in line for line in self.lines)

    async def wait_for_line(self, fragment: str, deadline: float = DEADLINE) -> None:
        async def check() -> bool:
            if self.process.returncode is not None:
                await self._reader
                assert fragment in self.text, self.text
            return await self.said(fragment)

        await until(check, f"{fragment!r} in the worker's output", deadline=deadline)

    async def finish(self, deadline: float = DEADLINE) -> int:
        try:
            await asyncio.wait_for(self.process.wait(), deadline)
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        await self._reader
        assert self.process.returncode is not None
        return self.process.returncode


def python_command(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def unused_path() -> str:
    return str(Path("/nonexistent") / "agent")
