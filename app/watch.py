"""`fleetbridge watch`: live events over the `graphql-transport-ws` protocol.

The client opens one websocket, sends `connection_init` with the bearer token in its
payload (`{"authorization": "Bearer …"}`), waits for `connection_ack`, then
`subscribe`s to `jobStageChanged` and/or `itemStatusChanged` and prints one line per
`next` message:

    <cursor> job 12 ASSIGNED -> BUILDING
    <cursor> item 7 TODO -> IN_PROGRESS

(the creation of a job or item shows as `(new) -> QUEUED`), or with `--json` one JSON
object per line.  Server `ping`s are answered with `pong`.

When the connection drops after it was acknowledged, the client reconnects with
`after` set to the last cursor it printed on each stream, so the stream resumes with
no gap and no duplicate (the service replays stored events after a cursor).  Events
before the first one printed are only replayed when `--after` was given.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

PROTOCOL = Subprotocol("graphql-transport-ws")
DEFAULT_URL = "ws://127.0.0.1:8000/graphql"
ACK_TIMEOUT_SECONDS = 10.0
RECONNECT_MAX_SECONDS = 30.0
FORBIDDEN_CLOSE_CODE = 4403


@dataclass(frozen=True, slots=True)
class Stream:
    """One subscription: `kind` is "job" or "item"; `entity_id` narrows it to one."""

    kind: str
    entity_id: str | None = None

    @property
    def field(self) -> str:
        return "jobStageChanged" if self.kind == "job" else "itemStatusChanged"

    def query(self) -> str:
        var = "jobId" if self.kind == "job" else "itemId"
        return (
            f"subscription($id: ID, $after: String) {{ {self.field}({var}: $id, after: $after) "
            f"{{ cursor {var} from to at }} }}"
        )


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: str
    cursor: str
    entity_id: str
    from_state: str | None
    to_state: str
    at: str

    def line(self) -> str:
        source = self.from_state or "(new)"
        return f"{self.cursor} {self.kind} {self.entity_id} {source} -> {self.to_state}"

    def as_json(self) -> str:
        return json.dumps({
            "cursor": self.cursor, "kind": self.kind, "id": self.entity_id,
            "from": self.from_state, "to": self.to_state, "at": self.at,
        })


@dataclass
class WatchOptions:
    url: str
    token: str
    streams: Sequence[Stream]
    after: str | None = None
    limit: int | None = None
    reconnect: bool = True
    # The last cursor seen per stream, for resuming after a reconnect.
    cursors: dict[str, str | None] = field(default_factory=dict)


class WatchError(Exception):
    """The service refused the connection or a subscription."""


def websocket_url(url: str) -> str:
    """Accept the HTTP address of the endpoint too."""
    for http, ws in (("http://", "ws://"), ("https://", "wss://")):
        if url.startswith(http):
            return ws + url[len(http):]
    return url


def parse_event(stream: Stream, payload: dict[str, Any]) -> WatchEvent:
    if payload.get("errors"):
        raise WatchError(_messages(payload["errors"]))
    data = payload["data"][stream.field]
    entity_key = "jobId" if stream.kind == "job" else "itemId"
    return WatchEvent(
        kind=stream.kind, cursor=str(data["cursor"]), entity_id=str(data[entity_key]),
        from_state=data.get("from"), to_state=str(data["to"]), at=str(data["at"]),
    )


def _messages(errors: Any) -> str:
    if isinstance(errors, list):
        return "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e)
                         for e in errors)
    return str(errors)


async def _send(connection: ClientConnection, message: dict[str, Any]) -> None:
    await connection.send(json.dumps(message))


async def _receive(connection: ClientConnection) -> dict[str, Any]:
    """The next protocol message; pings are answered on the way."""
    while True:
        raw = await connection.recv()
        message = json.loads(raw)
        if not isinstance(message, dict):
            raise WatchError(f"unexpected message: {raw!r}")
        if message.get("type") == "ping":
            await _send(connection, {"type": "pong"})
            continue
        if message.get("type") == "pong":
            continue
        return cast(dict[str, Any], message)


async def _session(
    options: WatchOptions, on_event: Callable[[WatchEvent], None], seen: list[int],
    acknowledged: list[bool],
) -> None:
    """One connection: init, subscribe, print until done or the limit is reached."""
    async with connect(websocket_url(options.url), subprotocols=[PROTOCOL],
                       open_timeout=ACK_TIMEOUT_SECONDS) as connection:
        await _send(connection, {
            "type": "connection_init", "payload": {"authorization": f"Bearer {options.token}"},
        })
        ack = await asyncio.wait_for(_receive(connection), ACK_TIMEOUT_SECONDS)
        if ack.get("type") != "connection_ack":
            raise WatchError(f"expected connection_ack, got {ack.get('type')!r}")
        acknowledged[0] = True
        active: dict[str, Stream] = {}
        for stream in options.streams:
            active[stream.kind] = stream
            after = options.cursors.get(stream.kind, options.after)
            await _send(connection, {"id": stream.kind, "type": "subscribe", "payload": {
                "query": stream.query(),
                "variables": {"id": stream.entity_id, "after": after},
            }})
        while active:
            message = await _receive(connection)
            kind = message.get("type")
            stream_id = str(message.get("id"))
            if kind == "next" and stream_id in active:
                event = parse_event(active[stream_id], message.get("payload") or {})
                options.cursors[stream_id] = event.cursor
                on_event(event)
                seen[0] += 1
                if options.limit is not None and seen[0] >= options.limit:
                    for open_id in active:
                        await _send(connection, {"id": open_id, "type": "complete"})
                    return
            elif kind == "error":
                raise WatchError(_messages(message.get("payload")))
            elif kind == "complete":
                active.pop(stream_id, None)


async def watch(options: WatchOptions, on_event: Callable[[WatchEvent], None]) -> int:
    """Deliver events to `on_event` until the limit, the end of every stream, or an
    error; returns how many were delivered."""
    seen = [0]
    connected_once = False
    delay = 1.0
    while True:
        acknowledged = [False]
        try:
            await _session(options, on_event, seen, acknowledged)
            return seen[0]
        except ConnectionClosed as exc:
            received = exc.rcvd
            if received is not None and received.code == FORBIDDEN_CLOSE_CODE:
                raise WatchError("the service refused the token") from exc
            if received is not None and received.code >= 4000:
                raise WatchError(
                    f"closed by the service: {received.reason or received.code}"
                ) from exc
            if not (options.reconnect and (acknowledged[0] or connected_once)):
                raise WatchError(f"connection lost: {exc}") from exc
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            if not (options.reconnect and connected_once):
                raise WatchError(f"cannot connect to {options.url}: {exc}") from exc
        if acknowledged[0]:
            connected_once = True
            delay = 1.0
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX_SECONDS)
