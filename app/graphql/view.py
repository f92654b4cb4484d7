"""The strawberry ASGI view: builds the per-request context and authenticates.

Over HTTP the token comes in the `Authorization: Bearer …` header; over a
websocket in the `connection_init` payload (`{"authorization": "Bearer …"}`), and
an anonymous or unknown token is refused there, before any subscription starts.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from cross_web import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler
from strawberry.types.unset import UnsetType

from app.auth.service import Principal, parse_bearer
from app.errors import StoreUnavailableError
from app.graphql.context import Context, Services
from app.web import GRAPHIQL_HTML, html_page


class LegacyGraphQLWSHandler(BaseGraphQLWSHandler[Context, None]):
    """The legacy `graphql-ws` protocol has no init timeout of its own in strawberry;
    apply the view's `connection_init_wait_timeout` here too (close code 4408, as
    `graphql-transport-ws` does), so an idle unauthenticated socket cannot linger."""

    async def handle(self) -> None:
        timer = asyncio.create_task(self._close_unless_acknowledged())
        try:
            await super().handle()
        finally:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer

    async def _close_unless_acknowledged(self) -> None:
        await asyncio.sleep(self.view.connection_init_wait_timeout.total_seconds())
        if not self.connection_acknowledged:
            with contextlib.suppress(Exception):
                await self.websocket.close(code=4408, reason="Connection initialisation timeout")


class FleetGraphQL(GraphQL[Context, None]):
    graphql_ws_handler_class = LegacyGraphQLWSHandler

    async def get_context(
        self, request: Request | WebSocket, response: Response | WebSocket
    ) -> Context:
        services: Services = request.app.state.services
        context = Context(services=services, request=request, response=response)
        if not isinstance(request, WebSocket):
            try:
                context.principal = await self._authenticate(
                    services, parse_bearer(request.headers.get("authorization"))
                )
            except StoreUnavailableError as exc:  # answered as an error, not a 500
                context.auth_failure = exc
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
        principal = await self._authenticate(
            context.services, parse_bearer(header) if isinstance(header, str) else None
        )
        if principal is None:
            raise ConnectionRejectionError({"message": "a valid bearer token is required"})
        context.principal = principal
        if isinstance(context.request, WebSocket):  # closed (4403) when the token is revoked
            context.services.tokens.track(context.request, principal)
        return {"productId": principal.product_id, "role": principal.role.value}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if scope["type"] == "websocket":  # the connection is over: stop tracking it
                services: Services = scope["app"].state.services
                services.tokens.forget(scope)

    @staticmethod
    async def _authenticate(services: Services, secret: str | None) -> Principal | None:
        if secret is None:
            return None
        return await services.tokens.authenticate(secret)

    def parse_json(self, data: str | bytes) -> Any:
        """A GraphQL request body (and its `variables`) is a JSON object, or a list for a
        batch.  strawberry would crash on a bare `null`, number or string and answer
        500; refuse those with a 400 instead."""
        value = super().parse_json(data)
        if not isinstance(value, dict | list):
            raise HTTPException(400, "The request body must be a JSON object")
        return value
