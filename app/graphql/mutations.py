"""Mutations: parse, authorise, run one service call in a unit of work, answer.

Each mutation field is its own unit of work; the events it records are published
(and, with FLEET_TRACKER_ECHO on, echoed) after its commit and before it answers.
"""

from __future__ import annotations

import strawberry
from strawberry.types import Info

from app import limits
from app.auth.service import Permission
from app.bridge.service import IngestOptions as IngestOptionsSpec
from app.fleet.models import Job as JobModel
from app.fleet.models import JobStage
from app.fleet.service import MetricsDelta
from app.graphql.context import Context
from app.graphql.ids import require_id
from app.graphql.inputs import (
    CreateItemInput,
    IngestOptions,
    JobMetricsInput,
    SubmitJobInput,
    UpdateItemInput,
    WorkerInput,
)
from app.graphql.inputs import lease_seconds as check_lease_seconds
from app.graphql.types import (
    ClaimPayload,
    Comment,
    EchoPayload,
    Item,
    Job,
    Lease,
    SubmitJobPayload,
)
from app.tracker import service as tracker_service


async def _answer(info: Info[Context, None], row: JobModel) -> Job:
    """The job as the mutation answers it.  With FLEET_TRACKER_ECHO on, the change's
    echo ran after its commit and may have updated the job (`lastEchoedStatus`), so a
    tracker-linked job is read again; otherwise the committed row is current."""
    services = info.context.services
    if services.settings.tracker_echo and row.tracker_item_id is not None:
        async with services.db.read() as session:
            row = await services.fleet.get_job(session, row.product_id, row.id)
    return Job.from_model(row)


def _lease_of(job: Job) -> Lease:
    assert job.lease is not None
    return job.lease


