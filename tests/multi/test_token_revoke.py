"""A revoke reaches every instance (issue 10 §2): two real `fleetbridge serve`
processes on one PostgreSQL, a websocket open on each, and the real
`fleetbridge token revoke` process.  The instances re-check open sockets only once a
minute here, so closing both within 5 s is the NOTIFY's doing."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from app.auth.models import Role
from tests.api.test_cli import cli_env, run_cli
from tests.api.ws_client import JOB_EVENTS, TRANSPORT_WS, ws_connect
from tests.conftest import error_codes
from tests.multi.test_two_instances import Instance

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("store", ["postgres"])]

VIEWER = "query { viewer { productId role } }"


async def test_a_revoke_closes_websockets_and_refuses_requests_on_every_instance(
    database_url, tmp_path, monkeypatch, http_client, make_token
):
    monkeypatch.setenv("FLEET_TOKEN_CHECK_SECONDS", "60")
    monkeypatch.setenv("FLEET_TOKEN_CACHE_SECONDS", "60")
    instances = [Instance(name, database_url, tmp_path) for name in ("A", "B")]
    try:
        await asyncio.gather(*(instance.wait_healthy() for instance in instances))
        secret = await make_token("acme", Role.WORKER)
        code, out, err = await run_cli("token", "list", "--json",
                                       env=cli_env(DATABASE_URL=database_url))
        assert code == 0, err
        token_id = str(json.loads(out.splitlines()[-1])["id"])
        clients = [http_client(instance, secret) for instance in instances]
        for client in clients:  # twice: the second answer comes from the cache
            for _ in range(2):
                assert (await client.data(VIEWER))["viewer"]["role"] == "WORKER"
        async with ws_connect(instances[0].ws_url, TRANSPORT_WS, secret) as on_a, \
                ws_connect(instances[1].ws_url, TRANSPORT_WS, secret) as on_b:
            await on_a.subscribe(JOB_EVENTS)
            await on_b.subscribe(JOB_EVENTS)
            code, _, err = await run_cli("token", "revoke", token_id,
                                         env=cli_env(DATABASE_URL=database_url))
            assert code == 0, err
            started = time.monotonic()
            closed = await asyncio.gather(on_a.wait_closed(timeout=5), on_b.wait_closed(timeout=5))
            assert [code for code, _ in closed] == [4403, 4403]
            assert time.monotonic() - started < 5
        for client in clients:
            assert error_codes(await client.execute(VIEWER)) == ["UNAUTHENTICATED"]
    finally:
        for instance in instances:
            instance.kill()
            if log := instance.log():
                print(f"--- instance {instance.name} log ---\n{log}")
