"""Operations you can see (issue 10 item 6), over real HTTP on both stores: /metrics
series move as jobs move, one log line per request with its request id, and /readyz
checks the database and its migrations."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from app.auth.models import Role
from app.db import utcnow
from app.fleet.models import Job
from tests.api.ws_client import JOB_EVENTS, TRANSPORT_WS, ws_connect
from tests.conftest import error_codes

SUBMIT = """
mutation Submit($t: String!, $p: Priority) {
  submitJob(input: {title: $t, bodyMd: $t, priority: $p}) { job { id } }
}
"""
CLAIM = """
mutation Claim { claimNextJob(worker: {workerId: "w1"}) { job { id } lease { fence } } }
"""
TRANSITION = """
mutation Move($id: ID!, $fence: Int!, $to: JobStage!) {
  transitionJob(jobId: $id, fence: $fence, to: $to) { stage }
}
"""
DEADLINE = 10.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def wait_for_value(http: httpx.AsyncClient, name: str, expected: float, **labels: str):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while (current := value(await scrape(http), name, **labels)) != expected:
        assert loop.time() < deadline, f"{name}{labels} stayed {current}, not {expected}"
        await asyncio.sleep(0.05)


async def test_metrics_move_as_jobs_move(live_server, http_client, make_token):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    worker = http_client(server, await make_token("acme", Role.WORKER))
    http = member.http

    before = await scrape(http)
    # process and GC collectors of prometheus-client
    assert value(before, "process_cpu_seconds_total") > 0
    assert any(name == "python_gc_collections_total" for name, _ in before)
    assert value(before, "fleetbridge_jobs", stage="QUEUED", priority="HIGH") == 0
    assert value(before, "fleetbridge_metrics_database_up") == 1
    assert not any(
        "product" in dict(labels) or "acme" in dict(labels).values() for _, labels in before
    )

    for n in range(2):
        await member.data(SUBMIT, t=f"job {n}", p="HIGH")
    await member.data(SUBMIT, t="low one", p="LOW")
    submitted = await scrape(http)
    assert value(submitted, "fleetbridge_jobs", stage="QUEUED", priority="HIGH") == 2
    assert value(submitted, "fleetbridge_jobs", stage="QUEUED", priority="LOW") == 1
    assert value(submitted, "fleetbridge_leases_held") == 0
    assert value(submitted, "fleetbridge_events_published_total", type="JOB_CREATED") == 3
    assert value(
        submitted, "fleetbridge_http_requests_total", operation="Submit", outcome="ok"
    ) == 3

    claim = (await worker.data(CLAIM))["claimNextJob"]
    job_id, fence = claim["job"]["id"], claim["lease"]["fence"]
    await worker.data(TRANSITION, id=job_id, fence=fence, to="BUILDING")
    moved = await scrape(http)
    assert value(moved, "fleetbridge_jobs", stage="QUEUED", priority="HIGH") == 1
    assert value(moved, "fleetbridge_jobs", stage="BUILDING", priority="HIGH") == 1
    assert value(moved, "fleetbridge_leases_held") == 1
    assert value(moved, "fleetbridge_job_stage_changes_total", to="ASSIGNED") == 1
    assert value(moved, "fleetbridge_job_stage_changes_total", to="BUILDING") == 1
    assert value(moved, "fleetbridge_claim_duration_seconds_count", outcome="claimed") == 1
    assert value(moved, "fleetbridge_http_requests_total", operation="Claim", outcome="ok") == 1
    assert value(moved, "fleetbridge_http_request_duration_seconds_count", operation="Move") == 1

    # A stale fence: the request's outcome is its error code.
    stale = await worker.execute(TRANSITION, id=job_id, fence=fence + 5, to="REVIEW")
    assert error_codes(stale) == ["CONFLICT"]
    failed = await scrape(http)
    assert value(
        failed, "fleetbridge_http_requests_total", operation="Move", outcome="CONFLICT"
    ) == 1

    # The lease runs out (moved into the past at the database seam) and the reaper
    # takes it back.
    async with server.services.db.unit_of_work() as session:
        await session.execute(
            update(Job).where(Job.id == int(job_id))
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    reaped = await server.app.state.runtime.loops.reap_once()
    assert reaped.requeued == (int(job_id),)
    after_reap = await scrape(http)
    assert value(after_reap, "fleetbridge_reaped_leases_total", outcome="requeued") == 1
    assert value(after_reap, "fleetbridge_leases_held") == 0
    assert value(after_reap, "fleetbridge_jobs", stage="QUEUED", priority="HIGH") == 2
    assert value(after_reap, "fleetbridge_jobs", stage="BUILDING", priority="HIGH") == 0

    # Subscribers connected: up while a subscription is open, down after.
    async with ws_connect(server.ws_url, TRANSPORT_WS, member.token) as client:
        operation = await client.subscribe(JOB_EVENTS)
        await wait_for_value(http, "fleetbridge_subscribers", 1)
        await client.stop(operation)
    await wait_for_value(http, "fleetbridge_subscribers", 0)


async def test_echo_failures_and_the_sweeper_backlog_are_counted(
    live_server, http_client, make_token
):
    async def broken_writer(*_: Any) -> None:
        raise RuntimeError("tracker is down")

    server = await live_server(tracker_echo=True, echo_writer=broken_writer)
    member = http_client(server, await make_token("acme", Role.MEMBER))
    item = (await member.data('mutation { createItem(input: {title: "t"}) { id } }'))
    await member.data(
        "mutation($id: ID!) { ingestItemAsJob(itemId: $id) { job { id } } }",
        id=item["createItem"]["id"],
    )
    samples = await scrape(member.http)
    assert value(samples, "fleetbridge_echo_failures_total") == 1
    assert value(samples, "fleetbridge_echo_backlog") == 1


@pytest.mark.parametrize("store", ["sqlite"])
async def test_one_log_line_per_request_with_its_request_id(
    live_server, http_client, make_token, caplog
):
    server = await live_server()
    worker = http_client(server, await make_token("acme", Role.WORKER))
    caplog.set_level(logging.INFO, logger="app.access")

    response = await worker.http.post(
        "/graphql", json={"query": CLAIM, "operationName": "Claim"},
        headers={"Authorization": f"Bearer {worker.token}", "X-Request-ID": "req-42.a"},
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-42.a"
    lines = [r for r in caplog.records if r.name == "app.access"]
    assert len(lines) == 1
    line: Any = lines[0]
    assert (line.operation, line.product, line.role, line.outcome, line.status) == (
        "Claim", "acme", "worker", "ok", 200
    )
    assert line.duration_ms >= 0
    assert "id=req-42.a" in line.getMessage()

    # An id that could forge log lines is replaced by a generated one.
    caplog.clear()
    forged = await worker.http.get("/healthz", headers={"X-Request-ID": "a b\tc"})
    generated = forged.headers["x-request-id"]
    assert len(generated) == 32
    assert generated != "a b\tc"
    (health,) = [r for r in caplog.records if r.name == "app.access"]
    assert (health.operation, health.outcome, health.product) == ("/healthz", "ok", "-")  # type: ignore[attr-defined]

    # Anonymous and refused requests are logged too, with their outcome.
    caplog.clear()
    anonymous = http_client(server, None)
    await anonymous.execute("{ viewer { productId } }")
    await anonymous.http.post("/graphql", content=b"{nope", headers={
        "Content-Type": "application/json"})
    outcomes = [(r.operation, r.outcome, r.role) for r in caplog.records  # type: ignore[attr-defined]
                if r.name == "app.access"]
    assert outcomes == [("anonymous", "UNAUTHENTICATED", "-"), ("anonymous", "http_400", "-")]


@pytest.mark.parametrize("store", ["sqlite"])
def test_operation_labels_are_bounded(store: str) -> None:
    from app.metrics import MAX_OPERATION_LABELS, ServiceMetrics

    metrics = ServiceMetrics()
    assert metrics.operation_label(None) == "anonymous"
    assert metrics.operation_label("not a name!") == "invalid"
    names = [metrics.operation_label(f"Op{n}") for n in range(MAX_OPERATION_LABELS + 5)]
    assert names[:MAX_OPERATION_LABELS] == [f"Op{n}" for n in range(MAX_OPERATION_LABELS)]
    assert set(names[MAX_OPERATION_LABELS:]) == {"other"}
    assert metrics.operation_label("Op0") == "Op0"  # names already seen keep their label


async def test_readyz_checks_that_migrations_are_at_head(live_server, http_client, caplog):
    from app.migrate import downgrade, upgrade

    server = await live_server()
    http = http_client(server, None).http
    assert (await http.get("/readyz")).status_code == 200

    await asyncio.to_thread(downgrade, server.services.settings.database_url, "-1")
    caplog.clear()
    caplog.set_level(logging.INFO)
    behind = await http.get("/readyz")
    assert behind.status_code == 503
    assert behind.json()["status"] == "unavailable"
    assert "fleetbridge migrate" in behind.json()["reason"]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].exc_info is None
    assert "not ready" in warnings[0].getMessage()

    await asyncio.to_thread(upgrade, server.services.settings.database_url)
    assert (await http.get("/readyz")).status_code == 200


@pytest.mark.parametrize("store", ["sqlite"])
async def test_json_logs_carry_the_request_line_as_fields(database_url):
    import json
    import signal
    import sys

    from tests.api.test_cli import ROOT, cli_env
    from tests.conftest import free_port

    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
        cwd=ROOT, env=cli_env(DATABASE_URL=database_url, FLEET_LOG_FORMAT="json"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            while True:
                assert process.returncode is None, "serve exited early"
                assert loop.time() < deadline, "serve did not answer in time"
                try:
                    await http.get("/healthz")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            answer = await http.get("/readyz", headers={"X-Request-ID": "probe-7"})
            assert answer.headers["x-request-id"] == "probe-7"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 60)
    text = err.decode()
    try:
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise AssertionError(f"a log line is not JSON: {text}") from exc
    assert lines, "no log lines"
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    (probe,) = [line for line in lines if line.get("request_id") == "probe-7"]
    assert probe["logger"] == "app.access"
    assert (probe["path"], probe["operation"], probe["status"], probe["outcome"]) == (
        "/readyz", "/readyz", 200, "ok"
    )
    assert isinstance(probe["duration_ms"], float | int)
