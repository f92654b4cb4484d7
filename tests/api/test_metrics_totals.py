"""Job totals beyond GraphQL's 32-bit Int read as null instead of failing the query."""

from __future__ import annotations

from app.auth.models import Role

SUBMIT = """mutation { submitJob(input: {title: "big", bodyMd: "many tokens"}) { job { id } } }"""
CLAIM = """mutation { claimNextJob(worker: {workerId: "w"}) { lease { fence } } }"""
MOVE = """mutation($id: ID!, $fence: Int!, $to: JobStage!, $tokens: Int!) {
  transitionJob(jobId: $id, fence: $fence, to: $to, metrics: {tokensIn: $tokens, tokensOut: 7})
  { id } }"""
METRICS = """query($id: ID!) { job(id: $id) { title metrics { tokensIn tokensOut costUsd } } }"""
INT_MAX = 2**31 - 1


async def test_a_total_beyond_graphql_int_is_null_not_an_error(
    live_server, http_client, make_token
) -> None:
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    worker = http_client(server, await make_token("acme", Role.WORKER))
    job_id = (await member.data(SUBMIT))["submitJob"]["job"]["id"]
    fence = (await worker.data(CLAIM))["claimNextJob"]["lease"]["fence"]

    await worker.data(MOVE, id=job_id, fence=fence, to="BUILDING", tokens=INT_MAX)
    within = (await member.data(METRICS, id=job_id))["job"]["metrics"]
    assert (within["tokensIn"], within["tokensOut"]) == (INT_MAX, 7)

    await worker.data(MOVE, id=job_id, fence=fence, to="REVIEW", tokens=1)
    beyond = await member.data(METRICS, id=job_id)  # .data() asserts there is no error
    assert beyond["job"]["title"] == "big"
    assert (beyond["job"]["metrics"]["tokensIn"], beyond["job"]["metrics"]["tokensOut"]) == (
        None, 14)
