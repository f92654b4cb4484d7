"""`app.bridge.group_commit.GroupCommit` on its own: which requests a run serves, and
when each caller is let go.  No database: a run is a coroutine that the test holds
at a gate (an `asyncio.Event`), so every interleaving here is forced, not hoped for.
"""

from __future__ import annotations

import asyncio

import pytest

from app.bridge.group_commit import GroupCommit, Take
from app.bridge.service import _unique


class Runs:
    """A run that waits at `gate` (what a run waits for: the writer), then takes the
    pending requests once and records them; `fail` makes it raise after taking."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.batches: list[list[int]] = []
        self.fail = False

    async def __call__(self, take: Take[int]) -> None:
        await self.gate.wait()
        self.batches.append(take())
        if self.fail:
            raise RuntimeError("the run failed after taking its requests")


async def settle() -> None:
    """Let every ready task run until none is left ready."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_requests_pending_while_a_run_waits_are_served_by_that_run() -> None:
    runs = Runs()
    group: GroupCommit[int] = GroupCommit(runs)
    callers = [asyncio.create_task(group.submit(n)) for n in range(4)]
    await settle()
    assert group.waiting()  # the run waits at the gate: a new request joins it
    late = asyncio.create_task(group.submit(4))
    await settle()
    assert not any(task.done() for task in [*callers, late])
    runs.gate.set()
    await asyncio.gather(*callers, late)
    assert runs.batches == [[0, 1, 2, 3, 4]]  # one run, in the order they came
    assert (group.runs, group.served, group.waiting()) == (1, 5, False)


async def test_a_request_that_comes_after_the_take_waits_for_the_next_run() -> None:
    runs = Runs()
    taken = asyncio.Event()
    release = asyncio.Event()

    async def run(take: Take[int]) -> None:
        runs.batches.append(take())
        taken.set()
        await release.wait()  # the run's work, after it took its requests

    group: GroupCommit[int] = GroupCommit(run)
    first = asyncio.create_task(group.submit(1))
    await taken.wait()
    assert not group.waiting()
    second = asyncio.create_task(group.submit(2))
    await settle()
    assert not first.done()  # served when its run ends
    assert not second.done()
    taken.clear()
    release.set()
    await first
    await asyncio.gather(second)
    assert runs.batches == [[1], [2]]
    assert group.runs == 2


async def test_a_run_that_takes_again_serves_what_it_took_before() -> None:
    gate = asyncio.Event()
    seen: list[list[int]] = []

    async def run(take: Take[int]) -> None:
        while batch := take():
            seen.append(batch)
            await gate.wait()
            gate.clear()

    group: GroupCommit[int] = GroupCommit(run)
    first = asyncio.create_task(group.submit(1))
    await settle()
    second = asyncio.create_task(group.submit(2))
    await settle()
    assert not first.done()
    gate.set()  # the run takes [2], which serves [1]
    await first
    assert not second.done()
    gate.set()
    await second
    assert seen == [[1], [2]]
    assert (group.runs, group.served) == (1, 2)


async def test_a_failing_run_still_lets_its_callers_go(caplog: pytest.LogCaptureFixture) -> None:
    runs = Runs()
    runs.fail = True
    runs.gate.set()
    group: GroupCommit[int] = GroupCommit(runs)
    await asyncio.wait_for(asyncio.gather(group.submit(1), group.submit(2)), 5)
    assert runs.batches == [[1, 2]]
    assert "a group commit run failed" in caplog.text
    runs.fail = False
    await asyncio.wait_for(group.submit(3), 5)  # and the next request starts a new run
    assert runs.batches == [[1, 2], [3]]


async def test_a_run_that_never_takes_still_lets_its_callers_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run(take: Take[int]) -> None:
        raise RuntimeError("failed before taking")

    group: GroupCommit[int] = GroupCommit(run)
    await asyncio.wait_for(group.submit(1), 5)
    assert "did not take its requests" in caplog.text
    assert group.served == 1


async def test_idle_waits_for_the_run_under_way() -> None:
    runs = Runs()
    group: GroupCommit[int] = GroupCommit(runs)
    caller = asyncio.create_task(group.submit(1))
    await settle()
    idle = asyncio.create_task(group.idle())
    await settle()
    assert not idle.done()
    runs.gate.set()
    await asyncio.gather(caller, idle)
    await asyncio.wait_for(group.idle(), 5)  # nothing under way: returns at once


def test_a_group_echoes_each_job_once_in_the_order_its_requests_came() -> None:
    """Echoes of one item see what the earlier ones decided (app.bridge.service), so a
    group run keeps the order of arrival, each job at its first place."""
    requests = [[("acme", [5])], [("acme", [3, 5]), ("globex", [1])], [("acme", [2])]]
    assert _unique(requests) == [("acme", 5), ("acme", 3), ("globex", 1), ("acme", 2)]
