"""The scheduler through the real claim path, on SQLite and PostgreSQL (DESIGN §3):
capability filtering never misses an eligible job beyond the first candidate window,
priorities come out in order, and aging lets an old LOW job beat a fresh URGENT one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from app.auth.models import Role
from app.fleet.models import Job, JobStage, Priority
from app.fleet.repository import CLAIM_WINDOW
from app.fleet.scheduler import WorkerProfile
from app.fleet.service import JobSpec
from app.graphql.context import Services
from app.main import Runtime

PRODUCT = "acme"
TokenFactory = Callable[..., Awaitable[str]]
RuntimeFactory = Callable[..., Awaitable[Runtime]]


async def submit_all(services: Services, specs: list[JobSpec]) -> list[Job]:
    """Submit many jobs in one unit of work (one transaction keeps the setup fast)."""
    async with services.db.unit_of_work() as session:
        return [
            (await services.fleet.submit_job(session, PRODUCT, spec)).job for spec in specs
        ]


async def claim(
    services: Services, worker: WorkerProfile, *, now: datetime | None = None
) -> Job | None:
    async with services.db.unit_of_work() as session:
        return await services.fleet.claim_next_job(session, PRODUCT, worker, now=now)


async def stage_of(services: Services, job_id: int) -> JobStage:
    async with services.db.read() as session:
        return (await services.fleet.get_job(session, PRODUCT, job_id)).stage


def spec(title: str, **fields: Any) -> JobSpec:
    return JobSpec(title=title, body_md=f"body of {title}", **fields)


PLAIN_WORKER = WorkerProfile(worker_id="cpu-1")
GPU_WORKER = WorkerProfile(worker_id="gpu-1", capabilities=frozenset({"gpu"}))


# -- the candidate window --------------------------------------------------------


@pytest.mark.parametrize(
    "blockers", [CLAIM_WINDOW, 2 * CLAIM_WINDOW + 22], ids=["one-window", "beyond-two-windows"]
)
async def test_an_eligible_job_beyond_the_first_window_is_found(
    services: Services, make_token: TokenFactory, blockers: int
) -> None:
    await make_token(PRODUCT, Role.MEMBER)
    gpu_jobs = await submit_all(
        services, [spec(f"gpu {n}", capabilities=("gpu",)) for n in range(blockers)]
    )
    [plain] = await submit_all(services, [spec("needs nothing")])
    assert len(gpu_jobs) >= CLAIM_WINDOW

    claimed = await claim(services, PLAIN_WORKER)

    assert claimed is not None
    assert claimed.id == plain.id
    assert claimed.stage == JobStage.ASSIGNED
    assert claimed.lease_worker_id == "cpu-1"
    # Nothing else was touched, and the worker without a GPU finds nothing more.
    assert await stage_of(services, gpu_jobs[0].id) == JobStage.QUEUED
    assert await stage_of(services, gpu_jobs[-1].id) == JobStage.QUEUED
    assert await claim(services, PLAIN_WORKER) is None
    # A GPU worker takes the blockers oldest first.
    first_gpu = await claim(services, GPU_WORKER)
    assert first_gpu is not None
    assert first_gpu.id == gpu_jobs[0].id


async def test_a_lane_full_of_ineligible_jobs_does_not_hide_a_lower_priority_job(
    services: Services, make_token: TokenFactory
) -> None:
    await make_token(PRODUCT, Role.MEMBER)
    count = CLAIM_WINDOW + 10
    await submit_all(services, [
        spec(f"urgent gpu {n}", priority=Priority.URGENT, capabilities=("gpu", "os:mac"))
        for n in range(count)
    ])
    await submit_all(services, [
        spec(f"high mac {n}", priority=Priority.HIGH, capabilities=("os:mac",))
        for n in range(count)
    ])
    [low] = await submit_all(services, [spec("low, runs anywhere", priority=Priority.LOW)])

    gpu_only = WorkerProfile(worker_id="gpu-only", capabilities=frozenset({"gpu"}))
    claimed = await claim(services, gpu_only)

    assert claimed is not None
    assert claimed.id == low.id


async def test_no_eligible_job_in_many_windows_gives_none(
    services: Services, make_token: TokenFactory
) -> None:
    await make_token(PRODUCT, Role.MEMBER)
    jobs = await submit_all(services, [
        spec(f"mac {n}", capabilities=("os:mac",) if n % 2 else ("gpu", "os:mac"))
        for n in range(2 * CLAIM_WINDOW + 1)
    ])

    assert await claim(services, GPU_WORKER) is None
    assert await stage_of(services, jobs[0].id) == JobStage.QUEUED
    mac_worker = WorkerProfile(worker_id="mac", capabilities=frozenset({"os:mac"}))
    claimed = await claim(services, mac_worker)
    assert claimed is not None
    assert claimed.id == jobs[1].id  # the oldest one needing only os:mac


async def test_engine_class_and_profile_are_matched_on_the_claim_path(
    services: Services, make_token: TokenFactory
) -> None:
    await make_token(PRODUCT, Role.MEMBER)
    reviewer, fast, coder_fast, plain = await submit_all(services, [
        spec("reviewer job", priority=Priority.URGENT, engine_class="reviewer"),
        spec("fast job", priority=Priority.URGENT, profile="fast"),
        spec("coder fast job", priority=Priority.HIGH, engine_class="coder", profile="fast"),
        spec("plain job", priority=Priority.LOW),
    ])
    coder = WorkerProfile(worker_id="coder", engine_classes=frozenset({"coder"}))
    coder_with_fast = WorkerProfile(
        worker_id="coder-fast", engine_classes=frozenset({"coder"}), profiles=frozenset({"fast"})
    )

    first = await claim(services, coder)
    assert first is not None
    assert first.id == plain.id  # a worker listing no profile only gets jobs without one
    second = await claim(services, coder_with_fast)
    assert second is not None
    assert second.id == fast.id  # URGENT with an unset engine class beats HIGH
    third = await claim(services, coder_with_fast)
    assert third is not None
    assert third.id == coder_fast.id
    assert await claim(services, coder_with_fast) is None
    assert await stage_of(services, reviewer.id) == JobStage.QUEUED


# -- priority order --------------------------------------------------------------


async def test_claims_come_out_in_priority_order_whatever_the_submission_order(
    services: Services, make_token: TokenFactory
) -> None:
    await make_token(PRODUCT, Role.MEMBER)
    submitted = await submit_all(services, [
        spec("normal, oldest", priority=Priority.NORMAL),
        spec("low", priority=Priority.LOW),
        spec("urgent, newest of the first batch", priority=Priority.URGENT),
        spec("high", priority=Priority.HIGH),
        spec("normal, newer", priority=Priority.NORMAL),
    ])
    [urgent_late] = await submit_all(services, [spec("urgent, last", priority=Priority.URGENT)])

    claimed_titles = []
    for _ in range(len(submitted) + 1):
        job = await claim(services, PLAIN_WORKER)
        assert job is not None
        claimed_titles.append(job.title)

    assert claimed_titles == [
        "urgent, newest of the first batch",
        "urgent, last",
        "high",
        "normal, oldest",
        "normal, newer",
        "low",
    ]
    assert urgent_late.title == "urgent, last"
    assert await claim(services, PLAIN_WORKER) is None


# -- aging -----------------------------------------------------------------------

AGING_SECONDS = 600
# The URGENT job's retry backoff makes it eligible again 29 minutes after the LOW job
# was queued: just under the 3 * 10 minutes the LOW job needs to climb three levels.
BACKOFF_SECONDS = 3 * AGING_SECONDS - 60


@pytest.mark.parametrize(
    ("after_urgent_is_due", "winner"),
    [
        # The URGENT job is still backing off: only the LOW job is eligible.
        (timedelta(seconds=-1), Priority.LOW),
        # LOW has waited ~29 min (0 + 2 levels) against a fresh URGENT (3): URGENT wins.
        (timedelta(seconds=1), Priority.URGENT),
        # LOW has waited ~30 min (0 + 3 levels), URGENT one minute (3 + 0): equal
        # effective priority, and the LOW job has waited longer, so it wins.
        (timedelta(seconds=61), Priority.LOW),
        # Ten more minutes add one level to both; the older LOW job still wins the tie.
        (timedelta(seconds=661), Priority.LOW),
    ],
)
async def test_an_old_low_job_beats_a_fresh_urgent_one_on_the_claim_path(
    make_runtime: RuntimeFactory,
    make_token: TokenFactory,
    after_urgent_is_due: timedelta,
    winner: Priority,
) -> None:
    services = (await make_runtime(
        aging_seconds=AGING_SECONDS, retry_backoff_seconds=BACKOFF_SECONDS,
        retry_backoff_max_seconds=BACKOFF_SECONDS, retry_backoff_jitter=0.0,
    )).services
    await make_token(PRODUCT, Role.MEMBER)
    low, urgent = await submit_all(services, [
        spec("old low", priority=Priority.LOW),
        spec("urgent", priority=Priority.URGENT),
    ])
    # The URGENT job is claimed first and fails retryably: it goes back to the queue,
    # eligible again only after its backoff, so from then on it is a *fresh* job.
    first = await claim(services, PLAIN_WORKER)
    assert first is not None
    assert first.id == urgent.id
    async with services.db.unit_of_work() as session:
        requeued = await services.fleet.transition_job(
            session, PRODUCT, urgent.id, first.lease_fence, JobStage.FAILED, retryable=True,
        )
    assert requeued.stage == JobStage.QUEUED
    urgent_due = requeued.queued_at
    assert urgent_due - low.queued_at >= timedelta(seconds=BACKOFF_SECONDS)
    assert urgent_due - low.queued_at < timedelta(seconds=BACKOFF_SECONDS + 59)

    claimed = await claim(services, PLAIN_WORKER, now=urgent_due + after_urgent_is_due)

    assert claimed is not None
    assert claimed.priority == winner
    assert claimed.id == (low.id if winner == Priority.LOW else urgent.id)
