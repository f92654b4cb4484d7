"""The HTTP surface (health, readiness, metrics, GraphiQL) and the read side of the
GraphQL API over real HTTP: pagination, filters and nested fields (both stores)."""

from __future__ import annotations

import re

from app.auth.models import Role
from tests.conftest import error_codes

CREATE_ITEM = """
mutation($input: CreateItemInput!) { createItem(input: $input) { id title status labels } }
"""
ITEMS = """
query($status: ItemStatus, $label: String, $first: Int, $after: String) {
  items(status: $status, label: $label, first: $first, after: $after) {
    nodes { id title status labels } pageInfo { endCursor hasNextPage }
  }
}
"""
SUBMIT = """
mutation($input: SubmitJobInput!) { submitJob(input: $input) { outcome job { id stage } } }
"""
INGEST = """
mutation($id: ID!) { ingestItemAsJob(itemId: $id) { job { id stage trackerItemId } } }
"""
JOBS = """
query($stage: JobStage, $trackerItemId: ID, $first: Int, $after: String) {
  jobs(stage: $stage, trackerItemId: $trackerItemId, first: $first, after: $after) {
    nodes { id title stage trackerItemId } pageInfo { endCursor hasNextPage }
  }
}
"""
CANCEL = "mutation($id: ID!) { cancelJob(jobId: $id) { id stage } }"
ADD_COMMENT = """
mutation($id: ID!, $body: String!) { addComment(itemId: $id, body: $body) { id itemId kind } }
"""


async def _member(live_server, http_client, make_token):
    server = await live_server()
    return http_client(server, await make_token("acme", Role.MEMBER))


