"""The demo call page: a static page (cli/static) that calls the transceiver through the relay.

``make_demo_app(signalling_url, relay_address)`` serves

- ``/`` (and ``/index.html``): the page,
- ``/static/...``: its script and style sheet (nothing is fetched from anywhere else),
- ``/config.json``: ``{"signalling_url": ..., "relay": ...}``, which the page reads to know
  where to POST its offer.

Serve it from ``http://127.0.0.1:PORT`` (a secure context, so getUserMedia works). The page's
Content-Security-Policy allows scripts, styles and requests to this origin and to the
signalling URL's origin only.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from yarl import URL

__all__ = ["STATIC_DIR", "make_demo_app"]

STATIC_DIR = Path(__file__).resolve().parent / "static"

_NO_STORE = {"Cache-Control": "no-store"}


def _origin(url: str) -> str | None:
    parsed = URL(url)
    if not parsed.is_absolute():
        return None  # relative: same origin as the page
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"signalling_url must be http(s): {url!r}")
    return str(parsed.origin())


def _csp(signalling_url: str) -> str:
    connect = "'self'"
    origin = _origin(signalling_url)
    if origin is not None:
        connect += f" {origin}"
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            "media-src 'self' blob: mediastream:",
            f"connect-src {connect}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def make_demo_app(signalling_url: str, relay_address: str) -> web.Application:
    """The demo page app; ``signalling_url`` is the transceiver's ``.../v1/sessions`` URL."""
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        raise FileNotFoundError(f"demo page missing: {index}")
    config = {"signalling_url": signalling_url, "relay": relay_address}
    page_headers = {**_NO_STORE, "Content-Security-Policy": _csp(signalling_url), "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer"}

    async def page(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(index, headers=page_headers)

    async def config_json(request: web.Request) -> web.Response:
        return web.json_response(config, headers=_NO_STORE)

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/index.html", page)
    app.router.add_get("/config.json", config_json)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False, append_version=False)
    return app
