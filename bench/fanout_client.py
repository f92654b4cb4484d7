"""The subscriber side of the fan-out benchmark (bench/bench_fanout.py): a lean
websocket client and the client processes, each holding its share of the S
subscriptions and timing every event from the server's commit to its arrival."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import time
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

CONNECT_CONCURRENCY = 64
PROBE_DEADLINE = 180.0  # seconds for every subscriber to see the untimed first event
SUBSCRIPTION = (
    "subscription($after: String) { jobStageChanged(after: $after) "
    "{ cursor at job { id stage } } }"
)


class LeanWebSocket(asyncio.Protocol):
    """A minimal websocket client (RFC 6455) for thousands of subscribers on a few
    cores: the `websockets` library spends ~50 µs of Python per message received, which
    at 20,000 messages a second took more CPU than the server it was measuring.  This
    one parses frames itself, unmasked from the server, and hands each text message's
    bytes to `on_text` with the time it arrived; it answers pings and sends masked,
    uncompressed frames.  Like a browser it offers permessage-deflate (RFC 7692) and
    inflates what the server compressed when the server accepts.  Only what the
    benchmark needs: no fragmentation (the server sends none)."""

    def __init__(self, on_text: Any) -> None:
        self.on_text = on_text
        self.inflate: Any = None  # a zlib decompressor once deflate is negotiated
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    @classmethod
    async def connect(cls, url: str, protocol: str, on_text: Any) -> LeanWebSocket:
        host, _, rest = url.removeprefix("ws://").partition("/")
        address, _, port = host.partition(":")
        loop = asyncio.get_running_loop()
        _, socket = await loop.create_connection(lambda: cls(on_text), address, int(port))
        key = base64.b64encode(os.urandom(16)).decode()
        assert socket.transport is not None
        socket.transport.write(
            f"GET /{rest} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
            "\r\n".encode())
        await socket.opened
        return socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        for future in (self.opened, self.closed):
            if not future.done():
                future.set_exception(ConnectionError(f"connection lost: {exc!r}"))
        self.closed.exception()  # retrieved: a subscriber may have stopped listening

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self.buffer
        buffer += data
        if not self.opened.done():
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end])
            del buffer[:end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(head[:200].decode("latin-1")))
                return
            if b"permessage-deflate" in head.lower():
                self.inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            self.opened.set_result(None)
        while len(buffer) >= 2:
            opcode, length, offset = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, offset = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, offset = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < offset + length:
                return
            payload = bytes(buffer[offset:offset + length])
            compressed = buffer[0] & 0x40
            del buffer[:offset + length]
            if opcode == 0x1:
                if compressed:  # RSV1: a deflated message (context kept across messages)
                    payload = self.inflate.decompress(payload + b"\x00\x00\xff\xff")
                self.on_text(payload, now)
            elif opcode == 0x9:
                self.send_frame(0xA, payload)  # pong
            elif opcode == 0x8:
                self.send_frame(0x8, payload[:2])
                assert self.transport is not None
                self.transport.close()

    def send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            header = bytes([0x80 | opcode, 0x80 | size])
        elif size < 1 << 16:
            header = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
        else:
            header = bytes([0x80 | opcode, 0x80 | 127]) + size.to_bytes(8, "big")
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(header + mask + masked)

    def send_text(self, text: str) -> None:
        self.send_frame(0x1, text.encode())

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.send_frame(0x8, (1000).to_bytes(2, "big"))
            self.transport.close()


@dataclass
class _Seen:
    last: int | None = None
    got: int = 0
    counting: bool = True


NEXT_PREFIX = b'{"id":"1","type":"next","payload":{"data":{"jobStageChanged":{'
CURSOR_FIELD = re.compile(rb'"cursor":"([^"]+)"')
AT_FIELD = re.compile(rb'"at":"([^"]+)"')


async def _subscribers(
    ws_url: str, token: str, count: int, after: str, expected: int, ready: Any,
    start: Any, drain_seconds: float, close_go: Any,
) -> dict[str, Any]:
    latencies: list[float] = []
    worst: dict[int, float] = {}  # per event (sequence): the slowest delivery, ms
    received = 0
    out_of_order = 0
    errors = 0
    connected = asyncio.Semaphore(CONNECT_CONCURRENCY)
    live = 0
    all_live = asyncio.Event()
    first_seen = [asyncio.Event() for _ in range(count)]
    counted = [asyncio.Event() for _ in range(count)]  # done, or past the deadline
    close_all = asyncio.Event()  # every client process has counted: close the sockets
    deadline: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    failures: list[str] = []
    timing = False  # set when the run starts: the probe event is not timed

    def failed(what: str) -> None:
        nonlocal errors
        errors += 1
        if len(failures) < 3:
            failures.append(what[:200])

    async def one(index: int) -> None:
        nonlocal live
        try:
            await subscriber(index)
        except Exception as exc:
            failed(repr(exc))
        finally:
            first_seen[index].set()  # a subscriber that failed does not hold the run up
            counted[index].set()
            if not all_live.is_set():
                live += 1
                if live >= count:
                    all_live.set()

    async def subscriber(index: int) -> None:
        nonlocal live
        loop = asyncio.get_running_loop()
        acknowledged: asyncio.Future[None] = loop.create_future()
        done: asyncio.Future[None] = loop.create_future()
        state = _Seen()

        def on_text(raw: bytes, now: float) -> None:
            nonlocal received, out_of_order
            if not state.counting:
                return  # past the deadline: late counts as lost
            if raw.startswith(NEXT_PREFIX) and b'"errors"' not in raw:
                cursor, at = CURSOR_FIELD.search(raw), AT_FIELD.search(raw)
                assert cursor is not None
                assert at is not None
                seq = int(_b64(cursor.group(1).decode()).split(":")[1])
                if state.last is not None and seq != state.last + 1:
                    out_of_order += 1
                state.last = seq
                state.got += 1
                received += 1
                if state.got == 1:
                    first_seen[index].set()
                elif timing:
                    when = datetime.fromisoformat(at.group(1).decode()).timestamp()
                    latency = (now - when) * 1000.0
                    latencies.append(latency)
                    if latency > worst.get(seq, 0.0):
                        worst[seq] = latency
                if state.got >= expected and not done.done():
                    done.set_result(None)
                return
            message = json.loads(raw)
            kind = message.get("type")
            if kind == "connection_ack" and not acknowledged.done():
                acknowledged.set_result(None)
            elif kind == "ping":
                socket.send_text('{"type":"pong"}')
            else:
                failed(str(message))
                if kind in {"error", "complete"} and not done.done():
                    done.set_result(None)

        async with connected:
            socket = await asyncio.wait_for(
                LeanWebSocket.connect(ws_url, "graphql-transport-ws", on_text), 120)
            socket.send_text(json.dumps({"type": "connection_init",
                                         "payload": {"authorization": f"Bearer {token}"}}))
            await asyncio.wait_for(acknowledged, 120)
            socket.send_text(json.dumps({
                "id": "1", "type": "subscribe",
                "payload": {"query": SUBSCRIPTION, "variables": {"after": after}},
            }))
        live += 1
        if live >= count:
            all_live.set()
        try:
            seen: asyncio.Future[Any] = asyncio.ensure_future(first_seen[index].wait())
            closed: asyncio.Future[Any] = socket.closed
            await asyncio.wait([seen, closed], return_when=asyncio.FIRST_COMPLETED)
            seen.cancel()
            if socket.closed.done():
                socket.closed.result()  # raises: the connection was lost
            # Armed before the run starts (nothing to do per subscriber when it does):
            # everything arrived, the drain deadline passed, or the connection was lost.
            await asyncio.wait([done, deadline, socket.closed],
                               return_when=asyncio.FIRST_COMPLETED)
            if socket.closed.done() and not done.done():
                socket.closed.result()
        finally:
            state.counting = False
            counted[index].set()
            # Sockets close only once every subscriber everywhere has counted: a mass
            # close is the server's work too, and would delay the deliveries measured.
            await close_all.wait()
            socket.close()

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    await all_live.wait()
    ready.put(("live", None))
    # Bounded: a subscriber that never sees the probe counts its events as lost.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in first_seen)),
                               PROBE_DEADLINE)
    ready.put(("probed", None))
    await start.wait()
    timing = True
    asyncio.get_running_loop().call_later(
        drain_seconds, lambda: deadline.done() or deadline.set_result(None))
    await asyncio.gather(*(event.wait() for event in counted))
    ready.put(("counted", None))
    await asyncio.get_running_loop().run_in_executor(None, close_go.wait)
    close_all.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"latencies": latencies, "worst": worst, "received": received,
            "out_of_order": out_of_order,
            "errors": errors, "failures": failures}


def _b64(cursor: str) -> str:
    return base64.urlsafe_b64decode(cursor.encode()).decode()


def client_main(ws_url: str, token: str, count: int, after: str, expected: int,
                 ready: Any, go: Any, results: Any, drain_seconds: float,
                 close_go: Any) -> None:
    async def main() -> dict[str, Any]:
        start = asyncio.Event()

        async def wait_go() -> None:
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            start.set()

        waiter = asyncio.create_task(wait_go())
        try:
            return await _subscribers(ws_url, token, count, after, expected, ready, start,
                                      drain_seconds, close_go)
        finally:
            waiter.cancel()

    try:
        outcome = asyncio.run(main())
    except Exception as exc:  # reported, never a hung benchmark
        outcome = {"latencies": [], "received": 0, "out_of_order": 0, "errors": count,
                   "failure": repr(exc)}
        ready.put(("live", None))
        ready.put(("probed", None))
        ready.put(("counted", None))
    results.put(outcome)
