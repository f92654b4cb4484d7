"""The strawberry ASGI view: builds the per-request context and authenticates.

Over HTTP the token comes in the `Authorization: Bearer …` header; over a
websocket in the `connection_init` payload (`{"authorization": "Bearer …"}`), and
an anonymous or unknown token is refused there, before any subscription starts.

HTTP follows the GraphQL-over-HTTP conventions of app.graphql.transport:
`application/graphql-response+json` when the client prefers it, request errors as
4xx without `data`, subscriptions refused (websocket only), a refused request
answered as a JSON `{"errors": [...]}` body with `extensions.code` BAD_REQUEST.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from cross_web import AsyncHTTPRequestAdapter, HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError, MissingQueryError
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.subscriptions.protocols.graphql_transport_ws.types import ConnectionInitMessage
from strawberry.subscriptions.protocols.graphql_ws.types import (
    ConnectionInitMessage as LegacyInitMessage,
)
from strawberry.types import ExecutionResult
from strawberry.types.graphql import OperationType
from strawberry.types.unset import UnsetType

from app.auth.service import Principal, hash_token, parse_bearer
from app.errors import RateLimitedError, StoreUnavailableError
from app.graphql.context import Context, Services
from app.graphql.delivery import SharedFramesLegacyWS, SharedFramesTransportWS
from app.graphql.transport import (
    GRAPHQL_RESPONSE_JSON,
    SUBSCRIPTION_OVER_HTTP,
    is_request_error,
    prefers_graphql_response_json,
)
from app.observability import note_outcome, note_principal
from app.web import GRAPHIQL_HTML, html_page

# JSON nested deeper than this is refused like invalid JSON (400, websocket 4400);
# the service's own documents nest a few levels.
MAX_JSON_DEPTH = 64
RATE_LIMITED_CLOSE = 4429
# The store could not check the token at `connection_init`: "Try Again Later" (RFC 6455
# close code registry, 1013), never an unhandled error that drops the connection.
STORE_UNAVAILABLE_CLOSE = 1013


def json_depth_exceeds(value: object, limit: int) -> bool:
    """True when `value` (decoded JSON) nests lists/objects more than `limit` deep."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            inner = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in inner if isinstance(child, dict | list))
    return False


def _release_websocket(context: Context) -> None:
    if context.websocket_slot is not None:
        context.services.quotas.close_websocket(context.websocket_slot)
        context.websocket_slot = None


class TransportWSHandler(SharedFramesTransportWS[Context, None]):
    """`graphql-transport-ws` with the per-token websocket quota: over it the
    connection is closed with 4429 and a reason, and a held slot is released when
    the connection ends.  When the store cannot check the token the connection is
    closed with 1013 (try again later) and the reason, never dropped by an error."""

    async def handle(self) -> None:
        try:
            await super().handle()
        finally:
            _release_websocket(self.context)

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        try:
            await super().handle_connection_init(message)
        except RateLimitedError as exc:
            await self.websocket.close(code=RATE_LIMITED_CLOSE, reason=exc.message[:120])
        except StoreUnavailableError as exc:
            await self.websocket.close(code=STORE_UNAVAILABLE_CLOSE, reason=exc.message[:120])


class RequestRefused(HTTPException):
    """A request refused before execution, with the headers its status calls for."""

    def __init__(self, status_code: int, reason: str, headers: dict[str, str]) -> None:
        super().__init__(status_code, reason)
        self.headers = headers


