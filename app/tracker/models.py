from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Enum, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, JsonDocument, UTCDateTime, utcnow


class ItemStatus(enum.StrEnum):
    TODO = "TODO"
    IN_PROGRESS = "IN_PROGRESS"
    BLOCKED = "BLOCKED"
    DONE = "DONE"
    CANCELLED = "CANCELLED"


class CommentKind(enum.StrEnum):
    USER = "USER"
    SYSTEM = "SYSTEM"


ITEM_STATUS = Enum(ItemStatus, native_enum=False, length=16, name="item_status")


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (Index("ix_items_product_status_id", "product_id", "status", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[str] = mapped_column(ForeignKey("products.id"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[ItemStatus] = mapped_column(ITEM_STATUS, default=ItemStatus.TODO)
    labels: Mapped[list[str]] = mapped_column(JsonDocument, default=list)
    # The status the bridge's echo last wrote onto this item (None before the first
    # echo).  The echo owns the status only while the item still shows it (DESIGN §4).
    bridge_status: Mapped[ItemStatus | None] = mapped_column(ITEM_STATUS)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Comment(Base):
    __tablename__ = "comments"
    __table_args__ = (Index("ix_comments_item_id_id", "item_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[str] = mapped_column(ForeignKey("products.id"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    body: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(100))
    kind: Mapped[CommentKind] = mapped_column(
        Enum(CommentKind, native_enum=False, length=16, name="comment_kind")
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
