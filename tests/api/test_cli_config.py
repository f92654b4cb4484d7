"""Friendly configuration, as a user meets it: real `fleetbridge` processes (issue 10 §4).

Invalid settings name the variable and what it accepts (exit 2, no traceback);
`.env` is read; the log level takes any case; `--version`; a database that was never
migrated is reported, not created; passwords in URLs never reach the output.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.api.test_cli import APP_TABLES, ROOT, cli_env, run_cli, table_names
from tests.conftest import _pg_admin, _pg_url, free_port


async def test_an_invalid_variable_is_named_with_its_allowed_values(tmp_path):
    env = cli_env(FLEET_PORT="abc", FLEET_LOG_LEVEL="loud",
                  DATABASE_URL=f"sqlite:///{tmp_path}/x.db")
    code, out, err = await run_cli("serve", env=env)
    assert code == 2
    assert "Traceback" not in err
    assert out == ""
    assert "FLEET_PORT='abc' is not valid: expected an integer from 1 to 65535" in err
    assert "FLEET_LOG_LEVEL='loud' is not valid: expected one of debug, info, warning, error" in err
    code, _, err = await run_cli("migrate", env=cli_env(DATABASE_URL="mysql://db/x"))
    assert code == 2
    assert "DATABASE_URL='mysql://db/x' is not valid: expected a URL such as" in err
    assert not (tmp_path / "x.db").exists()


async def test_dotenv_and_any_case_log_level_and_version(tmp_path):
    (tmp_path / ".env").write_text(
        "# read from the working directory\nDATABASE_URL=sqlite:///./from-dotenv.db\n"
        "FLEET_LOG_LEVEL=WARNING\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "migrate", cwd=tmp_path, env=cli_env(
            PYTHONPATH=str(ROOT)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert APP_TABLES <= await table_names(f"sqlite+aiosqlite:///{tmp_path}/from-dotenv.db")
    assert "Running upgrade" not in err.decode()  # WARNING took effect
    # the environment wins over .env
    code, _, err = await run_cli("migrate", env=cli_env(
        DATABASE_URL=f"sqlite:///{tmp_path}/from-env.db", FLEET_LOG_LEVEL="Info"))
    assert code == 0, err
    assert (tmp_path / "from-env.db").exists()
    code, out, _ = await run_cli("--version", env=cli_env())
    assert code == 0
    assert out.startswith("fleetbridge ")


async def test_a_database_never_migrated_is_reported_not_created(tmp_path):
    missing = tmp_path / "never.db"
    for args in (("token", "create", "--product", "p", "--role", "member"),
                 ("token", "list"), ("token", "revoke", "1")):
        code, out, err = await run_cli(*args, env=cli_env(DATABASE_URL=f"sqlite:///{missing}"))
        assert code == 2, err
        assert "run `fleetbridge migrate` first" in err
        assert "Traceback" not in err
        assert out == ""
        assert not missing.exists()
    # an existing but empty database (PostgreSQL, or a SQLite file made elsewhere)
    empty = tmp_path / "empty.db"
    empty.touch()
    code, _, err = await run_cli("token", "list", env=cli_env(DATABASE_URL=f"sqlite:///{empty}"))
    assert code == 2
    assert "has not been migrated; run `fleetbridge migrate` first" in err


@pytest.fixture
def empty_pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    request.getfixturevalue("pg_template")  # skips (or fails under CI) without PostgreSQL
    name = f"fleetbridge_cfg_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_pg_admin(f"CREATE DATABASE {name}"))
    try:
        yield _pg_url(name)
    finally:
        asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.mark.postgres
async def test_passwords_in_urls_are_masked_in_logs_and_messages(empty_pg_url):
    # trust authentication ignores the password, so the URL works with any
    url = make_url(empty_pg_url).set(password="s3cret-pass")
    with_password = url.render_as_string(hide_password=False)
    code, _, err = await run_cli("token", "list", env=cli_env(DATABASE_URL=with_password))
    assert code == 2
    assert "s3cret-pass" not in err
    assert ":***@" in err
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "serve", "--port", str(port), cwd=ROOT,
        env=cli_env(DATABASE_URL=with_password, FLEET_LOG_LEVEL="INFO"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            while True:
                assert process.returncode is None, "serve exited early"
                assert time.monotonic() < deadline, "serve did not answer /readyz"
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
    finally:
        process.send_signal(signal.SIGINT)
        _, err_bytes = await asyncio.wait_for(process.communicate(), 30)
    log = err_bytes.decode()
    assert "s3cret-pass" not in log
    assert ":***@" in log
    assert "GraphQL at http://127.0.0.1:" in log
