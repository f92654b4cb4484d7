"""The batch of claims' choice rule (app.fleet.claim_batch.first_untaken), against the
claims made one after another: for any queue and any order of workers, each claim of
a batch that read N rows of each priority gets the job it would have got alone after
the earlier ones (DESIGN §3), ages and ties included."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from app.fleet.claim_batch import first_untaken
from app.fleet.models import Priority
from app.fleet.scheduler import WorkerProfile, select_job

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
AGING = 600
CAPS = ("gpu", "os:mac")


@dataclass(frozen=True)
class Queued:
    id: int
    priority: Priority
    capabilities: frozenset[str]
    queued_at: datetime

    def row(self) -> tuple[Any, ...]:
        """As the heads statement returns it."""
        return (self.id, self.priority, sorted(self.capabilities), None, None,
                self.queued_at, None, NOW)


def in_queue_order(jobs: list[Queued]) -> list[Queued]:
    return sorted(jobs, key=lambda job: (job.queued_at, job.id))


def heads(jobs: list[Queued], worker: WorkerProfile, limit: int) -> list[tuple[Any, ...]]:
    """The heads statement: each priority's first `limit` jobs `worker` may take."""
    rows: list[tuple[Any, ...]] = []
    for priority in Priority:
        mine = [job for job in in_queue_order(jobs)
                if job.priority == priority and job.capabilities <= worker.capabilities]
        rows.extend(job.row() for job in mine[:limit])
    return rows


def one_after_another(jobs: list[Queued], workers: list[WorkerProfile]) -> list[int | None]:
    left, got = list(jobs), []
    for worker in workers:
        chosen = select_job(first_untaken(heads(left, worker, 1), set()), worker, NOW, AGING)
        got.append(None if chosen is None else chosen.id)
        left = [job for job in left if chosen is None or job.id != chosen.id]
    return got


def as_a_batch(jobs: list[Queued], workers: list[WorkerProfile]) -> list[int | None]:
    read = {worker.capabilities: heads(jobs, worker, len(workers)) for worker in workers}
    taken: set[int] = set()
    got: list[int | None] = []
    for worker in workers:
        chosen = select_job(first_untaken(read[worker.capabilities], taken), worker, NOW,
                            AGING)
        got.append(None if chosen is None else chosen.id)
        if chosen is not None:
            taken.add(chosen.id)
    return got


queued_jobs = st.lists(
    st.builds(
        lambda priority, caps, minutes: (priority, frozenset(caps), minutes),
        st.sampled_from(list(Priority)), st.sets(st.sampled_from(CAPS), max_size=2),
        st.integers(min_value=0, max_value=40),  # a few share an instant: ties by id
    ),
    max_size=14,
).map(lambda specs: [
    Queued(n + 1, priority, caps, NOW - timedelta(minutes=minutes))
    for n, (priority, caps, minutes) in enumerate(specs)])
workers = st.lists(
    st.sets(st.sampled_from(CAPS), max_size=2).map(
        lambda caps: WorkerProfile("w", capabilities=frozenset(caps))),
    min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(queued_jobs, workers)
def test_a_batch_chooses_as_the_claims_one_after_another(
    jobs: list[Queued], order: list[WorkerProfile],
) -> None:
    assert as_a_batch(jobs, order) == one_after_another(jobs, order)


def test_first_untaken_takes_each_prioritys_first_row_left_in_queue_order() -> None:
    old, new = NOW - timedelta(minutes=5), NOW - timedelta(minutes=1)
    rows = [Queued(7, Priority.HIGH, frozenset(), new).row(),
            Queued(3, Priority.HIGH, frozenset(), old).row(),
            Queued(9, Priority.LOW, frozenset(), old).row(),
            Queued(4, Priority.HIGH, frozenset(), old).row()]
    assert [c.id for c in first_untaken(rows, set())] == [3, 9]
    assert [c.id for c in first_untaken(rows, {3})] == [4, 9]
    assert [c.id for c in first_untaken(rows, {3, 4, 9})] == [7]
    assert first_untaken(rows, {3, 4, 7, 9}) == []
