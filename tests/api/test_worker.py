"""`fleetbridge worker` as a user runs it: a real process against a served instance (uvicorn
in the test's loop), on both stores.  Its lines (stderr) and the jobs' rows are checked.
The worker's behaviour through outages is in test_worker_outage.py.
"""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import sys

import pytest

from app.auth.models import Role
from app.client import FleetClient
from app.worker import EX_TEMPFAIL, Worker, WorkerConfig
from tests.api.test_cli import ROOT, cli_env, run_cli
from tests.api.worker_helpers import (
    CANCEL,
    DEADLINE,
    WorkerProcess,
    ingested_job,
    job_of,
    python_command,
    stage_is,
    until,
    unused_path,
)

# Ships only when the body arrives on stdin and the job's fields are in the environment;
# leaves metrics for the worker to report.  The worker's token must not be passed on.
CHECKING_COMMAND = """
import json, os, sys
body = sys.stdin.read()
env = os.environ
ok = (body == 'the body' and env['FLEET_JOB_TITLE'] == 'Ship it'
      and env['FLEET_JOB_ID'] == env['EXPECTED_JOB_ID'] and env['FLEET_JOB_ATTEMPT'] == '1'
      and env['FLEET_JOB_CAPABILITIES'] == 'os:linux' and 'FLEET_TOKEN' not in env)
with open(env['FLEET_METRICS_FILE'], 'w') as f:
    json.dump({'costUsd': 0.5, 'tokensIn': 120, 'tokensOut': 30}, f)
sys.exit(0 if ok else 3)
"""

SUBMIT = "mutation($input: SubmitJobInput!) { submitJob(input: $input) { job { id } } }"

# Sleeps (until killed) for the job named in its argument; exits 0 at once for any other.
SLEEPS_FOR_ONE_JOB = python_command(
    "import os, sys, time\n"
    "if os.environ['FLEET_JOB_ID'] == sys.argv[1]:\n    time.sleep(120)\n")


async def test_worker_once_ships_the_job_with_one_line_per_happening(
    live_server, http_client, make_token
):
    server = await live_server(tracker_echo=True)
    member = http_client(server, await make_token("acme", Role.MEMBER))
    _, job_id = await ingested_job(member, "the body", ["cap:os:linux"])

    code, out, err = await run_cli(
        "worker", "--url", f"{server.url}/graphql", "--worker-id", "cli-worker",
        "--capability", "os:linux", "--once", "--", sys.executable, "-c", CHECKING_COMMAND,
        env=cli_env(FLEET_TOKEN=await make_token("acme", Role.WORKER), EXPECTED_JOB_ID=job_id),
        timeout=DEADLINE,
    )
    assert code == 0, err
    assert err.splitlines()[0].split(" ", 1)[1].startswith("worker cli-worker started: ")
    lines = err.splitlines()[1:]
    assert [line.split(" ", 1)[1].split(" in ")[0] for line in lines] == [
        f'job {job_id}: claimed "Ship it" (attempt 1 of 3, fence 1)',
        f"job {job_id}: BUILDING",
        f"job {job_id}: exit 0 -> SHIPPED",
    ]
    assert lines[-1].endswith("cost $0.50, tokens 120 in / 30 out")
    assert out == ""  # stdout is the command's
    job = await job_of(member, job_id)
    assert job["stage"] == "SHIPPED"
    assert job["item"]["status"] == "DONE"
    assert job["metrics"] == {"costUsd": 0.5, "tokensIn": 120, "tokensOut": 30}


async def test_worker_reports_a_failing_command_with_its_exit_code(
    live_server, http_client, make_token
):
    server = await live_server(tracker_echo=True)
    member = http_client(server, await make_token("acme", Role.MEMBER))
    _, job_id = await ingested_job(member, "not what the command wants", [])

    code, _, err = await run_cli(
        "worker", "--url", f"{server.url}/graphql", "--token",
        await make_token("acme", Role.WORKER), "--once", "--", sys.executable, "-c",
        "import sys; data=sys.stdin.read(); sys.exit(0 if data=='the body' else 3)",
        env=cli_env(), timeout=DEADLINE,
    )
    assert code == 0, err
    assert f"job {job_id}: exit 3 -> FAILED (exit code 3) in " in err
    job = await job_of(member, job_id)
    assert (job["stage"], job["failureReason"]) == ("FAILED", "exit code 3")
    assert job["item"]["status"] == "BLOCKED"


