"""Keyset pagination over ascending integer ids, with opaque cursors (DESIGN §6).

A `Page` carries every node's cursor, so a GraphQL connection can answer both
`nodes` and Relay's `edges { cursor node }` with `pageInfo { startCursor endCursor
hasNextPage hasPreviousPage }`.
"""

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
    """One page: `nodes` in order, `cursors[i]` the cursor of `nodes[i]`;
    `has_previous_page` is True when the page was read after a cursor (there were
    nodes before it: Relay allows that answer for forward paging)."""

    nodes: Sequence[T]
    cursors: Sequence[str]
    has_next_page: bool
    has_previous_page: bool = False

    @property
    def start_cursor(self) -> str | None:
        return self.cursors[0] if self.cursors else None

    @property
    def end_cursor(self) -> str | None:
        return self.cursors[-1] if self.cursors else None


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


def make_page(
    kind: str, rows: Sequence[T], first: int, ident: Callable[[T], int],
    *, after: str | None = None,
) -> Page[T]:
    """`rows` were fetched with `limit first + 1`; the extra row only says there is more.
    `after` is the cursor the page was read after (None for a first page)."""
    nodes = rows[:first]
    return Page(
        nodes=nodes,
        cursors=[encode_cursor(kind, ident(node)) for node in nodes],
        has_next_page=len(rows) > first,
        has_previous_page=after is not None,
    )

