"""`GET /playground`: a chat page over the server's own API (static files shipped in
phitune/serving/static; no build step, no CDN, nothing fetched from elsewhere).

The page itself is public, as /health is: it holds no secret. It asks for the API key
once, keeps it in page memory and sends it on each /v1 call like any client, so the
API's auth, filter, queue and metrics apply to it unchanged. A strict Content Security
Policy lets the page load only this server's own script and style and talk only to
this server.
"""
from __future__ import annotations

from importlib.resources import files

from fastapi.responses import Response

from phitune.serving.schemas import APIError

STATIC = files("phitune.serving") / "static"
ASSETS = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def page():
    return Response((STATIC / "playground.html").read_bytes(), media_type="text/html; charset=utf-8",
                    headers=HEADERS)


async def asset(name: str):
    if name not in ASSETS:  # a fixed list: no path from the URL reaches the file system
        raise APIError(404, f"Unknown request URL: GET /playground/{name}.", "invalid_request_error", None,
                       "unknown_url")
    return Response((STATIC / name).read_bytes(), media_type=ASSETS[name], headers=HEADERS)


def add_routes(app) -> None:
    app.add_api_route("/playground", page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/playground/{name}", asset, methods=["GET"], include_in_schema=False)
