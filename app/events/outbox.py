"""Writing events in the transaction of the change, and handing them on after commit.

Services call `record_event()`; it appends an `Event` row to the session and
remembers it on the session.  The unit of work (`app.uow`) takes the remembered
records with `take_recorded()` once the transaction has committed and passes them
to the hub; after a rollback they are dropped with the session.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.models import Product
from app.db import utcnow
from app.errors import BadUserInputError
from app.events.models import Event, EventType

_SESSION_KEY = "fleet.recorded_events"
_CURSOR_PREFIX = "event:"
MAX_EVENT_SEQ = 2**63 - 1  # `seq` is a BIGINT


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


async def record_event(
    session: AsyncSession,
    *,
    product_id: str,
    type: EventType,
    entity_id: int,
    from_state: str | None = None,
    to_state: str | None = None,
    payload: dict[str, Any] | None = None,
) -> Event:
    """Append an event to the outbox.  Call it last in a unit of work where possible:
    the product row it updates stays locked until commit, which is what keeps a
    product's sequence in commit order on PostgreSQL."""
    seq = (
        await session.execute(
            update(Product)
            .where(Product.id == product_id)
            .values(last_event_seq=Product.last_event_seq + 1)
            .returning(Product.last_event_seq)
            .execution_options(synchronize_session=False)
        )
    ).scalar_one()
    event = Event(
        product_id=product_id,
        seq=seq,
        type=type,
        entity_id=entity_id,
        from_state=from_state,
        to_state=to_state,
        payload=payload or {},
        created_at=utcnow(),
    )
    session.add(event)
    session.info.setdefault(_SESSION_KEY, []).append(event)
    return event


def take_recorded(session: AsyncSession) -> list[EventRecord]:
    """The events recorded in `session`'s committed transaction, in sequence order."""
    events: list[Event] = session.info.pop(_SESSION_KEY, [])
    return sorted((EventRecord.from_model(e) for e in events), key=lambda r: r.seq)


def discard_recorded(session: AsyncSession) -> None:
    session.info.pop(_SESSION_KEY, None)
