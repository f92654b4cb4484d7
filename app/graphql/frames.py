"""Result frames on the wire: spliced text (one payload text, each subscriber's
operation id around it) and, for the broadcast, RFC 6455 frames written straight to
a uvicorn websocket's transport (app.graphql.delivery, app.graphql.broadcast).

`FleetWebSocketProtocol` is uvicorn's `websockets-sansio` protocol (app.server serves
websockets with it) that leaves itself in its connection's ASGI scope
(`scope["extensions"][WIRE_EXTENSION]`), so that `Wire.of(websocket)` can write a
text message to it synchronously, in the event loop's thread, exactly as uvicorn's
own ASGI `send` would: a connection without permessage-deflate gets the frame header
and the payload bytes (a server's frames are unmasked, one frame per message); one
with an extension negotiated goes through the connection's `websockets` protocol
object, which compresses.  Nothing is written once the handshake is not complete,
a close was sent or received, or the transport is closing; `writable()` is also
False while the transport's buffer is above its high-water mark (uvicorn paused
writing): the caller then takes the usual, awaiting path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from strawberry.types.execution import ExecutionResult
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

from app.graphql.sharing import SharedData

WIRE_EXTENSION = "fleetbridge.wire"


class Splice:
    """One message shape of a protocol (`make(id, payload)`, as strawberry builds it),
    as one view encodes it, cut around its id and its payload: a frame is then the
    parts with the subscriber's encoded id and the shared encoded payload between.
    Checked once per view class against the view's own encoding of a sample; when the
    view's encoding cannot be cut that way, frames go the usual way."""

    _ID, _PAYLOAD = "\x00id\x00", "\x00payload\x00"

    def __init__(self, make: Callable[[str, object], dict[str, object]]) -> None:
        self.make = make
        self._parts: dict[type, tuple[str, str, str] | None] = {}

    def around(self, view: Any, operation_id: str) -> tuple[str, str] | None:
        """The text before and after the payload in `operation_id`'s frames under
        `view`'s encoding; None when frames cannot be spliced for it."""
        kind = type(view)
        if kind not in self._parts:
            self._parts[kind] = self._cut(view.encode_json)
        parts = self._parts[kind]
        if parts is None:
            return None
        encoded_id = view.encode_json(operation_id)
        if not isinstance(encoded_id, str):
            return None
        return parts[0] + encoded_id + parts[1], parts[2]

    def frame(self, view: Any, operation_id: str, payload: str) -> str | None:
        around = self.around(view, operation_id)
        return None if around is None else around[0] + payload + around[1]

    def _cut(self, encode: Callable[[object], str | bytes]) -> tuple[str, str, str] | None:
        id_mark, payload_mark = encode(self._ID), encode(self._PAYLOAD)
        text = encode(self.make(self._ID, self._PAYLOAD))
        if not (isinstance(id_mark, str) and isinstance(payload_mark, str)
                and isinstance(text, str)):
            return None
        if text.count(id_mark) != 1 or text.count(payload_mark) != 1:
            return None
        at_id, at_payload = text.index(id_mark), text.index(payload_mark)
        if at_id > at_payload:
            return None
        parts = (text[:at_id], text[at_id + len(id_mark):at_payload],
                 text[at_payload + len(payload_mark):])
        sample_id, sample_payload = 'o"p\u00e9', {"data": {"x": "\u00e9\u2028", "n": [1.5, None]}}
        encoded_id, encoded_payload = encode(sample_id), encode(sample_payload)
        if not (isinstance(encoded_id, str) and isinstance(encoded_payload, str)):
            return None
        spliced = parts[0] + encoded_id + parts[1] + encoded_payload + parts[2]
        return parts if spliced == encode(self.make(sample_id, sample_payload)) else None


# The two messages that carry results, exactly as strawberry builds them (key order too).
NEXT = Splice(lambda operation_id, payload: {"id": operation_id, "type": "next",
                                               "payload": payload})
DATA = Splice(lambda operation_id, payload: {"type": "data", "id": operation_id,
                                               "payload": payload})


def shared_frame(view: Any, splice: Splice, operation_id: str,
                 result: ExecutionResult) -> str | None:
    """The text frame carrying `result` to `operation_id`, spliced from the shared
    payload text; None when it must go the usual way (a result that is not shared,
    has errors or extensions, or a view whose encoding is not text)."""
    data = result.data
    if not isinstance(data, SharedData) or result.errors or result.extensions:
        return None
    payload = data.payload_json(view.encode_json)
    if payload is None:
        return None
    return splice.frame(view, operation_id, payload)


# -- writing to the transport ---------------------------------------------------------


class FleetWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websocket protocol, reachable from its ASGI scope (module docstring)."""

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # absent when the handshake was refused
        if scope is not None:
            scope["extensions"][WIRE_EXTENSION] = self


def text_frame_header(size: int) -> bytes:
    """The RFC 6455 header of one unmasked, final text frame of `size` bytes."""
    if size < 126:
        return bytes((0x81, size))
    if size < 1 << 16:
        return bytes((0x81, 126)) + size.to_bytes(2, "big")
    return bytes((0x81, 127)) + size.to_bytes(8, "big")


class Wire:
    """Synchronous writes of text messages to one uvicorn websocket connection."""

    __slots__ = ("conn", "protocol", "raw", "transport")

    def __init__(self, protocol: WebSocketsSansIOProtocol) -> None:
        self.protocol = protocol
        self.transport = protocol.transport
        self.conn = protocol.conn
        self.raw = not self.conn.extensions  # no permessage-deflate: frame it here

    @classmethod
    def of(cls, websocket: Any) -> Wire | None:
        """The wire of a starlette `WebSocket` served by `FleetWebSocketProtocol`;
        None for any other (an in-process test client, another server)."""
        scope = getattr(websocket, "scope", None)
        protocol = scope.get("extensions", {}).get(WIRE_EXTENSION) if scope else None
        return cls(protocol) if isinstance(protocol, WebSocketsSansIOProtocol) else None

    def writable(self) -> bool:
        """Whether a message may be written now (module docstring)."""
        protocol = self.protocol
        return (protocol.handshake_complete and not protocol.close_sent
                and not protocol.disconnected and protocol.initial_response is None
                and protocol.writable.is_set() and self.conn.state is State.OPEN
                and not self.transport.is_closing())

    def write_text(self, data: bytes) -> None:
        """Write `data` (UTF-8 text) as one text message; check `writable()` first."""
        if self.raw:
            self.transport.write(text_frame_header(len(data)) + data)
        else:
            self.conn.send_text(data)
            self.transport.write(b"".join(self.conn.data_to_send()))
