"""Per-token quotas on long-lived things: open websockets and live subscriptions
(DESIGN §8), counted in this instance's memory.

A token is identified by the sha256 of its secret (`app.auth.service.hash_token`),
so the count needs no database.  Over a quota: `RateLimitedError` (`RATE_LIMITED`);
a websocket refused that way is closed with code 4429.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from app.errors import RateLimitedError


class TokenQuotas:
    def __init__(self) -> None:
        self.websockets: Counter[str] = Counter()
        self.subscriptions: Counter[str] = Counter()

    def open_websocket(self, token_key: str, limit: int) -> None:
        """Count one more open websocket of the token; `RateLimitedError` when it
        already has `limit` open (nothing is counted then)."""
        if self.websockets[token_key] >= limit:
            raise RateLimitedError(
                f"this token already has {limit} open websockets (FLEET_MAX_WEBSOCKETS_PER_TOKEN)"
            )
        self.websockets[token_key] += 1

    def close_websocket(self, token_key: str) -> None:
        self.websockets[token_key] -= 1
        if self.websockets[token_key] <= 0:
            del self.websockets[token_key]

    @contextmanager
    def subscription(self, token_key: str | None, limit: int) -> Iterator[None]:
        """Hold one of the token's `limit` live subscriptions for the block;
        `RateLimitedError` when all are taken."""
        key = token_key or "anonymous"
        if self.subscriptions[key] >= limit:
            raise RateLimitedError(
                f"this token already has {limit} live subscriptions "
                "(FLEET_MAX_SUBSCRIPTIONS_PER_TOKEN)"
            )
        self.subscriptions[key] += 1
        try:
            yield
        finally:
            self.subscriptions[key] -= 1
            if self.subscriptions[key] <= 0:
                del self.subscriptions[key]
