"""The worker can be left running: outages are waited out, never fatal.

- PostgreSQL goes away under a served instance (a TCP proxy of the test's own between the
  server and the shared cluster is cut for a few seconds, then restored; the cluster
  itself is never stopped, other tests use it): the service answers SERVICE_UNAVAILABLE,
  the worker logs one warning per retry, reports its job when the database is back and
  ships the next one.
- The service itself goes away (both stores): connection refused, retried until a server
  answers on the same address again.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import uvicorn

from app.auth.models import Role
from tests.api.worker_helpers import (
    DEADLINE,
    WorkerProcess,
    ingested_job,
    job_of,
    python_command,
    stage_is,
    until,
)
from tests.conftest import LiveServer

# Waits for a gate file, so the test decides when the command finishes.
GATED_COMMAND = python_command(
    "import os, sys, time\n"
    "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.05)\n"
)


class TcpProxy:
    """Forwards a loopback port to `target`; `cut()` drops every connection and refuses
    new ones, `restore()` listens again on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def restore(self) -> None:
        await self.start()

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.cut()


def through(proxy: TcpProxy, database_url: str) -> str:
    parts = urlsplit(database_url)
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = f"{netloc[0]}@" if len(netloc) == 2 else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{proxy.port}"))


@pytest.mark.parametrize("store", ["postgres"])
async def test_worker_rides_out_a_database_outage_and_ships_the_next_job(
    store, database_url, live_server, http_client, make_token, tmp_path: Path
):
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    try:
        server = await live_server(database_url=through(proxy, database_url))
        member = http_client(server, await make_token("acme", Role.MEMBER))
        _, first = await ingested_job(member, "the body", [])
        gate = tmp_path / "gate"
        worker = await WorkerProcess.start(
            f"{server.url}/graphql", await make_token("acme", Role.WORKER),
            "--retry-max-seconds", "1", "--poll-seconds", "0.2", "--lease-seconds", "60",
            command=(*GATED_COMMAND, str(gate)),
        )
        await worker.wait_for_line(f"job {first}: BUILDING")

        await proxy.cut()
        gate.touch()  # the command finishes while the database is away
        await worker.wait_for_line("SERVICE_UNAVAILABLE")
        await until(lambda: asyncio.sleep(0, result=sum(
            "SERVICE_UNAVAILABLE" in line for line in worker.lines) >= 3), "three retries",
            worker.process)
        await proxy.restore()

        await until(lambda: stage_is(member, first, "SHIPPED"), "the first job to ship",
                    worker.process)
        _, second = await ingested_job(member, "the body", [])
        await until(lambda: stage_is(member, second, "SHIPPED"), "the next job to ship",
                    worker.process)
        assert (await job_of(member, first))["attempts"] == 1
        worker.process.terminate()
        assert await worker.finish() == 143, worker.text
    finally:
        await proxy.stop()
    warnings = [line for line in worker.lines if "WARNING" in line]
    assert warnings, worker.text
    assert all("retry" in line for line in warnings), warnings
    assert "Traceback" not in worker.text
    assert f"job {first}: exit 0 -> SHIPPED" in worker.text
    assert f"job {second}: exit 0 -> SHIPPED" in worker.text


async def test_worker_waits_for_a_service_that_went_away(
    live_server, make_settings, http_client, make_token
):
    server = await live_server()
    token = await make_token("acme", Role.WORKER)
    worker = await WorkerProcess.start(
        f"{server.url}/graphql", token, "--retry-max-seconds", "0.5", "--poll-seconds", "0.2",
        command=python_command("pass"),
    )
    try:
        await server.stop()
        await worker.wait_for_line("WARNING")
        back = LiveServer(make_settings())
        back.port, back.url = server.port, server.url
        back.server = uvicorn.Server(uvicorn.Config(
            back.app, host="127.0.0.1", port=server.port, log_level="warning",
            ws="websockets-sansio", lifespan="on"))
        await back.start()
        try:
            member = http_client(back, await make_token("acme", Role.MEMBER))
            _, job_id = await ingested_job(member, "the body", [])
            await until(lambda: stage_is(member, job_id, "SHIPPED"), "the job to ship",
                        worker.process, deadline=DEADLINE)
            worker.process.terminate()
            assert await worker.finish() == 143, worker.text
        finally:
            await back.stop()
    finally:
        if worker.process.returncode is None:
            worker.process.kill()
            await worker.finish()
    assert "Traceback" not in worker.text
    assert any("WARNING" in line and "retry" in line for line in worker.lines), worker.text
