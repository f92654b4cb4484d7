"""One clock (DESIGN §8, issue 11): two `fleetbridge serve` processes on one
PostgreSQL, one of them running 4 s fast under libfaketime (Debian `faketime`,
installed by .ci/run).  Leases, heartbeats, backoff and the reaper read the
database's clock, so the fast instance neither reaps a lease its holder keeps
alive nor hides a job it requeues from the other instance.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.auth.models import Role
from tests.conftest import IN_CI, GraphQLClient
from tests.multi.test_two_instances import Instance

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("store", ["postgres"])]

LIBFAKETIME = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))),
                   Path("/usr/lib/faketime/libfaketime.so.1"))
SKEW_SECONDS = 4
LEASE_SECONDS = 5
HEARTBEAT_EVERY = 1.7
FAST = {
    "LD_PRELOAD": str(LIBFAKETIME),
    "FAKETIME": f"+{SKEW_SECONDS}s",
    "DONT_FAKE_MONOTONIC": "1",  # asyncio's timers keep real time
}

SUBMIT = """mutation($t: String!) { submitJob(input: {title: $t, bodyMd: "x"}) { job { id } } }"""
CLAIM = """mutation($w: WorkerInput!) { claimNextJob(worker: $w) {
  job { id stage } lease { fence expiresAt } } }"""
HEARTBEAT = """mutation($id: ID!, $fence: Int!, $s: Int) {
  heartbeat(jobId: $id, fence: $fence, leaseSeconds: $s) { fence expiresAt } }"""
FAIL = """mutation($id: ID!, $fence: Int!) {
  transitionJob(jobId: $id, fence: $fence, to: FAILED, retryable: true) { stage } }"""
JOB = """query($id: ID!) { job(id: $id) { stage attempts failureReason lease { fence } } }"""


def fast_clock_offset() -> float:
    """How far ahead a process under FAST sees the wall clock (seconds)."""
    out = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env={**os.environ, **FAST}, capture_output=True, text=True, check=True,
    )
    return float(out.stdout) - time.time()


@pytest.fixture
async def skewed_pair(database_url: str, tmp_path: Path) -> AsyncIterator[list[Instance]]:
    """A: the true clock, no background loops.  B: 4 s fast, reaping every 0.2 s."""
    if not LIBFAKETIME.exists():
        message = "libfaketime is not installed (apt-get install faketime)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    offset = fast_clock_offset()
    assert SKEW_SECONDS - 1 < offset < SKEW_SECONDS + 1, offset
    common = {"FLEET_RETRY_BACKOFF_SECONDS": "0", "FLEET_REAPER_INTERVAL_SECONDS": "0.2"}
    instances = [
        Instance("A", database_url, tmp_path,
                 extra_env={**common, "FLEET_BACKGROUND_LOOPS": "false"}),
        Instance("B-fast", database_url, tmp_path, extra_env={**common, **FAST}),
    ]
    try:
        await asyncio.gather(*(instance.wait_healthy() for instance in instances))
        yield instances
    finally:
        for instance in instances:
            instance.kill()
            if log := instance.log():
                print(f"--- instance {instance.name} log ---\n{log}")


async def test_a_fast_instance_neither_reaps_a_live_lease_nor_hides_a_requeued_job(
    skewed_pair: list[Instance], http_client, make_token,
) -> None:
    instance_a, instance_b = skewed_pair
    member, worker = await make_token("acme", Role.MEMBER), await make_token("acme", Role.WORKER)
    on_a: GraphQLClient = http_client(instance_a, worker)
    on_b: GraphQLClient = http_client(instance_b, worker)
    submit_a = http_client(instance_a, member)
    job_id = (await submit_a.data(SUBMIT, t="kept alive"))["submitJob"]["job"]["id"]
    worker_a = {"workerId": "w-a", "leaseSeconds": LEASE_SECONDS}

    claimed = (await on_a.data(CLAIM, w=worker_a))["claimNextJob"]
    assert claimed["job"]["id"] == job_id
    fence = claimed["lease"]["fence"]

    # The holder heartbeats every 1.7 s through A while B's reaper runs every 0.2 s,
    # seeing the lease 4 s nearer its end than it is by its own clock.
    beats = 0
    end = time.monotonic() + 2 * LEASE_SECONDS
    while time.monotonic() < end:
        await asyncio.sleep(HEARTBEAT_EVERY)
        lease = (await on_a.data(HEARTBEAT, id=job_id, fence=fence, s=LEASE_SECONDS))["heartbeat"]
        assert lease["fence"] == fence
        beats += 1
    job = (await on_a.data(JOB, id=job_id))["job"]
    assert job["stage"] == "ASSIGNED", job
    assert job["lease"]["fence"] == fence
    assert job["failureReason"] is None

    # The holder goes quiet: B reaps the lease when it really expires (not 4 s early
    # and not late) and A can claim the requeued job at once.
    quiet_since = time.monotonic()
    while (await on_a.data(JOB, id=job_id))["job"]["stage"] != "QUEUED":
        assert time.monotonic() - quiet_since < LEASE_SECONDS + 5, "never reaped"
        await asyncio.sleep(0.05)
    reaped_after = time.monotonic() - quiet_since
    assert reaped_after > LEASE_SECONDS - HEARTBEAT_EVERY - 1.0  # never early by the skew
    again = (await on_a.data(CLAIM, w=worker_a))["claimNextJob"]
    assert again["job"] is not None, "a job the fast instance requeued is hidden from A"
    assert again["job"]["id"] == job_id

    # A retryable failure reported through B queues it again: claimable on A at once.
    await on_b.data(FAIL, id=job_id, fence=again["lease"]["fence"])
    third = (await on_a.data(CLAIM, w=worker_a))["claimNextJob"]
    assert third["job"] is not None, "a job the fast instance requeued is hidden from A"
    assert third["job"]["id"] == job_id
    print(f"\nskew {SKEW_SECONDS}s: {beats} heartbeats kept the lease; reaped "
          f"{reaped_after:.2f}s after the last one; requeued jobs claimable on A at once")