async def test_once_on_an_empty_queue_says_so_and_a_bad_token_is_an_error(
    live_server, make_token
):
    server = await live_server()
    worker_token = await make_token("acme", Role.WORKER)
    args = ("worker", "--url", f"{server.url}/graphql", "--once", "--", "true")
    code, out, err = await run_cli(*args, env=cli_env(FLEET_TOKEN=worker_token))
    assert (code, out) == (0, "")
    assert err.splitlines()[-1].endswith(" no job in the queue"), err
    code, _, err = await run_cli(*args, env=cli_env(FLEET_TOKEN="not-a-token"))
    assert code == 2
    assert "UNAUTHENTICATED" in err
    assert "Traceback" not in err


async def test_exit_tempfail_is_a_retryable_failure_from_python(
    live_server, http_client, make_token
):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    _, job_id = await ingested_job(member, "the body", [])
    command = [sys.executable, "-c", f"import sys; sys.exit({EX_TEMPFAIL})"]
    async with FleetClient(f"{server.url}/graphql",
                           await make_token("acme", Role.WORKER)) as client:
        outcomes = await asyncio.wait_for(
            Worker(client, WorkerConfig(command=command, worker_id="w", once=True)).run(),
            DEADLINE,
        )
    assert [(o.job_id, o.exit_code, o.stage) for o in outcomes] == [
        (job_id, EX_TEMPFAIL, "QUEUED")]
    job = await job_of(member, job_id)
    assert (job["stage"], job["attempts"], job["failureReason"]) == (
        "QUEUED", 1, f"exit code {EX_TEMPFAIL}")


async def test_a_command_that_cannot_start_stops_the_worker_and_uses_no_attempt(
    live_server, http_client, make_token
):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    _, first = await ingested_job(member, "the body", [])
    _, second = await ingested_job(member, "another body", ["priority:low"])

    worker = await WorkerProcess.start(f"{server.url}/graphql",
                                       await make_token("acme", Role.WORKER),
                                       "--poll-seconds", "0.2", command=(unused_path(),))
    assert await worker.finish() == 2, worker.text
    assert f"job {first}: released (cannot run the command" in worker.text
    assert f"error: cannot run the command ['{unused_path()}']" in worker.text
    assert "Traceback" not in worker.text
    # the worker stopped at the first job: it did not burn the attempts of the queue
    for job_id in (first, second):
        job = await job_of(member, job_id)
        assert (job["stage"], job["attempts"], job["lease"]) == ("QUEUED", 0, None)


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_a_signal_releases_the_held_job_without_using_an_attempt(
    live_server, http_client, make_token, signum, exit_code
):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    _, job_id = await ingested_job(member, "the body", [])
    worker = await WorkerProcess.start(f"{server.url}/graphql",
                                       await make_token("acme", Role.WORKER))
    await until(lambda: stage_is(member, job_id, "BUILDING"), "BUILDING", worker.process)
    await worker.wait_for_line(f"job {job_id}: BUILDING")

    if signum == signal.SIGINT:
        # Ctrl-C on a terminal: the whole process group gets it, the command too
        os.killpg(worker.process.pid, signum)
    else:
        worker.process.send_signal(signum)
    assert await worker.finish() == exit_code, worker.text
    job = await job_of(member, job_id)
    assert (job["stage"], job["attempts"], job["lease"]) == ("QUEUED", 0, None)
    assert job["failureReason"] == f"worker stopped by {signum.name}"
    assert f"job {job_id}: released (worker stopped by {signum.name}); back to QUEUED" in (
        worker.text)


