"""`releaseJob` over real HTTP (both stores): the worker role's way to give a job back."""

from __future__ import annotations

from app.auth.models import Role
from tests.conftest import error_codes

CLAIM = """mutation($worker: WorkerInput!) { claimNextJob(worker: $worker) {
  job { id attempts } lease { fence } } }"""
RELEASE = """mutation($id: ID!, $fence: Int!, $reason: String) {
  releaseJob(jobId: $id, fence: $fence, reason: $reason) {
    id stage attempts failureReason notBefore lease { fence } } }"""
JOB = "query($id: ID!) { job(id: $id) { stage attempts lease { fence } } }"


async def test_release_over_http(live_server, http_client, make_token, make_job):
    server = await live_server()
    worker = http_client(server, await make_token("acme", Role.WORKER))
    member = http_client(server, await make_token("acme", Role.MEMBER))
    job = await make_job("acme")
    claim = (await worker.data(CLAIM, worker={"workerId": "w"}))["claimNextJob"]
    fence = claim["lease"]["fence"]
    assert (claim["job"]["id"], claim["job"]["attempts"]) == (str(job.id), 1)

    # a member cannot release (it cancels instead); an unknown id is
    # NOT_FOUND, a long reason BAD_USER_INPUT, a wrong fence CONFLICT
    assert error_codes(await member.execute(RELEASE, id=str(job.id), fence=fence)) == [
        "FORBIDDEN"]
    assert error_codes(await worker.execute(RELEASE, id="x", fence=fence)) == ["NOT_FOUND"]
    assert error_codes(await worker.execute(
        RELEASE, id=str(job.id), fence=fence, reason="r" * 100_000)) == ["BAD_USER_INPUT"]
    assert error_codes(await worker.execute(RELEASE, id=str(job.id), fence=fence + 1)) == [
        "CONFLICT"]
    assert (await member.data(JOB, id=str(job.id)))["job"] == {
        "stage": "ASSIGNED", "attempts": 1, "lease": {"fence": fence}}

    released = (await worker.data(RELEASE, id=str(job.id), fence=fence,
                                  reason="worker stopped"))["releaseJob"]
    assert released == {"id": str(job.id), "stage": "QUEUED", "attempts": 0,
                        "failureReason": "worker stopped", "notBefore": None, "lease": None}
    # released twice: the lease is gone
    assert error_codes(await worker.execute(RELEASE, id=str(job.id), fence=fence)) == [
        "CONFLICT"]
    again = (await worker.data(CLAIM, worker={"workerId": "w2"}))["claimNextJob"]
    assert (again["job"]["id"], again["job"]["attempts"], again["lease"]["fence"]) == (
        str(job.id), 1, fence + 2)
