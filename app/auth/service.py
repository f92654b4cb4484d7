"""Bearer tokens, principals and role rules (DESIGN §1).

A token is a random secret shown once; only its sha256 is stored.  Roles:
`member` works the tracker and the bridge, submits, cancels and retries jobs;
`worker` claims, heartbeats and transitions jobs; `admin` may do all of it.
Every role may read its own product.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import repository
from app.auth.models import Product, Role, Token
from app.errors import BadUserInputError, ForbiddenError, UnauthenticatedError

TOKEN_PREFIX = "fb_"
PRODUCT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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


async def authenticate(session: AsyncSession, secret: str | None) -> Principal | None:
    if not secret or len(secret) > 200:
        return None
    token = await repository.get_token_by_hash(session, hash_token(secret))
    if token is None:
        return None
    return Principal(product_id=token.product_id, role=token.role, name=token.name)


async def create_token(
    session: AsyncSession, *, product_id: str, role: Role, name: str | None = None
) -> str:
    """Create a token (and the product, if new); return the secret, which is not stored."""
    if not PRODUCT_ID_PATTERN.match(product_id):
        raise BadUserInputError(
            "product", "use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    if await repository.get_product(session, product_id) is None:
        session.add(Product(id=product_id))
        await session.flush()
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(
        Token(
            product_id=product_id,
            role=role,
            name=name or f"{role.value}-{secrets.token_hex(3)}",
            token_hash=hash_token(secret),
        )
    )
    await session.flush()
    return secret
