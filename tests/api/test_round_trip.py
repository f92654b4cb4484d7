"""The core round trip over real HTTP against the served ASGI app (both stores)."""

from __future__ import annotations

from app.auth.models import Role
from tests.conftest import error_codes

CREATE_ITEM = """
mutation($input: CreateItemInput!) { createItem(input: $input) { id status labels } }
"""
INGEST = """
mutation($id: ID!) { ingestItemAsJob(itemId: $id) {
  outcome job { id stage trackerItemId bodyMd idempotencyKey priority capabilities engineClass }
} }
"""
CLAIM = """
mutation($worker: WorkerInput!) { claimNextJob(worker: $worker) {
  job { id stage attempts } lease { workerId fence expiresAt }
} }
"""
TRANSITION = """
mutation($id: ID!, $fence: Int!, $to: JobStage!, $metrics: JobMetricsInput) {
  transitionJob(jobId: $id, fence: $fence, to: $to, metrics: $metrics) {
    stage lastEchoedStatus metrics { costUsd tokensIn tokensOut durationMs }
  }
}
"""
ITEM = """
query($id: ID!) { item(id: $id) { status comments { nodes { kind body author } }
  jobs { nodes { id stage } } } }
"""


async def test_item_to_shipped_round_trip_over_http(live_server, http_client, make_token):
    server = await live_server(tracker_echo=True)
    member = http_client(server, await make_token("acme", Role.MEMBER))
    worker = http_client(server, await make_token("acme", Role.WORKER))
    description = "Secret plan: rotate key sk-THIS-MUST-NOT-LEAK"

    item = (await member.data(CREATE_ITEM, input={
        "title": "Ship the thing", "description": description,
        "labels": ["engine-class:agentic-coder", "priority:high", "cap:os:mac"],
    }))["createItem"]
    ingested = (await member.data(INGEST, id=item["id"]))["ingestItemAsJob"]
    job = ingested["job"]
    assert ingested["outcome"] == "CREATED"
    assert job["bodyMd"] == description
    assert job["idempotencyKey"] == f"tracker-{item['id']}"
    assert (job["priority"], job["engineClass"], job["capabilities"]) == (
        "HIGH", "agentic-coder", ["os:mac"])

    claim = (await worker.data(CLAIM, worker={
        "workerId": "w1", "capabilities": ["os:mac"], "engineClasses": ["agentic-coder"],
    }))["claimNextJob"]
    assert claim["job"]["id"] == job["id"]
    fence = claim["lease"]["fence"]

    building = (await worker.data(TRANSITION, id=job["id"], fence=fence, to="BUILDING"))
    assert building["transitionJob"]["lastEchoedStatus"] == "IN_PROGRESS"
    shipped = (await worker.data(TRANSITION, id=job["id"], fence=fence, to="SHIPPED",
                                 metrics={"costUsd": 0.25, "tokensIn": 1000, "tokensOut": 200}))
    assert shipped["transitionJob"]["stage"] == "SHIPPED"
    assert shipped["transitionJob"]["lastEchoedStatus"] == "DONE"  # the echo ran first

    seen = (await member.data(ITEM, id=item["id"]))["item"]
    assert seen["status"] == "DONE"
    system = [c for c in seen["comments"]["nodes"] if c["kind"] == "SYSTEM"]
    assert len(system) == 2  # IN_PROGRESS, then DONE
    assert all(description not in c["body"] and "sk-THIS" not in c["body"] for c in system)
    assert "$0.2500" in system[-1]["body"]
    assert "1000 in / 200 out" in system[-1]["body"]

    # a worker cannot create items; a member cannot claim
    denied = await worker.execute(CREATE_ITEM, input={"title": "x"})
    assert error_codes(denied) == ["FORBIDDEN"]
    denied = await member.execute(CLAIM, worker={"workerId": "m"})
    assert error_codes(denied) == ["FORBIDDEN"]
