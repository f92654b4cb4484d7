"""The ASGI guard in front of the GraphQL endpoint (DESIGN §8): rate limits, the body
cap and the body read timeout, all before the body is parsed or anyone authenticated.

- Rate limits (the `limits` library, in memory, per instance): every request to
  `/graphql` (and every websocket handshake) counts against its client address and,
  when it carries an `Authorization` header, against that token.  Over the limit:
  HTTP 429 with `Retry-After` and a GraphQL error coded `RATE_LIMITED`; a websocket
  handshake is refused (HTTP 403 before upgrade).  Limits are `limits` strings
  ("100/second", "1000/minute;50/second"); an empty string switches one off.
- Body cap (`FLEET_MAX_BODY_BYTES`): a declared `Content-Length` above the cap is
  answered 413 before one byte of the body is read; a chunked body is read with a
  running count and refused with 413 as soon as it passes the cap.  So at most the cap
  is ever buffered per request.
- Read timeout (`FLEET_HTTP_READ_TIMEOUT_SECONDS`): a body that stops arriving is
  answered 408 and the connection closed.  (A request *head* that never completes is
  closed by the server protocol, see app.server.)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Iterable

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

GUARDED_PATHS = frozenset({"/graphql"})


class RateLimits:
    """Per-address and per-token request limits, in this process's memory."""

    def __init__(self, per_ip: str, per_token: str) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._per_ip = parse_many(per_ip) if per_ip.strip() else []
        self._per_token = parse_many(per_token) if per_token.strip() else []

    def _hit(self, items: Iterable[RateLimitItem], *key: str) -> float | None:
        """Seconds to wait when one of `items` is exhausted for `key`, else None."""
        for item in items:
            if not self._limiter.hit(item, *key):
                stats = self._limiter.get_window_stats(item, *key)
                return max(1.0, stats.reset_time - time.time())
        return None

    def check(self, address: str | None, authorization: str | None) -> float | None:
        """Count one request; the seconds to wait before retrying, or None when allowed."""
        wait = self._hit(self._per_ip, "ip", address or "unknown")
        if wait is None and authorization:
            token = hashlib.sha256(authorization.encode("utf-8", "replace")).hexdigest()[:32]
            wait = self._hit(self._per_token, "token", token)
        return wait


def _error_body(message: str, code: str) -> bytes:
    return json.dumps({"data": None, "errors": [
        {"message": message, "extensions": {"code": code}}
    ]}).encode()


async def send_error(send: Send, status: int, message: str, code: str,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """A complete JSON error response that also closes the connection."""
    body = _error_body(message, code)
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *headers,
        ],
    })
    await send({"type": "http.response.body", "body": body})


class BodyTooLargeError(Exception):
    pass


class RequestGuard:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, read_timeout: float,
                 rate_limits: RateLimits) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout
        self.rate_limits = rate_limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] not in GUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        client = scope.get("client")
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        wait = self.rate_limits.check(client[0] if client else None, authorization)
        if wait is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4429,
                            "reason": "rate limit exceeded"})
                return
            await send_error(
                send, 429, f"rate limit exceeded: retry in {math.ceil(wait)} s", "RATE_LIMITED",
                [(b"retry-after", str(math.ceil(wait)).encode())],
            )
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        await self._http(scope, receive, send, headers)

    async def _http(self, scope: Scope, receive: Receive, send: Send,
                    headers: dict[bytes, bytes]) -> None:
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await send_error(send, 400, "invalid Content-Length", "BAD_REQUEST")
                return
            if int(declared) > self.max_body_bytes:
                await self._too_large(send)
                return
        try:
            body = await self._read_body(receive)
        except BodyTooLargeError:
            await self._too_large(send)
            return
        except TimeoutError:
            await send_error(send, 408, "the request body did not arrive in time",
                             "REQUEST_TIMEOUT")
            return
        if body is None:  # the client went away
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            # asyncio.timeout, not wait_for: the same TimeoutError without a task per
            # message (issue 12 §3)
            async with asyncio.timeout(self.read_timeout):
                message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLargeError
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send) -> None:
        await send_error(
            send, 413, f"the request body is larger than {self.max_body_bytes} bytes",
            "PAYLOAD_TOO_LARGE",
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the already-read body once, then the real channel (for
    `http.disconnect`)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
