"""What subscribers of one event share (issue 12 "fan-out that scales"): the key
under which their results are equal, and the per-event cache of payloads and results.

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
its queue overflowed) may miss them and simply executes on its own.  How results
are executed and sent: app.graphql.delivery.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
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

    __slots__ = ("_bytes", "_encoded")

    def payload_json(self, encode: Callable[[object], str | bytes]) -> str | None:
        """`encode({"data": self})`, once per encoder; None when it is not text."""
        cached: tuple[Callable[[object], str | bytes], str | bytes] | None = getattr(
            self, "_encoded", None)
        if cached is None or (cached[0] is not encode and cached[0] != encode):
            cached = (encode, encode({"data": self}))
            self._encoded = cached
        encoded = cached[1]
        return encoded if isinstance(encoded, str) else None

    def payload_bytes(self, encode: Callable[[object], str | bytes]) -> bytes | None:
        """`payload_json(encode)` as UTF-8, once per encoder (the broadcast writes
        bytes); None when it is not text."""
        cached: tuple[Callable[[object], str | bytes], bytes] | None = getattr(
            self, "_bytes", None)
        if cached is None or (cached[0] is not encode and cached[0] != encode):
            text = self.payload_json(encode)
            if text is None:
                return None
            cached = (encode, text.encode())
            self._bytes = cached
        return cached[1]


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


class Standing(enum.Enum):
    """Where the shared result of one event for one share key stands."""

    READY = "ready"  # made, error-free: hand it out
    RUNNING = "running"  # an execution is in flight (awaiting something)
    UNSHARED = "unshared"  # made with errors, or failed: everyone executes on their own
    ABSENT = "absent"  # nobody has executed it (or it left the cache)


class SharedResults:
    """Per-event payloads and per-(event, share key) results, LRU-bounded.

    Counters (tests, benchmark): `executions` — selection sets executed on an event by
    a subscription that could share; `shared` — results handed out without executing;
    `unshared` — executions whose result could not be shared (errors); `broadcasts` —
    frames the broadcast wrote without waking a stream."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._payloads: OrderedDict[tuple[Hashable, bool], tuple[object, object]] = OrderedDict()
        self._results: OrderedDict[tuple[Hashable, int], _Entry] = OrderedDict()
        self._keys: OrderedDict[Hashable, Hashable] = OrderedDict()
        self._leaders: OrderedDict[tuple[Hashable, int], object] = OrderedDict()
        # Per share key, the latest event broadcast and its shared data (`remember`).
        self.latest: dict[Hashable, tuple[object, SharedData]] = {}
        self.executions = 0
        self.shared = 0
        self.unshared = 0
        self.broadcasts = 0  # frames written by the broadcast (app.graphql.broadcast)

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

    def standing(self, key: Hashable, payload: object) -> tuple[Standing, SharedData | None]:
        """Where the result of `payload` for share key `key` stands, with its shared
        data when READY (counted as shared)."""
        entry = self._results.get((key, id(payload)))
        if entry is None or entry.payload is not payload:
            return Standing.ABSENT, None
        if entry.result is not None:
            self.shared += 1
            data: SharedData = entry.result.data  # type: ignore[assignment]
            return Standing.READY, data
        if entry.future is not None:
            return Standing.RUNNING, None
        return Standing.UNSHARED, None

    def remember(self, key: Hashable, event: object, data: SharedData) -> None:
        """Keep `data` as share key `key`'s result of `event` (the hub's record object,
        the same for every subscriber of it), so that the broadcast finds it for the
        next subscriber with one lookup (`latest`).  Bounded like the other caches."""
        latest = self.latest
        if key not in latest and len(latest) >= self.max_entries:
            latest.clear()
        latest[key] = (event, data)

    def lead(self, key: Hashable, payload: object) -> bool:
        """True for the first caller per (`key`, `payload`): it is to execute the
        result that the others then share (app.graphql.broadcast); False after."""
        slot = (key, id(payload))
        if self._leaders.get(slot) is payload:
            return False
        self._leaders[slot] = payload  # held, so that its id() is not reused meanwhile
        self._leaders.move_to_end(slot)
        while len(self._leaders) > self.max_entries:
            self._leaders.popitem(last=False)
        return True

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
