"""The pure parts of app.graphql.delivery: what a subscription's result depends on,
when results are shared, and frames spliced exactly as strawberry encodes them."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
from graphql import ExecutionResult, GraphQLError, OperationDefinitionNode, parse
from graphql.language import FragmentDefinitionNode
from starlette.websockets import WebSocketDisconnect

from app.graphql.delivery import DirectSender, SubscriberGone
from app.graphql.frames import DATA as _DATA
from app.graphql.frames import NEXT as _NEXT
from app.graphql.sharing import SharedData, SharedResults, event_variables, share_key


def used(document: str) -> frozenset[str]:
    ast = parse(document)
    operation = next(d for d in ast.definitions if isinstance(d, OperationDefinitionNode))
    fragments = {d.name.value: d for d in ast.definitions
                 if isinstance(d, FragmentDefinitionNode)}
    return event_variables(operation, fragments)


@pytest.mark.parametrize(("document", "variables"), [
    # root field arguments make the stream, not the result of one event
    ("subscription($a: String, $j: ID) { jobStageChanged(after: $a, jobId: $j) { cursor } }",
     set()),
    ("subscription($a: String, $w: Boolean!) { jobStageChanged(after: $a) "
     "{ cursor job @include(if: $w) { id } } }", {"w"}),
    ("subscription($a: String, $x: Boolean!) { jobStageChanged(after: $a) @include(if: $x) "
     "{ cursor } }", {"x"}),
    ("subscription($a: String) { ...Root } "
     "fragment Root on Subscription { jobStageChanged(after: $a) { cursor } }", set()),
    ("subscription($a: String) { ... on Subscription { jobStageChanged(after: $a) { cursor } } }",
     set()),
    ("subscription($n: Int) { jobStageChanged { job { ...J } } } "
     "fragment J on Job { item { comments(first: $n) { nodes { id } } } }", {"n"}),
    ("subscription($a: String) { jobStageChanged(after: $a) { job { item "
     "{ comments(after: $a) { nodes { id } } } } } }", {"a"}),  # used below the root too
])
def test_the_variables_an_events_execution_reads(document, variables):
    assert used(document) == variables


def test_share_keys_ignore_what_only_shapes_the_stream_and_keep_the_rest():
    def key(**overrides: Any) -> Any:
        values: dict[str, Any] = {
            "document": "d", "operation_name": None, "variables": {"after": "x", "w": True},
            "used": frozenset({"w"}), "extensions": None, "product_id": "acme",
            "role": "member",
        }
        values.update(overrides)
        return share_key(**values)

    assert key() == key(variables={"after": "other", "w": True})
    assert key() != key(variables={"after": "x", "w": False})
    assert key() != key(product_id="globex")
    assert key() != key(role="worker")
    assert key() != key(document="d2")
    assert key() != key(operation_name="Named")
    assert key(variables={"w": float("nan")}) is None  # not JSON: never shared
    assert key(extensions={"x": object()}) is None


class CompactView:
    def encode_json(self, data: object) -> str:  # strawberry's own
        return json.dumps(data, separators=(",", ":"))


class IndentedView:
    def encode_json(self, data: object) -> str:
        return json.dumps(data, indent=2)


class BytesView:
    def encode_json(self, data: object) -> bytes:
        return json.dumps(data).encode()


def test_spliced_frames_are_exactly_strawberrys_encoding():
    view = CompactView()
    payload = {"data": {"jobStageChanged": {"cursor": "x\u2028", "title": 'é "q"', "n": 1.5}}}
    for splice, make in ((_NEXT, lambda i, p: {"id": i, "type": "next", "payload": p}),
                         (_DATA, lambda i, p: {"type": "data", "id": i, "payload": p})):
        for operation_id in ("1", 'we"ird\u00e9', "\U0001f600"):
            frame = splice.frame(view, operation_id, view.encode_json(payload))
            assert frame == view.encode_json(make(operation_id, payload))


def test_views_whose_encoding_cannot_be_spliced_send_the_usual_way():
    for view in (IndentedView(), BytesView()):
        assert _NEXT.frame(view, "1", "{}") is None


def ok(data: dict[str, Any]) -> ExecutionResult:
    return ExecutionResult(data, None)


def test_an_error_free_result_is_shared_and_encoded_once():
    shared, payload, runs = SharedResults(), object(), []

    def run() -> ExecutionResult:
        runs.append(1)
        return ok({"f": 1})

    first = shared.execute("key", payload, run, asyncio.iscoroutine)
    second = shared.execute("key", payload, run, asyncio.iscoroutine)
    assert first is second
    assert len(runs) == 1
    assert isinstance(first.data, SharedData)
    assert first.data == {"f": 1}
    assert shared.ready("key", payload) is first.data
    assert shared.ready("other key", payload) is None
    assert shared.ready("key", object()) is None  # another event
    view = CompactView()
    encoded = first.data.payload_json(view.encode_json)
    assert encoded == '{"data":{"f":1}}'
    assert first.data.payload_json(view.encode_json) is encoded  # once per view


def test_a_result_with_errors_goes_to_its_executor_only():
    shared, payload = SharedResults(), object()
    failing = ExecutionResult({"f": None}, [GraphQLError("no")])
    calls = []

    def run() -> ExecutionResult:
        calls.append(1)
        return failing

    assert shared.execute("key", payload, run, asyncio.iscoroutine) is failing
    assert shared.execute("key", payload, run, asyncio.iscoroutine) is failing
    assert len(calls) == 2  # the second subscriber executed on its own
    assert shared.ready("key", payload) is None
    assert (shared.executions, shared.shared, shared.unshared) == (2, 0, 1)


async def test_concurrent_subscribers_wait_for_one_execution_in_flight():
    shared, payload, release = SharedResults(), object(), asyncio.Event()
    calls = []

    async def slow() -> ExecutionResult:
        calls.append(1)
        await release.wait()
        return ok({"f": 2})

    waiting = [asyncio.ensure_future(shared.execute("key", payload, slow,
                                                    asyncio.iscoroutine))
               for _ in range(5)]
    await asyncio.sleep(0)
    waiting[0].cancel()  # the first subscriber goes away: the others still get it
    release.set()
    results = await asyncio.gather(*waiting[1:])
    assert len(calls) == 1
    assert all(result is results[0] for result in results)
    assert results[0].data == {"f": 2}


async def test_an_execution_that_raises_is_not_shared():
    shared, payload = SharedResults(), object()
    calls = []

    async def boom() -> ExecutionResult:
        calls.append(1)
        await asyncio.sleep(0)
        if len(calls) == 1:
            raise RuntimeError("first one fails")
        return ok({"f": 3})

    first = asyncio.ensure_future(shared.execute("key", payload, boom, asyncio.iscoroutine))
    second = asyncio.ensure_future(shared.execute("key", payload, boom, asyncio.iscoroutine))
    with pytest.raises(RuntimeError):
        await first
    assert (await second).data == {"f": 3}  # executed on its own
    assert len(calls) == 2


def test_payloads_are_built_once_per_event_and_entity_read():
    shared = SharedResults()
    built = []

    def build(record: str, row: object) -> tuple[str, object]:
        built.append(record)
        return (record, row)

    row = object()
    first = shared.payload(("JobStageEvent", "acme", 7), build, "r7", row)
    assert shared.payload(("JobStageEvent", "acme", 7), build, "r7", row) is first
    plain = shared.payload(("JobStageEvent", "acme", 7), build, "r7", None)
    assert plain == ("r7", None)
    assert shared.payload(("JobStageEvent", "acme", 7), build, "r7", row) is first
    assert shared.payload(("JobStageEvent", "acme", 7), build, "r7", object()) is not first
    assert len(built) == 3


async def test_a_frame_to_a_websocket_that_went_away_ends_the_operation_like_a_cancel():
    class Gone:
        async def send_text(self, frame: str) -> None:
            raise WebSocketDisconnect(1006)

    handler = SimpleNamespace(view=CompactView(), websocket=SimpleNamespace(ws=Gone()),
                              schema=None)
    sender = DirectSender(handler, "1", _NEXT)
    with pytest.raises(SubscriberGone):
        await sender.send('{"id":"1"}')
    assert not issubclass(SubscriberGone, Exception)  # passes strawberry's error handling
