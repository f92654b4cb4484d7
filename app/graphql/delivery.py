"""One execution and one encoding per event and distinct subscription (issue 12
"fan-out that scales").

A live event reaches every subscriber of its product.  graphql-core would execute
each subscriber's selection set on it, and strawberry would encode each result to
JSON, once per subscriber.  Here subscribers that would get the same answer share it
(what may be shared, and the caches: app.graphql.sharing):

* **the payload** — the `JobStageEvent` / `ItemStatusEvent` object given to
  graphql-core as the event's root value — is built once per event (and per
  entity read, app.events.entities) for all its subscribers (`SharedResults.payload`);
* **the execution** — `SharedEventExecutor`, the schema's executor class, executes
  a subscription's selection set on an event once per *share key* and hands the same
  result to every other subscriber with that key (`SharedResults.execute`);
* **the encoding** — the websocket handlers (`SharedFramesTransportWS`,
  `SharedFramesLegacyWS`) encode a shared result's `{"data": …}` once and splice each
  subscriber's operation id into the frame (app.graphql.frames), so every subscriber
  of it is sent the same payload bytes;
* **the sending** — `DirectSender` sends a shared result's frame from the
  subscription's own event stream, and, once the stream is caught up and parked, the
  hub's broadcast writes it to the connection without waking the stream at all
  (app.graphql.broadcast).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Mapping
from contextvars import ContextVar
from typing import Any

from starlette.websockets import WebSocketDisconnect
from strawberry.asgi import ASGIWebSocketAdapter
from strawberry.extensions import MaskErrors, SchemaExtension
from strawberry.http.exceptions import WebSocketDisconnected
from strawberry.http.typevars import Context, RootValue
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
    Operation,
)
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler
from strawberry.types.execution import ExecutionResult, PreExecutionError

from app.graphql.frames import DATA, NEXT, Splice, Wire, shared_frame
from app.graphql.sharing import (
    SharedData,
    SharedResults,
    event_variables,
    share_key,
)

# -- what the schema's extensions allow ------------------------------------------------


_ALLOWED: dict[int, bool] = {}


def sharing_allowed(schema: Any) -> bool:
    """Whether results may be shared and sent as spliced frames under `schema`'s
    extensions: none may wrap resolvers (`resolve`, which could depend on the caller),
    add to results (`get_results`) or change them as they stream (`on_stream_result`;
    error masking is allowed, as shared results have no errors).  Once per schema."""
    allowed = _ALLOWED.get(id(schema))
    if allowed is None:
        allowed = True
        for extension in schema.get_extensions():
            kind = type(extension)
            if (kind._implements_resolve()
                    or kind.get_results is not SchemaExtension.get_results
                    or kind.on_stream_result not in (SchemaExtension.on_stream_result,
                                                     MaskErrors.on_stream_result)):
                allowed = False
        _ALLOWED[id(schema)] = allowed
    return allowed


# -- the executor ---------------------------------------------------------------


_UNSET: Any = object()


class SharedEventExecutor(StrawberryGraphQLCoreExecutionContext):
    """strawberry's executor, executing a subscription's events through
    `SharedResults` (`context.services.deliveries`).  Queries and mutations, and
    subscriptions without an authenticated caller, execute as before."""

    _raw_variables: Mapping[str, Any] | None = None
    _share_key: Hashable | None = _UNSET
    _shared: SharedResults | None = None
    _event: Any = _UNSET

    @classmethod
    def build(cls, schema: Any, document: Any, root_value: Any = None,
              context_value: Any = None, raw_variable_values: dict[str, Any] | None = None,
              *args: Any, **kwargs: Any) -> Any:
        executor = super().build(schema, document, root_value, context_value,
                                 raw_variable_values, *args, **kwargs)
        if isinstance(executor, SharedEventExecutor):
            executor._raw_variables = raw_variable_values
        return executor

    def _sharing(self) -> tuple[SharedResults | None, Hashable | None]:
        sender = _SENDER.get()
        if sender is None or not sender.sharing:
            return None, None
        context = self.context_value
        shared = getattr(getattr(context, "services", None), "deliveries", None)
        principal = getattr(context, "principal", None)
        loc = self.operation.loc
        if not isinstance(shared, SharedResults) or principal is None or loc is None:
            return None, None
        key = share_key(
            document=loc.source.body,
            operation_name=self.operation.name.value if self.operation.name else None,
            variables=self._raw_variables,
            used=event_variables(self.operation, self.fragment_definitions),
            extensions=getattr(self, "operation_extensions", None),
            product_id=principal.product_id, role=principal.role,
        )
        return (shared, shared.intern(key)) if key is not None else (None, None)

    def build_per_event_executor(self, payload: Any) -> Any:
        if self._share_key is _UNSET:  # once per subscription, on its first event
            self._shared, self._share_key = self._sharing()
            sender = _SENDER.get()
            if sender is not None:  # its next events may go straight out as frames
                sender.shared, sender.share_key = self._shared, self._share_key
        executor = super().build_per_event_executor(payload)
        assert isinstance(executor, SharedEventExecutor)
        executor._event = payload
        return executor

    def execute_operation(self, serially: bool | None = None) -> Any:
        shared, key = self._shared, self._share_key
        if self._event is _UNSET or shared is None or key is None or key is _UNSET:
            return super().execute_operation(serially)
        base = super().execute_operation
        return shared.execute(key, self._event, lambda: base(serially), self.is_awaitable)



# -- sending ------------------------------------------------------------------------


class SubscriberGone(BaseException):
    """The websocket went away while a frame was sent from inside the subscription's
    event stream: the operation ends quietly, as when the handler cancels it (a plain
    exception there would be reported as an execution error)."""


class DirectSender:
    """Sends an operation's shared results straight from its event stream.

    Set for the operation's task by the handlers below; the subscription's event
    stream (app.graphql.subscriptions) asks it for each event's frame.  Once the
    first event has gone through graphql-core (`SharedEventExecutor` learns the share
    key then), an event whose shared result some subscriber has already made is sent
    as a spliced frame right away, in the stream's own order, without a trip through
    graphql-core and strawberry; any other event goes the usual way.  `sharing` is
    False when the schema's extensions forbid sharing (`sharing_allowed`)."""

    __slots__ = ("_encode", "_head", "_head_bytes", "_tail", "_tail_bytes", "operation",
                 "operation_id", "share_key", "shared", "sharing", "splice", "task", "view",
                 "websocket", "wire")

    def __init__(self, handler: Any, operation_id: str, splice: Splice,
                 operation: Operation[Any, Any] | None = None) -> None:
        self.view = handler.view
        self.websocket = handler.websocket
        self.operation_id = operation_id
        self.operation = operation
        self.splice = splice
        self.sharing = (isinstance(self.websocket, ASGIWebSocketAdapter)
                        and sharing_allowed(handler.schema))
        self.shared: SharedResults | None = None
        self.share_key: Hashable | None = None
        self._encode: Callable[[object], str | bytes] = self.view.encode_json
        # This operation's frames around the payload text, once known.
        self._head: str | None = None
        self._tail = ""
        self._head_bytes = self._tail_bytes = b""
        # The operation's task (its stream runs in it) and, when the connection is
        # served by app.graphql.frames.FleetWebSocketProtocol, its wire (broadcast).
        self.task = asyncio.current_task()
        self.wire = Wire.of(self.websocket.ws) if self.sharing else None

    def _around(self) -> str | None:
        head = self._head
        if head is None:
            around = self.splice.around(self.view, self.operation_id)
            if around is None:
                self.sharing = False
                self.wire = None
                return None
            head, self._tail = around
            self._head, self._head_bytes, self._tail_bytes = (
                head, head.encode(), self._tail.encode())
        return head

    def frame(self, payload: object) -> str | None:
        """The frame of `payload`'s shared result if there is one already; else None."""
        shared, key = self.shared, self.share_key
        if shared is None or key is None:
            return None
        data = shared.ready(key, payload)
        if data is None:
            return None
        encoded = data.payload_json(self._encode)
        if encoded is None:
            return None
        head = self._around()
        return None if head is None else head + encoded + self._tail

    def frame_bytes(self, data: SharedData) -> bytes | None:
        """The frame of shared `data` as UTF-8 bytes; None when it cannot be spliced."""
        encoded = data.payload_bytes(self._encode)
        if encoded is None or self._around() is None:
            return None
        return self._head_bytes + encoded + self._tail_bytes

    def open(self) -> bool:
        """Whether a frame may be written to the wire now: the operation is neither
        completed nor being cancelled (complete / stop, a closed connection) and the
        wire takes writes (app.graphql.frames.Wire.writable)."""
        operation, task, wire = self.operation, self.task, self.wire
        return (wire is not None and (operation is None or not operation.completed)
                and task is not None and not task.done() and not task.cancelling()
                and wire.writable())

    async def send(self, frame: str) -> None:
        """Send `frame` (raises SubscriberGone when the websocket is gone)."""
        if self.operation is not None and self.operation.completed:
            return
        try:
            await self.websocket.ws.send_text(frame)
        except WebSocketDisconnect as exc:
            raise SubscriberGone from exc


