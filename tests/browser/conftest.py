"""Browser tests: Debian's `chromium` driven by Playwright for Python (no browser
download: `executable_path` points at the system browser) against real
`fleetbridge serve` processes on SQLite (the board uses the same public API on both
stores).  Under CI=true a missing browser is a failure, elsewhere a skip.

Screenshots go to tests/artifacts/ (git-ignored; FLEET_TEST_ARTIFACTS overrides).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from app.auth.models import Role
from app.auth.service import create_token
from app.db import create_engine
from app.uow import Database
from tests.conftest import IN_CI, free_port

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("FLEET_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("FLEET_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))
START_DEADLINE = 30.0

try:
    from playwright.sync_api import Browser, Page, Playwright, Route, expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None
else:
    # Waiting for a page to settle on a loaded CI machine; the board's own deadlines
    # (a change shows within 2 s) are passed explicitly where they are the point.
    expect.set_options(timeout=15_000)


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: .ci/run installs chromium and the dev extra)")
    pytest.skip(reason)


class Serve:
    """One `python -m app.cli serve` process; `stop()` then `start()` restarts it on the
    same port."""

    def __init__(self, database_url: str, log_dir: Path, name: str = "serve",
                 port: int | None = None) -> None:
        self.database_url = database_url
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        env = {**os.environ, "DATABASE_URL": self.database_url, "FLEET_LOG_LEVEL": "warning",
               "FLEET_RETRY_BACKOFF_SECONDS": "0"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + START_DEADLINE
        with httpx.Client(base_url=self.url, timeout=2) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"fleetbridge serve exited:\n{self.log()}")
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/healthz").status_code == 200:
                        return self
                time.sleep(0.05)
        raise AssertionError(f"fleetbridge serve never became healthy:\n{self.log()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


class Api:
    """A second client: GraphQL over HTTP with a bearer token."""

    def __init__(self, server: Serve, token: str) -> None:
        self.server = server
        self.token = token

    def data(self, query: str, **variables: Any) -> dict[str, Any]:
        response = httpx.post(
            f"{self.server.url}/graphql", json={"query": query, "variables": variables},
            headers={"Authorization": f"Bearer {self.token}"}, timeout=30,
        )
        body: dict[str, Any] = response.json()
        assert not body.get("errors"), body
        data: dict[str, Any] = body["data"]
        return data


def make_token(database_url: str, product: str, role: Role) -> str:
    async def create() -> str:
        db = Database(create_engine(database_url))
        try:
            async with db.unit_of_work() as session:
                return await create_token(session, product_id=product, role=role)
        finally:
            await db.dispose()

    # Playwright's sync API runs an event loop in this thread: use another one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, create()).result()


@pytest.fixture(scope="session")
def browser_db(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("browser") / "fleet.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(scope="session")
def server(browser_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """One server for the browser tests; each test works in its own product."""
    serve = Serve(browser_db, tmp_path_factory.mktemp("logs")).start()
    yield serve
    serve.stop()


# Module scope, not session: while Playwright's sync API is started its event loop runs
# in this thread, which the asyncio tests of later modules must not see.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if sync_playwright is None:
        _unavailable("playwright is not installed")
    if not Path(CHROMIUM).exists():
        _unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
    )
    yield browser
    browser.close()


class Offsite:
    """Every request to a host other than the server's is aborted and recorded."""

    def __init__(self) -> None:
        self.allowed: set[str] = set()
        self.blocked: list[str] = []

    def handle(self, route: Route) -> None:
        url = route.request.url
        if urlsplit(url).netloc in self.allowed:
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()


@pytest.fixture
def offsite() -> Offsite:
    return Offsite()


@pytest.fixture
def page(browser: Browser, offsite: Offsite, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1920, "height": 1000})
    context.route("**/*", offsite.handle)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def allow(offsite: Offsite, server: Serve) -> None:
    offsite.allowed.add(urlsplit(server.url).netloc)


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    print(f"screenshot: {path}")
    return path
