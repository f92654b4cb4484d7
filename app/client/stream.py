"""Live events over the websocket (`graphql-transport-ws`, gql's websockets transport).

One connection carries every stream the caller asked for (`jobStageChanged` and/or
`itemStatusChanged`, each optionally narrowed to one id); their events are merged in
the order they arrive.  After a drop the connection is opened again and each stream
resumes after the last cursor it delivered (the service replays stored events after a
cursor), so nothing is missed and nothing is seen twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from gql import Client, GraphQLRequest
from gql.client import AsyncClientSession
from gql.transport.exceptions import TransportQueryError
from gql.transport.websockets import WebsocketsTransport
from websockets.exceptions import ConnectionClosed

from app.client.retry import FleetApiError, RetryPolicy, describe, is_transient

logger = logging.getLogger("app.client")

FORBIDDEN_CLOSE_CODE = 4403


@dataclass(frozen=True, slots=True)
class Stream:
    """One subscription: `kind` is "job" or "item"; `entity_id` narrows it to one."""

    kind: str
    entity_id: str | None = None

    @property
    def field(self) -> str:
        return "jobStageChanged" if self.kind == "job" else "itemStatusChanged"

    @property
    def id_key(self) -> str:
        return "jobId" if self.kind == "job" else "itemId"

    def request(self, after: str | None) -> GraphQLRequest:
        document = (
            f"subscription Watch($id: ID, $after: String) {{ {self.field}({self.id_key}: $id, "
            f"after: $after) {{ cursor {self.id_key} from to at }} }}"
        )
        return GraphQLRequest(document, variable_values={"id": self.entity_id, "after": after})


@dataclass(frozen=True, slots=True)
class FleetEvent:
    """One change: `kind` "job" or "item"; `from_state` None when it was created."""

    kind: str
    cursor: str
    entity_id: str
    from_state: str | None
    to_state: str
    at: str

    @classmethod
    def from_data(cls, stream: Stream, data: dict[str, Any]) -> FleetEvent:
        payload = data[stream.field]
        return cls(
            kind=stream.kind, cursor=str(payload["cursor"]),
            entity_id=str(payload[stream.id_key]), from_state=payload.get("from"),
            to_state=str(payload["to"]), at=str(payload["at"]),
        )

    def line(self) -> str:
        """`<cursor> job 12 ASSIGNED -> BUILDING` (a creation shows as `(new) -> …`)."""
        source = self.from_state or "(new)"
        return f"{self.cursor} {self.kind} {self.entity_id} {source} -> {self.to_state}"

    def as_json(self) -> str:
        return json.dumps({
            "cursor": self.cursor, "kind": self.kind, "id": self.entity_id,
            "from": self.from_state, "to": self.to_state, "at": self.at,
        })


class _Completed:
    """A stream the service completed."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream


_Item = tuple[Stream, FleetEvent] | _Completed | BaseException


def _close_code(exc: BaseException) -> tuple[int, str] | None:
    """The close frame the service sent, if `exc` came from a closed websocket."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionClosed) and seen.rcvd is not None:
            return seen.rcvd.code, seen.rcvd.reason
        seen = seen.__cause__ or seen.__context__
    return None


def _refusal(exc: BaseException) -> FleetApiError | None:
    """The service's own refusal behind a failure: a GraphQL error or a 4xxx close."""
    if isinstance(exc, FleetApiError):
        return exc
    if isinstance(exc, TransportQueryError):
        first = (exc.errors or [{}])[0]
        if isinstance(first, dict):
            code = (first.get("extensions") or {}).get("code") or "BAD_REQUEST"
            return FleetApiError(str(code), str(first.get("message", exc)))
        return FleetApiError("BAD_REQUEST", str(first))
    close = _close_code(exc)
    if close is not None and close[0] == FORBIDDEN_CLOSE_CODE:
        return FleetApiError("UNAUTHENTICATED", "the service refused the token")
    if close is not None and close[0] >= 4000:
        return FleetApiError("CLOSED", f"closed by the service: {close[1] or close[0]}")
    return None


class EventStream:
    """The merged, resuming event stream behind `FleetClient.events` (see there)."""

    def __init__(
        self, url: str, token: str, streams: Sequence[Stream], *, after: str | None,
        reconnect: bool, retry: RetryPolicy,
    ) -> None:
        self.url = url
        self.token = token
        self.streams = list(streams)
        self.after = after
        self.reconnect = reconnect
        self.retry = retry
        # The last cursor delivered per stream, where a reconnect resumes.
        self.cursors: dict[Stream, str] = {}

    def _client(self) -> Client:
        transport = WebsocketsTransport(
            url=self.url, init_payload={"authorization": f"Bearer {self.token}"},
            subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL],
            connect_timeout=10, ack_timeout=10, close_timeout=2,
        )
        return Client(transport=transport, execute_timeout=None)

    async def events(self) -> AsyncGenerator[FleetEvent, None]:
        acknowledged_once = False
        failures = 0
        active = list(self.streams)
        while active:
            client = self._client()
            queue: asyncio.Queue[_Item] = asyncio.Queue()
            delay = 0.0
            pumps: list[asyncio.Task[None]] = []
            try:
                session = await client.connect_async()  # type: ignore[no-untyped-call]
                assert isinstance(session, AsyncClientSession)
                acknowledged_once, failures = True, 0
                pumps = [asyncio.create_task(self._pump(session, s, queue)) for s in active]
                while active:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, _Completed):
                        active.remove(item.stream)
                        continue
                    stream, event = item
                    self.cursors[stream] = event.cursor
                    yield event
                return
            except Exception as exc:
                refusal = _refusal(exc)
                if refusal is not None:
                    raise refusal from exc
                if not (self.reconnect and acknowledged_once and is_transient(exc)):
                    raise
                failures += 1
                delay = min(self.retry.max_seconds, self.retry.initial_seconds * 2 ** (
                    failures - 1)) + random.uniform(0, self.retry.jitter_seconds)
                logger.warning("event stream lost (%s); reconnecting in %.1f s",
                               describe(exc), delay)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await client.close_async()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)

    async def _pump(
        self, session: AsyncClientSession, stream: Stream,
        queue: asyncio.Queue[_Item],
    ) -> None:
        try:
            request = stream.request(self.cursors.get(stream, self.after))
            async for data in session.subscribe(request):
                await queue.put((stream, FleetEvent.from_data(stream, data)))
            await queue.put(_Completed(stream))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await queue.put(exc)
