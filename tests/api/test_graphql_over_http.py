"""GraphQL over HTTP conventions over real HTTP (issue 10 item 5): subscriptions are
refused over HTTP with a message naming the websocket, a syntax error is
GRAPHQL_PARSE_FAILED, and `Accept: application/graphql-response+json` is answered as
the GraphQL-over-HTTP spec says (request errors 4xx without `data`)."""

from __future__ import annotations

import logging

import pytest

from app.auth.models import Role
from app.graphql.transport import accept_qualities, prefers_graphql_response_json
from tests.conftest import error_codes

pytestmark = pytest.mark.parametrize("store", ["sqlite"])  # transport only: one store

GRAPHQL_JSON = "application/graphql-response+json"
SUBSCRIPTION = "subscription { jobStageChanged { cursor to } }"


async def _client(live_server, http_client, make_token):
    server = await live_server()
    return http_client(server, await make_token("acme", Role.MEMBER))


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []


async def test_a_subscription_over_http_is_refused_with_a_pointer_to_the_websocket(
    live_server, http_client, make_token, caplog
):
    client = await _client(live_server, http_client, make_token)
    headers = {"Authorization": f"Bearer {client.token}"}
    caplog.set_level(logging.INFO)
    answers = [
        await client.http.post("/graphql", json={"query": SUBSCRIPTION}, headers=headers),
        await client.http.get("/graphql", params={"query": SUBSCRIPTION}, headers=headers),
        # strawberry's multipart HTTP streaming is refused the same way
        await client.http.post(
            "/graphql", json={"query": SUBSCRIPTION},
            headers={**headers, "Accept": "multipart/mixed;subscriptionSpec=1.0"},
        ),
    ]
    for response in answers:
        assert response.status_code == 400, response.text
        body = response.json()
        assert "data" not in body
        assert error_codes(body) == ["BAD_REQUEST"]
        assert "websocket" in body["errors"][0]["message"]
    _no_traceback(caplog)


async def test_syntax_errors_are_parse_failures_and_validation_errors_stay_validation(
    live_server, http_client, make_token
):
    client = await _client(live_server, http_client, make_token)
    broken = await client.execute("{ viewer { productId ")
    assert error_codes(broken) == ["GRAPHQL_PARSE_FAILED"]
    invalid = await client.execute("{ viewer { noSuchField } }")
    assert error_codes(invalid) == ["GRAPHQL_VALIDATION_FAILED"]


async def test_graphql_response_json_answers_request_errors_4xx_without_data(
    live_server, http_client, make_token
):
    client = await _client(live_server, http_client, make_token)
    headers = {"Authorization": f"Bearer {client.token}", "Accept": GRAPHQL_JSON}

    async def post(body: object):
        response = await client.http.post("/graphql", json=body, headers=headers)
        assert response.headers["content-type"].startswith(GRAPHQL_JSON)
        return response

    for query, variables, code in [
        ("{ viewer { productId ", None, "GRAPHQL_PARSE_FAILED"),
        ("{ viewer { noSuchField } }", None, "GRAPHQL_VALIDATION_FAILED"),
        ("query($id: ID!) { job(id: $id) { id } }", {}, None),  # variable does not coerce
    ]:
        response = await post({"query": query, "variables": variables})
        assert response.status_code == 400, response.text
        body = response.json()
        assert "data" not in body
        assert body["errors"]
        if code:
            assert error_codes(body) == [code]

    # A request that is not GraphQL at all is a 400 in the same media type.
    malformed = await client.http.post(
        "/graphql", content=b"{not json", headers={**headers, "Content-Type": "application/json"}
    )
    assert malformed.status_code == 400
    assert malformed.headers["content-type"].startswith(GRAPHQL_JSON)
    assert error_codes(malformed.json()) == ["BAD_REQUEST"]

    # Executed requests are 200 with `data`, field errors included.
    ok = await post({"query": "{ viewer { productId } }"})
    assert (ok.status_code, ok.json()) == (200, {"data": {"viewer": {"productId": "acme"}}})
    field_error = await post({"query": 'mutation { retryJob(jobId: "999") { id } }'})
    assert field_error.status_code == 200
    assert field_error.json()["data"] is None
    assert error_codes(field_error.json()) == ["NOT_FOUND"]


async def test_plain_json_clients_keep_200_for_graphql_errors(
    live_server, http_client, make_token
):
    client = await _client(live_server, http_client, make_token)
    response = await client.http.post(
        "/graphql", json={"query": "{ viewer { noSuchField } }"},
        headers={"Authorization": f"Bearer {client.token}", "Accept": "application/json"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["data"] is None


async def test_a_mutation_over_get_is_405_allow_post(live_server, http_client, make_token):
    client = await _client(live_server, http_client, make_token)
    response = await client.http.get(
        "/graphql", params={"query": 'mutation { retryJob(jobId: "1") { id } }'},
        headers={"Authorization": f"Bearer {client.token}", "Accept": GRAPHQL_JSON},
    )
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert error_codes(response.json()) == ["BAD_REQUEST"]


@pytest.mark.parametrize(
    ("accept", "preferred"),
    [
        (None, False),
        ("application/json", False),
        ("*/*", False),
        (GRAPHQL_JSON, True),
        (f"{GRAPHQL_JSON}, application/json;q=0.9", True),
        (f"application/json, {GRAPHQL_JSON}", True),
        (f"application/json, {GRAPHQL_JSON};q=0.5", False),
        (f"{GRAPHQL_JSON};q=0", False),
        ("Application/GraphQL-Response+JSON; charset=utf-8", True),
    ],
)
def test_accept_negotiation(store: str, accept: str | None, preferred: bool) -> None:
    assert prefers_graphql_response_json(accept) is preferred


def test_accept_qualities_read_q_values(store: str) -> None:
    assert accept_qualities("a/b;q=0.3, c/d, e/f;q=x") == {"a/b": 0.3, "c/d": 1.0, "e/f": 0.0}
