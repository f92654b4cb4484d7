"""The served side of the fan-out benchmark (bench/bench_fanout.py): fresh databases,
`python -m app.cli serve` processes of a given checkout, and what /proc says of them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
from harness import SERVED_ENV

PG_DSN = os.environ.get("FLEET_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
PRODUCT = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Server:
    def __init__(self, app_dir: Path, database_url: str, log_dir: Path, name: str,
                 extra_env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/graphql"
        self.log_path = log_dir / f"server-{name}.log"
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "PYTHONPATH": str(app_dir),
            **SERVED_ENV,
            "FLEET_MAX_SUBSCRIPTIONS_PER_CONNECTION": "20",
            # One token and one address open every websocket: the per-token and per-address
            # limits (DESIGN §8) would refuse all but the first few.
            "FLEET_MAX_WEBSOCKETS_PER_TOKEN": "1000000",
            "FLEET_MAX_SUBSCRIPTIONS_PER_TOKEN": "1000000",
            "FLEET_RATE_LIMIT_PER_IP": "",
            "FLEET_RATE_LIMIT_PER_TOKEN": "",
            **extra_env,
        }
        with self.log_path.open("wb") as log:
            profile = os.environ.get("FLEET_BENCH_PROFILE")  # a directory: cProfile the servers
            prefix = ["-m", "cProfile", "-o", f"{profile}/server-{name}.prof"] if profile else []
            self.process = subprocess.Popen(
                [sys.executable, *prefix, "-m", "app.cli", "serve", "--port", str(self.port)],
                cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait_healthy(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as http:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(self.log_path.read_text()[-3000:])
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError("server never became healthy")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # uvicorn shuts down; cProfile writes
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


@contextlib.contextmanager
def fresh_database(store: str, tmp: Path) -> Iterator[str]:
    if store == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp / 'fanout.db'}"
        return
    name = f"fleetbridge_fanout_{uuid.uuid4().hex[:8]}"
    asyncio.run(_pg_admin(f"CREATE DATABASE {name}"))
    try:
        yield f"postgresql+asyncpg://{PG_DSN.split('://', 1)[1]}/{name}"
    finally:
        asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def _pg_admin(sql: str) -> None:
    connection = await asyncpg.connect(f"{PG_DSN}/postgres", timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def pg_answers() -> bool:
    try:
        asyncio.run(_pg_admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    return True


def prepare(app_dir: Path, database_url: str) -> str:
    """Migrate and create a member token, with the served checkout's own code."""
    script = (
        "import asyncio\n"
        "from app.migrate import upgrade\n"
        "from app.auth.models import Role\n"
        "from app.auth.service import create_token\n"
        "from app.db import create_engine\n"
        "from app.uow import Database\n"
        f"upgrade({database_url!r})\n"
        "async def main():\n"
        f"    db = Database(create_engine({database_url!r}))\n"
        "    async with db.unit_of_work() as s:\n"
        f"        t = await create_token(s, product_id={PRODUCT!r}, role=Role.MEMBER)\n"
        "    await db.dispose()\n"
        "    print(t)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(app_dir)}
    out = subprocess.run([sys.executable, "-c", script], cwd=app_dir, env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]
