"""The job stage graph (DESIGN §2), checked over every pair of stages, and the retry
backoff."""

from __future__ import annotations

import itertools

import pytest

from app.fleet.models import JobStage
from app.fleet.stages import (
    ACTIVE_STAGES,
    TERMINAL_STAGES,
    can_worker_move,
    is_terminal,
    jittered,
    over_budget,
    retry_backoff_seconds,
    worker_moves,
)

Q, A, B, R, T, S, F, C = (
    JobStage.QUEUED, JobStage.ASSIGNED, JobStage.BUILDING, JobStage.REVIEW,
    JobStage.TESTING, JobStage.SHIPPED, JobStage.FAILED, JobStage.CANCELLED,
)

# Written out by hand from DESIGN §2, not derived from the code under test:
# forward along ASSIGNED → BUILDING → REVIEW → TESTING → SHIPPED (skips allowed),
# REVIEW/TESTING → BUILDING (rework), any active stage → FAILED.  Nothing else.
ALLOWED: dict[JobStage, set[JobStage]] = {
    Q: set(),
    A: {B, R, T, S, F},
    B: {R, T, S, F},
    R: {T, S, F, B},
    T: {S, F, B},
    S: set(),
    F: set(),
    C: set(),
}

ALL_PAIRS = list(itertools.product(JobStage, JobStage))


def test_the_expected_table_covers_every_stage() -> None:
    assert set(ALLOWED) == set(JobStage)
    assert len(ALL_PAIRS) == 64
    assert sum(len(targets) for targets in ALLOWED.values()) == 16


@pytest.mark.parametrize(
    ("source", "target"), ALL_PAIRS, ids=[f"{s.value}->{t.value}" for s, t in ALL_PAIRS]
)
def test_every_move_against_the_expected_table(source: JobStage, target: JobStage) -> None:
    assert can_worker_move(source, target) is (target in ALLOWED[source])


@pytest.mark.parametrize("source", list(JobStage))
def test_worker_moves_lists_exactly_the_allowed_targets(source: JobStage) -> None:
    assert worker_moves(source) == frozenset(ALLOWED[source])


@pytest.mark.parametrize(
    ("source", "target"),
    [(A, B), (B, R), (R, T), (T, S), (A, R), (A, T), (A, S), (B, T), (B, S), (R, S)],
)
def test_forward_moves_and_skips_are_allowed(source: JobStage, target: JobStage) -> None:
    assert can_worker_move(source, target)


@pytest.mark.parametrize("source", [R, T])
def test_rework_goes_back_to_building(source: JobStage) -> None:
    assert can_worker_move(source, B)


@pytest.mark.parametrize("source", sorted(ACTIVE_STAGES))
def test_any_active_stage_may_fail(source: JobStage) -> None:
    assert can_worker_move(source, F)


@pytest.mark.parametrize(
    ("source", "target"),
    [(B, A), (R, A), (T, A), (T, R)],
)
def test_backwards_moves_other_than_rework_are_refused(
    source: JobStage, target: JobStage
) -> None:
    assert not can_worker_move(source, target)


@pytest.mark.parametrize("stage", list(JobStage))
def test_self_moves_are_refused(stage: JobStage) -> None:
    assert not can_worker_move(stage, stage)


@pytest.mark.parametrize("target", list(JobStage))
@pytest.mark.parametrize("source", [Q, S, F, C])
def test_nothing_moves_out_of_queued_or_a_terminal_stage(
    source: JobStage, target: JobStage
) -> None:
    assert not can_worker_move(source, target)
    assert worker_moves(source) == frozenset()


@pytest.mark.parametrize("target", [Q, A, C])
@pytest.mark.parametrize("source", list(JobStage))
def test_a_worker_never_moves_a_job_to_queued_assigned_or_cancelled(
    source: JobStage, target: JobStage
) -> None:
    # QUEUED is reached by retry/reaping, ASSIGNED by claiming, CANCELLED by a member.
    assert not can_worker_move(source, target)


