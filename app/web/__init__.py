"""The browser side served by fleetbridge itself: the live fleet board at `/board`,
GraphiQL at `/graphql` (GET, HTML), and their assets under `/static/`.

The assets are built from `web/` (TypeScript + Vite) into `app/web/static/`, which is
committed and shipped as package data, so installing fleetbridge needs no Node and the
pages load nothing from another host (issue 9).
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"
BOARD_HTML = STATIC_DIR / "board" / "index.html"
GRAPHIQL_HTML = STATIC_DIR / "graphiql" / "index.html"

# File names carry no content hash (the build is compared byte for byte in CI), so the
# browser revalidates every asset (ETag / Last-Modified make that a 304).
_REVALIDATE = {"Cache-Control": "no-cache"}


class _RevalidatedStaticFiles(StaticFiles):
    def file_response(
        self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(_REVALIDATE)
        return response


def html_page(path: Path) -> Response:
    """One of the built HTML pages, revalidated on every load."""
    return FileResponse(path, media_type="text/html", headers=_REVALIDATE)


async def _board(_: Request) -> Response:
    return html_page(BOARD_HTML)


async def _home(_: Request) -> Response:
    return RedirectResponse("/board", status_code=307)


def web_routes() -> list[BaseRoute]:
    """`/` (redirects to the board), `/board` and `/static/…`."""
    return [
        Route("/", _home, methods=["GET", "HEAD"]),
        Route("/board", _board, methods=["GET", "HEAD"]),
        Mount("/static", app=_RevalidatedStaticFiles(directory=STATIC_DIR), name="static"),
    ]
