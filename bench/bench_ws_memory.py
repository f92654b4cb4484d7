"""What one idle websocket with one live subscription costs the server, in memory.

    .venv/bin/python bench/bench_ws_memory.py                       # 1,000 subscribers, as served
    .venv/bin/python bench/bench_ws_memory.py --ws wsproto --deflate --subscribers 500
    .venv/bin/python bench/bench_ws_memory.py --tracemalloc 30      # where it goes (slower)

The app is served in this process by uvicorn with `app.server.server_options()`
(options given here override them); one client process opens S websockets
(`graphql-transport-ws`), each authenticates and subscribes with the fan-out
benchmark's subscription, and every subscriber receives one event, so each stream is
live and has delivered once.  Printed: the server's RSS growth per subscriber
(KiB) and, with `--tracemalloc N`, the N biggest allocation sites still alive, grouped
by file and by line (Python allocations only: the kernel's socket buffers and
allocator slack are not in it; RSS is).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import uvicorn
from bench_fanout import SUBSCRIPTION, proc_rss_kib, raise_open_files_limit
from websockets.asyncio.client import connect

from app.auth.models import Role
from app.auth.service import create_token
from app.config import Settings
from app.events.outbox import encode_event_cursor
from app.events.repository import log_bounds
from app.fleet.service import JobSpec
from app.graphql.context import Services
from app.main import create_app
from app.migrate import upgrade
from app.server import server_options

PRODUCT = "memory"


def _clients(url: str, token: str, count: int, after: str, ready: Any, done: Any) -> None:
    async def one(index: int, gate: asyncio.Semaphore, live: list[Any]) -> None:
        async with gate:
            connection = await connect(url, subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
                                       open_timeout=120, max_queue=None)
            await connection.send(json.dumps({"type": "connection_init",
                                              "payload": {"authorization": f"Bearer {token}"}}))
            assert json.loads(await connection.recv())["type"] == "connection_ack"
            await connection.send(json.dumps({
                "id": "1", "type": "subscribe",
                "payload": {"query": SUBSCRIPTION, "variables": {"after": after}}}))
        live.append(connection)

    async def main() -> None:
        gate = asyncio.Semaphore(64)
        live: list[Any] = []
        await asyncio.gather(*(one(i, gate, live) for i in range(count)))
        ready.put("subscribed")

        async def first_event(connection: Any) -> None:
            while True:
                message = json.loads(await connection.recv())
                if message.get("type") == "ping":
                    await connection.send('{"type":"pong"}')
                elif message.get("type") == "next":
                    return

        await asyncio.gather(*(first_event(c) for c in live))
        ready.put("received")
        await asyncio.get_running_loop().run_in_executor(None, done.wait)
        for connection in live:
            await connection.close()

    asyncio.run(main())


def _group(snapshot: tracemalloc.Snapshot, base: tracemalloc.Snapshot, key: str,
           top: int, subscribers: int) -> list[str]:
    stats = snapshot.compare_to(base, key)
    lines = []
    for stat in stats[:top]:
        if stat.size_diff <= 0:
            continue
        frame = stat.traceback[0]
        where = f"{frame.filename.split('site-packages/')[-1]}"
        if key == "lineno":
            where += f":{frame.lineno}"
        lines.append(f"{stat.size_diff / 1024 / subscribers:8.2f} KiB/sub "
                     f"{stat.count_diff / subscribers:7.1f} blocks/sub  {where}")
    return lines


async def run(args: argparse.Namespace, url: str) -> None:
    settings = Settings(database_url=url, background_loops=False,
                        max_websockets_per_token=1_000_000,
                        max_subscriptions_per_token=1_000_000,
                        rate_limit_per_ip="", rate_limit_per_token="", log_level="warning")
    app = create_app(settings)
    options = server_options(settings)
    if args.ws:
        options["ws"] = args.ws
    if args.deflate is not None:
        options["ws_per_message_deflate"] = args.deflate
    port = 18_000 + (int(time.time()) % 2_000)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on", **options)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    services: Services = app.state.services
    async with services.db.unit_of_work() as session:
        token = await create_token(session, product_id=PRODUCT, role=Role.MEMBER)
    async with services.db.unit_of_work() as session:
        await services.fleet.submit_job(session, PRODUCT, JobSpec(title="warm", body_md="x"))

    async def cursor_now() -> str:
        async with services.db.read() as session:
            last, _ = await log_bounds(session, PRODUCT)
        return encode_event_cursor(last)

    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Event()
    loop = asyncio.get_running_loop()

    async def phase(client_count: int) -> mp.process.BaseProcess:
        process = ctx.Process(target=_clients, args=(
            f"ws://127.0.0.1:{port}/graphql", token, client_count, await cursor_now(), ready,
            done))
        process.start()
        assert await loop.run_in_executor(None, ready.get, True, 600) == "subscribed"
        async with services.db.unit_of_work() as session:
            await services.fleet.submit_job(session, PRODUCT, JobSpec(title="probe", body_md="x"))
        assert await loop.run_in_executor(None, ready.get, True, 600) == "received"
        return process

    # Warm up every cache and code path with a few subscribers first.
    warm = await phase(10)
    done.set()
    await loop.run_in_executor(None, warm.join, 60)
    done.clear()
    for _ in range(20):
        gc.collect()
        await asyncio.sleep(0.05)
    if args.tracemalloc:
        tracemalloc.start(args.frames)
    gc.collect()
    objects_before = len(gc.get_objects())
    rss_before = proc_rss_kib(__import__("os").getpid())
    base = tracemalloc.take_snapshot() if args.tracemalloc else None
    clients = await phase(args.subscribers)
    await asyncio.sleep(1.0)
    gc.collect()
    rss_after = proc_rss_kib(__import__("os").getpid())
    report: dict[str, Any] = {
        "subscribers": args.subscribers, "ws": options["ws"],
        "per_message_deflate": options.get("ws_per_message_deflate", True),
        "rss_per_subscriber_kib": round((rss_after - rss_before) / args.subscribers, 1),
        "gc_objects_per_subscriber": round(
            (len(gc.get_objects()) - objects_before) / args.subscribers, 1),
    }
    if base is not None:
        snapshot = tracemalloc.take_snapshot()
        total = sum(s.size_diff for s in snapshot.compare_to(base, "filename"))
        report["python_kib_per_subscriber"] = round(total / 1024 / args.subscribers, 1)
        print("-- by file")
        print("\n".join(_group(snapshot, base, "filename", args.tracemalloc, args.subscribers)))
        print("-- by line")
        print("\n".join(_group(snapshot, base, "lineno", args.tracemalloc, args.subscribers)))
        tracemalloc.stop()
    print(json.dumps(report))
    done.set()
    await loop.run_in_executor(None, clients.join, 60)
    server.should_exit = True
    await task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=1_000)
    parser.add_argument("--ws", choices=["websockets", "websockets-sansio", "wsproto"])
    parser.add_argument("--deflate", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="TOP")
    parser.add_argument("--frames", type=int, default=1)
    args = parser.parse_args()
    raise_open_files_limit()
    sys.setrecursionlimit(10_000)
    tmp = Path(tempfile.mkdtemp(prefix="ws-memory-"))
    url = f"sqlite+aiosqlite:///{tmp / 'memory.db'}"
    upgrade(url)
    asyncio.run(run(args, url))


if __name__ == "__main__":
    main()
