"""Writing events in the transaction of the change, and handing them on after commit.

Services call `record_event()`; it appends an `Event` row in the caller's
transaction and remembers an `EventRecord` of it on the session.  The unit of work
(`app.uow`) takes the remembered records with `take_recorded()` once the
transaction has committed and passes them to the hub; after a rollback they are
dropped with the session.

A product's events are numbered by `products.last_event_seq`: the row is bumped in
the same round trip that appends the event, and its lock is held until the
transaction ends, so sequences are gap-free and in commit order (DESIGN §5).

On PostgreSQL the same statement also sends the cross-instance wake-up,
`NOTIFY fleetbridge_events, '<product>:<seq>'` (`EVENT_CHANNEL`, app.events.pg_hub
listens): NOTIFY is transactional, so the other instances hear of the event exactly
when it commits and never of one that rolled back, and no connection other than the
committing one is needed.  Statements that change a row and append its event in one
round trip (app.fleet.cycle) build on `pg_append_event_ctes()` and hand their record
to `remember_event()`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Integer, String, bindparam, column, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import TypeEngine

from app.db import JsonDocument, UTCDateTime, utcnow
from app.errors import BadUserInputError
from app.events.models import Event, EventType

_SESSION_KEY = "fleet.recorded_events"
_CURSOR_PREFIX = "event:"
MAX_EVENT_SEQ = 2**63 - 1  # `seq` is a BIGINT
# The PostgreSQL channel that wakes the other instances (payload `<product>:<seq>`).
EVENT_CHANNEL = "fleetbridge_events"


@dataclass(frozen=True, slots=True)
class EventRecord:
    """An immutable copy of a committed event row, safe to share between tasks."""

    product_id: str
    seq: int
    type: EventType
    entity_id: int
    from_state: str | None
    to_state: str | None
    created_at: datetime
    payload: dict[str, Any] = field(default_factory=dict)
    # Not part of the event: what the stage change's own statement read for the tracker
    # echo (app.fleet.changes.EchoSeen), when it was asked to; never stored or sent.
    seen: Any = field(default=None, compare=False, repr=False)

    @property
    def cursor(self) -> str:
        return encode_event_cursor(self.seq)

    @classmethod
    def from_model(cls, event: Event) -> EventRecord:
        return cls(
            product_id=event.product_id,
            seq=event.seq,
            type=event.type,
            entity_id=event.entity_id,
            from_state=event.from_state,
            to_state=event.to_state,
            created_at=event.created_at,
            payload=dict(event.payload or {}),
        )


def encode_event_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{seq}".encode()).decode()


def decode_event_cursor(cursor: str, *, field_name: str = "after") -> int:
    try:
        text = base64.urlsafe_b64decode(cursor.encode()).decode()
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise BadUserInputError(field_name, "not a valid event cursor") from exc
    digits = text[len(_CURSOR_PREFIX) :]
    # ASCII digits only ("²".isdigit() is true, but int() refuses it), within the
    # BIGINT range of `seq`, so that a forged cursor never reaches the database.
    if (
        not text.startswith(_CURSOR_PREFIX)
        or not (digits.isascii() and digits.isdigit())
        or len(digits) > 19
        or int(digits) > MAX_EVENT_SEQ
    ):
        raise BadUserInputError(field_name, "not a valid event cursor")
    return int(digits)


def pg_append_event_ctes(source: str, *, type_sql: str, entity_id_sql: str,
                         from_state_sql: str, to_state_sql: str, payload_sql: str) -> str:
    """PostgreSQL: two CTEs, to follow a `WITH` list that defines CTE `source`, which
    append one event for each row of `source` (zero or one row in practice).

    `event_seq` bumps `products.last_event_seq` of `source.product_id` (the row stays
    locked until the transaction ends: gap-free, commit-ordered sequences), and
    `event_row` inserts the event with that sequence and `:event_created_at` (bind
    it: `utcnow()`, the process clock every event carries).  The `*_sql` arguments
    are SQL expressions over `source`'s columns.  When `source` has no row nothing is
    bumped and nothing is inserted.  Select `event_row.seq` and `PG_NOTIFY_SQL` from
    `event_row` in the main statement.
    """
    return f"""event_seq AS (
    UPDATE products SET last_event_seq = products.last_event_seq + 1
    FROM {source} WHERE products.id = {source}.product_id
    RETURNING products.id, products.last_event_seq
), event_row AS (
    INSERT INTO events (product_id, seq, type, entity_id, from_state, to_state, payload,
                        created_at)
    SELECT event_seq.id, event_seq.last_event_seq, {type_sql}, {entity_id_sql},
           {from_state_sql}, {to_state_sql}, {payload_sql}, :event_created_at
    FROM {source} JOIN event_seq ON event_seq.id = {source}.product_id
    RETURNING product_id, seq
)"""


# The wake-up, selected from `event_row` (a `void`, read as None); it is delivered
# to the listeners when the transaction commits, and dropped when it rolls back.
PG_NOTIFY_SQL = (
    f"pg_notify('{EVENT_CHANNEL}', event_row.product_id || ':' || event_row.seq)"
)
EVENT_CREATED_AT = bindparam("event_created_at", type_=UTCDateTime())

_PG_RECORD = (
    text(
        "WITH change AS (SELECT CAST(:product_id AS VARCHAR) AS product_id), "
        + pg_append_event_ctes(
            "change", type_sql=":type", entity_id_sql="CAST(:entity_id AS INTEGER)",
            from_state_sql="CAST(:from_state AS VARCHAR)",
            to_state_sql="CAST(:to_state AS VARCHAR)", payload_sql=":payload",
        )
        + f"\nSELECT event_row.seq, {PG_NOTIFY_SQL} AS notified FROM event_row"
    )
    .bindparams(
        bindparam("type", type_=String()), bindparam("payload", type_=JsonDocument),
        EVENT_CREATED_AT,
    )
    .columns(column("seq", BigInteger), column("notified", String))
)
_SQLITE_BUMP = text(
    "UPDATE products SET last_event_seq = last_event_seq + 1 WHERE id = :product_id"
    " RETURNING last_event_seq"
).columns(column("last_event_seq", BigInteger))
# SQLite: the event row of a sequence already taken (`event_row_values` binds it).
SQLITE_INSERT_EVENT_SQL = (
    "INSERT INTO events (product_id, seq, type, entity_id, from_state, to_state, payload,"
    " created_at) VALUES (:product_id, :seq, :type, :entity_id, :from_state, :to_state,"
    " :payload, :event_created_at)"
)
EVENT_BIND_TYPES: dict[str, TypeEngine[Any]] = {
    "seq": BigInteger(), "entity_id": Integer(), "payload": JsonDocument,
    "event_created_at": UTCDateTime(),
}
_SQLITE_INSERT = text(SQLITE_INSERT_EVENT_SQL).bindparams(
    *(bindparam(name, type_=type_) for name, type_ in EVENT_BIND_TYPES.items())
)


def event_row_values(record: EventRecord) -> dict[str, Any]:
    """The parameters of `SQLITE_INSERT_EVENT_SQL` for `record`."""
    return {
        "product_id": record.product_id, "seq": record.seq, "type": record.type.value,
        "entity_id": record.entity_id, "from_state": record.from_state,
        "to_state": record.to_state, "payload": record.payload,
        "event_created_at": record.created_at,
    }


async def record_event(
    session: AsyncSession,
    *,
    product_id: str,
    type: EventType,
    entity_id: int,
    from_state: str | None = None,
    to_state: str | None = None,
    payload: dict[str, Any] | None = None,
) -> EventRecord:
    """Append an event to the outbox; returns the record the hub will get after commit.

    One round trip on PostgreSQL (sequence bump, insert and NOTIFY), two on SQLite
    (bump, insert; the transaction holds the write lock).  Call it last in a unit of
    work where possible: the product row it updates stays locked until commit, which
    is what keeps a product's sequence in commit order on PostgreSQL.  Raises
    NoResultFound for a product that does not exist.
    """
    record = EventRecord(
        product_id=product_id, seq=0, type=type, entity_id=entity_id,
        from_state=from_state, to_state=to_state, created_at=utcnow(),
        payload=dict(payload or {}),
    )
    if session.get_bind().dialect.name == "postgresql":
        seq = (await session.execute(_PG_RECORD, event_row_values(record))).scalar_one()
        record = replace(record, seq=seq)
    else:
        seq = (await session.execute(_SQLITE_BUMP, {"product_id": product_id})).scalar_one()
        record = replace(record, seq=seq)
        await session.execute(_SQLITE_INSERT, event_row_values(record))
    remember_event(session, record)
    return record


def remember_event(session: AsyncSession, record: EventRecord) -> None:
    """Hand `record` (an event row this transaction wrote) to the hub after commit."""
    session.info.setdefault(_SESSION_KEY, []).append(record)


def take_recorded(session: AsyncSession) -> list[EventRecord]:
    """The events recorded in `session`'s committed transaction, in sequence order."""
    records: list[EventRecord] = session.info.pop(_SESSION_KEY, [])
    return sorted(records, key=lambda r: r.seq)


def discard_recorded(session: AsyncSession) -> None:
    session.info.pop(_SESSION_KEY, None)
