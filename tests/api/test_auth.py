"""Authentication, the role rules and product isolation over real HTTP (both stores),
and `fleetbridge token create` through the real command line."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from app.auth.models import Role
from tests.conftest import error_codes

ROOT = Path(__file__).resolve().parents[2]

VIEWER = "{ viewer { productId role } }"
COUNTS = """{ items(first: 200) { nodes { id status title } }
              jobs(first: 200) { nodes { id stage attempts lease { fence workerId } } } }"""
CREATE_ITEM = "mutation($input: CreateItemInput!) { createItem(input: $input) { id } }"
INGEST = "mutation($id: ID!) { ingestItemAsJob(itemId: $id) { outcome job { id stage } } }"
CLAIM = """mutation($worker: WorkerInput!) { claimNextJob(worker: $worker) {
  job { id } lease { fence workerId } } }"""
CANCEL = "mutation($id: ID!) { cancelJob(jobId: $id) { id stage } }"

# name → (operation, variables built from the ids of the scene)
TRACKER_OPERATIONS = {
    "createItem": (CREATE_ITEM, lambda s: {"input": {"title": "denied"}}),
    "updateItem": ("mutation($id: ID!) { updateItem(id: $id, input: {title: \"x\"}) { id } }",
                   lambda s: {"id": s["item"]}),
    "addComment": ("mutation($id: ID!) { addComment(itemId: $id, body: \"x\") { id } }",
                   lambda s: {"id": s["item"]}),
    "submitJob": ("mutation { submitJob(input: {title: \"t\", bodyMd: \"b\"}) { outcome } }",
                  lambda s: {}),
    "ingestItemAsJob": (INGEST, lambda s: {"id": s["fresh_item"]}),
    "echoJobToItem": ("mutation($id: ID!) { echoJobToItem(jobId: $id) { echoed } }",
                      lambda s: {"id": s["claimed_job"]}),
    "cancelJob": (CANCEL, lambda s: {"id": s["queued_job"]}),
    "retryJob": ("mutation($id: ID!) { retryJob(jobId: $id) { id stage } }",
                 lambda s: {"id": s["cancelled_job"]}),
}
WORK_OPERATIONS = {
    "claimNextJob": (CLAIM, lambda s: {"worker": {"workerId": "intruder"}}),
    "heartbeat": ("mutation($id: ID!, $fence: Int!) { heartbeat(jobId: $id, fence: $fence) "
                  "{ fence } }", lambda s: {"id": s["claimed_job"], "fence": s["fence"]}),
    "transitionJob": ("mutation($id: ID!, $fence: Int!) { transitionJob(jobId: $id, "
                      "fence: $fence, to: BUILDING) { stage } }",
                      lambda s: {"id": s["claimed_job"], "fence": s["fence"]}),
}


async def _scene(server, http_client, make_token, product="acme"):
    """Product rows in every state the operations need, made through the API."""
    member = http_client(server, await make_token(product, Role.MEMBER))
    worker = http_client(server, await make_token(product, Role.WORKER))
    item = (await member.data(CREATE_ITEM, input={"title": "claimed"}))["createItem"]["id"]
    claimed = (await member.data(INGEST, id=item))["ingestItemAsJob"]["job"]["id"]
    claim = (await worker.data(CLAIM, worker={"workerId": "w1"}))["claimNextJob"]
    assert claim["job"]["id"] == claimed
    fresh_item = (await member.data(CREATE_ITEM, input={"title": "fresh"}))["createItem"]["id"]
    submit = "mutation($t: String!) { submitJob(input: {title: $t, bodyMd: \"b\"}) { job { id } } }"
    queued = (await member.data(submit, t="queued"))["submitJob"]["job"]["id"]
    cancelled = (await member.data(submit, t="cancelled"))["submitJob"]["job"]["id"]
    await member.data(CANCEL, id=cancelled)
    return {
        "member": member, "worker": worker, "item": item, "fresh_item": fresh_item,
        "claimed_job": claimed, "fence": claim["lease"]["fence"], "queued_job": queued,
        "cancelled_job": cancelled,
    }


async def _state(client):
    return await client.data(COUNTS)


BAD_AUTHORIZATION_HEADERS = [
    None, "Bearer fb_not-a-real-token", "Bearer", "Basic dXNlcjpwYXNz", "fb_no-scheme",
    "Bearer " + "x" * 500,
]


async def test_missing_or_bad_token_is_unauthenticated(live_server, http_client, make_token):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    before = await _state(member)
    anonymous = http_client(server, None)
    for authorization in BAD_AUTHORIZATION_HEADERS:
        headers = {"Authorization": authorization} if authorization else {}
        for query, variables in ((VIEWER, {}), (COUNTS, {}),
                                 (CREATE_ITEM, {"input": {"title": "x"}}),
                                 (CLAIM, {"worker": {"workerId": "w"}})):
            response = await anonymous.http.post(
                "/graphql", json={"query": query, "variables": variables}, headers=headers
            )
            assert response.status_code < 500
            assert set(error_codes(response.json())) == {"UNAUTHENTICATED"}, (
                authorization, response.text)
    assert await _state(member) == before


async def test_worker_may_not_do_tracker_work(live_server, http_client, make_token):
    server = await live_server()
    scene = await _scene(server, http_client, make_token)
    before = await _state(scene["member"])
    for name, (query, variables) in TRACKER_OPERATIONS.items():
        body = await scene["worker"].execute(query, **variables(scene))
        assert error_codes(body) == ["FORBIDDEN"], (name, body)
        assert body["data"] is None
        assert await _state(scene["member"]) == before, name


async def test_member_may_not_do_fleet_work(live_server, http_client, make_token):
    server = await live_server()
    scene = await _scene(server, http_client, make_token)
    before = await _state(scene["member"])
    assert any(n["stage"] == "QUEUED" for n in before["jobs"]["nodes"])  # a claim could take it
    for name, (query, variables) in WORK_OPERATIONS.items():
        body = await scene["member"].execute(query, **variables(scene))
        assert error_codes(body) == ["FORBIDDEN"], (name, body)
        assert await _state(scene["member"]) == before, name


async def test_admin_may_do_tracker_and_fleet_work(live_server, http_client, make_token):
    server = await live_server()
    scene = await _scene(server, http_client, make_token)
    admin = http_client(server, await make_token("acme", Role.ADMIN))
    for name, (query, variables) in TRACKER_OPERATIONS.items():
        body = await admin.execute(query, **variables(scene))
        assert not body.get("errors"), (name, body)
    # the claimed job was still held by w1 (admin's heartbeat and transition use its fence)
    for name in ("heartbeat", "transitionJob"):
        query, variables = WORK_OPERATIONS[name]
        body = await admin.execute(query, **variables(scene))
        assert not body.get("errors"), (name, body)
    claim = (await admin.data(CLAIM, worker={"workerId": "admin-worker"}))["claimNextJob"]
    assert claim["job"] is not None
    assert claim["lease"]["workerId"] == "admin-worker"


async def test_every_role_reads_its_viewer_items_and_jobs(live_server, http_client,
                                                          make_token):
    server = await live_server()
    scene = await _scene(server, http_client, make_token, product="reader-co")
    expected = await _state(scene["member"])
    assert len(expected["items"]["nodes"]) == 2
    assert len(expected["jobs"]["nodes"]) == 3
    for role in Role:
        reader = http_client(server, await make_token("reader-co", role))
        viewer = (await reader.data(VIEWER))["viewer"]
        assert viewer == {"productId": "reader-co", "role": role.name}
        assert await _state(reader) == expected, role
        item = await reader.data("query($id: ID!) { item(id: $id) { id } }", id=scene["item"])
        assert item["item"] == {"id": scene["item"]}
        job = await reader.data("query($id: ID!) { job(id: $id) { id } }",
                                id=scene["claimed_job"])
        assert job["job"] == {"id": scene["claimed_job"]}


async def test_products_are_isolated_over_http(live_server, http_client, make_token):
    server = await live_server()
    scene = await _scene(server, http_client, make_token, product="product-a")
    b_member = http_client(server, await make_token("product-b", Role.MEMBER))
    b_worker = http_client(server, await make_token("product-b", Role.WORKER))
    a_before = await _state(scene["member"])

    # B's member: every tracker operation on A's ids is NOT_FOUND, never FORBIDDEN
    for name, (query, variables) in TRACKER_OPERATIONS.items():
        if name in {"createItem", "submitJob"}:
            continue  # they name no id
        body = await b_member.execute(query, **variables(scene))
        assert error_codes(body) == ["NOT_FOUND"], (name, body)
    reads = await b_member.data(
        "query($i: ID!, $j: ID!) { item(id: $i) { id } job(id: $j) { id } }",
        i=scene["item"], j=scene["claimed_job"],
    )
    assert reads == {"item": None, "job": None}
    by_item = await b_member.data(
        "query($i: ID!) { jobs(trackerItemId: $i) { nodes { id } } }", i=scene["item"]
    )
    assert by_item["jobs"]["nodes"] == []

    # B's own rows are all B sees; A sees only A's
    b_item = (await b_member.data(CREATE_ITEM, input={"title": "b's"}))["createItem"]["id"]
    b_job = (await b_member.data(INGEST, id=b_item))["ingestItemAsJob"]["job"]["id"]
    b_state = await _state(b_member)
    assert [n["id"] for n in b_state["items"]["nodes"]] == [b_item]
    assert [n["id"] for n in b_state["jobs"]["nodes"]] == [b_job]
    a_after = await _state(scene["member"])
    assert a_after == a_before

    # B's worker claims B's job only, and cannot touch A's claimed job
    claim = (await b_worker.data(CLAIM, worker={"workerId": "b-w"}))["claimNextJob"]
    assert claim["job"]["id"] == b_job
    assert (await b_worker.data(CLAIM, worker={"workerId": "b-w"}))["claimNextJob"] == {
        "job": None, "lease": None,
    }  # A still has a QUEUED job, which B never gets
    assert any(n["stage"] == "QUEUED" for n in a_after["jobs"]["nodes"])
    for name in ("heartbeat", "transitionJob"):
        query, variables = WORK_OPERATIONS[name]
        body = await b_worker.execute(query, **variables(scene))
        assert error_codes(body) == ["NOT_FOUND"], (name, body)
    assert await _state(scene["member"]) == a_before


async def _run_cli(database_url: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_cli_token_create_prints_a_working_token(live_server, http_client, database_url):
    code, stdout, stderr = await _run_cli(
        database_url, "token", "create", "--product", "p1", "--role", "worker"
    )
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    assert stdout == lines[0] + "\n"
    token = lines[0]
    assert token.startswith("fb_")
    assert token == token.strip()

    server = await live_server()
    worker = http_client(server, token)
    assert (await worker.data(VIEWER))["viewer"] == {"productId": "p1", "role": "WORKER"}
    assert (await worker.data(CLAIM, worker={"workerId": "cli"}))["claimNextJob"]["job"] is None
    denied = await worker.execute(CREATE_ITEM, input={"title": "x"})
    assert error_codes(denied) == ["FORBIDDEN"]


@pytest.mark.parametrize("product", ["bad product!", "x" * 65], ids=["spaces", "too-long"])
async def test_cli_token_create_refuses_an_invalid_product(database_url, product):
    code, stdout, stderr = await _run_cli(
        database_url, "token", "create", "--product", product, "--role", "member"
    )
    assert code != 0
    assert stdout == ""
    assert "Traceback" not in stderr
