"""Concurrent submits with one idempotency key create one job (both stores).

On PostgreSQL the submits really race: each sees no job with the key, inserts,
and all but one hit the partial unique index; the service turns that into DEDUPED.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from app.auth.models import Role
from app.events.models import Event
from app.fleet.models import Job
from app.fleet.service import JobSpec, SubmitOutcome
from app.graphql.context import Services


async def test_concurrent_submits_with_one_key_create_one_job(
    services: Services, make_token
) -> None:
    await make_token("acme", Role.MEMBER)
    spec = JobSpec(title="once", body_md="only once", idempotency_key="deploy-42")

    async def submit() -> tuple[int, SubmitOutcome]:
        async with services.db.unit_of_work() as session:
            result = await services.fleet.submit_job(session, "acme", spec)
        return result.job.id, result.outcome

    results = await asyncio.gather(*(submit() for _ in range(12)))

    assert len({job_id for job_id, _ in results}) == 1
    outcomes = sorted(outcome for _, outcome in results)
    assert outcomes.count(SubmitOutcome.CREATED) == 1
    assert outcomes.count(SubmitOutcome.DEDUPED) == 11
    async with services.db.read() as session:
        jobs = (await session.execute(select(func.count()).select_from(Job))).scalar_one()
        events = (await session.execute(select(func.count()).select_from(Event))).scalar_one()
    assert (jobs, events) == (1, 1)


async def test_jobs_without_a_key_are_never_deduplicated(services: Services, make_token) -> None:
    await make_token("acme", Role.MEMBER)
    spec = JobSpec(title="same", body_md="same body")
    ids = set()
    for _ in range(3):
        async with services.db.unit_of_work() as session:
            result = await services.fleet.submit_job(session, "acme", spec)
        assert result.outcome == SubmitOutcome.CREATED
        ids.add(result.job.id)
    assert len(ids) == 3
