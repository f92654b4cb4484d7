"""Shared fixtures.

Stores: every test that takes `database_url` runs once on SQLite and once on
PostgreSQL.  Migrations run once per session into a template (a SQLite file, a
PostgreSQL template database); each test gets its own copy, so tests are isolated
and nothing is mocked.  PostgreSQL is at FLEET_TEST_PG (default
postgresql://postgres@127.0.0.1:5432); when it does not answer the PostgreSQL runs
are skipped, except under CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import httpx
import pytest
import uvicorn

from app.auth.models import Role
from app.auth.service import create_token
from app.config import Settings
from app.fleet.models import Job
from app.fleet.service import JobSpec
from app.graphql.context import Services
from app.main import Runtime, build_runtime, create_app
from app.migrate import upgrade
from app.server import server_options
from app.tracker import service as tracker_service
from app.tracker.models import Item
from app.tracker.service import NewItem

PG_DSN = os.environ.get("FLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
# Request rate limits are exercised by the tests that set them (tests/api/
# test_bounded_cost.py); load and fault tests hammer from one address and one token, so
# by default the suite (in process and in `fleetbridge serve` children) runs without.
os.environ.setdefault("FLEET_RATE_LIMIT_PER_IP", "")
os.environ.setdefault("FLEET_RATE_LIMIT_PER_TOKEN", "")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
_counter = itertools.count()


def _pg_url(database: str, driver: str = "postgresql+asyncpg") -> str:
    return f"{driver}://{PG_DSN.split('://', 1)[1]}/{database}"


async def _pg_admin(sql: str) -> None:
    connection = await asyncpg.connect(f"{PG_DSN}/postgres", timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def _pg_answers() -> bool:
    try:
        asyncio.run(_pg_admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    return True


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    if not _pg_answers():
        message = (
            f"PostgreSQL does not answer at {PG_DSN}; start it (see README) or set "
            "FLEET_TEST_PG to run the PostgreSQL half of the suite"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    template = f"fleetbridge_test_template_{os.getpid()}"
    asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {template} WITH (FORCE)"))
    asyncio.run(_pg_admin(f"CREATE DATABASE {template}"))
    upgrade(_pg_url(template))
    yield template
    asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {template} WITH (FORCE)"))


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[str]:
    """A freshly migrated, empty database of the parametrized store."""
    if store == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "fleet.db"
        shutil.copyfile(template, path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    template_db: str = request.getfixturevalue("pg_template")
    name = f"fleetbridge_test_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    asyncio.run(_pg_admin(f"CREATE DATABASE {name} TEMPLATE {template_db}"))
    try:
        yield _pg_url(name)
    finally:
        asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def make_settings(database_url: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "background_loops": False,
            "retry_backoff_seconds": 0.0,
            # Generous: a loaded CI machine queues for the pool; tests/faults sets its own.
            "db_timeout_seconds": 30.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


RuntimeFactory = Callable[..., Awaitable[Runtime]]


@pytest.fixture
async def make_runtime(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[RuntimeFactory]:
    """Build (and afterwards stop) a runtime; keyword arguments override settings,
    `echo_writer=` injects a fault at the bridge's item-writing seam."""
    started: list[Runtime] = []

    async def make(*, echo_writer: Any = None, **overrides: Any) -> Runtime:
        runtime = build_runtime(make_settings(**overrides), echo_writer=echo_writer)
        await runtime.start(background=False)
        started.append(runtime)
        return runtime

    yield make
    for runtime in started:
        await runtime.stop()


@pytest.fixture
async def services(make_runtime: RuntimeFactory) -> Services:
    return (await make_runtime()).services


TokenFactory = Callable[..., Awaitable[str]]


@pytest.fixture
def make_token(database_url: str) -> TokenFactory:
    """`await make_token("acme", Role.MEMBER)` → a bearer secret."""
    from app.db import create_engine
    from app.uow import Database

    async def make(product: str = "acme", role: Role = Role.MEMBER) -> str:
        db = Database(create_engine(database_url))
        try:
            async with db.unit_of_work() as session:
                return await create_token(session, product_id=product, role=role)
        finally:
            await db.dispose()

    return make


ItemFactory = Callable[..., Awaitable[Item]]
JobFactory = Callable[..., Awaitable[Job]]


@pytest.fixture
def make_item(services: Services, make_token: TokenFactory) -> ItemFactory:
    """`await make_item("acme", title=…, labels=[…])` (the product is created if new)."""

    async def make(product: str = "acme", **fields: Any) -> Item:
        await make_token(product, Role.MEMBER)
        fields.setdefault("title", "Fix the flaky login test")
        fields["labels"] = tuple(fields.get("labels", ()))
        async with services.db.unit_of_work() as session:
            return await tracker_service.create_item(session, product, NewItem(**fields))

    return make


@pytest.fixture
def make_job(services: Services, make_token: TokenFactory) -> JobFactory:
    async def make(product: str = "acme", **fields: Any) -> Job:
        await make_token(product, Role.MEMBER)
        fields.setdefault("title", "a job")
        fields.setdefault("body_md", "do the thing")
        if "capabilities" in fields:
            fields["capabilities"] = tuple(fields["capabilities"])
        async with services.db.unit_of_work() as session:
            result = await services.fleet.submit_job(session, product, JobSpec(**fields))
        return result.job

    return make


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """The real ASGI app served by uvicorn on a loopback port, in the test's loop."""

    def __init__(self, settings: Settings, echo_writer: Any = None) -> None:
        self.app = create_app(settings, echo_writer=echo_writer)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/graphql"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
            **server_options(settings),
        )
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task


@pytest.fixture
async def live_server(make_settings: Callable[..., Settings]) -> AsyncIterator[
    Callable[..., Awaitable[LiveServer]]
]:
    """`server = await live_server(tracker_echo=True)` serves the app over real HTTP."""
    servers: list[LiveServer] = []

    async def start(*, echo_writer: Any = None, **overrides: Any) -> LiveServer:
        server = LiveServer(make_settings(**overrides), echo_writer=echo_writer)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


class GraphQLClient:
    """POSTs GraphQL over HTTP; `data()` asserts there were no errors."""

    def __init__(self, http: httpx.AsyncClient, token: str | None) -> None:
        self.http = http
        self.token = token

    async def execute(self, query: str, **variables: Any) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        response = await self.http.post(
            "/graphql", json={"query": query, "variables": variables}, headers=headers
        )
        assert response.status_code < 500, response.text
        body: dict[str, Any] = response.json()
        return body

    async def data(self, query: str, **variables: Any) -> dict[str, Any]:
        body = await self.execute(query, **variables)
        assert not body.get("errors"), body["errors"]
        data: dict[str, Any] = body["data"]
        return data


def error_codes(body: dict[str, Any]) -> list[str]:
    return [error.get("extensions", {}).get("code") for error in body.get("errors") or []]


class Served(Protocol):
    url: str


@pytest.fixture
async def http_client() -> AsyncIterator[Callable[[Served, str | None], GraphQLClient]]:
    """`http_client(server, token)`: a GraphQL client of any served app with a `url`
    (a `LiveServer`, or a `fleetbridge serve` process)."""
    clients: list[httpx.AsyncClient] = []

    def make(server: Served, token: str | None) -> GraphQLClient:
        http = httpx.AsyncClient(base_url=server.url, timeout=30)
        clients.append(http)
        return GraphQLClient(http, token)

    yield make
    for http in clients:
        await http.aclose()
