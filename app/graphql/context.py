"""Per-request GraphQL context: the services, the caller and per-request DataLoaders."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.websockets import WebSocket
from strawberry.dataloader import DataLoader

from app.auth.guard import TokenGuard
from app.auth.service import Permission, Principal, require
from app.bridge.service import BridgeService
from app.config import Settings
from app.errors import FleetError
from app.events.entities import EntityReader
from app.events.hub import LocalHub
from app.events.service import EventStreams
from app.fleet.models import Job
from app.fleet.service import FleetService
from app.graphql.delivery import SharedResults
from app.graphql.snapshot import read_session
from app.metrics import ServiceMetrics
from app.pagination import Page
from app.quotas import TokenQuotas
from app.tracker import repository as tracker_repository
from app.tracker import service as tracker_service
from app.tracker.models import Comment, Item
from app.uow import Database


@dataclass(frozen=True, slots=True)
class Services:
    """Everything the app builds once at start-up (see app.main)."""

    settings: Settings
    db: Database
    hub: LocalHub
    fleet: FleetService
    bridge: BridgeService
    streams: EventStreams
    tokens: TokenGuard
    entities: EntityReader
    metrics: ServiceMetrics | None = None
    # Open websockets and live subscriptions per token (DESIGN §8).
    quotas: TokenQuotas = field(default_factory=TokenQuotas)
    # Subscription results shared per event (app.graphql.delivery).
    deliveries: SharedResults = field(default_factory=SharedResults)


# (item id, page size, cursor) of one item's page of comments or of jobs.
PageKey = tuple[int, int, str | None]
CommentPageKey = PageKey


class Loaders:
    """Batching loaders scoped to one product and one request."""

    def __init__(self, db: Database, product_id: str, fleet: FleetService) -> None:
        self.db = db
        self.fleet = fleet
        self.product_id = product_id
        self.item = DataLoader[int, Item | None](self._load_items)
        self.jobs_of_item = DataLoader[PageKey, Page[Job]](self._load_job_pages)
        self.comments = DataLoader[CommentPageKey, Page[Comment]](self._load_comment_pages)

    async def _load_items(self, ids: list[int]) -> list[Item | None]:
        async with read_session(self.db) as session:
            rows = await tracker_repository.get_items(session, self.product_id, ids)
        by_id = {row.id: row for row in rows}
        return [by_id.get(i) for i in ids]

    async def _load_comment_pages(self, keys: list[CommentPageKey]) -> list[Page[Comment]]:
        """First pages of many items in one query per page size; a page after a cursor
        (rare: a client paging one item) is read on its own."""
        pages: dict[CommentPageKey, Page[Comment]] = {}
        async with read_session(self.db) as session:
            for first in {first for _, first, after in keys if after is None}:
                item_ids = [item for item, size, after in keys if size == first and after is None]
                firsts = await tracker_service.first_comment_pages(
                    session, self.product_id, item_ids, first=first
                )
                pages.update({(item, first, None): page for item, page in firsts.items()})
            for key in keys:
                item_id, first, after = key
                if after is not None:
                    pages[key] = await tracker_service.list_comments(
                        session, self.product_id, item_id, first=first, after=after
                    )
        return [pages[key] for key in keys]

    async def _load_job_pages(self, keys: list[PageKey]) -> list[Page[Job]]:
        """`Item.jobs` pages: first pages of many items in one query per page size; a
        page after a cursor is read on its own (filtered by item, oldest first)."""
        pages: dict[PageKey, Page[Job]] = {}
        fleet = self.fleet
        async with read_session(self.db) as session:
            for first in {first for _, first, after in keys if after is None}:
                item_ids = [item for item, size, after in keys if size == first and after is None]
                firsts = await fleet.first_job_pages(session, self.product_id, item_ids,
                                                     first=first)
                pages.update({(item, first, None): page for item, page in firsts.items()})
            for key in keys:
                item_id, first, after = key
                if after is not None:
                    pages[key] = await fleet.list_jobs(
                        session, self.product_id, tracker_item_id=item_id, first=first,
                        after=after,
                    )
        return [pages[key] for key in keys]


@dataclass
class Context:
    services: Services
    request: Request | WebSocket
    response: Any
    principal: Principal | None = None
    # Why the caller could not be authenticated when that was not the token's fault
    # (the database did not answer); raised on the first field that needs a caller.
    auth_failure: FleetError | None = None
    connection_params: dict[str, Any] | None = None
    # sha256 of the caller's bearer secret (per-token quotas); None when anonymous.
    token_key: str | None = None
    # The token whose websocket quota this connection holds (released when it ends).
    websocket_slot: str | None = None
    _loaders: Loaders | None = field(default=None, repr=False)

    @property
    def db(self) -> Database:
        return self.services.db

    def read(self) -> AbstractAsyncContextManager[AsyncSession]:
        """A session to read with: the query operation's one snapshot
        (app.graphql.snapshot), or a fresh read session outside a query."""
        return read_session(self.db)

    def require(self, permission: Permission) -> Principal:
        if self.principal is None and self.auth_failure is not None:
            raise self.auth_failure
        return require(self.principal, permission)

    @property
    def loaders(self) -> Loaders:
        """Per-request loaders.  A websocket connection lives long and its data goes
        stale, so there every use gets fresh loaders (no cache across events)."""
        principal = self.require(Permission.READ)
        if isinstance(self.request, WebSocket):
            return Loaders(self.db, principal.product_id, self.services.fleet)
        if self._loaders is None:
            self._loaders = Loaders(self.db, principal.product_id, self.services.fleet)
        return self._loaders
