"""How uvicorn serves the app: the HTTP protocol with a request-head timeout, and the
connection limits (DESIGN §8).  `fleetbridge serve` and the test servers use
`server_options()` alike.

- A request head (request line and headers) must arrive whole within
  `FLEET_HTTP_READ_TIMEOUT_SECONDS` of the connection opening or of the previous
  response; otherwise the connection is closed (slowloris).  The body's own timeout is
  app.http_guard's.
- An idle keep-alive connection is closed after `FLEET_HTTP_KEEP_ALIVE_SECONDS`.
- A request head is at most 16 KiB (h11), a websocket message at most
  `FLEET_MAX_BODY_BYTES`; a websocket peer that stops answering pings (one every
  `FLEET_WS_PING_SECONDS`) for as long is dropped.
- Websockets use uvicorn's `websockets-sansio` implementation (as
  app.graphql.frames.FleetWebSocketProtocol, which the broadcast writes to), without
  permessage-deflate unless `FLEET_WS_PER_MESSAGE_DEFLATE` is on: compressing costs a
  zlib compressor and decompressor per connection (~40 KiB) and a compression of every
  frame for every subscriber, while event frames are a few hundred bytes.

The garbage collector (`tune_gc`, `fleetbridge serve` only): thousands of live
subscriptions are hundreds of thousands of long-lived objects, and with Python's
default thresholds a full collection (scanning all of them, seconds at 10,000
subscribers) ran every few seconds under fan-out, stalling every delivery and request.
So what start-up loaded (modules, the schema, settings) is frozen out of collection
(`FLEET_GC_FREEZE`), and the youngest generation is collected every
`FLEET_GC_THRESHOLD` allocations rather than 700, the older ones 20 and 100 times less
often than that: garbage is still found, cycles a little later.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from app.config import Settings
from app.graphql.frames import FleetWebSocketProtocol

MAX_HEAD_BYTES = 16 * 1024


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head stalls."""

    head_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or bool(self.cycle.response_complete)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_head():
            self._arm_head_timer()
        super().data_received(data)
        if not self._waiting_for_head():
            self._disarm_head_timer()

    def handle_websocket_upgrade(self, event: Any) -> None:
        self._disarm_head_timer()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


def server_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run()` / `uvicorn.Config()`."""
    protocol = type("FleetH11Protocol", (TimedH11Protocol,),
                    {"head_timeout": settings.http_read_timeout_seconds})
    return {
        "http": protocol,
        "ws": FleetWebSocketProtocol,
        "timeout_keep_alive": settings.http_keep_alive_seconds,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        "ws_max_size": settings.max_body_bytes,
        "ws_per_message_deflate": settings.ws_per_message_deflate,
        "ws_ping_interval": settings.ws_ping_seconds,
        "ws_ping_timeout": settings.ws_ping_seconds,
    }


GC_OLDER_RATIOS = (20, 100)


def tune_gc(settings: Settings) -> None:
    """Set up the garbage collector for a long-running server (module docstring).
    Call once, after the app is built and before it serves."""
    if settings.gc_threshold:
        gc.set_threshold(settings.gc_threshold, *GC_OLDER_RATIOS)
    if settings.gc_freeze:
        gc.collect()
        gc.freeze()