class LegacyGraphQLWSHandler(SharedFramesLegacyWS[Context, None]):
    """The legacy `graphql-ws` protocol has no init timeout of its own in strawberry;
    apply the view's `connection_init_wait_timeout` here too (close code 4408, as
    `graphql-transport-ws` does), so an idle unauthenticated socket cannot linger.
    The per-token websocket quota applies as for `graphql-transport-ws`."""

    async def handle(self) -> None:
        timer = asyncio.create_task(self._close_unless_acknowledged())
        try:
            await super().handle()
        finally:
            _release_websocket(self.context)
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer

    async def handle_connection_init(self, message: LegacyInitMessage) -> None:
        try:
            await super().handle_connection_init(message)
        except (RateLimitedError, StoreUnavailableError) as exc:
            code = (RATE_LIMITED_CLOSE if isinstance(exc, RateLimitedError)
                    else STORE_UNAVAILABLE_CLOSE)
            await self.send_message({"type": "connection_error", "payload": {
                "message": exc.message, "extensions": exc.extensions}})
            await self.websocket.close(code=code, reason=exc.message[:120])

    async def _close_unless_acknowledged(self) -> None:
        await asyncio.sleep(self.view.connection_init_wait_timeout.total_seconds())
        if not self.connection_acknowledged:
            with contextlib.suppress(Exception):
                await self.websocket.close(code=4408, reason="Connection initialisation timeout")


