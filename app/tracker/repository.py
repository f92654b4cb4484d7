"""All queries on items and comments.  Every query is scoped to one product."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app.db import JsonArrayContains
from app.tracker.models import Comment, Item, ItemStatus


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
