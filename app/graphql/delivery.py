"""One execution and one encoding per event and distinct subscription (issue 12
"fan-out that scales").

A live event reaches every subscriber of its product.  graphql-core would execute
each subscriber's selection set on it, and strawberry would encode each result to
JSON, once per subscriber.  Here subscribers that would get the same answer share it:

* **the payload** — the `JobStageEvent` / `ItemStatusEvent` object given to
  graphql-core as the event's root value — is built once per event (and per
  entity read, app.events.entities) for all its subscribers (`SharedResults.payload`);
* **the execution** — `SharedEventExecutor`, the schema's executor class, executes
  a subscription's selection set on an event once per *share key* and hands the same
  result to every other subscriber with that key (`SharedResults.execute`);
* **the encoding** — the websocket handlers (`SharedFramesTransportWS`,
  `SharedFramesLegacyWS`) encode a shared result's `{"data": …}` once and splice each
  subscriber's operation id into the frame, so every subscriber of it is sent the
  same payload bytes.

The share key of a subscription (`share_key`) is what the result of an event can
depend on: the document text and the operation's name, the values of the variables
that the per-event execution reads (a variable used only in the root field's
arguments — `jobId`, `after` — only shapes the stream of events, never the result of
one), the client's operation `extensions`, and of the caller its product and role.
That is all a resolver under `Subscription` may use of the caller (`info.context`):
the types' resolvers read through product-scoped loaders, and no field depends on
the role; a resolver that needed more of the caller would have to join the key.

Only a complete, error-free result is shared.  A result with errors is returned to
the subscriber whose execution made it, and every other subscriber of that event
executes on its own, so errors are formatted and masked per subscriber exactly as
without sharing.  An execution that raises, or is cancelled, is not shared either.

Both caches are per process, bounded LRUs over the most recent events
(`DEFAULT_MAX_ENTRIES`): a subscriber far behind (replaying, or catching up after
its queue overflowed) may miss them and simply executes on its own.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, TypeVar

from graphql import (
    ExecutionResult as GraphQLResult,
)
from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    InlineFragmentNode,
    Node,
    OperationDefinitionNode,
    SelectionSetNode,
    VariableDefinitionNode,
    VariableNode,
)
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

DEFAULT_MAX_ENTRIES = 4_096

T = TypeVar("T")
R = TypeVar("R")
S = TypeVar("S")


# -- what a subscription's result depends on ------------------------------------------


def _root_fields(selection_set: SelectionSetNode,
                 fragments: Mapping[str, FragmentDefinitionNode],
                 seen: set[str]) -> Iterator[FieldNode]:
    """The root fields of an operation: in its selection set, directly or through
    fragments (a fragment spread at the root is on the root type, so its fields are
    root fields too)."""
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            yield selection
        elif isinstance(selection, InlineFragmentNode):
            yield from _root_fields(selection.selection_set, fragments, seen)
        elif isinstance(selection, FragmentSpreadNode):
            name = selection.name.value
            fragment = fragments.get(name)
            if fragment is not None and name not in seen:
                seen.add(name)
                yield from _root_fields(fragment.selection_set, fragments, seen)


def event_variables(operation: OperationDefinitionNode,
                    fragments: Mapping[str, FragmentDefinitionNode]) -> frozenset[str]:
    """The variables that executing `operation`'s selection set on one event may read:
    every variable it uses, except where used only in the arguments of its root
    fields (those go to the subscribe resolver, which makes the stream of events).
    Conservative: every fragment of the document counts, used here or not."""
    root_fields = {id(field) for field in _root_fields(operation.selection_set, fragments,
                                                        set())}
    found: set[str] = set()
    stack: list[Node] = [operation, *fragments.values()]
    while stack:
        node = stack.pop()
        if isinstance(node, VariableNode):
            found.add(node.name.value)
            continue
        if isinstance(node, VariableDefinitionNode):  # a declaration, not a use
            continue
        skip_arguments = id(node) in root_fields
        for key in node.keys:
            if key == "loc" or (skip_arguments and key == "arguments"):
                continue
            child = getattr(node, key, None)
            if isinstance(child, Node):
                stack.append(child)
            elif isinstance(child, tuple | list):
                stack.extend(item for item in child if isinstance(item, Node))
    return frozenset(found)


def _canonical(value: object) -> str | None:
    """A JSON text equal for equal values (sorted keys); None when it is not JSON."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None


