"""When the database cannot be reached the service still answers: GraphQL requests
get SERVICE_UNAVAILABLE (never a 500 or a stack trace), /readyz says 503 and
/healthz stays up."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import error_codes


async def test_an_unreachable_database_is_an_error_code_not_a_500(
    live_server, store: str, tmp_path: Path
):
    unreachable = (
        f"sqlite+aiosqlite:///{tmp_path / 'no-such-dir' / 'fleet.db'}" if store == "sqlite"
        else "postgresql+asyncpg://postgres@127.0.0.1:1/fleetbridge"  # nothing listens there
    )
    server = await live_server(database_url=unreachable)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 503
        for headers in ({"Authorization": "Bearer fb_some-token"}, {}):
            response = await http.post(
                "/graphql", json={"query": "{ viewer { productId } }"}, headers=headers
            )
            assert response.status_code == 200, response.text
            assert "Traceback" not in response.text
            expected = "SERVICE_UNAVAILABLE" if headers else "UNAUTHENTICATED"
            assert error_codes(response.json()) == [expected]
