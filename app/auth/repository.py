from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.models import Product, Token

# PostgreSQL NOTIFY channel announcing revoked tokens; payload: comma-separated ids.
TOKEN_CHANNEL = "fleetbridge_tokens"


async def get_product(session: AsyncSession, product_id: str) -> Product | None:
    return await session.get(Product, product_id)


async def get_token_by_hash(session: AsyncSession, token_hash: str) -> Token | None:
    result = await session.execute(select(Token).where(Token.token_hash == token_hash))
    return result.scalar_one_or_none()


async def list_tokens(session: AsyncSession, product_id: str | None) -> list[Token]:
    query = select(Token).order_by(Token.id)
    if product_id is not None:
        query = query.where(Token.product_id == product_id)
    return list((await session.execute(query)).scalars())


async def tokens_by_id(session: AsyncSession, token_ids: Sequence[int]) -> list[Token]:
    if not token_ids:
        return []
    result = await session.execute(select(Token).where(Token.id.in_(token_ids)))
    return list(result.scalars())


async def active_tokens_named(
    session: AsyncSession, product_id: str, name: str, now: datetime
) -> list[Token]:
    result = await session.execute(
        select(Token).where(
            Token.product_id == product_id, Token.name == name, Token.revoked_at.is_(None),
            or_(Token.expires_at.is_(None), Token.expires_at > now),
        )
    )
    return list(result.scalars())


async def mark_revoked(session: AsyncSession, token_ids: Sequence[int], now: datetime) -> None:
    await session.execute(
        update(Token).where(Token.id.in_(token_ids), Token.revoked_at.is_(None))
        .values(revoked_at=now)
    )


async def notify_revoked(session: AsyncSession, token_ids: Sequence[int]) -> None:
    """PostgreSQL only: NOTIFY is transactional, so the others hear of it at commit."""
    if session.get_bind().dialect.name != "postgresql":
        return
    await session.execute(
        text("SELECT pg_notify(:channel, :payload)"),
        {"channel": TOKEN_CHANNEL, "payload": ",".join(str(i) for i in token_ids)},
    )


async def touch_tokens(
    session: AsyncSession, used: dict[int, datetime], older_than: datetime
) -> None:
    """Record last use; a row already marked since `older_than` is left alone."""
    for token_id, at in used.items():
        await session.execute(
            update(Token)
            .where(Token.id == token_id,
                   or_(Token.last_used_at.is_(None), Token.last_used_at < older_than))
            .values(last_used_at=at)
        )