def share_key(*, document: str, operation_name: str | None,
              variables: Mapping[str, Any] | None, used: frozenset[str],
              extensions: object, product_id: str, role: object) -> Hashable | None:
    """The key under which subscriptions share a result per event (module docstring);
    None when it cannot be told (variables or extensions that are not JSON)."""
    provided = variables or {}
    read = _canonical({name: provided[name] for name in sorted(used) if name in provided})
    ext = _canonical(extensions)
    if read is None or ext is None:
        return None
    return (document, operation_name, read, ext, product_id, role)


# -- the shared results -------------------------------------------------------------


class SharedData(dict[str, Any]):
    """The `data` of a result shared by subscribers, with its encoded `{"data": …}`
    payload kept after the first subscriber's frame (`payload_json`).  Never mutated."""

    __slots__ = ("_encoded",)

    def payload_json(self, encode: Callable[[object], str | bytes]) -> str | None:
        """`encode({"data": self})`, once per encoder; None when it is not text."""
        cached: tuple[Callable[[object], str | bytes], str | bytes] | None = getattr(
            self, "_encoded", None)
        if cached is None or (cached[0] is not encode and cached[0] != encode):
            cached = (encode, encode({"data": self}))
            self._encoded = cached
        encoded = cached[1]
        return encoded if isinstance(encoded, str) else None


def _shareable(result: object) -> GraphQLResult | None:
    """The shared form of a complete, error-free result; None for any other."""
    if (type(result) is GraphQLResult and not result.errors and result.data is not None
            and not result.extensions):
        return GraphQLResult(SharedData(result.data), None)
    return None


class _Entry:
    __slots__ = ("future", "payload", "result", "settled")

    def __init__(self, payload: object) -> None:
        self.payload = payload  # held, so that its id() is not reused while cached
        self.result: GraphQLResult | None = None  # the shared result, once there is one
        self.future: asyncio.Future[Any] | None = None  # an execution in flight
        self.settled = False

    def settle(self, future: asyncio.Future[Any]) -> None:
        if self.settled:
            return
        self.settled = True
        self.future = None
        if future.cancelled() or future.exception() is not None:
            return  # not shared: everyone else executes on their own
        self.result = _shareable(future.result())


