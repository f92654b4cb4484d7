from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Enum, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, JsonDocument, UTCDateTime, utcnow


class EventType(enum.StrEnum):
    JOB_CREATED = "JOB_CREATED"
    JOB_STAGE_CHANGED = "JOB_STAGE_CHANGED"
    ITEM_CREATED = "ITEM_CREATED"
    ITEM_STATUS_CHANGED = "ITEM_STATUS_CHANGED"
    COMMENT_ADDED = "COMMENT_ADDED"


class Event(Base):
    """One outbox row per change, written in the transaction of the change.

    `seq` numbers a product's events without gaps, in commit order: it is taken
    from the product row, whose lock is held until the transaction ends.
    """

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("product_id", "seq"),
        Index("ix_events_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[str] = mapped_column(ForeignKey("products.id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[EventType] = mapped_column(
        Enum(EventType, native_enum=False, length=32, name="event_type")
    )
    entity_id: Mapped[int] = mapped_column(Integer)
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str | None] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JsonDocument, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
