"""The ASGI application: Starlette routes, the GraphQL endpoint and the lifespan that
builds the engine, the event hub, the services and the background loops."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from app.auth.guard import TokenGuard
from app.auth.repository import TOKEN_CHANNEL
from app.auth.revocations import epoch as token_epoch
from app.auth.revocations import sidecar_path
from app.background import BackgroundLoops
from app.bridge.service import BridgeService, ItemEchoWriter, write_status_and_comment
from app.config import Settings, get_settings
from app.db import create_engine
from app.events.entities import EntityReader
from app.events.hub import LogHub
from app.events.outbox import EventRecord
from app.events.pg_hub import PostgresHub
from app.events.service import EventStreams
from app.fleet.service import FleetPolicy, FleetService
from app.graphql.context import Services
from app.graphql.schema import schema
from app.graphql.view import FleetGraphQL
from app.http_guard import RateLimits, RequestGuard
from app.metrics import ServiceMetrics
from app.observability import RequestObserver
from app.readiness import check_ready
from app.uow import Database
from app.web import web_routes

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Runtime:
    services: Services
    loops: BackgroundLoops
    metrics: ServiceMetrics

    async def start(self, *, background: bool) -> None:
        await self.services.hub.start()
        await self.services.tokens.start()
        if background:
            self.loops.start()

    async def stop(self) -> None:
        await self.loops.stop()
        await self.services.tokens.stop()
        await self.services.hub.stop()
        await self.services.bridge.aclose()
        await self.services.db.dispose()
        await self.services.streams.db.dispose()


def build_runtime(settings: Settings, *, echo_writer: ItemEchoWriter | None = None) -> Runtime:
    """Wire the services together.  Nothing is started and nothing touches the network."""
    engine = create_engine(
        settings.database_url, timeout_seconds=settings.db_timeout_seconds,
        pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow,
    )
    db = Database(engine)
    # Event reads (hub catch-up, stream replay, events' entities) have a small pool of
    # their own: live delivery never holds or waits on the pool requests use.
    event_db = Database(create_engine(
        settings.database_url, timeout_seconds=settings.db_timeout_seconds,
        pool_size=settings.event_pool_size, max_overflow=0,
    ))
    hub: LogHub
    if engine.dialect.name == "postgresql":
        # Many instances may share this database: wake each other with LISTEN/NOTIFY.
        pg_hub = PostgresHub(event_db, settings.database_url,
                             max_queue=settings.subscriber_queue_size,
                             poll_seconds=settings.hub_poll_seconds,
                             retry_seconds=settings.stream_retry_seconds)
        # Token checks are cached only while revoke notifications can arrive.
        tokens = TokenGuard(db, cache_seconds=settings.token_cache_seconds,
                            check_seconds=settings.token_check_seconds,
                            live=lambda: pg_hub.listener_pid)
        pg_hub.listen(TOKEN_CHANNEL, tokens.on_notification)
        hub = pg_hub
    else:
        hub = LogHub(event_db, max_queue=settings.subscriber_queue_size,
                     poll_seconds=settings.hub_poll_seconds,
                     retry_seconds=settings.stream_retry_seconds)
        # Revokes by other processes bump the database's sidecar file: its stat is the
        # cache's epoch (no sidecar, e.g. in memory: nothing is cached).
        sidecar = sidecar_path(settings.database_url)
        tokens = TokenGuard(
            db, cache_seconds=settings.token_cache_seconds,
            check_seconds=settings.token_check_seconds,
            live=(lambda: token_epoch(sidecar)) if sidecar is not None else None,
        )
    fleet = FleetService(
        FleetPolicy(
            lease_seconds=settings.lease_seconds,
            aging_seconds=settings.aging_seconds,
            retry_backoff_seconds=settings.retry_backoff_seconds,
            retry_backoff_max_seconds=settings.retry_backoff_max_seconds,
            retry_backoff_jitter=settings.retry_backoff_jitter,
            echo_reads=settings.tracker_echo,
        )
    )
    bridge = BridgeService(
        db, fleet, echo_writer=echo_writer or write_status_and_comment,
        retry_max_seconds=settings.echo_sweep_max_backoff_seconds,
        auto_ingest_label=settings.auto_ingest_label,
    )
    metrics = ServiceMetrics()
    metrics.count_subscribers(
        lambda: sum(hub.subscriber_count(product) for product in hub.subscribed_products())
    )
    bridge.on_echo_failure = metrics.echo_failures.inc

    async def on_commit(records: Sequence[EventRecord]) -> None:
        metrics.observe(records)
        await hub.publish(records)
        metrics.published(records)
        if settings.tracker_echo:
            await bridge.echo_stage_changes(records)

    db.on_commit = on_commit
    services = Services(
        settings=settings, db=db, hub=hub, fleet=fleet, bridge=bridge,
        streams=EventStreams(event_db, hub, retry_seconds=settings.stream_retry_seconds),
        entities=EntityReader(event_db), tokens=tokens, metrics=metrics,
    )
    loops = BackgroundLoops(settings, db, fleet, bridge)
    loops.on_reaped = metrics.reaped
    return Runtime(services=services, loops=loops, metrics=metrics)


def create_app(
    settings: Settings | None = None, *, echo_writer: ItemEchoWriter | None = None
) -> Starlette:
    settings = settings or get_settings()
    graphql_app = FleetGraphQL(
        schema,
        graphql_ide="graphiql" if settings.graphiql else None,
        connection_init_wait_timeout=timedelta(seconds=settings.connection_init_timeout_seconds),
        max_subscriptions_per_connection=settings.max_subscriptions_per_connection,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        runtime = build_runtime(settings, echo_writer=echo_writer)
        app.state.runtime = runtime
        app.state.services = runtime.services
        await runtime.start(background=settings.background_loops)
        try:
            yield
        finally:
            await runtime.stop()

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        """200 when the database answers and its migrations are at head; else 503 and
        one warning line (no traceback)."""
        services: Services = request.app.state.services
        problem = await check_ready(services.db, services.settings.db_timeout_seconds)
        if problem is not None:
            logger.warning("not ready: %s", problem)
            return JSONResponse({"status": "unavailable", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        runtime: Runtime = request.app.state.runtime
        await runtime.metrics.refresh(runtime.services.db)
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/graphql", graphql_app, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", graphql_app),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            *web_routes(),
        ],
        # The request observer outermost (it logs and counts every answer), then CORS
        # (a refusal still carries its headers), then the guard: rate limits, the body
        # cap and the body read timeout, before anything is parsed.
        middleware=[
            Middleware(RequestObserver),
            *cors_middleware(settings),
            Middleware(
                RequestGuard,
                max_body_bytes=settings.max_body_bytes,
                read_timeout=settings.http_read_timeout_seconds,
                rate_limits=RateLimits(settings.rate_limit_per_ip, settings.rate_limit_per_token),
            ),
        ],
        lifespan=lifespan,
    )


def cors_middleware(settings: Settings) -> list[Middleware]:
    """`FLEET_CORS_ORIGINS` lets browser apps on those origins call the API: preflights
    from them are answered, others get 400 and no `Access-Control-Allow-Origin`.
    Bearer tokens travel in a header, so credentials (cookies) are not allowed.  With no
    origin configured there is no CORS at all: same-origin only (issue 9)."""
    if not settings.cors_origins:
        return []
    return [Middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST"],
        allow_headers=["authorization", "content-type", "accept"],
        allow_credentials=False,
        max_age=600,
    )]
