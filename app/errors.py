"""The one exception root of the service.

Every error a client may see is a `FleetError`; each subclass carries its GraphQL
error code.  The `extensions` property is picked up by graphql-core when the error
is raised inside a resolver, so domain code never imports GraphQL.  Anything else
that escapes is masked as `INTERNAL_SERVER_ERROR` by the GraphQL layer and logged.
"""

from __future__ import annotations

from typing import Any


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
        super().__init__(f"{kind} {ident} not found")
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
