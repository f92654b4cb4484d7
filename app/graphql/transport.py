"""GraphQL over HTTP conventions as pure rules (the GraphQL-over-HTTP spec; issue 10).

* Media types: a request whose `Accept` header prefers
  `application/graphql-response+json` is answered in it, with the spec's status
  codes: a *request error* (the document does not parse or validate, variables do
  not coerce, the request is malformed) is a 4xx whose body has no `data` key.
  Otherwise `application/json` is answered with 200, as before.
* Subscriptions are served over the websocket only (DESIGN §5); over HTTP they are
  refused with 400 and a message that says where to go.
* A mutation over GET is 405 with `Allow: POST` (the spec's MUST).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from graphql import GraphQLError

GRAPHQL_RESPONSE_JSON = "application/graphql-response+json"
APPLICATION_JSON = "application/json"
SUBSCRIPTION_OVER_HTTP = (
    "Subscriptions are served over the websocket at /graphql (protocols "
    "graphql-transport-ws and graphql-ws), not over HTTP"
)


def _quality(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value.strip())
            except ValueError:
                return 0.0
    return 1.0


def accept_qualities(accept: str | None) -> dict[str, float]:
    """`Accept` header → {media type (lower case, no parameters): quality}."""
    qualities: dict[str, float] = {}
    for part in (accept or "").split(","):
        media, *params = part.split(";")
        media = media.strip().lower()
        if media:
            qualities[media] = max(qualities.get(media, 0.0), _quality(params))
    return qualities


@lru_cache(maxsize=64)
def prefers_graphql_response_json(accept: str | None) -> bool:
    """True when the client accepts `application/graphql-response+json` at least as
    much as `application/json` (and at all).  Asked twice per request, of the few
    `Accept` headers clients send: kept per header (bounded; a client sending a new
    one each time only evicts)."""
    qualities = accept_qualities(accept)
    wanted = qualities.get(GRAPHQL_RESPONSE_JSON, 0.0)
    return wanted > 0 and wanted >= qualities.get(APPLICATION_JSON, 0.0)


def is_request_error(data: object, errors: Sequence[GraphQLError] | None) -> bool:
    """A request error stops the request before execution: no data, and no error
    with a response `path` (every field error has one)."""
    return data is None and bool(errors) and all(error.path is None for error in errors or ())
