"""The client's and the worker's pure rules: what is transient, how retries wait and log,
how a job's outcome reads on the worker's line."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from gql.transport.exceptions import (
    TransportConnectionFailed,
    TransportProtocolError,
    TransportServerError,
)

from app.client import FleetApiError, JobState, RetryPolicy, Stream, http_url, websocket_url
from app.client.retry import call_with_retry, is_transient
from app.watch import choose_streams
from app.worker import failure_reason, read_metrics
from app.worker_report import elapsed, figures, outcome

FAST = RetryPolicy(initial_seconds=0.001, max_seconds=0.002, jitter_seconds=0.001)


@pytest.mark.parametrize(("error", "transient"), [
    (FleetApiError("SERVICE_UNAVAILABLE", "the database is unavailable"), True),
    (FleetApiError("RATE_LIMITED", "slow down"), True),
    (FleetApiError("CONFLICT", "stale fence"), False),
    (FleetApiError("UNAUTHENTICATED", "bad token"), False),
    (FleetApiError("BAD_USER_INPUT", "title"), False),
    (TransportServerError("bad gateway", 502), True),
    (TransportServerError("too many", 429), True),
    (TransportServerError("not found", 404), False),
    (TransportConnectionFailed("connection refused"), True),
    (ConnectionRefusedError(), True),
    (TimeoutError(), True),
    (TransportProtocolError("not GraphQL"), False),
    (ValueError("bug"), False),
])
def test_what_is_worth_another_try(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


async def test_transient_failures_are_retried_with_one_warning_each(caplog) -> None:
    failures = [FleetApiError("SERVICE_UNAVAILABLE", "db down"), ConnectionRefusedError()]

    async def call() -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    with caplog.at_level(logging.WARNING, logger="app.client"):
        assert await call_with_retry("claimNextJob", FAST, call) == "ok"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("claimNextJob failed (SERVICE_UNAVAILABLE: db down); retry 1 in")
    assert "retry 2 in" in lines[1]


async def test_an_answer_is_raised_at_once_and_a_bounded_policy_gives_up() -> None:
    calls = 0

    async def conflict() -> None:
        nonlocal calls
        calls += 1
        raise FleetApiError("CONFLICT", "stale fence")

    with pytest.raises(FleetApiError, match="CONFLICT"):
        await call_with_retry("transitionJob", FAST, conflict)
    assert calls == 1

    async def down() -> None:
        raise FleetApiError("SERVICE_UNAVAILABLE", "db down")

    with pytest.raises(FleetApiError, match="SERVICE_UNAVAILABLE"):
        await asyncio.wait_for(call_with_retry("heartbeat", FAST.bounded(0.05), down), 5)


async def test_an_interrupt_ends_a_long_wait_at_once() -> None:
    stop = asyncio.Event()
    policy = RetryPolicy(initial_seconds=60, max_seconds=60, interrupt=stop)

    async def down() -> None:
        stop.set()  # as if SIGINT arrived during the request
        raise FleetApiError("SERVICE_UNAVAILABLE", "db down")

    with pytest.raises(FleetApiError):
        await asyncio.wait_for(call_with_retry("claimNextJob", policy, down), 5)


def test_endpoint_addresses() -> None:
    assert websocket_url("http://h:1/graphql") == "ws://h:1/graphql"
    assert websocket_url("https://h/graphql") == "wss://h/graphql"
    assert http_url("ws://h:1/graphql") == "http://h:1/graphql"
    assert http_url("wss://h/graphql") == "https://h/graphql"
    assert http_url("http://h/graphql") == "http://h/graphql"


def test_the_worker_lines_read_the_outcome() -> None:
    shipped = JobState({"id": "1", "stage": "SHIPPED", "attempts": 1, "failureReason": None,
                        "metrics": {"costUsd": 0.5, "tokensIn": 120, "tokensOut": 30}})
    assert (outcome(shipped), figures(shipped)) == (
        "SHIPPED", ", cost $0.50, tokens 120 in / 30 out")
    over = JobState({"id": "1", "stage": "FAILED", "attempts": 1,
                     "failureReason": "budget exceeded", "metrics": {"costUsd": 1.2}})
    assert (outcome(over), figures(over)) == ("FAILED (budget exceeded)", ", cost $1.20")
    again = JobState({"id": "1", "stage": "QUEUED", "attempts": 1,
                      "failureReason": "exit code 75", "metrics": {}})
    assert (outcome(again), figures(again)) == ("QUEUED again (exit code 75)", "")
    assert [elapsed(s) for s in (0.42, 59.9, 93, 7500)] == ["0.4s", "59.9s", "1m33s", "2h05m"]
    assert (failure_reason(3), failure_reason(-15)) == ("exit code 3", "killed by signal 15")


def test_metrics_file_keeps_only_usable_figures(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text('{"costUsd": 0.25, "tokensIn": 10, "tokensOut": -1, "x": 1}')
    assert read_metrics(path) == {"costUsd": 0.25, "tokensIn": 10}
    path.write_text("not json")
    assert read_metrics(path) is None
    assert read_metrics(tmp_path / "missing.json") is None


def test_watch_streams_from_the_options() -> None:
    assert choose_streams(None, None, None) == [Stream("job"), Stream("item")]
    assert choose_streams(None, None, "item") == [Stream("item")]
    assert choose_streams("12", None, None) == [Stream("job", "12")]
    assert choose_streams("12", "7", None) == [Stream("job", "12"), Stream("item", "7")]