class FleetGraphQL(GraphQL[Context, None]):
    graphql_ws_handler_class = LegacyGraphQLWSHandler
    graphql_transport_ws_handler_class = TransportWSHandler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            try:
                await super().__call__(scope, receive, send)
            finally:
                if scope["type"] == "websocket":  # the connection is over: stop tracking it
                    services: Services = scope["app"].state.services
                    services.tokens.forget(scope)
            return
        request = Request(scope=scope, receive=receive)
        graphql_json = prefers_graphql_response_json(request.headers.get("accept"))
        response: Response
        try:
            response = await self.run(request)
        except HTTPException as exc:
            response = JSONResponse(
                {"errors": [{"message": exc.reason, "extensions": {"code": "BAD_REQUEST"}}]},
                status_code=exc.status_code,
                headers=exc.headers if isinstance(exc, RequestRefused) else None,
            )
        if graphql_json and response.media_type == "application/json":
            response.headers["content-type"] = GRAPHQL_RESPONSE_JSON
            if getattr(request.state, "graphql_request_error", False):
                response.status_code = 400
        await response(scope, receive, send)

    async def execute_operation(
        self,
        request: Request,
        request_adapter: AsyncHTTPRequestAdapter,
        request_data: GraphQLRequestData | list[GraphQLRequestData],
        context: Context,
        root_value: None,
        sub_response: Response,
    ) -> Any:
        """Subscriptions stream over the websocket only: strawberry's HTTP streaming
        transports (multipart, SSE) are refused like a subscription over POST."""
        if isinstance(request_data, GraphQLRequestData) and request_data.protocol != "http":
            raise HTTPException(400, SUBSCRIPTION_OVER_HTTP)
        return await super().execute_operation(
            request, request_adapter, request_data, context, root_value, sub_response
        )

    async def execute_single(
        self,
        request: Request,
        request_adapter: AsyncHTTPRequestAdapter,
        sub_response: Response,
        context: Context,
        root_value: None,
        request_data: GraphQLRequestData,
    ) -> ExecutionResult:
        """strawberry's, without subscriptions over HTTP (400, saying where they are
        served) and with a mutation over GET answered 405 `Allow: POST`."""
        allowed = OperationType.from_http(request_adapter.method) - {OperationType.SUBSCRIPTION}
        if not self.allow_queries_via_get and request_adapter.method == "GET":
            allowed -= {OperationType.QUERY}
        try:
            return await self.schema.execute(
                request_data.query,
                root_value=root_value,
                variable_values=request_data.variables,
                context_value=context,
                operation_name=request_data.operation_name,
                allowed_operation_types=allowed,
                operation_extensions=request_data.extensions,
            )
        except CannotGetOperationTypeError as exc:
            raise HTTPException(400, exc.as_http_error_reason()) from exc
        except InvalidOperationTypeError as exc:
            if exc.operation_type == OperationType.SUBSCRIPTION:
                raise HTTPException(400, SUBSCRIPTION_OVER_HTTP) from exc
            if request_adapter.method == "GET" and exc.operation_type == OperationType.MUTATION:
                raise RequestRefused(
                    405, "Mutations are served over POST only", {"Allow": "POST"}
                ) from exc
            raise HTTPException(400, exc.as_http_error_reason(request_adapter.method)) from exc
        except MissingQueryError as exc:
            raise HTTPException(400, "No GraphQL query found in the request") from exc

    async def process_result(
        self, request: Request, result: ExecutionResult
    ) -> GraphQLHTTPResponse:
        """With `application/graphql-response+json`, a request error has no `data` key
        and is answered 400 (see `__call__`)."""
        body = await super().process_result(request, result)
        codes = [(error.extensions or {}).get("code") for error in result.errors or ()]
        note_outcome(request.scope, str(codes[0] or "error") if codes else "ok")
        if prefers_graphql_response_json(request.headers.get("accept")) and is_request_error(
            result.data, result.errors
        ):
            request.state.graphql_request_error = True
            return {key: value for key, value in body.items() if key != "data"}  # type: ignore[return-value]
        return body

    async def get_context(
        self, request: Request | WebSocket, response: Response | WebSocket
    ) -> Context:
        services: Services = request.app.state.services
        context = Context(services=services, request=request, response=response)
        if not isinstance(request, WebSocket):
            secret = parse_bearer(request.headers.get("authorization"))
            context.token_key = hash_token(secret) if secret else None
            try:
                context.principal = await self._authenticate(services, secret,
                                                              context.token_key)
            except StoreUnavailableError as exc:  # answered as an error, not a 500
                context.auth_failure = exc
            if context.principal is not None:
                note_principal(
                    request.scope, context.principal.product_id, context.principal.role.value
                )
        return context

    async def render_graphql_ide(self, request: Request) -> Response:
        """GraphiQL from the package's own assets (app/web/static/graphiql), built from the
        npm packages, instead of strawberry's page, which loads its scripts from a CDN and
        stays blank offline.  Its headers tab goes out as HTTP headers and, for
        subscriptions, as the `connection_init` payload read by `on_ws_connect`."""
        return html_page(GRAPHIQL_HTML)

    async def on_ws_connect(self, context: Context) -> UnsetType | dict[str, object] | None:
        params: Any = context.connection_params
        header = None
        if isinstance(params, dict):
            header = params.get("authorization") or params.get("Authorization")
        secret = parse_bearer(header) if isinstance(header, str) else None
        principal = await self._authenticate(context.services, secret)
        if principal is None or secret is None:
            raise ConnectionRejectionError({"message": "a valid bearer token is required"})
        context.principal = principal
        context.token_key = hash_token(secret)
        _release_websocket(context)  # a repeated init holds one slot, not two
        context.services.quotas.open_websocket(
            context.token_key, context.services.settings.max_websockets_per_token
        )
        context.websocket_slot = context.token_key
        if isinstance(context.request, WebSocket):  # closed (4403) when the token is revoked
            context.services.tokens.track(context.request, principal)
        return {"productId": principal.product_id, "role": principal.role.value}

    @staticmethod
    async def _authenticate(services: Services, secret: str | None,
                            key: str | None = None) -> Principal | None:
        if secret is None:
            return None
        if key is None:
            return await services.tokens.authenticate(secret)
        return await services.tokens.authenticate(secret, key=key)  # hashed once a request

    def decode_json(self, data: str | bytes) -> object:
        """JSON of a request body or websocket message.  Bytes that are not UTF-8 and
        nesting deeper than MAX_JSON_DEPTH count as invalid JSON: 400 over HTTP, close
        4400 over `graphql-transport-ws`, never a 500 or a dropped connection."""
        try:
            value = super().decode_json(data)
        except (UnicodeDecodeError, RecursionError) as exc:
            raise json.JSONDecodeError(f"not valid JSON ({type(exc).__name__})", "", 0) from exc
        if json_depth_exceeds(value, MAX_JSON_DEPTH):
            raise json.JSONDecodeError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", "", 0)
        return value

    def parse_json(self, data: str | bytes) -> Any:
        """A GraphQL request body (and its `variables`) is a JSON object, or a list for a
        batch.  strawberry would crash on a bare `null`, number or string and answer
        500; refuse those with a 400 instead."""
        value = super().parse_json(data)
        if not isinstance(value, dict | list):
            raise HTTPException(400, "The request body must be a JSON object")
        return value