_SENDER: ContextVar[DirectSender | None] = ContextVar("fleet_direct_sender", default=None)


def direct_sender() -> DirectSender | None:
    """The sender of the operation running in this task (None outside a websocket
    operation, or when its results may not be shared)."""
    sender = _SENDER.get()
    return sender if sender is not None and sender.sharing else None


async def _send_text(websocket: Any, frame: str) -> None:
    try:
        await websocket.ws.send_text(frame)
    except WebSocketDisconnect as exc:
        raise WebSocketDisconnected from exc


class SharedFramesTransportWS(BaseGraphQLTransportWSHandler[Context, RootValue]):
    """`graphql-transport-ws`, sending a shared result as a spliced `next` frame."""

    async def run_operation(self, operation: Operation[Context, RootValue]) -> None:
        _SENDER.set(DirectSender(self, operation.id, NEXT, operation))  # this task only
        try:
            await super().run_operation(operation)
        except SubscriberGone:
            return  # the handler cleans up as for any closed connection

    async def _send_result_stream(self, operation: Operation[Context, RootValue],
                                  result_source: Any) -> None:
        # strawberry's own (0.341), with `send_next` going through `_send_next`
        is_first_result = True
        async for result in result_source:
            if is_first_result and isinstance(result, PreExecutionError):
                await self._handle_pre_execution_error(operation, result)
                return
            if not isinstance(result, ExecutionResult):
                await self._reject_incremental_delivery(operation)
                return
            await self._send_next(operation, result)
            is_first_result = False

    async def _send_next(self, operation: Operation[Context, RootValue],
                         result: ExecutionResult) -> None:
        frame = None
        if isinstance(self.websocket, ASGIWebSocketAdapter):
            frame = shared_frame(self.view, NEXT, operation.id, result)
        if frame is None:
            await operation.send_next(result)
        elif not operation.completed:
            await _send_text(self.websocket, frame)


class SharedFramesLegacyWS(BaseGraphQLWSHandler[Context, RootValue]):
    """The legacy `graphql-ws`, sending a shared result as a spliced `data` frame."""

    async def handle_async_results(self, operation_id: str, query: str,
                                   operation_name: str | None,
                                   variables: dict[str, object] | None) -> None:
        _SENDER.set(DirectSender(self, operation_id, DATA))  # this task only
        try:
            await super().handle_async_results(operation_id, query, operation_name, variables)
        except SubscriberGone:
            return

    async def send_data_message(self, execution_result: ExecutionResult,
                                operation_id: str) -> None:
        frame = None
        if isinstance(self.websocket, ASGIWebSocketAdapter):
            frame = shared_frame(self.view, DATA, operation_id, execution_result)
        if frame is None:
            await super().send_data_message(execution_result, operation_id)
        else:
            await _send_text(self.websocket, frame)


__all__ = [
    "DirectSender",
    "SharedData",
    "SharedEventExecutor",
    "SharedFramesLegacyWS",
    "SharedFramesTransportWS",
    "SharedResults",
    "SubscriberGone",
    "direct_sender",
    "event_variables",
    "share_key",
    "sharing_allowed",
]
