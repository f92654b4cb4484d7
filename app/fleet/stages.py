"""The job stage graph (DESIGN §2) as pure rules."""

from __future__ import annotations

from app.fleet.models import JobStage

ACTIVE_STAGES = frozenset(
    {JobStage.ASSIGNED, JobStage.BUILDING, JobStage.REVIEW, JobStage.TESTING}
)
TERMINAL_STAGES = frozenset({JobStage.SHIPPED, JobStage.FAILED, JobStage.CANCELLED})

# Moves a lease holder may make.  Forward stages may be skipped; REVIEW and TESTING
# may go back to BUILDING for rework; every active stage may fail.
_PIPELINE = (JobStage.ASSIGNED, JobStage.BUILDING, JobStage.REVIEW, JobStage.TESTING,
             JobStage.SHIPPED)
_REWORK_FROM = frozenset({JobStage.REVIEW, JobStage.TESTING})


def worker_moves(stage: JobStage) -> frozenset[JobStage]:
    """The stages a lease holder may move a job in `stage` to."""
    if stage not in ACTIVE_STAGES:
        return frozenset()
    forward = _PIPELINE[_PIPELINE.index(stage) + 1 :]
    moves = {*forward, JobStage.FAILED}
    if stage in _REWORK_FROM:
        moves.add(JobStage.BUILDING)
    return frozenset(moves)


def can_worker_move(source: JobStage, target: JobStage) -> bool:
    return target in worker_moves(source)


BUDGET_EXCEEDED_REASON = "budget exceeded"
# Cost totals are sums of floats: a total within this much of the budget is not over it
# (0.1 + 0.2 on a 0.3 budget is not an overrun).
BUDGET_TOLERANCE_USD = 1e-9


def over_budget(cost_usd: float, budget: float | None) -> bool:
    """True when a job's reported cost total (USD) has gone over its budget (USD);
    a job without a budget is never over it (DESIGN §4, "Tracker → fleet")."""
    return budget is not None and cost_usd > budget + BUDGET_TOLERANCE_USD


def is_terminal(stage: JobStage) -> bool:
    return stage in TERMINAL_STAGES


def jittered(delay: float, jitter: float, draw: float) -> float:
    """`delay` (seconds) with its last `jitter` fraction drawn at random.

    `draw` is uniform in [0, 1) (`random.random()`); the result is in
    `[delay·(1 - jitter), delay]`: `jitter` 0 keeps `delay`, 0.5 is "equal jitter",
    1 is "full jitter".  Jobs that failed together then come back spread out, not
    all at the same instant (issue 11).  Raises ValueError for a fraction outside
    [0, 1] or a draw outside [0, 1).
    """
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be within [0, 1], not {jitter}")
    if not 0.0 <= draw < 1.0:
        raise ValueError(f"draw must be within [0, 1), not {draw}")
    return delay * (1.0 - jitter) + delay * jitter * draw


def retry_backoff_seconds(attempts: int, *, base: float, cap: float) -> float:
    """Exponential backoff before attempt `attempts + 1`: base, 2·base, 4·base … ≤ cap."""
    if attempts <= 0:
        return 0.0
    return float(min(cap, base * 2 ** min(attempts - 1, 32)))
