"""Hostile input over real HTTP and websockets (DESIGN §8, issue 11), both stores:
text that cannot be stored is BAD_USER_INPUT naming the field; bodies that are not
JSON (bad UTF-8, 1,000 levels deep) are 400 (websocket: close 4400); an ambiguous
document is refused; error messages quote at most ~100 characters of input; the
bridge's idempotency prefix is reserved.  Nothing refused writes anything."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.auth.models import Role
from tests.api.test_bad_input import (
    ADD_COMMENT,
    CANCEL,
    CLAIM,
    COMMENTS,
    CREATE_ITEM,
    INGEST,
    ITEMS,
    JOBS,
    SUBMIT,
    TRANSITION,
    UPDATE_ITEM,
    Scene,
    _role_for,
)
from tests.api.ws_client import JOB_EVENTS, TRANSPORT_WS, ws_connect
from tests.conftest import error_codes

BAD = "a\ud800b"  # a lone surrogate: no UTF-8 encoding, no database stores it

SURROGATE_CASES: list[tuple[str, dict[str, Any], str]] = [
    (CREATE_ITEM, {"input": {"title": BAD}}, "input.title"),
    (CREATE_ITEM, {"input": {"title": "ok", "description": BAD}}, "input.description"),
    (CREATE_ITEM, {"input": {"title": "ok", "labels": ["fine", BAD]}}, "input.labels"),
    (UPDATE_ITEM, {"id": "$item", "input": {"title": BAD}}, "input.title"),
    (UPDATE_ITEM, {"id": "$item", "input": {"labels": [BAD]}}, "input.labels"),
    (ADD_COMMENT, {"id": "$item", "body": BAD}, "body"),
    (ADD_COMMENT, {"id": BAD, "body": "ok"}, "itemId"),
    (SUBMIT, {"input": {"title": "ok", "bodyMd": BAD}}, "input.bodyMd"),
    (SUBMIT, {"input": {"title": "ok", "bodyMd": "ok", "idempotencyKey": BAD}},
     "input.idempotencyKey"),
    (SUBMIT, {"input": {"title": "ok", "bodyMd": "ok", "capabilities": [BAD]}},
     "input.capabilities"),
    (SUBMIT, {"input": {"title": "ok", "bodyMd": "ok", "kind": BAD}}, "input.kind"),
    (SUBMIT, {"input": {"title": "ok", "bodyMd": "ok", "engineClass": BAD}}, "input.engineClass"),
    (INGEST, {"id": "$fresh_item", "options": {"profile": BAD}}, "options.profile"),
    (CLAIM, {"worker": {"workerId": BAD}}, "worker.workerId"),
    (CLAIM, {"worker": {"workerId": "w", "capabilities": [BAD]}}, "worker.capabilities"),
    (TRANSITION, {"id": "$claimed_job", "fence": "$fence", "to": "FAILED", "reason": BAD},
     "reason"),
    (CANCEL, {"id": "$queued_job", "reason": BAD}, "reason"),
    (ITEMS, {"label": BAD}, "label"),
    (ITEMS, {"after": BAD}, "after"),
    (JOBS, {"after": BAD}, "after"),
    (COMMENTS, {"id": "$item", "after": BAD}, "after"),
    # a variable named unlike its argument is named by where it is used
    ("mutation($t: String!) { createItem(input: {title: $t}) { id } }", {"t": BAD},
     "input.title"),
]


async def _post(client: Any, query: str, variables: dict[str, Any] | None = None) -> Any:
    """POST with the body JSON-encoded as ASCII (lone surrogates as `\\udXXX` escapes,
    as any JSON client may send them); no 5xx, no stack trace."""
    body = json.dumps({"query": query, "variables": variables or {}})
    response = await client.http.post(
        "/graphql", content=body.encode(),
        headers={"Authorization": f"Bearer {client.token}", "Content-Type": "application/json"},
    )
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    return response


@pytest.fixture
async def scene(live_server, http_client, make_token) -> Scene:
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    worker = http_client(server, await make_token("acme", Role.WORKER))
    scene = await Scene(member, worker).build()
    scene.ids["server"] = server
    return scene


async def test_lone_surrogates_are_bad_user_input_naming_the_field(scene):
    before = await scene.state()
    failures = []
    for query, variables, field in SURROGATE_CASES:
        role = "worker" if query in (CLAIM, TRANSITION) else _role_for(query)
        response = await _post(scene.clients[role], query, scene.resolve(variables))
        errors = response.json().get("errors") or []
        if [error.get("extensions") for error in errors] != [
            {"code": "BAD_USER_INPUT", "field": field}
        ]:
            failures.append(f"{field}: {response.text[:300]}")
    assert not failures, "\n".join(failures)
    # in the document itself the GraphQL lexer refuses it (raw or as a \\u escape)
    for literal in ('"a\ud800"', '"a\\ud800"'):
        query = f"mutation {{ createItem(input: {{title: {literal}}}) {{ id }} }}"
        body = (await _post(scene.clients["member"], query)).json()
        assert set(error_codes(body)) <= {"GRAPHQL_VALIDATION_FAILED", "GRAPHQL_PARSE_FAILED",
                                          "BAD_USER_INPUT"}, body
        assert error_codes(body), body
    assert await scene.state() == before


async def _raw_post(scene: Scene, body: bytes) -> Any:
    member = scene.clients["member"]
    return await member.http.post(
        "/graphql", content=body,
        headers={"Authorization": f"Bearer {member.token}",
                 "Content-Type": "application/json"},
    )


async def test_bodies_that_are_not_json_are_400(scene):
    before = await scene.state()
    title = b'{"query": "mutation { createItem(input: {title: \\"x\\"}) { id } }", '
    cases = {
        "raw 0xFF in a string": b'{"query": "{ viewer { role } }", "variables": {"t": "a\xffb"}}',
        "truncated UTF-8": b'{"query": "{ viewer { role } }", "x": "\xe2\x82"}',
        "1,000 levels deep": title + b'"variables": {"v": ' + b"[" * 1_000 + b"]" * 1_000
        + b"}}",
        "100,000 levels deep": b"[" * 100_000 + b"]" * 100_000,
        "not JSON": b"{query: nope",
    }
    for name, body in cases.items():
        response = await _raw_post(scene, body)
        assert response.status_code == 400, (name, response.status_code, response.text[:200])
    assert await scene.state() == before


async def test_a_websocket_frame_that_is_not_json_closes_4400(scene, make_token):
    server = scene.ids["server"]
    token = await make_token("acme", Role.MEMBER)
    deep_ping = json.dumps({"type": "ping", "payload": json.loads("[" * 70 + "]" * 70)})
    for frame in ("[" * 1_000 + "]" * 1_000, "{not json", deep_ping):
        async with ws_connect(server.ws_url, TRANSPORT_WS, token) as client:
            await client.connection.send(frame)
            code, reason = await client.wait_closed()
            assert code == 4400, (frame[:20], code, reason)


async def test_several_operations_without_a_name_are_refused(scene):
    before = await scene.state()
    member = scene.clients["member"]
    document = """mutation A { createItem(input: {title: "A"}) { id } }
                  mutation B { createItem(input: {title: "B"}) { id } }"""
    body = (await _post(member, document)).json()
    assert error_codes(body) == ["GRAPHQL_VALIDATION_FAILED"], body
    assert "operation name" in body["errors"][0]["message"]
    assert await scene.state() == before
    named = await member.http.post(
        "/graphql", json={"query": document, "operationName": "B"},
        headers={"Authorization": f"Bearer {member.token}"})
    assert named.json()["data"]["createItem"]["id"]


async def test_error_messages_quote_at_most_about_100_characters(scene):
    member = scene.clients["member"]
    huge = "9" * 1_000_000
    body = (await _post(member, ADD_COMMENT, {"id": huge, "body": "x"})).json()
    assert error_codes(body) == ["NOT_FOUND"]
    assert len(body["errors"][0]["message"]) < 150, len(body["errors"][0]["message"])
    # graphql-core's own messages repeat names from the document
    body = (await _post(member, "{ " + "x" * 200_000 + " }")).json()
    assert error_codes(body) == ["GRAPHQL_VALIDATION_FAILED"]
    assert len(body["errors"][0]["message"]) <= 320
    body = (await _post(member, ITEMS, {"first": "y" * 200_000})).json()
    assert error_codes(body) == ["GRAPHQL_VALIDATION_FAILED"]
    assert len(body["errors"][0]["message"]) <= 320


async def test_the_bridge_idempotency_prefix_is_reserved(scene):
    before = await scene.state()
    member = scene.clients["member"]
    body = (await _post(member, SUBMIT, {"input": {
        "title": "t", "bodyMd": "b", "idempotencyKey": "tracker-1"}})).json()
    assert [e["extensions"] for e in body["errors"]] == [
        {"code": "BAD_USER_INPUT", "field": "input.idempotencyKey"}]
    assert await scene.state() == before
    # the item's own ingest still dedupes onto its own job
    fresh = scene.ids["fresh_item"]
    first = (await member.data(INGEST, id=fresh))["ingestItemAsJob"]
    again = (await member.data(INGEST, id=fresh))["ingestItemAsJob"]
    assert (first["outcome"], again["outcome"]) == ("CREATED", "DEDUPED")
    assert first["job"]["id"] == again["job"]["id"]


async def test_a_lone_surrogate_over_the_websocket_is_bad_user_input(scene, make_token):
    server = scene.ids["server"]
    token = await make_token("acme", Role.MEMBER)
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as client:
        operation = await client.subscribe(JOB_EVENTS, jobId=BAD, after=None)
        errors = await client.operation_errors(operation)
        assert [e.get("extensions") for e in errors] == [
            {"code": "BAD_USER_INPUT", "field": "jobId"}]


async def test_variables_that_are_not_an_object_are_refused_with_a_code(scene):
    member = scene.clients["member"]
    for variables in ([1], "x", 5, [{"t": BAD}]):
        body = json.dumps({"query": "query($t: String) { items(label: $t) { nodes { id } } }",
                           "variables": variables})
        response = await member.http.post(
            "/graphql", content=body.encode(),
            headers={"Authorization": f"Bearer {member.token}",
                     "Content-Type": "application/json"})
        assert response.status_code < 500, response.text
        if response.status_code == 200:
            codes = error_codes(response.json())
            assert codes, response.text
            assert "INTERNAL_SERVER_ERROR" not in codes, response.text
