"""The general path's row moves (app.fleet.moves), on transient jobs: no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.fleet.models import Job, JobStage
from app.fleet.moves import finish, requeue
from app.fleet.records import FleetPolicy

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def held(attempts: int) -> Job:
    return Job(stage=JobStage.BUILDING, attempts=attempts, lease_fence=4,
               lease_worker_id="w1", lease_expires_at=NOW + timedelta(minutes=5),
               queued_at=NOW - timedelta(hours=1), updated_at=NOW - timedelta(minutes=1))


def test_requeue_raises_the_fence_drops_the_lease_and_waits_out_the_backoff() -> None:
    job = held(attempts=3)  # the third attempt failed: 4 x base before the fourth
    requeue(job, NOW, FleetPolicy(retry_backoff_seconds=10.0, retry_backoff_jitter=0.5), 0.5)
    assert job.stage is JobStage.QUEUED
    assert job.lease_fence == 5  # the old lease can no longer write
    assert job.lease_worker_id is None
    assert job.lease_expires_at is None
    assert job.not_before == NOW + timedelta(seconds=30.0)  # 40 s, its last half drawn at 0.5
    assert job.queued_at == job.not_before  # aging starts once it may run again
    assert job.updated_at == NOW


def test_requeue_backoff_is_capped() -> None:
    job = held(attempts=30)
    policy = FleetPolicy(retry_backoff_seconds=10.0, retry_backoff_max_seconds=60.0,
                         retry_backoff_jitter=0.0)
    requeue(job, NOW, policy, 0.99)
    assert job.not_before == NOW + timedelta(seconds=60.0)


def test_finish_ends_the_lease_and_stamps_the_end() -> None:
    job = held(attempts=1)
    finish(job, JobStage.SHIPPED, NOW)
    assert (job.stage, job.finished_at, job.updated_at) == (JobStage.SHIPPED, NOW, NOW)
    assert job.lease_worker_id is None
    assert job.lease_expires_at is None
    assert job.lease_fence == 4  # finishing does not fence: the holder's last write was it
