"""Queries (DESIGN §6): every read is scoped to the caller's product."""

from __future__ import annotations

from typing import Annotated

import strawberry
from strawberry.types import Info

from app.auth.service import Permission
from app.fleet import repository as fleet_repository
from app.fleet.models import JobStage
from app.graphql.context import Context
from app.graphql.ids import parse_id
from app.graphql.types import After, Connection, First, Item, Job, Viewer, connection_of
from app.limits import LABEL_MAX, page_size, text
from app.tracker import repository as tracker_repository
from app.tracker import service as tracker_service
from app.tracker.models import ItemStatus


@strawberry.type(description="Reads. Every read sees the caller's product only.")
class Query:
    @strawberry.field(description="Who is calling (product and role of the token).")
    async def viewer(self, info: Info[Context, None]) -> Viewer:
        """Reads nothing itself: `eventCursor` is read only when it is selected."""
        principal = info.context.require(Permission.READ)
        return Viewer(product_id=principal.product_id, role=principal.role)

    @strawberry.field(description="One tracker item; null when no item has this id.")
    async def item(
        self, info: Info[Context, None],
        id: Annotated[strawberry.ID, strawberry.argument(description="The item's id.")],
    ) -> Item | None:
        principal = info.context.require(Permission.READ)
        item_id = parse_id(id)
        if item_id is None:
            return None
        async with info.context.read() as session:
            row = await tracker_repository.get_item(session, principal.product_id, item_id)
        return Item.from_model(row) if row is not None else None

    @strawberry.field(description="Tracker items, oldest first, optionally filtered.")
    async def items(
        self,
        info: Info[Context, None],
        status: Annotated[
            ItemStatus | None, strawberry.argument(description="Only items with this status.")
        ] = None,
        label: Annotated[
            str | None, strawberry.argument(description="Only items carrying this label.")
        ] = None,
        first: First = 50,
        after: After = None,
    ) -> Connection[Item]:
        principal = info.context.require(Permission.READ)
        if label is not None:
            text("label", label, max_len=LABEL_MAX)
        async with info.context.read() as session:
            page = await tracker_service.list_items(
                session, principal.product_id, status=status, label=label,
                first=page_size(first), after=after,
            )
        return connection_of(page, [Item.from_model(row) for row in page.nodes])

    @strawberry.field(description="One job; null when no job has this id.")
    async def job(
        self, info: Info[Context, None],
        id: Annotated[strawberry.ID, strawberry.argument(description="The job's id.")],
    ) -> Job | None:
        principal = info.context.require(Permission.READ)
        job_id = parse_id(id)
        if job_id is None:
            return None
        async with info.context.read() as session:
            row = await fleet_repository.get_job(session, principal.product_id, job_id)
        return Job.from_model(row) if row is not None else None

    @strawberry.field(description="Jobs, oldest first, optionally filtered.")
    async def jobs(
        self,
        info: Info[Context, None],
        stage: Annotated[
            JobStage | None, strawberry.argument(description="Only jobs in this stage.")
        ] = None,
        tracker_item_id: Annotated[
            strawberry.ID | None,
            strawberry.argument(description="Only jobs made from this tracker item."),
        ] = None,
        first: First = 50,
        after: After = None,
    ) -> Connection[Job]:
        principal = info.context.require(Permission.READ)
        item_filter = None
        if tracker_item_id is not None:
            item_filter = parse_id(tracker_item_id)
            if item_filter is None:  # names no item: nothing can match
                item_filter = 0
        async with info.context.read() as session:
            page = await info.context.services.fleet.list_jobs(
                session, principal.product_id, stage=stage, tracker_item_id=item_filter,
                first=page_size(first), after=after,
            )
        return connection_of(page, [Job.from_model(row) for row in page.nodes])