@strawberry.type
class Mutation:
    @strawberry.mutation
    async def create_item(self, info: Info[Context, None], input: CreateItemInput) -> Item:
        principal = info.context.require(Permission.TRACKER)
        spec = input.to_spec()
        async with info.context.db.unit_of_work() as session:
            row = await info.context.services.bridge.create_item(
                session, principal.product_id, spec, labels_field="input.labels"
            )
        return Item.from_model(row)

    @strawberry.mutation
    async def update_item(
        self, info: Info[Context, None], id: strawberry.ID, input: UpdateItemInput
    ) -> Item:
        principal = info.context.require(Permission.TRACKER)
        item_id = require_id("item", id)
        changes = input.to_spec()
        async with info.context.db.unit_of_work() as session:
            row = await info.context.services.bridge.update_item(
                session, principal.product_id, item_id, changes, labels_field="input.labels"
            )
        return Item.from_model(row)

    @strawberry.mutation
    async def add_comment(
        self, info: Info[Context, None], item_id: strawberry.ID, body: str
    ) -> Comment:
        principal = info.context.require(Permission.TRACKER)
        item_row_id = require_id("item", item_id)
        body = limits.text("body", body, max_len=limits.COMMENT_MAX, required=True)
        async with info.context.db.unit_of_work() as session:
            row = await tracker_service.add_comment(
                session, principal.product_id, item_row_id, body=body, author=principal.name
            )
        return Comment.from_model(row)

    @strawberry.mutation
    async def submit_job(
        self, info: Info[Context, None], input: SubmitJobInput
    ) -> SubmitJobPayload:
        principal = info.context.require(Permission.TRACKER)
        item_id = (
            require_id("item", input.tracker_item_id) if input.tracker_item_id is not None else None
        )
        spec = input.to_spec(item_id)
        async with info.context.db.unit_of_work() as session:
            result = await info.context.services.fleet.submit_job(
                session, principal.product_id, spec
            )
        return SubmitJobPayload(job=await _answer(info, result.job), outcome=result.outcome)

    @strawberry.mutation
    async def ingest_item_as_job(
        self, info: Info[Context, None], item_id: strawberry.ID,
        options: IngestOptions | None = None,
    ) -> SubmitJobPayload:
        principal = info.context.require(Permission.TRACKER)
        item_row_id = require_id("item", item_id)
        spec = options.to_spec() if options is not None else IngestOptionsSpec()
        async with info.context.db.unit_of_work() as session:
            result = await info.context.services.bridge.ingest_item(
                session, principal.product_id, item_row_id, spec
            )
        return SubmitJobPayload(job=await _answer(info, result.job), outcome=result.outcome)

    @strawberry.mutation
    async def echo_job_to_item(
        self, info: Info[Context, None], job_id: strawberry.ID
    ) -> EchoPayload:
        principal = info.context.require(Permission.TRACKER)
        result = await info.context.services.bridge.echo_job(
            principal.product_id, require_id("job", job_id)
        )
        return EchoPayload.from_result(result)

    @strawberry.mutation
    async def claim_next_job(self, info: Info[Context, None], worker: WorkerInput) -> ClaimPayload:
        principal = info.context.require(Permission.WORK)
        profile = worker.to_profile()
        seconds = check_lease_seconds("worker.leaseSeconds", worker.lease_seconds)
        async with info.context.db.unit_of_work() as session:
            row = await info.context.services.fleet.claim_next_job(
                session, principal.product_id, profile, lease_seconds=seconds
            )
        if row is None:
            return ClaimPayload(job=None, lease=None)
        job = await _answer(info, row)
        return ClaimPayload(job=job, lease=_lease_of(job))

    @strawberry.mutation
    async def heartbeat(
        self, info: Info[Context, None], job_id: strawberry.ID, fence: int,
        lease_seconds: int | None = None,
    ) -> Lease:
        principal = info.context.require(Permission.WORK)
        job_row_id = require_id("job", job_id)
        seconds = check_lease_seconds("leaseSeconds", lease_seconds)
        async with info.context.db.unit_of_work() as session:
            row = await info.context.services.fleet.heartbeat(
                session, principal.product_id, job_row_id, fence, lease_seconds=seconds
            )
        return _lease_of(Job.from_model(row))

    @strawberry.mutation
    async def transition_job(
        self,
        info: Info[Context, None],
        job_id: strawberry.ID,
        fence: int,
        to: JobStage,
        metrics: JobMetricsInput | None = None,
        reason: str | None = None,
        retryable: bool | None = False,
    ) -> Job:
        principal = info.context.require(Permission.WORK)
        job_row_id = require_id("job", job_id)
        delta = metrics.to_delta() if metrics is not None else MetricsDelta()
        reason = limits.optional_text("reason", reason, max_len=limits.REASON_MAX)
        async with info.context.db.unit_of_work() as session:
            row = await info.context.services.fleet.transition_job(
                session, principal.product_id, job_row_id, fence, to,
                metrics=delta, reason=reason, retryable=bool(retryable),
            )
        return await _answer(info, row)

    @strawberry.mutation
    async def release_job(
        self, info: Info[Context, None], job_id: strawberry.ID, fence: int,
        reason: str | None = None,
    ) -> Job:
        principal = info.context.require(Permission.WORK)
        job_row_id = require_id("job", job_id)
        reason = limits.optional_text("reason", reason, max_len=limits.REASON_MAX)
        async with info.context.db.unit_of_work() as session:
            row = await info.context.services.fleet.release_job(
                session, principal.product_id, job_row_id, fence, reason
            )
        return await _answer(info, row)

    @strawberry.mutation
    async def cancel_job(
        self, info: Info[Context, None], job_id: strawberry.ID, reason: str | None = None
    ) -> Job:
        principal = info.context.require(Permission.TRACKER)
        job_row_id = require_id("job", job_id)
        reason = limits.optional_text("reason", reason, max_len=limits.REASON_MAX)
        async with info.context.db.unit_of_work() as session:
            row = await info.context.services.fleet.cancel_job(
                session, principal.product_id, job_row_id, reason
            )
        return await _answer(info, row)

    @strawberry.mutation
    async def retry_job(self, info: Info[Context, None], job_id: strawberry.ID) -> Job:
        principal = info.context.require(Permission.TRACKER)
        job_row_id = require_id("job", job_id)
        async with info.context.db.unit_of_work() as session:
            row = await info.context.services.fleet.retry_job(
                session, principal.product_id, job_row_id
            )
        return await _answer(info, row)
