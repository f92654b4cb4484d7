"""The command line as a user runs it: real processes against real databases (both stores).

`migrate` and `serve` run on empty databases (`worker` and `watch`: test_worker.py,
test_watch.py), every subprocess awaited asynchronously.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import inspect

from app.db import create_engine
from tests.conftest import _pg_admin, _pg_url, free_port

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30.0
APP_TABLES = {"products", "tokens", "items", "comments", "jobs", "events"}

def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLEET_") and k != "DATABASE_URL"}
    env.update(extra)
    return env


async def run_cli(*args: str, env: dict[str, str], timeout: float = DEADLINE) -> tuple[
    int, str, str
]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def table_names(database_url: str) -> set[str]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            return set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


@pytest.fixture
def empty_database_url(store: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[
    str
]:
    """An empty (never migrated) database: a zero-byte SQLite file, or a new PG database."""
    if store == "sqlite":
        path = tmp_path / "empty.db"
        path.touch()
        yield f"sqlite+aiosqlite:///{path}"
        return
    request.getfixturevalue("pg_template")  # skips (or fails under CI) without PostgreSQL
    name = f"fleetbridge_cli_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_pg_admin(f"CREATE DATABASE {name}"))
    try:
        yield _pg_url(name)
    finally:
        asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# -- migrate and serve -------------------------------------------------------------


async def test_migrate_creates_the_tables_in_an_empty_database(empty_database_url):
    assert await table_names(empty_database_url) == set()
    code, _, err = await run_cli("migrate", env=cli_env(DATABASE_URL=empty_database_url))
    assert code == 0, err
    assert APP_TABLES <= await table_names(empty_database_url)
    # running it again is a no-op, not an error
    code, _, err = await run_cli("migrate", env=cli_env(DATABASE_URL=empty_database_url))
    assert code == 0, err


async def test_serve_migrates_an_empty_database_and_answers_healthz(empty_database_url):
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
        cwd=ROOT, env=cli_env(DATABASE_URL=empty_database_url, FLEET_LOG_LEVEL="warning"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        health = None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            while health is None:
                assert process.returncode is None, "serve exited early"
                assert time.monotonic() < deadline, "serve did not answer /healthz in time"
                try:
                    health = await http.get("/healthz")
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            assert health.status_code == 200
            assert health.json() == {"status": "ok"}
            ready = await http.get("/readyz")
            assert ready.status_code == 200
        assert APP_TABLES <= await table_names(empty_database_url)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), DEADLINE)
    # uvicorn shuts down cleanly, then re-raises the signal it caught
    assert process.returncode in (0, -signal.SIGTERM), err.decode()
    assert "Traceback" not in err.decode()
