"""The schema, its guards (depth, token and alias limits) and error handling.

Errors the service raises on purpose (`FleetError`) reach the client with their
`extensions.code`.  A document that does not parse gets `GRAPHQL_PARSE_FAILED`;
one that does not validate (or breaks a guard) `GRAPHQL_VALIDATION_FAILED`.
Anything else is logged with its traceback and masked as `INTERNAL_SERVER_ERROR`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import strawberry
from graphql import GraphQLError, GraphQLSyntaxError
from starlette.requests import Request
from strawberry.extensions import (
    AddValidationRules,
    MaskErrors,
    MaxTokensLimiter,
    SchemaExtension,
)
from strawberry.extensions.max_aliases import create_validator as alias_limit_rule
from strawberry.extensions.query_depth_limiter import create_validator as depth_limit_rule
from strawberry.extensions.runner import SchemaExtensionsRunner
from strawberry.types import ExecutionContext

from app.errors import FleetError, quote
from app.graphql.delivery import SharedEventExecutor
from app.graphql.documents import CachedDocuments
from app.graphql.guards import RequestGuards
from app.graphql.hooks import CachedHooksRunner
from app.graphql.mutations import Mutation
from app.graphql.queries import Query
from app.graphql.snapshot import OneSnapshotPerQuery
from app.graphql.subscriptions import Subscription
from app.observability import note_operation
from app.uow import is_store_failure, store_unavailable

logger = logging.getLogger("app.graphql")

MAX_DEPTH = 12
MAX_TOKENS = 5_000
MAX_ALIASES = 50
TOKEN_LIMIT_MESSAGE = "Syntax Error: Document contains more than"
MAX_MESSAGE = 300  # characters of an error message
# Parsed documents and their validation results are kept per process
# (app.graphql.documents: LRU, bounded); validation results are keyed by the rules,
# so they hit only because the rules below are built once.

# The depth and alias limits as validation rule classes, built once for the process.
# strawberry's QueryDepthLimiter/MaxAliasesLimiter build a new rule class per instance,
# i.e. per request, which makes every validation-cache key unique (issue 12 item 3).
LIMIT_RULES = (depth_limit_rule(MAX_DEPTH, None), alias_limit_rule(MAX_ALIASES))


class LimitRules(AddValidationRules):
    """The depth (MAX_DEPTH) and alias (MAX_ALIASES) limits; GRAPHQL_VALIDATION_FAILED."""

    def __init__(self) -> None:
        super().__init__(list(LIMIT_RULES))


def _is_unexpected(error: GraphQLError) -> bool:
    original = error.original_error
    return original is not None and not isinstance(original, FleetError | GraphQLError)


def request_error_code(error: GraphQLError) -> str:
    """The code of an error found before execution: a syntax error is
    GRAPHQL_PARSE_FAILED, anything else (validation, guards) GRAPHQL_VALIDATION_FAILED."""
    syntax = isinstance(error, GraphQLSyntaxError) or isinstance(
        error.original_error, GraphQLSyntaxError
    )
    # The token guard (MaxTokensLimiter) stops graphql-core's parser with a syntax
    # error; it is a guard, like depth and aliases, not a document that cannot parse.
    if syntax and not error.message.startswith(TOKEN_LIMIT_MESSAGE):
        return "GRAPHQL_PARSE_FAILED"
    return "GRAPHQL_VALIDATION_FAILED"


class MaskUnexpectedErrors(MaskErrors):
    def __init__(self) -> None:
        super().__init__(should_mask_error=_is_unexpected, error_message="Unexpected error.")

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        original = error.original_error
        if original is not None and is_store_failure(original):
            # A store failure that escaped app.uow's translation: still not a 500.
            unavailable = store_unavailable(original)
            return GraphQLError(
                unavailable.message, nodes=error.nodes, source=error.source,
                positions=error.positions, path=error.path, original_error=unavailable,
                extensions=unavailable.extensions,
            )
        logger.error(
            "unexpected error at %s: %r", ".".join(map(str, error.path or [])), original,
            exc_info=(type(original), original, original.__traceback__) if original else None,
        )
        masked = super().anonymise_error(error)
        masked.extensions = {"code": "INTERNAL_SERVER_ERROR"}
        return masked

    def _process_result(self, result: object) -> None:
        """strawberry's, without its `isinstance` against a runtime-checkable Protocol
        whose one member is `errors` (typing's check costs ~2 % of a request's CPU):
        the same test, as an attribute look-up."""
        errors = getattr(result, "errors", None)
        if errors:
            result.errors = self._process_errors(errors)  # type: ignore[attr-defined]

    def _process_errors(self, errors: list[GraphQLError]) -> list[GraphQLError]:
        processed = super()._process_errors(errors)
        for error in processed:
            # graphql-core's messages repeat names and values from the document; keep
            # them short (DESIGN §8: a message quotes at most ~100 characters of input).
            if len(error.message) > MAX_MESSAGE:
                error.message = quote(error.message, MAX_MESSAGE)
            if not error.extensions or "code" not in error.extensions:
                error.extensions = {**(error.extensions or {}), "code": request_error_code(error)}
        return processed


class NoteOperationName(SchemaExtension):
    """Leave the operation's name (the client's `operationName`, or the name of the
    document's only operation) for the request log and metrics (app.observability)."""

    def on_operation(self) -> Iterator[None]:
        yield
        request = getattr(self.execution_context.context, "request", None)
        if isinstance(request, Request):
            try:
                name = self.execution_context.operation_name
            except Exception:  # a document that did not parse has no operations
                name = None
            note_operation(request.scope, name)


class FleetSchema(strawberry.Schema):
    def create_extensions_runner(
        self, execution_context: ExecutionContext, extensions: list[SchemaExtension]
    ) -> SchemaExtensionsRunner:
        """The extensions' hooks wrapped once per class (app.graphql.hooks)."""
        return CachedHooksRunner(execution_context=execution_context, extensions=extensions)

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        """Expected errors are answers, not incidents; unexpected ones are logged when
        they are masked (MaskUnexpectedErrors), so nothing to do here."""


schema = FleetSchema(
    query=Query,
    mutation=Mutation,
    subscription=Subscription,
    extensions=[
        NoteOperationName,
        lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
        LimitRules,
        CachedDocuments,  # after the limits: they set the parse options and rules
        RequestGuards,  # before the snapshot opens: a refusal reads nothing
        OneSnapshotPerQuery,
        MaskUnexpectedErrors,
    ],
    # Subscriptions: one execution per event and distinct subscription (app.graphql.delivery).
    execution_context_class=SharedEventExecutor,
)
