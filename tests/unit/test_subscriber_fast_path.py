"""The hub's side of the broadcast (app.events.subscriber.Subscriber.deliver_fast) and
the wire's framing (app.graphql.frames.text_frame_header), as pure units.

deliver_fast hands a parked subscriber's queued events to its fast path in order,
passes over what its filter refuses, leaves a gap or an overflow to the stream, and
stops at the first event the fast path cannot deliver, leaving it and the rest queued.
"""

from __future__ import annotations

import asyncio

from app.db import utcnow
from app.events.models import EventType
from app.events.outbox import EventRecord
from app.events.subscriber import DONE, HELD, SLOW, WAIT, Subscriber
from app.graphql.frames import text_frame_header


def record(seq: int, entity_id: int = 1) -> EventRecord:
    return EventRecord(product_id="acme", seq=seq, type=EventType.JOB_CREATED,
                       entity_id=entity_id, from_state=None, to_state="QUEUED",
                       created_at=utcnow())


async def parked(subscriber: Subscriber, last: int) -> asyncio.Task[list[EventRecord]]:
    subscriber.last = last
    task = asyncio.create_task(subscriber.next_batch())
    await asyncio.sleep(0)  # it waits for news
    return task


async def test_a_parked_subscriber_gets_its_events_in_order_and_stays_parked():
    subscriber = Subscriber("acme", max_queue=10)
    sent: list[int] = []
    subscriber.fast = lambda r, final: sent.append(r.seq) or DONE
    waiting = await parked(subscriber, 4)
    for seq in (5, 6, 7):
        subscriber.offer(record(seq))
    assert subscriber.deliver_fast(False) == DONE
    assert sent == [5, 6, 7]
    assert (subscriber.last, subscriber.queued()) == (7, 0)
    assert not waiting.done()
    waiting.cancel()


async def test_what_the_filter_refuses_is_passed_over_and_a_gap_goes_to_the_stream():
    subscriber = Subscriber("acme", max_queue=10)
    sent: list[int] = []
    subscriber.fast = lambda r, final: sent.append(r.seq) or DONE
    subscriber.matches = lambda r: r.entity_id == 1
    waiting = await parked(subscriber, 0)
    for seq, entity in ((1, 2), (2, 1), (4, 1)):  # 3 is missing
        subscriber.offer(record(seq, entity))
    assert subscriber.deliver_fast(False) == SLOW
    assert sent == [2]
    assert subscriber.last == 2
    assert [r.seq for r in subscriber._queue] == [4]  # the stream reads 3 from the log
    waiting.cancel()


async def test_the_first_event_it_cannot_deliver_stops_it_with_the_rest_queued():
    for answer in (SLOW, WAIT, HELD):
        subscriber = Subscriber("acme", max_queue=10)
        subscriber.fast = lambda r, final, answer=answer: DONE if r.seq == 1 else answer
        waiting = await parked(subscriber, 0)
        for seq in (1, 2, 3):
            subscriber.offer(record(seq))
        assert subscriber.deliver_fast(False) == answer
        assert subscriber.last == 1
        assert [r.seq for r in subscriber._queue] == [2, 3]
        waiting.cancel()


async def test_a_busy_overflowed_or_unparked_stream_is_left_to_itself():
    subscriber = Subscriber("acme", max_queue=2)
    subscriber.fast = lambda r, final: DONE
    subscriber.offer(record(1))
    assert subscriber.deliver_fast(False) == SLOW  # never parked: `last` unknown
    subscriber.last = 0
    assert subscriber.deliver_fast(False) == DONE  # not waiting: it takes its queue itself
    assert subscriber.queued() == 1
    for seq in (2, 3):
        subscriber.offer(record(seq))
    assert subscriber.overflowed
    assert subscriber.deliver_fast(False) == SLOW  # it reads the log


def test_text_frame_headers_follow_rfc_6455_lengths():
    assert text_frame_header(0) == b"\x81\x00"
    assert text_frame_header(125) == b"\x81\x7d"
    assert text_frame_header(126) == b"\x81\x7e\x00\x7e"
    assert text_frame_header(65535) == b"\x81\x7e\xff\xff"
    assert text_frame_header(65536) == b"\x81\x7f" + (65536).to_bytes(8, "big")
