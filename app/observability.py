"""Request logging, request ids and HTTP metrics (issue 10 item 6).

`RequestObserver` is a pure ASGI middleware.  For every HTTP request it

* takes the client's `X-Request-ID` when it is a sane token (1 to 128 characters of
  `A-Za-z0-9._:/+=-`), or makes one (32 hex digits), and returns it in the
  response's `X-Request-ID` header;
* logs one line on `app.access` when the response is done: request id, method,
  path, GraphQL operation name, the caller's product and role, outcome, HTTP
  status and duration;
* counts it in `fleetbridge_http_requests_total{operation, outcome}` and
  `fleetbridge_http_request_duration_seconds{operation}`.

The GraphQL view leaves what only it knows in the request's scope state
(`note_operation`, `note_principal`, `note_outcome`).  The outcome is `ok`, the
first error's `extensions.code`, or `http_<status>` for a refusal before GraphQL
ran.  Every log record written while a request is served carries its id
(`RequestIdFilter`).

`configure_logging(level, fmt)`: `text` lines for people, `json` (one object per
line, python-json-logger) for machines (FLEET_LOG_FORMAT).
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from collections.abc import MutableMapping
from typing import Any, Literal

from pythonjsonlogger.json import JsonFormatter
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_logger = logging.getLogger("app.access")

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# Paths counted under their own name; anything else is `other` (bounded labels).
KNOWN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

_STATE_OPERATION = "fleet_operation"
_STATE_PRINCIPAL = "fleet_principal"
_STATE_OUTCOME = "fleet_outcome"


def request_id_from(header: str | None) -> str:
    """The client's request id when it is a sane token, else a new one."""
    if header is not None and _SANE_REQUEST_ID.match(header):
        return header
    return uuid.uuid4().hex


def _state(scope: MutableMapping[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = scope.setdefault("state", {})
    return state


def note_operation(scope: MutableMapping[str, Any], name: str | None) -> None:
    _state(scope)[_STATE_OPERATION] = name


def note_principal(scope: MutableMapping[str, Any], product: str, role: str) -> None:
    _state(scope)[_STATE_PRINCIPAL] = (product, role)


def note_outcome(scope: MutableMapping[str, Any], outcome: str) -> None:
    _state(scope)[_STATE_OUTCOME] = outcome


class RequestObserver:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        raw_id = headers.get(REQUEST_ID_HEADER.lower().encode())
        request_id = request_id_from(raw_id.decode("latin-1") if raw_id else None)
        token = request_id_var.set(request_id)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            self._record(scope, request_id, status, seconds)
            request_id_var.reset(token)

    @staticmethod
    def _record(scope: Scope, request_id: str, status: int, seconds: float) -> None:
        state = _state(scope)
        path = str(scope.get("path", ""))
        is_graphql = _STATE_OPERATION in state or path == "/graphql"
        outcome = state.get(_STATE_OUTCOME) or (f"http_{status}" if status >= 400 else "ok")
        product, role = state.get(_STATE_PRINCIPAL) or ("-", "-")
        metrics = _metrics_of(scope)
        if is_graphql:
            operation = (
                metrics.operation_label(state.get(_STATE_OPERATION)) if metrics else "anonymous"
            )
        else:
            operation = path if path in KNOWN_PATHS else "other"
        if metrics is not None:
            metrics.request(operation, outcome, seconds)
        duration_ms = round(seconds * 1000, 1)
        access_logger.info(
            "%s %s op=%s product=%s role=%s outcome=%s status=%s %sms id=%s",
            scope.get("method"), path, operation, product, role, outcome, status,
            duration_ms, request_id,
            extra={
                "method": scope.get("method"), "path": path, "operation": operation,
                "product": product, "role": role, "outcome": outcome, "status": status,
                "duration_ms": duration_ms,
            },
        )


def _metrics_of(scope: Scope) -> Any:
    app = scope.get("app")
    runtime = getattr(getattr(app, "state", None), "runtime", None)
    return getattr(runtime, "metrics", None)


class RequestIdFilter(logging.Filter):
    """Stamps every record with the id of the request being served (or `-`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get() or "-"
        return True


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s"


def configure_logging(level: str, fmt: Literal["text", "json"] = "text") -> None:
    """Root logging for `fleetbridge serve`: one handler on stderr, `text` or `json`
    (an object per line: timestamp, level, logger, message, request_id and the
    access line's fields).  uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                JSON_FIELDS,
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
