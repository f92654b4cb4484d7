"""A small GraphQL-over-websocket client for tests.

Speaks `graphql-transport-ws` and the legacy `graphql-ws` protocol over the
`websockets` library.  Every receive has a deadline (`asyncio.wait_for`), so a test
waits for a condition for a bounded time and never sleeps hoping for timing.
Messages of several operations on one connection are kept apart per operation id.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from app.events.outbox import decode_event_cursor

TRANSPORT_WS = "graphql-transport-ws"
LEGACY_WS = "graphql-ws"
PROTOCOLS = (TRANSPORT_WS, LEGACY_WS)
DEADLINE = 10.0

JOB_EVENTS = """
subscription($jobId: ID, $after: String) {
  jobStageChanged(jobId: $jobId, after: $after) {
    cursor jobId from to at job { id stage title }
  }
}
"""
ITEM_EVENTS = """
subscription($itemId: ID, $after: String) {
  itemStatusChanged(itemId: $itemId, after: $after) {
    cursor itemId from to at item { id status title }
  }
}
"""


class InitRefusedError(Exception):
    """The server refused the connection at `connection_init`."""

    def __init__(self, code: int | None, reason: str, message: dict[str, Any] | None) -> None:
        super().__init__(f"refused: close code {code} {reason!r}, message {message!r}")
        self.code = code
        self.reason = reason
        self.message = message


class SubscriptionClient:
    """One websocket connection speaking `protocol`."""

    def __init__(self, connection: ClientConnection, protocol: str) -> None:
        self.connection = connection
        self.protocol = protocol
        self._ids = itertools.count(1)
        self._pending: dict[str, deque[dict[str, Any]]] = defaultdict(deque)
        self.ack_payload: dict[str, Any] | None = None

    # -- the wire ------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        await self.connection.send(json.dumps(message))

    async def _receive_any(self, timeout: float) -> dict[str, Any]:
        """The next protocol message, answering pings and skipping keep-alives."""
        while True:
            raw = await asyncio.wait_for(self.connection.recv(), timeout)
            message: dict[str, Any] = json.loads(raw)
            if message.get("type") == "ka":
                continue
            if message.get("type") == "ping":
                await self.send({"type": "pong"})
                continue
            return message

    async def init(
        self, token: str | None, timeout: float = DEADLINE, *, key: str = "authorization"
    ) -> None:
        """`connection_init` with `{key: "Bearer <token>"}` (GraphiQL sends its header
        editor's headers, so there the key is `Authorization`)."""
        payload = {key: f"Bearer {token}"} if token is not None else {}
        await self.send({"type": "connection_init", "payload": payload})
        try:
            message = await self._receive_any(timeout)
        except ConnectionClosed as closed:
            raise InitRefusedError(
                closed.rcvd.code if closed.rcvd else None,
                closed.rcvd.reason if closed.rcvd else "", None,
            ) from closed
        if message.get("type") != "connection_ack":
            code, reason = await self.wait_closed(timeout)
            raise InitRefusedError(code, reason, message)
        self.ack_payload = message.get("payload")

    async def wait_closed(self, timeout: float = DEADLINE) -> tuple[int | None, str]:
        """Wait (bounded) until the server closes; return its close code and reason."""
        async def drain() -> None:
            try:
                while True:
                    await self.connection.recv()
            except ConnectionClosed:
                return

        await asyncio.wait_for(drain(), timeout)
        return self.connection.close_code, self.connection.close_reason or ""

    # -- operations ----------------------------------------------------------

    async def subscribe(self, query: str, **variables: Any) -> str:
        operation_id = str(next(self._ids))
        kind = "subscribe" if self.protocol == TRANSPORT_WS else "start"
        await self.send({"id": operation_id, "type": kind,
                         "payload": {"query": query, "variables": variables}})
        return operation_id

    async def stop(self, operation_id: str) -> None:
        kind = "complete" if self.protocol == TRANSPORT_WS else "stop"
        await self.send({"id": operation_id, "type": kind})

    async def receive(self, operation_id: str, timeout: float = DEADLINE) -> dict[str, Any]:
        """The next message for `operation_id` (`next`/`data`, `error` or `complete`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._pending[operation_id]:
            message = await self._receive_any(max(0.0, deadline - loop.time()))
            self._pending[str(message.get("id"))].append(message)
        return self._pending[operation_id].popleft()

    async def next_result(self, operation_id: str, timeout: float = DEADLINE) -> dict[str, Any]:
        """The next execution result payload ({data, errors?}) of `operation_id`."""
        message = await self.receive(operation_id, timeout)
        expected = "next" if self.protocol == TRANSPORT_WS else "data"
        assert message["type"] == expected, message
        payload: dict[str, Any] = message["payload"]
        return payload

    async def next_event(
        self, operation_id: str, field: str, timeout: float = DEADLINE
    ) -> dict[str, Any]:
        """The next event of a subscription whose root field is `field`; no errors."""
        payload = await self.next_result(operation_id, timeout)
        assert not payload.get("errors"), payload
        event: dict[str, Any] = payload["data"][field]
        return event

    async def operation_errors(
        self, operation_id: str, timeout: float = DEADLINE
    ) -> list[dict[str, Any]]:
        """The errors an operation ends with, whichever way the protocol reports them:
        an `error` message, or a `next`/`data` result carrying `errors`."""
        message = await self.receive(operation_id, timeout)
        payload = message.get("payload")
        if message["type"] == "error":
            return payload if isinstance(payload, list) else [payload]
        assert message["type"] in {"next", "data"}, message
        assert isinstance(payload, dict), message
        assert payload.get("errors"), message
        errors: list[dict[str, Any]] = payload["errors"]
        return errors

    async def close(self) -> None:
        await self.connection.close()


@asynccontextmanager
async def ws_connect(
    url: str, protocol: str, token: str | None, *, init: bool = True
) -> AsyncIterator[SubscriptionClient]:
    """Open a websocket with `protocol`; with `init` (default) authenticate with
    `token` and wait for `connection_ack` (raises `InitRefusedError` otherwise)."""
    async with connect(url, subprotocols=[Subprotocol(protocol)], open_timeout=DEADLINE,
                       close_timeout=DEADLINE) as connection:
        assert connection.subprotocol == protocol
        client = SubscriptionClient(connection, protocol)
        if init:
            await client.init(token)
        yield client


def seq_of(cursor: str) -> int:
    """The sequence number inside an event cursor (tests check consecutiveness)."""
    return decode_event_cursor(cursor)
