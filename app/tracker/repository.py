"""All queries on items and comments.  Every query is scoped to one product."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import aliased

from app.db import JsonArrayContains
from app.tracker.models import Comment, CommentKind, Item, ItemStatus

# The tables themselves, for the echo's Core statements (no ORM state to keep).
ITEMS: Table = Item.__table__  # type: ignore[assignment]
COMMENTS: Table = Comment.__table__  # type: ignore[assignment]


async def get_item(
    session: AsyncSession, product_id: str, item_id: int, *, for_update: bool = False
) -> Item | None:
    stmt = select(Item).where(Item.product_id == product_id, Item.id == item_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_items(
    session: AsyncSession, product_id: str, item_ids: Sequence[int]
) -> Sequence[Item]:
    stmt = select(Item).where(Item.product_id == product_id, Item.id.in_(item_ids))
    return (await session.execute(stmt)).scalars().all()


async def list_items(
    session: AsyncSession,
    product_id: str,
    *,
    status: ItemStatus | None,
    label: str | None,
    after_id: int | None,
    limit: int,
) -> Sequence[Item]:
    stmt = select(Item).where(Item.product_id == product_id)
    if status is not None:
        stmt = stmt.where(Item.status == status)
    if label is not None:
        stmt = stmt.where(JsonArrayContains(Item.labels, label))
    if after_id is not None:
        stmt = stmt.where(Item.id > after_id)
    stmt = stmt.order_by(Item.id).limit(limit)
    return (await session.execute(stmt)).scalars().all()


async def first_comments_of_items(
    session: AsyncSession, product_id: str, item_ids: Sequence[int], *, limit: int
) -> Sequence[Comment]:
    """The first `limit` comments of each item, in one query (a window per item)."""
    ranked = (
        select(
            Comment,
            func.row_number()
            .over(partition_by=Comment.item_id, order_by=Comment.id)
            .label("position"),
        )
        .where(Comment.product_id == product_id, Comment.item_id.in_(item_ids))
        .subquery()
    )
    comment = aliased(Comment, ranked)
    stmt = (
        select(comment)
        .where(ranked.c.position <= limit)
        .order_by(comment.item_id, comment.id)
    )
    return (await session.execute(stmt)).scalars().all()


async def list_comments(
    session: AsyncSession, product_id: str, item_id: int, *, after_id: int | None, limit: int
) -> Sequence[Comment]:
    stmt = select(Comment).where(Comment.product_id == product_id, Comment.item_id == item_id)
    if after_id is not None:
        stmt = stmt.where(Comment.id > after_id)
    stmt = stmt.order_by(Comment.id).limit(limit)
    return (await session.execute(stmt)).scalars().all()


# The echo's writes, built once: building a statement costs as much as running it.
_ITEM_OF_PRODUCT = (ITEMS.c.product_id == bindparam("b_product_id"),
                    ITEMS.c.id == bindparam("b_item_id"))
_WRITE_BRIDGE_STATUS = update(ITEMS).where(*_ITEM_OF_PRODUCT).values(
    bridge_status=bindparam("b_bridge_status"))
_WRITE_STATUS = update(ITEMS).where(*_ITEM_OF_PRODUCT).values(
    status=bindparam("b_status"), bridge_status=bindparam("b_bridge_status"),
    updated_at=bindparam("b_updated_at"))
_INSERT_COMMENT = insert(COMMENTS).values(
    product_id=bindparam("b_product_id"), item_id=bindparam("b_item_id"),
    body=bindparam("b_body"), author=bindparam("b_author"), kind=bindparam("b_kind"),
    created_at=bindparam("b_created_at"),
).returning(COMMENTS.c.id)


async def write_bridge_status(
    session: AsyncSession | AsyncConnection, product_id: str, item_id: int,
    bridge_status: ItemStatus | None, *, status: ItemStatus | None = None,
    now: datetime | None = None,
) -> None:
    """One `UPDATE items`: record `bridge_status` (the status the bridge owns) and, when
    `status` is given, set it and `updated_at = now` too.  Core, no ORM state: the
    caller holds the item's row lock and records the status change event itself."""
    params: dict[str, object] = {"b_product_id": product_id, "b_item_id": item_id,
                                 "b_bridge_status": bridge_status}
    if status is None:
        await session.execute(_WRITE_BRIDGE_STATUS, params)
        return
    params.update(b_status=status, b_updated_at=now)
    await session.execute(_WRITE_STATUS, params)


async def insert_comment(
    session: AsyncSession | AsyncConnection, product_id: str, item_id: int, *, body: str,
    author: str, kind: CommentKind, now: datetime,
) -> int:
    """One `INSERT INTO comments … RETURNING id` for an item the caller knows exists
    (and holds); returns the new comment's id."""
    result = await session.execute(_INSERT_COMMENT, {
        "b_product_id": product_id, "b_item_id": item_id, "b_body": body, "b_author": author,
        "b_kind": kind, "b_created_at": now,
    })
    return int(result.scalar_one())
