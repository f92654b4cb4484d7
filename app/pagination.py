"""Keyset pagination over ascending integer ids, with opaque cursors."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from app.errors import BadUserInputError

T = TypeVar("T")

# Ids are INTEGER columns (32-bit on PostgreSQL); no real row has a larger id.
MAX_CURSOR_ID = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    nodes: Sequence[T]
    end_cursor: str | None
    has_next_page: bool


def encode_cursor(kind: str, ident: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{ident}".encode()).decode()


def decode_cursor(kind: str, cursor: str | None, field: str = "after") -> int | None:
    if cursor is None:
        return None
    try:
        prefix, _, ident = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise BadUserInputError(field, "not a valid cursor") from exc
    # ASCII digits only (str.isdigit() also accepts "²", which int() refuses), and
    # within the range of the 32-bit INTEGER id columns, so that a forged cursor is a
    # BAD_USER_INPUT rather than a failed query.
    if prefix != kind or not (ident.isascii() and ident.isdigit()) or len(ident) > 10:
        raise BadUserInputError(field, "not a valid cursor")
    if int(ident) > MAX_CURSOR_ID:
        raise BadUserInputError(field, "not a valid cursor")
    return int(ident)


def make_page(kind: str, rows: Sequence[T], first: int, ident: Callable[[T], int]) -> Page[T]:
    """`rows` were fetched with `limit first + 1`; the extra row only says there is more."""
    nodes = rows[:first]
    end = encode_cursor(kind, ident(nodes[-1])) if nodes else None
    return Page(nodes=nodes, end_cursor=end, has_next_page=len(rows) > first)

