"""GraphQL IDs are the decimal row ids; anything else names nothing."""

from __future__ import annotations

from app.errors import NotFoundError

_MAX_ID = 2**31 - 1  # ids are 32-bit INTEGER columns


def parse_id(value: str) -> int | None:
    if not value.isascii() or not value.isdigit() or len(value) > 10:
        return None
    ident = int(value)
    return ident if 0 < ident <= _MAX_ID else None


def require_id(kind: str, value: str) -> int:
    ident = parse_id(value)
    if ident is None:
        raise NotFoundError(kind, value)
    return ident
