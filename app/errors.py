"""The one exception root of the service.

Every error a client may see is a `FleetError`; each subclass carries its GraphQL
error code.  The `extensions` property is picked up by graphql-core when the error
is raised inside a resolver, so domain code never imports GraphQL.  Anything else
that escapes is masked as `INTERNAL_SERVER_ERROR` by the GraphQL layer and logged.
"""

from __future__ import annotations

from typing import Any

QUOTE_MAX = 100  # characters of client input an error message repeats


def quote(value: object, limit: int = QUOTE_MAX) -> str:
    """`value` as an error message may repeat it: at most `limit` characters (then
    "…"), and always encodable (a lone surrogate becomes a `\\udXXX` escape)."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class FleetError(Exception):
    code = "INTERNAL_SERVER_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def extensions(self) -> dict[str, Any]:
        return {"code": self.code}


class UnauthenticatedError(FleetError):
    code = "UNAUTHENTICATED"


class ForbiddenError(FleetError):
    code = "FORBIDDEN"


class NotFoundError(FleetError):
    code = "NOT_FOUND"

    def __init__(self, kind: str, ident: object) -> None:
        super().__init__(f"{kind} {quote(ident)} not found")
        self.kind = kind


class BadUserInputError(FleetError):
    code = "BAD_USER_INPUT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field

    @property
    def extensions(self) -> dict[str, Any]:
        return {"code": self.code, "field": self.field}


class ConflictError(FleetError):
    code = "CONFLICT"


class StoreUnavailableError(FleetError):
    """The database could not serve the request (busy, unreachable); safe to retry."""

    code = "SERVICE_UNAVAILABLE"


class RateLimitedError(FleetError):
    """Too many requests, connections or subscriptions for one token or address."""

    code = "RATE_LIMITED"


class QueryRefusedError(FleetError):
    """A document that is valid GraphQL but refused before execution (too costly,
    ambiguous); reported like a validation failure."""

    code = "GRAPHQL_VALIDATION_FAILED"

    def __init__(self, message: str, extensions: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self._extra = extensions or {}

    @property
    def extensions(self) -> dict[str, Any]:
        return {"code": self.code, **self._extra}
