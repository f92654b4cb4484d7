from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.models import Product, Token


async def get_product(session: AsyncSession, product_id: str) -> Product | None:
    return await session.get(Product, product_id)


async def get_token_by_hash(session: AsyncSession, token_hash: str) -> Token | None:
    result = await session.execute(select(Token).where(Token.token_hash == token_hash))
    return result.scalar_one_or_none()
