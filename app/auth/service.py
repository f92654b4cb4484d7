"""Bearer tokens, principals and role rules (DESIGN §1).

A token is a random secret shown once; only its sha256 is stored.  It may expire
(`expires_at`) and be revoked (`revoked_at`); an expired or revoked token is refused
exactly like an unknown one.  Roles:
`member` works the tracker and the bridge, submits, cancels and retries jobs;
`worker` claims, heartbeats and transitions jobs; `admin` may do all of it.
Every role may read its own product.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import repository, revocations
from app.auth.models import Product, Role, Token
from app.db import utcnow
from app.errors import BadUserInputError, ForbiddenError, NotFoundError, UnauthenticatedError

TOKEN_PREFIX = "fb_"
PRODUCT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_MAX = 100
DURATION_PATTERN = re.compile(r"^\s*(\d{1,9})\s*([smhdw])\s*$", re.IGNORECASE)
DURATION_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 7 * 86_400}
MAX_LIFETIME = timedelta(days=3_650)


class Permission(enum.Enum):
    READ = "read"
    TRACKER = "tracker"  # items, comments, ingest, echo, submit/cancel/retry jobs
    WORK = "work"  # claim, heartbeat, transition


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.MEMBER: frozenset({Permission.READ, Permission.TRACKER}),
    Role.WORKER: frozenset({Permission.READ, Permission.WORK}),
    Role.ADMIN: frozenset(Permission),
}


@dataclass(frozen=True, slots=True)
class Principal:
    product_id: str
    role: Role
    name: str
    token_id: int = 0
    expires_at: datetime | None = None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def require(self, permission: Permission) -> Principal:
        if permission not in ROLE_PERMISSIONS[self.role]:
            raise ForbiddenError(f"the {self.role.value} role may not do this")
        return self


def require(principal: Principal | None, permission: Permission) -> Principal:
    if principal is None:
        raise UnauthenticatedError("a valid bearer token is required")
    return principal.require(permission)


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `45m`, `90s`, `2w` (one number, one unit) → a timedelta.

    Raises BadUserInputError("expires-in") for anything else, for zero and for more
    than ten years."""
    match = DURATION_PATTERN.match(text)
    if match is None:
        raise BadUserInputError(
            "expires-in", f"{text!r} is not a duration; use a number and a unit: "
            "s, m, h, d or w (for example 30d or 12h)"
        )
    value = timedelta(seconds=int(match[1]) * DURATION_UNITS[match[2].lower()])
    if not timedelta(0) < value <= MAX_LIFETIME:
        raise BadUserInputError("expires-in", "must be more than 0 and at most 3650d")
    return value


class TokenState(enum.StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


def token_state(token: Token, now: datetime) -> TokenState:
    """Revoked wins over expired; a token without `expires_at` never expires."""
    if token.revoked_at is not None:
        return TokenState.REVOKED
    if token.expires_at is not None and token.expires_at <= now:
        return TokenState.EXPIRED
    return TokenState.ACTIVE


def principal_of(token: Token) -> Principal:
    return Principal(product_id=token.product_id, role=token.role, name=token.name,
                     token_id=token.id, expires_at=token.expires_at)


async def authenticate(
    session: AsyncSession, secret: str | None, now: datetime | None = None
) -> Principal | None:
    """The principal of an active token, or None (unknown, expired or revoked)."""
    if not secret or len(secret) > 200:
        return None
    token = await repository.get_token_by_hash(session, hash_token(secret))
    if token is None or token_state(token, now or utcnow()) is not TokenState.ACTIVE:
        return None
    return principal_of(token)


async def create_token(
    session: AsyncSession,
    *,
    product_id: str,
    role: Role,
    name: str | None = None,
    expires_in: timedelta | None = None,
    replace: bool = False,
) -> str:
    """Create a token (and the product, if new); return the secret, which is not stored.

    `expires_in`: lifetime (None: never expires).  `replace`: first revoke the
    product's active tokens with the same `name` (how `make run` keeps one demo token
    per role instead of piling them up).  Raises BadUserInputError on a bad product
    id or name."""
    if not PRODUCT_ID_PATTERN.match(product_id):
        raise BadUserInputError(
            "product", "use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    if name is not None and not 0 < len(name) <= NAME_MAX:
        raise BadUserInputError("name", f"use 1-{NAME_MAX} characters")
    if await repository.get_product(session, product_id) is None:
        session.add(Product(id=product_id))
        await session.flush()
    now = utcnow()
    if replace and name is not None:
        earlier = await repository.active_tokens_named(session, product_id, name, now)
        await revoke_tokens(session, [token.id for token in earlier], now)
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(
        Token(
            product_id=product_id,
            role=role,
            name=name or f"{role.value}-{secrets.token_hex(3)}",
            token_hash=hash_token(secret),
            created_at=now,
            expires_at=now + expires_in if expires_in is not None else None,
        )
    )
    await session.flush()
    return secret


async def list_tokens(
    session: AsyncSession, product_id: str | None = None, *, include_inactive: bool = False,
    now: datetime | None = None,
) -> list[Token]:
    """Tokens in id order (of one product, if given); active ones only unless asked."""
    rows = await repository.list_tokens(session, product_id)
    if include_inactive:
        return rows
    now = now or utcnow()
    return [row for row in rows if token_state(row, now) is TokenState.ACTIVE]


async def revoke_token(session: AsyncSession, token_id: int) -> tuple[Token, bool]:
    """Revoke one token; returns it and whether this call revoked it (False when it
    already was).  Raises NotFoundError.  The revoke is announced to every instance
    (see `revoke_tokens`)."""
    token = await session.get(Token, token_id)
    if token is None:
        raise NotFoundError("token", token_id)
    if token.revoked_at is not None:
        return token, False
    await revoke_tokens(session, [token.id], utcnow())
    await session.refresh(token)
    return token, True


async def revoke_tokens(session: AsyncSession, token_ids: Sequence[int], now: datetime) -> None:
    """Mark tokens revoked, and announce it to every running instance at commit: on
    PostgreSQL the same transaction sends a NOTIFY on `TOKEN_CHANNEL` (app.auth.guard
    drops the cache entries and closes the tokens' websockets); on SQLite the commit
    is followed by a bump of the database's sidecar file (app.auth.revocations),
    which empties the servers' token caches.  Open websockets on SQLite close at the
    next re-check (FLEET_TOKEN_CHECK_SECONDS)."""
    if not token_ids:
        return
    await repository.mark_revoked(session, token_ids, now)
    await repository.notify_revoked(session, token_ids)
    revocations.announce_after_commit(session)


async def inactive_tokens(
    session: AsyncSession, token_ids: Sequence[int], now: datetime | None = None
) -> set[int]:
    """Which of `token_ids` may no longer be used: revoked, expired or deleted."""
    rows = await repository.tokens_by_id(session, token_ids)
    now = now or utcnow()
    active = {row.id for row in rows if token_state(row, now) is TokenState.ACTIVE}
    return set(token_ids) - active