async def test_a_signal_while_waiting_for_a_job_exits_at_once(live_server, make_token):
    server = await live_server()
    worker = await WorkerProcess.start(f"{server.url}/graphql",
                                       await make_token("acme", Role.WORKER),
                                       "--poll-seconds", "60")
    await worker.wait_for_line("started")
    worker.process.send_signal(signal.SIGINT)
    assert await worker.finish(deadline=DEADLINE) == 130, worker.text


async def test_a_job_cancelled_by_a_member_kills_the_command_and_says_why(
    live_server, http_client, make_token
):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    _, job_id = await ingested_job(member, "the body", [])
    _, next_job = await ingested_job(member, "the body", ["priority:low"])
    worker = await WorkerProcess.start(
        f"{server.url}/graphql", await make_token("acme", Role.WORKER), "--lease-seconds", "6",
        "--poll-seconds", "0.2",
        command=(*SLEEPS_FOR_ONE_JOB, job_id),
    )
    await worker.wait_for_line(f"job {job_id}: BUILDING")
    await member.data(CANCEL, id=job_id, reason="item cancelled")
    await worker.wait_for_line(f"job {job_id}: CANCELLED (item cancelled) by the service")
    # … and goes on with the next job
    await until(lambda: stage_is(member, next_job, "SHIPPED"), "the next job", worker.process)
    worker.process.send_signal(signal.SIGTERM)
    assert await worker.finish() == 143, worker.text
    line = next(line for line in worker.lines if "by the service" in line)
    assert "command killed (exit -15)" in line
    assert (await job_of(member, job_id))["stage"] == "CANCELLED"


async def test_a_budget_overrun_is_reported_on_the_jobs_line(live_server, http_client,
                                                             make_token):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    submitted = await member.data(SUBMIT, input={"title": "Ship it", "bodyMd": "b",
                                                 "budget": 1.0})
    job_id = submitted["submitJob"]["job"]["id"]
    code, _, err = await run_cli(
        "worker", "--url", f"{server.url}/graphql", "--once", "--", *python_command(
            "import json, os; json.dump({'costUsd': 1.5}, open(os.environ['FLEET_METRICS_FILE'],"
            " 'w'))"),
        env=cli_env(FLEET_TOKEN=await make_token("acme", Role.WORKER)), timeout=DEADLINE,
    )
    assert code == 0, err
    assert f"job {job_id}: exit 0 -> FAILED (budget exceeded) in " in err
    assert err.rstrip().endswith("cost $1.50")
    job = await job_of(member, job_id)
    assert (job["stage"], job["failureReason"]) == ("FAILED", "budget exceeded")


async def test_on_a_terminal_a_live_status_and_the_commands_output_pass_through(
    live_server, http_client, make_token
):
    """stderr (and stdout) on a pseudo-terminal: rich draws its status line, the job lines
    and the command's own output are printed above it."""
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    _, job_id = await ingested_job(member, "the body", [])
    controller, terminal = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "worker", "--url", f"{server.url}/graphql", "--once",
        "--", *python_command("import sys, time; print('hello from the command', flush=True);"
                              " time.sleep(1.5); print('bye', file=sys.stderr)"),
        cwd=ROOT, env=cli_env(FLEET_TOKEN=await make_token("acme", Role.WORKER),
                              TERM="xterm-256color", COLUMNS="160"),
        stdin=terminal, stdout=terminal, stderr=terminal,
    )
    os.close(terminal)
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []

    def read_all() -> None:
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: every end of the terminal is closed
                return
            if not data:
                return
            chunks.append(data)

    try:
        reader = loop.run_in_executor(None, read_all)
        assert await asyncio.wait_for(process.wait(), DEADLINE) == 0
        await asyncio.wait_for(reader, DEADLINE)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        os.close(controller)
    shown = b"".join(chunks).decode(errors="replace")
    assert "\x1b[" in shown  # drawn, not plain lines
    assert f"job {job_id}: BUILDING" in shown
    assert "hello from the command" in shown
    assert "bye" in shown
    assert f"job {job_id}: exit 0 -> SHIPPED" in shown
    assert "Traceback" not in shown
    assert (await job_of(member, job_id))["stage"] == "SHIPPED"
