"""Open CORS for the signalling HTTP APIs (the transceiver's, and `rtcrelay up`'s front), so a
call page served from another origin can POST, PATCH and DELETE sessions and read the
``Location`` and ``ETag`` of the answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

__all__ = ["ACCEPT_POST", "CORS_HEADERS", "PREFLIGHT_HEADERS", "cors_middleware", "preflight"]

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Location, ETag, Link, WWW-Authenticate, Retry-After",
}
PREFLIGHT_HEADERS = {
    **CORS_HEADERS,
    "Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Authorization, If-Match, Rtcrelay-Handoff",
    "Access-Control-Max-Age": "600",
}

ACCEPT_POST = {"Accept-Post": "application/sdp"}  # WHIP: what a POST to the sessions URL takes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # aiohttp's own 404/405 responses need the headers too
        exc.headers.update(CORS_HEADERS)
        raise
    response.headers.update(CORS_HEADERS)
    return response


async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers=PREFLIGHT_HEADERS)
