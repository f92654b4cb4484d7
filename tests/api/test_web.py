"""The browser side over real HTTP (issue 9): `/` and `/board`, the packaged assets,
GraphiQL served from the package (nothing from another host), FLEET_GRAPHIQL, and
CORS (FLEET_CORS_ORIGINS) preflights."""

from __future__ import annotations

import re

import pytest

ALLOWED = "http://board.example:5173"
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)


async def test_home_redirects_to_the_board_and_the_board_loads_its_packaged_assets(
    live_server, http_client
):
    client = http_client(await live_server(), None)
    home = await client.http.get("/")
    assert home.status_code == 307
    assert home.headers["location"] == "/board"
    board = await client.http.get("/board")
    assert board.status_code == 200
    assert board.headers["content-type"].startswith("text/html")
    assert not EXTERNAL.search(board.text), "the board must not load anything from another host"
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', board.text)
    assert any(path.endswith(".js") for path in assets)
    assert any(path.endswith(".css") for path in assets)
    for path in assets:
        response = await client.http.get(path)
        assert response.status_code == 200, path
        assert response.headers["cache-control"] == "no-cache"
    assert (await client.http.get("/static/assets/no-such-file.js")).status_code == 404


async def test_graphiql_is_the_packaged_page_and_loads_nothing_from_another_host(
    live_server, http_client
):
    client = http_client(await live_server(), None)
    page = await client.http.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert "fleetbridge · GraphiQL" in page.text
    assert not EXTERNAL.search(page.text)
    assert "unpkg.com" not in page.text
    for path in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        assert (await client.http.get(path)).status_code == 200, path


async def test_graphiql_can_be_switched_off(live_server, http_client):
    client = http_client(await live_server(graphiql=False), None)
    page = await client.http.get("/graphql", headers={"Accept": "text/html"})
    assert "GraphiQL" not in page.text
    assert page.status_code >= 400


@pytest.mark.parametrize("store", ["sqlite"])
async def test_cors_preflight_from_an_allowed_origin_is_answered(live_server, http_client):
    client = http_client(await live_server(cors_origins=(ALLOWED,)), None)
    preflight = await client.http.options("/graphql", headers={"Origin": ALLOWED, **PREFLIGHT})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers
    answer = await client.http.post(
        "/graphql", json={"query": "{ __typename }"}, headers={"Origin": ALLOWED}
    )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ALLOWED


@pytest.mark.parametrize("store", ["sqlite"])
async def test_cors_preflight_from_another_origin_is_refused(live_server, http_client):
    client = http_client(await live_server(cors_origins=(ALLOWED,)), None)
    other = "http://evil.example"
    preflight = await client.http.options("/graphql", headers={"Origin": other, **PREFLIGHT})
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers
    answer = await client.http.post(
        "/graphql", json={"query": "{ __typename }"}, headers={"Origin": other}
    )
    assert "access-control-allow-origin" not in answer.headers


@pytest.mark.parametrize("store", ["sqlite"])
async def test_without_cors_origins_a_preflight_is_not_answered(live_server, http_client):
    client = http_client(await live_server(), None)
    preflight = await client.http.options("/graphql", headers={"Origin": ALLOWED, **PREFLIGHT})
    assert preflight.status_code >= 400
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_origins_are_read_comma_separated(monkeypatch):
    from app.config import Settings

    monkeypatch.setenv("FLEET_CORS_ORIGINS", " http://a.example, https://b.example:8443/ ,")
    assert Settings().cors_origins == ("http://a.example", "https://b.example:8443")
    monkeypatch.setenv("FLEET_CORS_ORIGINS", "")
    assert Settings().cors_origins == ()
