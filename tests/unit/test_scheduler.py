"""The pure scheduler (DESIGN §3): eligibility, effective priority, ranking, choice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.fleet.models import JobStage, Priority
from app.fleet.scheduler import (
    DEFAULT_AGING_SECONDS,
    Candidate,
    WorkerProfile,
    effective_priority,
    is_eligible,
    rank,
    select_job,
)

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
AGING = timedelta(seconds=DEFAULT_AGING_SECONDS)


def job(
    ident: int = 1,
    *,
    stage: JobStage = JobStage.QUEUED,
    priority: Priority = Priority.NORMAL,
    capabilities: frozenset[str] = frozenset(),
    engine_class: str | None = None,
    profile: str | None = None,
    waited: timedelta = timedelta(0),
    not_before: datetime | None = None,
) -> Candidate:
    return Candidate(
        id=ident, stage=stage, priority=priority, capabilities=capabilities,
        engine_class=engine_class, profile=profile, eligible_since=NOW - waited,
        not_before=not_before,
    )


def worker(
    capabilities: set[str] | None = None,
    engine_classes: set[str] | None = None,
    profiles: set[str] | None = None,
) -> WorkerProfile:
    return WorkerProfile(
        worker_id="w-1",
        capabilities=frozenset(capabilities or ()),
        engine_classes=frozenset(engine_classes or ()),
        profiles=frozenset(profiles or ()),
    )


# -- eligibility ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("job_caps", "worker_caps", "eligible"),
    [
        (set(), set(), True),
        (set(), {"gpu", "os:mac"}, True),
        ({"gpu"}, {"gpu"}, True),
        ({"gpu"}, {"gpu", "os:mac"}, True),
        ({"gpu", "os:mac"}, {"os:mac", "gpu", "big-ram"}, True),
        ({"gpu"}, set(), False),
        ({"gpu"}, {"os:mac"}, False),
        ({"gpu", "os:mac"}, {"gpu"}, False),
        ({"GPU"}, {"gpu"}, False),
    ],
)
def test_capabilities_must_be_a_subset_of_the_workers(
    job_caps: set[str], worker_caps: set[str], eligible: bool
) -> None:
    candidate = job(capabilities=frozenset(job_caps))
    assert is_eligible(candidate, worker(capabilities=worker_caps), NOW) is eligible


@pytest.mark.parametrize(
    ("engine_class", "worker_classes", "eligible"),
    [
        (None, set(), True),
        (None, {"agentic-coder"}, True),
        ("agentic-coder", {"agentic-coder"}, True),
        ("agentic-coder", {"reviewer", "agentic-coder"}, True),
        ("agentic-coder", set(), False),
        ("agentic-coder", {"reviewer"}, False),
    ],
)
def test_engine_class_is_unset_or_among_the_workers(
    engine_class: str | None, worker_classes: set[str], eligible: bool
) -> None:
    candidate = job(engine_class=engine_class)
    assert is_eligible(candidate, worker(engine_classes=worker_classes), NOW) is eligible


@pytest.mark.parametrize(
    ("profile", "worker_profiles", "eligible"),
    [
        (None, set(), True),
        (None, {"fast"}, True),
        ("fast", {"fast"}, True),
        ("fast", {"cheap", "fast"}, True),
        ("fast", set(), False),
        ("fast", {"cheap"}, False),
    ],
)
def test_profile_is_unset_or_among_the_workers(
    profile: str | None, worker_profiles: set[str], eligible: bool
) -> None:
    candidate = job(profile=profile)
    assert is_eligible(candidate, worker(profiles=worker_profiles), NOW) is eligible


def test_engine_class_and_profile_are_checked_independently() -> None:
    candidate = job(engine_class="coder", profile="fast")
    assert is_eligible(candidate, worker(engine_classes={"coder"}, profiles={"fast"}), NOW)
    assert not is_eligible(candidate, worker(engine_classes={"fast"}, profiles={"coder"}), NOW)
    assert not is_eligible(candidate, worker(engine_classes={"coder"}), NOW)
    assert not is_eligible(candidate, worker(profiles={"fast"}), NOW)


@pytest.mark.parametrize(
    ("not_before", "eligible"),
    [
        (None, True),
        (NOW - timedelta(hours=1), True),
        (NOW - timedelta(microseconds=1), True),
        (NOW, True),
        (NOW + timedelta(microseconds=1), False),
        (NOW + timedelta(seconds=30), False),
    ],
)
def test_not_before_in_the_future_excludes(not_before: datetime | None, eligible: bool) -> None:
    assert is_eligible(job(not_before=not_before), worker(), NOW) is eligible


@pytest.mark.parametrize("stage", list(JobStage))
def test_only_queued_jobs_are_eligible(stage: JobStage) -> None:
    assert is_eligible(job(stage=stage), worker(), NOW) is (stage == JobStage.QUEUED)


@pytest.mark.parametrize(
    "stage", [stage for stage in JobStage if stage != JobStage.QUEUED]
)
def test_select_job_never_picks_a_job_that_is_not_queued(stage: JobStage) -> None:
    urgent_but_running = job(1, stage=stage, priority=Priority.URGENT, waited=AGING * 10)
    queued_low = job(2, priority=Priority.LOW)
    assert select_job([urgent_but_running], worker(), NOW) is None
    assert select_job([urgent_but_running, queued_low], worker(), NOW) == queued_low


# -- effective priority and rank -----------------------------------------------


@pytest.mark.parametrize(
    ("priority", "waited", "expected"),
    [
        (Priority.LOW, timedelta(0), 0),
        (Priority.NORMAL, timedelta(0), 1),
        (Priority.HIGH, timedelta(0), 2),
        (Priority.URGENT, timedelta(0), 3),
        (Priority.LOW, AGING - timedelta(microseconds=1), 0),
        (Priority.LOW, AGING, 1),
        (Priority.LOW, AGING * 2 + timedelta(seconds=1), 2),
        (Priority.LOW, AGING * 3, 3),
        (Priority.URGENT, AGING * 5, 8),
        # A job whose eligible_since lies ahead (clock skew) has not waited at all.
        (Priority.HIGH, -AGING * 4, 2),
    ],
)
def test_effective_priority_is_weight_plus_one_level_per_aging_period(
    priority: Priority, waited: timedelta, expected: int
) -> None:
    assert effective_priority(job(priority=priority, waited=waited), NOW) == expected


@pytest.mark.parametrize(
    ("aging_seconds", "waited_seconds", "expected"),
    [(60, 59, 1), (60, 60, 2), (60, 185, 4), (3_600, 3_599, 1), (3_600, 7_200, 3), (0.5, 2, 5)],
)
def test_effective_priority_with_custom_aging(
    aging_seconds: float, waited_seconds: float, expected: int
) -> None:
    candidate = job(priority=Priority.NORMAL, waited=timedelta(seconds=waited_seconds))
    assert effective_priority(candidate, NOW, aging_seconds) == expected


def test_rank_orders_by_effective_priority_then_age_then_id() -> None:
    urgent = job(9, priority=Priority.URGENT)
    old_normal = job(5, priority=Priority.NORMAL, waited=timedelta(seconds=30))
    new_normal_small_id = job(1, priority=Priority.NORMAL)
    new_normal_big_id = job(2, priority=Priority.NORMAL)
    ordered = sorted(
        [new_normal_big_id, old_normal, urgent, new_normal_small_id],
        key=lambda candidate: rank(candidate, NOW),
    )
    assert [candidate.id for candidate in ordered] == [9, 5, 1, 2]
    assert rank(urgent, NOW) == (-3, NOW, 9)


# -- select_job ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("priorities", "winner"),
    [
        ([Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.URGENT], Priority.URGENT),
        ([Priority.URGENT, Priority.HIGH, Priority.NORMAL, Priority.LOW], Priority.URGENT),
        ([Priority.LOW, Priority.HIGH, Priority.NORMAL], Priority.HIGH),
        ([Priority.LOW, Priority.NORMAL], Priority.NORMAL),
        ([Priority.LOW], Priority.LOW),
    ],
)
def test_highest_priority_wins_among_jobs_of_the_same_age(
    priorities: list[Priority], winner: Priority
) -> None:
    candidates = [job(i + 1, priority=p) for i, p in enumerate(priorities)]
    chosen = select_job(candidates, worker(), NOW)
    assert chosen is not None
    assert chosen.priority == winner


def test_priority_beats_age_within_one_aging_period() -> None:
    old_normal = job(1, priority=Priority.NORMAL, waited=AGING - timedelta(seconds=1))
    fresh_high = job(2, priority=Priority.HIGH)
    assert select_job([old_normal, fresh_high], worker(), NOW) == fresh_high


@pytest.mark.parametrize(
    ("low_waited", "winner_id"),
    [
        (AGING * 3, 1),  # LOW 0 + 3 levels ties URGENT 3; the older job wins the tie
        (AGING * 3 + timedelta(hours=1), 1),
        (AGING * 4, 1),
        (AGING * 3 - timedelta(microseconds=1), 2),  # one level short
        (AGING * 2, 2),
        (timedelta(0), 2),
    ],
)
def test_aging_lets_an_old_low_job_beat_a_fresh_urgent_one(
    low_waited: timedelta, winner_id: int
) -> None:
    old_low = job(1, priority=Priority.LOW, waited=low_waited)
    fresh_urgent = job(2, priority=Priority.URGENT)
    chosen = select_job([fresh_urgent, old_low], worker(), NOW)
    assert chosen is not None
    assert chosen.id == winner_id


@pytest.mark.parametrize(
    ("aging_seconds", "low_waited_seconds", "winner_id"),
    [
        (60, 180, 1),
        (60, 179, 2),
        (3_600, 10_800, 1),
        (3_600, 10_799, 2),
        (3_600, 1_800, 2),
    ],
)
def test_custom_aging_seconds(
    aging_seconds: float, low_waited_seconds: float, winner_id: int
) -> None:
    old_low = job(1, priority=Priority.LOW, waited=timedelta(seconds=low_waited_seconds))
    fresh_urgent = job(2, priority=Priority.URGENT)
    chosen = select_job([old_low, fresh_urgent], worker(), NOW, aging_seconds=aging_seconds)
    assert chosen is not None
    assert chosen.id == winner_id


def test_ties_go_to_the_oldest_eligible_since() -> None:
    newer = job(1, waited=timedelta(seconds=10))
    older = job(2, waited=timedelta(seconds=20))
    oldest_other_priority = job(3, priority=Priority.LOW, waited=timedelta(seconds=500))
    assert select_job([newer, older, oldest_other_priority], worker(), NOW) == older


def test_ties_of_age_go_to_the_smallest_id() -> None:
    candidates = [job(ident, waited=timedelta(seconds=10)) for ident in (7, 3, 12, 5)]
    chosen = select_job(candidates, worker(), NOW)
    assert chosen is not None
    assert chosen.id == 3


def test_an_aged_tie_is_settled_by_age_before_priority() -> None:
    # HIGH waited one period (2 + 1 = 3), URGENT waited a little less than one (3 + 0).
    high = job(1, priority=Priority.HIGH, waited=AGING + timedelta(seconds=5))
    urgent = job(2, priority=Priority.URGENT, waited=AGING - timedelta(seconds=5))
    assert select_job([urgent, high], worker(), NOW) == high


def test_ineligible_jobs_never_win_however_high_their_priority() -> None:
    gpu_urgent = job(1, priority=Priority.URGENT, capabilities=frozenset({"gpu"}))
    backoff_urgent = job(2, priority=Priority.URGENT, not_before=NOW + timedelta(seconds=1))
    other_class = job(3, priority=Priority.HIGH, engine_class="reviewer")
    other_profile = job(4, priority=Priority.HIGH, profile="cheap")
    plain_low = job(5, priority=Priority.LOW)
    candidates = [gpu_urgent, backoff_urgent, other_class, other_profile, plain_low]
    assert select_job(candidates, worker(engine_classes={"coder"}), NOW) == plain_low
    capable = worker(capabilities={"gpu"}, engine_classes={"reviewer"}, profiles={"cheap"})
    assert select_job(candidates, capable, NOW) == gpu_urgent


def test_no_candidates_gives_none() -> None:
    assert select_job([], worker(), NOW) is None


def test_no_eligible_candidate_gives_none() -> None:
    candidates = [
        job(1, capabilities=frozenset({"gpu"})),
        job(2, engine_class="coder"),
        job(3, profile="fast"),
        job(4, not_before=NOW + timedelta(minutes=5)),
        job(5, stage=JobStage.ASSIGNED),
    ]
    assert select_job(candidates, worker(capabilities={"os:mac"}), NOW) is None


def test_select_job_accepts_any_iterable() -> None:
    candidates = (job(ident, priority=p) for ident, p in [(1, Priority.LOW), (2, Priority.HIGH)])
    chosen = select_job(candidates, worker(), NOW)
    assert chosen is not None
    assert chosen.id == 2
