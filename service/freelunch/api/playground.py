"""The playground page at `/`: a static page, shipped in the package, that builds its form from
the model card (`/v1/models`: the methods served and their options' JSON schemas) and calls the API
like any client, with the API key the user typed in. The page itself is public (it holds no data);
with `--no-playground` none of it is served and `/` is the usual 404."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

PAGE_DIR = Path(__file__).with_name("playground")
# the files served, by URL path: a fixed table, so that no path a client sends reaches the disk
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/playground/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/playground/style.css": ("style.css", "text/css; charset=utf-8"),
}
# the page loads nothing from elsewhere, and may be framed by no other site
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _file_route(body: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return serve


def build_playground_router() -> APIRouter:
    router = APIRouter()
    for path, (name, media_type) in FILES.items():
        # read once: the files are small and ship with the package
        router.add_api_route(
            path, _file_route((PAGE_DIR / name).read_bytes(), media_type), methods=["GET", "HEAD"], include_in_schema=False
        )
    return router
