"""All queries on the event log."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.models import Product
from app.events.models import Event


async def events_after(
    session: AsyncSession, product_id: str, after_seq: int, *, limit: int,
    through_seq: int | None = None,
) -> Sequence[Event]:
    stmt = select(Event).where(Event.product_id == product_id, Event.seq > after_seq)
    if through_seq is not None:
        stmt = stmt.where(Event.seq <= through_seq)
    return (await session.execute(stmt.order_by(Event.seq).limit(limit))).scalars().all()


async def last_seq(session: AsyncSession, product_id: str) -> int:
    """The product's last event sequence number (0 before its first event); one
    primary-key read."""
    last = (
        await session.execute(select(Product.last_event_seq).where(Product.id == product_id))
    ).scalar_one_or_none()
    return last or 0


async def log_bounds(session: AsyncSession, product_id: str) -> tuple[int, int | None]:
    """(the product's last sequence number, the oldest one still stored)."""
    last = (
        await session.execute(select(Product.last_event_seq).where(Product.id == product_id))
    ).scalar_one_or_none()
    oldest = (
        await session.execute(select(func.min(Event.seq)).where(Event.product_id == product_id))
    ).scalar_one_or_none()
    return (last or 0, oldest)


async def delete_older_than(session: AsyncSession, cutoff: datetime) -> int:
    result = await session.execute(delete(Event).where(Event.created_at < cutoff))
    return int(getattr(result, "rowcount", 0) or 0)