class SharedResults:
    """Per-event payloads and per-(event, share key) results, LRU-bounded.

    Counters (tests, benchmark): `executions` — selection sets executed on an event by
    a subscription that could share; `shared` — results handed out without executing;
    `unshared` — executions whose result could not be shared (errors)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._payloads: OrderedDict[tuple[Hashable, bool], tuple[object, object]] = OrderedDict()
        self._results: OrderedDict[tuple[Hashable, int], _Entry] = OrderedDict()
        self._keys: OrderedDict[Hashable, Hashable] = OrderedDict()
        self.executions = 0
        self.shared = 0
        self.unshared = 0

    def intern(self, key: Hashable) -> Hashable:
        """One object per distinct share key, so that lookups compare by identity;
        kept for as long as some cached result has it (bounded like the results)."""
        known = self._keys.get(key)
        if known is None:
            self._keys[key] = known = key
        else:
            self._keys.move_to_end(key)
        while len(self._keys) > self.max_entries:
            self._keys.popitem(last=False)
        return known

    # -- payloads --------------------------------------------------------------

    def payload(self, key: Hashable, build: Callable[[R, S], T], record: R, source: S) -> T:
        """`build(record, source)`, the payload of event `key` (`source` being the
        entity read for it, or None): built once, and handed to every subscriber that
        asks with the same source object."""
        slot = (key, source is None)  # subscribers with and without the entity alternate
        entry = self._payloads.get(slot)
        if entry is not None and entry[0] is source:
            payload: T = entry[1]  # type: ignore[assignment]
            return payload
        built = build(record, source)
        self._payloads[slot] = (source, built)
        self._payloads.move_to_end(slot)
        while len(self._payloads) > self.max_entries:
            self._payloads.popitem(last=False)
        return built

    # -- results ---------------------------------------------------------------

    def execute(self, key: Hashable, payload: object,
                run: Callable[[], Any], is_awaitable: Callable[[Any], bool]) -> Any:
        """The result of executing on `payload` for share key `key`: `run()`'s result
        for the first subscriber, the same shared result for the others (an
        awaitable while the first execution is in flight)."""
        entry_key = (key, id(payload))
        entry = self._results.get(entry_key)
        if entry is not None and entry.payload is payload:
            if entry.result is not None:
                self.shared += 1
                return entry.result
            if entry.future is not None:
                return self._wait(entry, entry.future, run, is_awaitable, owner=False)
            return self._run(run)  # this event's result is not shared
        entry = _Entry(payload)
        self._results[entry_key] = entry
        while len(self._results) > self.max_entries:
            self._results.popitem(last=False)
        outcome = self._run(run)
        if is_awaitable(outcome):
            future = asyncio.ensure_future(outcome)  # survives its first waiter's going
            entry.future = future
            future.add_done_callback(entry.settle)
            return self._wait(entry, future, run, is_awaitable, owner=True)
        entry.settled = True
        entry.result = _shareable(outcome)
        if entry.result is None:
            self.unshared += 1
            return outcome
        return entry.result

    def ready(self, key: Hashable, payload: object) -> SharedData | None:
        """The shared, error-free data of `payload` for share key `key` when it has
        been made already (counted as shared); None otherwise."""
        entry = self._results.get((key, id(payload)))
        if entry is None or entry.payload is not payload or entry.result is None:
            return None
        self.shared += 1
        data: SharedData = entry.result.data  # type: ignore[assignment]
        return data

    def _run(self, run: Callable[[], Any]) -> Any:
        self.executions += 1
        return run()

    async def _wait(self, entry: _Entry, future: asyncio.Future[Any], run: Callable[[], Any],
                    is_awaitable: Callable[[Any], bool], *, owner: bool) -> Any:
        try:
            outcome = await asyncio.shield(future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not future.cancelled() or (task is not None and task.cancelling()):
                raise  # this subscriber is going away
            outcome = None  # the shared execution was cancelled: execute on one's own
        except Exception:
            if owner:
                raise  # as it would without sharing
            outcome = None
        entry.settle(future)
        if entry.result is not None:
            if not owner:
                self.shared += 1
            return entry.result
        if owner and outcome is not None:
            self.unshared += 1
            return outcome  # a result with errors goes to the one who executed it
        mine = self._run(run)
        return await mine if is_awaitable(mine) else mine


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


# -- the websocket handlers -----------------------------------------------------------


class _Splice:
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
_NEXT = _Splice(lambda operation_id, payload: {"id": operation_id, "type": "next",
                                               "payload": payload})
_DATA = _Splice(lambda operation_id, payload: {"type": "data", "id": operation_id,
                                               "payload": payload})


def shared_frame(view: Any, splice: _Splice, operation_id: str,
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

    __slots__ = ("_encode", "_head", "_tail", "operation", "operation_id", "share_key",
                 "shared", "sharing", "splice", "view", "websocket")

    def __init__(self, handler: Any, operation_id: str, splice: _Splice,
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
        head = self._head
        if head is None:
            around = self.splice.around(self.view, self.operation_id)
            if around is None:
                self.sharing = False
                return None
            head, self._tail = around
            self._head = head
        return head + encoded + self._tail

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
        _SENDER.set(DirectSender(self, operation.id, _NEXT, operation))  # this task only
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
            frame = shared_frame(self.view, _NEXT, operation.id, result)
        if frame is None:
            await operation.send_next(result)
        elif not operation.completed:
            await _send_text(self.websocket, frame)


class SharedFramesLegacyWS(BaseGraphQLWSHandler[Context, RootValue]):
    """The legacy `graphql-ws`, sending a shared result as a spliced `data` frame."""

    async def handle_async_results(self, operation_id: str, query: str,
                                   operation_name: str | None,
                                   variables: dict[str, object] | None) -> None:
        _SENDER.set(DirectSender(self, operation_id, _DATA))  # this task only
        try:
            await super().handle_async_results(operation_id, query, operation_name, variables)
        except SubscriberGone:
            return

    async def send_data_message(self, execution_result: ExecutionResult,
                                operation_id: str) -> None:
        frame = None
        if isinstance(self.websocket, ASGIWebSocketAdapter):
            frame = shared_frame(self.view, _DATA, operation_id, execution_result)
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
