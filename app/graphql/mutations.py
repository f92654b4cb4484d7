"""Mutations: parse, authorise, run one service call in a unit of work, answer.

Each mutation field is its own unit of work; the events it records are published
(and, with FLEET_TRACKER_ECHO on, echoed) after its commit and before it answers.
The lease holder's fields (claim, heartbeat, transition, release) open theirs with
`one_call=True`: the service call is all of it, so on PostgreSQL it may run alone
on the driver (app.lone).
"""

from __future__ import annotations

import time
from typing import Annotated

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


JobId = Annotated[strawberry.ID, strawberry.argument(description="The job's id.")]
ItemId = Annotated[strawberry.ID, strawberry.argument(description="The tracker item's id.")]
Fence = Annotated[
    int, strawberry.argument(description="The fence of the caller's lease (`Lease.fence`).")
]
Reason = Annotated[
    str | None, strawberry.argument(description="Why, in a few words (kept on the job).")
]
LeaseSeconds = Annotated[
    int | None,
    strawberry.argument(
        description="Lease length in seconds; null for the server's FLEET_LEASE_SECONDS."
    ),
]


def _lease_of(job: Job) -> Lease:
    assert job.lease is not None
    return job.lease


@strawberry.type(
    description="Writes. Each mutation is one transaction; its events are published "
    "after it commits."
)
class Mutation:
    @strawberry.mutation(description="Create a tracker item (member).")
    async def create_item(
        self, info: Info[Context, None],
        input: Annotated[CreateItemInput, strawberry.argument(description="The new item.")],
    ) -> Item:
        principal = info.context.require(Permission.TRACKER)
        spec = input.to_spec()
        async with info.context.db.unit_of_work() as session:
            row = await info.context.services.bridge.create_item(
                session, principal.product_id, spec, labels_field="input.labels"
            )
        return Item.from_model(row)

    @strawberry.mutation(
        description="Change a tracker item; only the fields given change (member). Setting "
        "CANCELLED cancels its unfinished jobs."
    )
    async def update_item(
        self, info: Info[Context, None],
        id: Annotated[strawberry.ID, strawberry.argument(description="The item's id.")],
        input: Annotated[UpdateItemInput, strawberry.argument(description="The changes.")],
    ) -> Item:
        principal = info.context.require(Permission.TRACKER)
        item_id = require_id("item", id)
        changes = input.to_spec()
        async with info.context.db.unit_of_work() as session:
            row = await info.context.services.bridge.update_item(
                session, principal.product_id, item_id, changes, labels_field="input.labels"
            )
        return Item.from_model(row)

    @strawberry.mutation(description="Comment on a tracker item (member).")
    async def add_comment(
        self, info: Info[Context, None], item_id: ItemId,
        body: Annotated[str, strawberry.argument(description="The text (Markdown).")],
    ) -> Comment:
        principal = info.context.require(Permission.TRACKER)
        item_row_id = require_id("item", item_id)
        body = limits.text("body", body, max_len=limits.COMMENT_MAX, required=True)
        async with info.context.db.unit_of_work() as session:
            row = await tracker_service.add_comment(
                session, principal.product_id, item_row_id, body=body, author=principal.name
            )
        return Comment.from_model(row)

    @strawberry.mutation(
        description="Queue a job (member); idempotent on `input.idempotencyKey`."
    )
    async def submit_job(
        self, info: Info[Context, None],
        input: Annotated[SubmitJobInput, strawberry.argument(description="The job.")],
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

    @strawberry.mutation(
        description="Turn a tracker item into a job (member; DESIGN §4). Label hints "
        "apply; a re-ingest dedupes while the item's job has not ended."
    )
    async def ingest_item_as_job(
        self, info: Info[Context, None], item_id: ItemId,
        options: Annotated[
            IngestOptions | None,
            strawberry.argument(description="Hints that override the item's labels."),
        ] = None,
    ) -> SubmitJobPayload:
        principal = info.context.require(Permission.TRACKER)
        item_row_id = require_id("item", item_id)
        spec = options.to_spec() if options is not None else IngestOptionsSpec()
        async with info.context.db.unit_of_work() as session:
            result = await info.context.services.bridge.ingest_item(
                session, principal.product_id, item_row_id, spec
            )
        return SubmitJobPayload(job=await _answer(info, result.job), outcome=result.outcome)

    @strawberry.mutation(
        description="Write a job's stage back onto its tracker item now (member). A failed "
        "write is answered in `error`, not raised, and retried by the sweeper."
    )
    async def echo_job_to_item(self, info: Info[Context, None], job_id: JobId) -> EchoPayload:
        principal = info.context.require(Permission.TRACKER)
        result = await info.context.services.bridge.echo_job(
            principal.product_id, require_id("job", job_id)
        )
        return EchoPayload.from_result(result)

    @strawberry.mutation(
        description="Claim the best eligible queued job for this worker (worker; DESIGN "
        "§3): it becomes ASSIGNED under a new lease. `job` is null when none is eligible."
    )
    async def claim_next_job(
        self, info: Info[Context, None],
        worker: Annotated[
            WorkerInput, strawberry.argument(description="Who claims and what it offers.")
        ],
    ) -> ClaimPayload:
        principal = info.context.require(Permission.WORK)
        profile = worker.to_profile()
        seconds = check_lease_seconds("worker.leaseSeconds", worker.lease_seconds)
        started = time.perf_counter()
        async with info.context.db.unit_of_work(one_call=True) as session:
            row = await info.context.services.fleet.claim_next_job(
                session, principal.product_id, profile, lease_seconds=seconds
            )
        if (metrics := info.context.services.metrics) is not None:
            metrics.claimed(time.perf_counter() - started, found=row is not None)
        if row is None:
            return ClaimPayload(job=None, lease=None)
        job = await _answer(info, row)
        return ClaimPayload(job=job, lease=_lease_of(job))

    @strawberry.mutation(
        description="Extend the caller's lease (worker). A stale fence or a lapsed lease "
        "is CONFLICT."
    )
    async def heartbeat(
        self, info: Info[Context, None], job_id: JobId, fence: Fence,
        lease_seconds: LeaseSeconds = None,
    ) -> Lease:
        principal = info.context.require(Permission.WORK)
        job_row_id = require_id("job", job_id)
        seconds = check_lease_seconds("leaseSeconds", lease_seconds)
        async with info.context.db.unit_of_work(one_call=True) as session:
            row = await info.context.services.fleet.heartbeat(
                session, principal.product_id, job_row_id, fence, lease_seconds=seconds
            )
        return _lease_of(Job.from_model(row))

    @strawberry.mutation(
        description="Move a held job to another stage (worker; DESIGN §2). A stale fence, "
        "a lapsed lease or a move outside the stage graph is CONFLICT and changes nothing."
    )
    async def transition_job(
        self,
        info: Info[Context, None],
        job_id: JobId,
        fence: Fence,
        to: Annotated[JobStage, strawberry.argument(description="The stage to move to.")],
        metrics: Annotated[
            JobMetricsInput | None,
            strawberry.argument(description="Cost and tokens to add to the job's totals."),
        ] = None,
        reason: Reason = None,
        retryable: Annotated[
            bool | None,
            strawberry.argument(
                description="With `to: FAILED`: queue the job again (after a backoff) "
                "while attempts remain."
            ),
        ] = False,
    ) -> Job:
        principal = info.context.require(Permission.WORK)
        job_row_id = require_id("job", job_id)
        delta = metrics.to_delta() if metrics is not None else MetricsDelta()
        reason = limits.optional_text("reason", reason, max_len=limits.REASON_MAX)
        async with info.context.db.unit_of_work(one_call=True) as session:
            row = await info.context.services.fleet.transition_job(
                session, principal.product_id, job_row_id, fence, to,
                metrics=delta, reason=reason, retryable=bool(retryable),
            )
        return await _answer(info, row)

    @strawberry.mutation(
        description="Give a held job back (worker): QUEUED at once, fence raised, the "
        "attempt it used not counted."
    )
    async def release_job(
        self, info: Info[Context, None], job_id: JobId, fence: Fence, reason: Reason = None,
    ) -> Job:
        principal = info.context.require(Permission.WORK)
        job_row_id = require_id("job", job_id)
        reason = limits.optional_text("reason", reason, max_len=limits.REASON_MAX)
        async with info.context.db.unit_of_work(one_call=True) as session:
            row = await info.context.services.fleet.release_job(
                session, principal.product_id, job_row_id, fence, reason
            )
        return await _answer(info, row)

    @strawberry.mutation(
        description="Cancel a job that has not ended (member); its holder's next write "
        "is CONFLICT."
    )
    async def cancel_job(
        self, info: Info[Context, None], job_id: JobId, reason: Reason = None
    ) -> Job:
        principal = info.context.require(Permission.TRACKER)
        job_row_id = require_id("job", job_id)
        reason = limits.optional_text("reason", reason, max_len=limits.REASON_MAX)
        async with info.context.db.unit_of_work() as session:
            row = await info.context.services.fleet.cancel_job(
                session, principal.product_id, job_row_id, reason
            )
        return await _answer(info, row)

    @strawberry.mutation(description="Queue a FAILED or CANCELLED job again (member).")
    async def retry_job(self, info: Info[Context, None], job_id: JobId) -> Job:
        principal = info.context.require(Permission.TRACKER)
        job_row_id = require_id("job", job_id)
        async with info.context.db.unit_of_work() as session:
            row = await info.context.services.fleet.retry_job(
                session, principal.product_id, job_row_id
            )
        return await _answer(info, row)
