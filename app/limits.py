"""Input bounds (DESIGN §8) and the checks that enforce them.

Every check raises `BadUserInputError` naming the offending field, as the client
spelled it (for example `input.title`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from app.errors import BadUserInputError

TITLE_MAX = 200
DESCRIPTION_MAX = 20_000
BODY_MD_MAX = 100_000
LABELS_MAX = 30
LABEL_MAX = 100
COMMENT_MAX = 10_000
PAGE_SIZE_MAX = 200
LEASE_SECONDS_MIN = 5
LEASE_SECONDS_MAX = 6 * 3_600
WORKER_ID_MAX = 200
NAMES_MAX = 50  # capabilities, engine classes, profiles per job or worker
NAME_MAX = 100
KIND_MAX = 64
REASON_MAX = 2_000
IDEMPOTENCY_KEY_MAX = 200
MAX_ATTEMPTS_MAX = 20
BUDGET_MAX = 1_000_000.0
COST_MAX = 1_000_000.0
TOKENS_MAX = 2**31 - 1  # GraphQL Int
# Idempotency keys the bridge gives the jobs it ingests (`tracker-<item id>`); a
# client's own keys may not start with it, so no client job can take an item's place.
TRACKER_KEY_PREFIX = "tracker-"


def text(field: str, value: str, *, max_len: int, required: bool = False) -> str:
    if required and not value.strip():
        raise BadUserInputError(field, "must not be empty")
    if len(value) > max_len:
        raise BadUserInputError(field, f"must be at most {max_len} characters")
    if "\x00" in value:
        raise BadUserInputError(field, "must not contain NUL characters")
    return value


def optional_text(field: str, value: str | None, *, max_len: int) -> str | None:
    if value is None:
        return None
    return text(field, value, max_len=max_len, required=True)


def names(field: str, values: Sequence[str] | None, *, max_items: int = NAMES_MAX,
          max_len: int = NAME_MAX) -> tuple[str, ...]:
    """A bounded list of short non-empty names, de-duplicated, order kept."""
    if values is None:
        return ()
    if len(values) > max_items:
        raise BadUserInputError(field, f"must have at most {max_items} entries")
    seen: dict[str, None] = {}
    for value in values:
        text(field, value, max_len=max_len, required=True)
        seen.setdefault(value.strip(), None)
    return tuple(seen)


def integer(field: str, value: int, *, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise BadUserInputError(field, f"must be between {lo} and {hi}")
    return value


def number(field: str, value: float, *, lo: float, hi: float) -> float:
    if math.isnan(value) or not lo <= value <= hi:
        raise BadUserInputError(field, f"must be between {lo:g} and {hi:g}")
    return value


PAGE_SIZE_DEFAULT = 50


def page_size(value: int | None, field: str = "first") -> int:
    """`first` of a connection; null means the default page size."""
    if value is None:
        return PAGE_SIZE_DEFAULT
    return integer(field, value, lo=1, hi=PAGE_SIZE_MAX)


def idempotency_key(field: str, value: str | None) -> str | None:
    """A client's idempotency key: bounded text, not in the bridge's reserved space."""
    key = optional_text(field, value, max_len=IDEMPOTENCY_KEY_MAX)
    if key is not None and key.startswith(TRACKER_KEY_PREFIX):
        raise BadUserInputError(
            field, f"keys starting with {TRACKER_KEY_PREFIX!r} are reserved for the tracker bridge"
        )
    return key