def test_stage_sets() -> None:
    assert frozenset({A, B, R, T}) == ACTIVE_STAGES
    assert frozenset({S, F, C}) == TERMINAL_STAGES
    assert not ACTIVE_STAGES & TERMINAL_STAGES


@pytest.mark.parametrize("stage", list(JobStage))
def test_is_terminal(stage: JobStage) -> None:
    assert is_terminal(stage) is (stage in {S, F, C})


# -- retry backoff ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [
        (0, 0.0),
        (-1, 0.0),
        (1, 30.0),
        (2, 60.0),
        (3, 120.0),
        (4, 240.0),
        (7, 1_920.0),
        (8, 3_600.0),  # 3 840 capped
        (9, 3_600.0),
        (50, 3_600.0),
        (10_000, 3_600.0),  # the exponent is bounded, no overflow
    ],
)
def test_retry_backoff_doubles_up_to_the_cap(attempts: int, expected: float) -> None:
    assert retry_backoff_seconds(attempts, base=30.0, cap=3_600.0) == expected


def test_retry_backoff_is_monotonic_and_never_exceeds_the_cap() -> None:
    delays = [retry_backoff_seconds(n, base=5.0, cap=300.0) for n in range(1, 40)]
    assert delays == sorted(delays)
    assert max(delays) == 300.0
    assert delays[:7] == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0]


@pytest.mark.parametrize(
    ("base", "cap", "attempts", "expected"),
    [
        (0.0, 3_600.0, 5, 0.0),  # a zero base turns backoff off (the test settings)
        (10.0, 5.0, 1, 5.0),  # a cap below the base wins
        (1.5, 100.0, 3, 6.0),
    ],
)
def test_retry_backoff_edge_settings(
    base: float, cap: float, attempts: int, expected: float
) -> None:
    result = retry_backoff_seconds(attempts, base=base, cap=cap)
    assert result == expected
    assert isinstance(result, float)


# -- budgets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cost", "budget", "over"),
    [
        (1.2, 1.0, True),
        (1.0, 1.0, False),  # reaching the budget is not going over it
        (0.1 + 0.2, 0.3, False),  # float noise in the sum is not an overrun
        (0.300001, 0.3, True),
        (1e9, None, False),  # no budget, no cap
        (0.0, 0.5, False),
    ],
)
def test_over_budget(cost: float, budget: float | None, over: bool) -> None:
    assert over_budget(cost, budget) is over


@pytest.mark.parametrize("draw", [0.0, 0.25, 0.5, 0.999999])
@pytest.mark.parametrize("jitter", [0.0, 0.5, 1.0])
def test_jittered_backoff_stays_within_its_band(jitter: float, draw: float) -> None:
    delay = jittered(20.0, jitter, draw)
    assert 20.0 * (1 - jitter) <= delay <= 20.0
    assert delay == pytest.approx(20.0 * (1 - jitter) + 20.0 * jitter * draw)


def test_no_jitter_is_the_plain_backoff_and_equal_jitter_spans_the_upper_half() -> None:
    assert {jittered(8.0, 0.0, draw / 10) for draw in range(10)} == {8.0}
    assert jittered(8.0, 0.5, 0.0) == 4.0
    assert jittered(8.0, 0.5, 0.5) == 6.0
    assert jittered(0.0, 1.0, 0.7) == 0.0  # no backoff stays none


def test_jitter_spreads_jobs_that_failed_together() -> None:
    import random

    rng = random.Random(11)
    delays = [jittered(retry_backoff_seconds(1, base=2.0, cap=60.0), 0.5, rng.random())
              for _ in range(40)]
    assert len(set(delays)) == 40
    assert min(delays) >= 1.0
    assert max(delays) <= 2.0
    assert max(delays) - min(delays) > 0.5


@pytest.mark.parametrize(("jitter", "draw"), [(-0.1, 0.5), (1.5, 0.5), (0.5, 1.0), (0.5, -0.1)])
def test_jitter_refuses_values_out_of_range(jitter: float, draw: float) -> None:
    with pytest.raises(ValueError, match="must be within"):
        jittered(10.0, jitter, draw)