async def test_health_and_readiness_answer_200(live_server, http_client):
    server = await live_server()
    anonymous = http_client(server, None)
    health = await anonymous.http.get("/healthz")
    ready = await anonymous.http.get("/readyz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


async def test_metrics_count_committed_events(live_server, http_client, make_token):
    member = await _member(live_server, http_client, make_token)
    sample = re.compile(r'^fleetbridge_events_total\{type="ITEM_CREATED"\} (\S+)$', re.M)
    before = await member.http.get("/metrics")
    assert before.status_code == 200
    assert "fleetbridge_events_total" in before.text
    assert not sample.search(before.text)

    await member.data(CREATE_ITEM, input={"title": "one"})
    await member.data(CREATE_ITEM, input={"title": "two"})
    after = await member.http.get("/metrics")
    assert after.status_code == 200
    match = sample.search(after.text)
    assert match is not None, after.text
    assert float(match.group(1)) == 2.0
    # a refused mutation commits nothing and so counts nothing
    await member.execute(CREATE_ITEM, input={"title": ""})
    again = sample.search((await member.http.get("/metrics")).text)
    assert again is not None
    assert float(again.group(1)) == 2.0


async def test_graphiql_is_served_to_browsers(live_server, http_client):
    server = await live_server()
    client = http_client(server, None)
    response = await client.http.get("/graphql", headers={"Accept": "text/html"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "graphiql" in response.text.lower()


async def test_items_paginate_with_end_cursor(live_server, http_client, make_token):
    member = await _member(live_server, http_client, make_token)
    titles = [f"item {n}" for n in range(5)]
    for title in titles:
        await member.data(CREATE_ITEM, input={"title": title})

    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = (await member.data(ITEMS, first=2, after=after))["items"]
        pages += 1
        seen += [node["title"] for node in page["nodes"]]
        assert len(page["nodes"]) <= 2
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
        assert after
    assert seen == titles  # oldest first, no duplicate, nothing skipped
    assert pages == 3

    everything = (await member.data(ITEMS))["items"]  # default page size 50
    assert [node["title"] for node in everything["nodes"]] == titles
    assert everything["pageInfo"]["hasNextPage"] is False
    empty = (await member.data(ITEMS, first=2, after=everything["pageInfo"]["endCursor"]))
    assert empty["items"]["nodes"] == []
    assert empty["items"]["pageInfo"] == {"endCursor": None, "hasNextPage": False}


async def test_items_filter_by_status_and_label(live_server, http_client, make_token):
    member = await _member(live_server, http_client, make_token)
    await member.data(CREATE_ITEM, input={"title": "a", "labels": ["bug", "ui"]})
    await member.data(CREATE_ITEM, input={"title": "b", "labels": ["bug"], "status": "BLOCKED"})
    await member.data(CREATE_ITEM, input={"title": "c", "labels": ["feature"]})
    await member.data(CREATE_ITEM, input={"title": "d", "labels": ["bugfix"], "status": "BLOCKED"})

    async def titles(**filters):
        return [node["title"] for node in (await member.data(ITEMS, **filters))["items"]["nodes"]]

    assert await titles(label="bug") == ["a", "b"]  # exact label, not a prefix
    assert await titles(status="BLOCKED") == ["b", "d"]
    assert await titles(status="BLOCKED", label="bug") == ["b"]
    assert await titles(status="DONE") == []
    assert await titles(label="nope") == []
    # a filtered list paginates too
    first = (await member.data(ITEMS, label="bug", first=1))["items"]
    assert [n["title"] for n in first["nodes"]] == ["a"]
    assert first["pageInfo"]["hasNextPage"] is True
    rest = (await member.data(ITEMS, label="bug", first=1,
                              after=first["pageInfo"]["endCursor"]))["items"]
    assert [n["title"] for n in rest["nodes"]] == ["b"]
    assert rest["pageInfo"]["hasNextPage"] is False


async def test_jobs_filter_by_stage_and_tracker_item(live_server, http_client, make_token):
    member = await _member(live_server, http_client, make_token)
    item = (await member.data(CREATE_ITEM, input={"title": "tracked"}))["createItem"]
    other = (await member.data(CREATE_ITEM, input={"title": "other"}))["createItem"]
    tracked = (await member.data(INGEST, id=item["id"]))["ingestItemAsJob"]["job"]
    await member.data(INGEST, id=other["id"])
    loose = (await member.data(SUBMIT, input={"title": "loose", "bodyMd": "x"}))["submitJob"]
    cancelled = (await member.data(CANCEL, id=loose["job"]["id"]))["cancelJob"]
    assert cancelled["stage"] == "CANCELLED"

    async def job_ids(**filters):
        return [node["id"] for node in (await member.data(JOBS, **filters))["jobs"]["nodes"]]

    assert len(await job_ids()) == 3
    assert await job_ids(trackerItemId=item["id"]) == [tracked["id"]]
    assert await job_ids(stage="CANCELLED") == [loose["job"]["id"]]
    assert len(await job_ids(stage="QUEUED")) == 2
    assert await job_ids(stage="CANCELLED", trackerItemId=item["id"]) == []
    assert await job_ids(trackerItemId="999999") == []
    assert await job_ids(trackerItemId="not-an-id") == []  # names nothing: matches nothing
    page = (await member.data(JOBS, stage="QUEUED", first=1))["jobs"]
    assert page["pageInfo"]["hasNextPage"] is True
    rest = (await member.data(JOBS, stage="QUEUED", first=1,
                              after=page["pageInfo"]["endCursor"]))["jobs"]
    assert [n["id"] for n in page["nodes"] + rest["nodes"]] == await job_ids(stage="QUEUED")


async def test_item_jobs_and_job_item_nested_fields(live_server, http_client, make_token):
    member = await _member(live_server, http_client, make_token)
    item = (await member.data(CREATE_ITEM, input={"title": "nested"}))["createItem"]
    bare = (await member.data(CREATE_ITEM, input={"title": "no jobs"}))["createItem"]
    job = (await member.data(INGEST, id=item["id"]))["ingestItemAsJob"]["job"]
    loose = (await member.data(SUBMIT, input={"title": "loose", "bodyMd": "x"}))["submitJob"]

    data = await member.data(
        """query($item: ID!, $bare: ID!, $job: ID!, $loose: ID!) {
          item(id: $item) { id jobs { nodes { id trackerItemId item { id title } } } }
          bare: item(id: $bare) { jobs { nodes { id } } }
          job(id: $job) { id item { id title jobs { nodes { id } } } }
          loose: job(id: $loose) { trackerItemId item { id } }
        }""",
        item=item["id"], bare=bare["id"], job=job["id"], loose=loose["job"]["id"],
    )
    assert data["item"]["jobs"]["nodes"] == [
        {"id": job["id"], "trackerItemId": item["id"],
         "item": {"id": item["id"], "title": "nested"}}
    ]
    assert data["bare"]["jobs"]["nodes"] == []
    assert data["job"]["item"] == {
        "id": item["id"], "title": "nested", "jobs": {"nodes": [{"id": job["id"]}]}
    }
    assert data["loose"] == {"trackerItemId": None, "item": None}

    # nested lists resolve per item when several items are read at once
    listed = (await member.data("{ items { nodes { id jobs { nodes { id } } } } }"))
    assert {n["id"]: [j["id"] for j in n["jobs"]["nodes"]] for n in listed["items"]["nodes"]} == {
        item["id"]: [job["id"]], bare["id"]: []
    }


async def test_item_comments_connection(live_server, http_client, make_token):
    member = await _member(live_server, http_client, make_token)
    item = (await member.data(CREATE_ITEM, input={"title": "talk"}))["createItem"]
    other = (await member.data(CREATE_ITEM, input={"title": "elsewhere"}))["createItem"]
    bodies = [f"comment {n}" for n in range(3)]
    for body in bodies:
        comment = (await member.data(ADD_COMMENT, id=item["id"], body=body))["addComment"]
        assert comment["itemId"] == item["id"]
        assert comment["kind"] == "USER"
    await member.data(ADD_COMMENT, id=other["id"], body="not here")

    query = """query($id: ID!, $first: Int, $after: String) { item(id: $id) {
      comments(first: $first, after: $after) {
        nodes { body author kind itemId } pageInfo { endCursor hasNextPage } } } }"""
    full = (await member.data(query, id=item["id"]))["item"]["comments"]
    assert [n["body"] for n in full["nodes"]] == bodies
    assert all(n["author"] and n["kind"] == "USER" for n in full["nodes"])
    assert full["pageInfo"]["hasNextPage"] is False

    first = (await member.data(query, id=item["id"], first=2))["item"]["comments"]
    assert [n["body"] for n in first["nodes"]] == bodies[:2]
    assert first["pageInfo"]["hasNextPage"] is True
    rest = (await member.data(query, id=item["id"], first=2,
                              after=first["pageInfo"]["endCursor"]))["item"]["comments"]
    assert [n["body"] for n in rest["nodes"]] == bodies[2:]
    assert rest["pageInfo"]["hasNextPage"] is False


async def test_graphql_get_without_html_accept_is_not_a_server_error(live_server, http_client,
                                                                     make_token):
    server = await live_server()
    token = await make_token("acme", Role.MEMBER)
    client = http_client(server, token)
    response = await client.http.get(
        "/graphql", params={"query": "{ viewer { productId role } }"},
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
    )
    assert response.status_code == 200
    assert response.json()["data"]["viewer"] == {"productId": "acme", "role": "MEMBER"}
    # a mutation over GET is refused (it would be a CSRF hole), never a 500
    refused = await client.http.get(
        "/graphql", params={"query": 'mutation { createItem(input: {title: "x"}) { id } }'},
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
    )
    assert 400 <= refused.status_code < 500
    assert "Traceback" not in refused.text
    unauthenticated = await client.http.get(
        "/graphql", params={"query": "{ viewer { productId } }"},
        headers={"Accept": "application/json"},
    )
    assert error_codes(unauthenticated.json()) == ["UNAUTHENTICATED"]


async def test_request_bodies_that_are_not_graphql_are_a_400(live_server, http_client,
                                                             make_token):
    member = await _member(live_server, http_client, make_token)
    headers = {"Authorization": f"Bearer {member.token}", "Content-Type": "application/json"}
    for raw in ("{not json", "[]", "null", "5", '"a string"', '{"variables": {}}',
                '{"query": 5}', '{"query": "{ viewer { role } }", "variables": "not an object"}'):
        response = await member.http.post("/graphql", content=raw, headers=headers)
        assert 400 <= response.status_code < 500, (raw, response.status_code, response.text)
        assert "Traceback" not in response.text
    wrong_type = await member.http.post("/graphql", content="query=1",
                                        headers={**headers, "Content-Type": "text/plain"})
    assert 400 <= wrong_type.status_code < 500
