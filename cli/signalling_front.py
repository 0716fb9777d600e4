"""`rtcrelay up`'s signalling front: one WHIP endpoint for its N transceivers.

- ``POST /v1/sessions`` goes to the transceivers in turn, starting after the last one used; one
  that refuses (``503``: at capacity, draining) or does not answer (dead, restarting) is
  skipped, so a new call lands on a live transceiver while another is down.
- ``GET``/``PATCH``/``DELETE /v1/sessions/{id}`` go to the transceiver that answered the
  session's POST (its ``Location`` path is kept: the page only ever talks to this origin); a
  transceiver that does not answer makes it ``404``: the session is gone with it.
- ``/metrics`` sums the transceivers' samples of the same name and labels (counters and
  gauges of one kind, histogram buckets included); ``/healthz`` answers, ``/readyz`` is ``200``
  while one transceiver is ready.

What a production deployment puts in front of its transceivers (a load balancer, the
application's own signalling) does the same job; this one is the demo's.
"""

from __future__ import annotations

import asyncio
import collections
import itertools

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from daemon.cors import ACCEPT_POST, PREFLIGHT_HEADERS, cors_middleware, preflight

__all__ = ["SignallingFront", "sum_metrics"]

SESSIONS_PATH = "/v1/sessions"
FORWARDED_REQUEST = ("Content-Type", "If-Match", "Rtcrelay-Handoff", "Authorization")
FORWARDED_RESPONSE = ("Content-Type", "Location", "ETag", "Retry-After", "WWW-Authenticate", "Link")
FORWARDED_RESPONSE_LOWER = frozenset(k.lower() for k in FORWARDED_RESPONSE)
OFFER_TIMEOUT_S = 20.0  # an offer takes ~50 ms, seconds when many arrive at once
CONNECT_TIMEOUT_S = 1.0  # a transceiver that does not accept in this long is skipped
MAX_OWNERS = 100_000  # session id -> transceiver, bounded (oldest first out)


def sum_metrics(texts: list[str]) -> str:
    """Prometheus texts of several processes as one: HELP/TYPE once, equal series summed."""
    meta: dict[str, list[str]] = {}
    values: collections.OrderedDict[str, float] = collections.OrderedDict()
    family_of: dict[str, str] = {}
    for text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("#"):
                parts = line.split(" ", 3)
                family = parts[2] if len(parts) > 2 else ""
                if line not in meta.setdefault(family, []):
                    meta[family].append(line)
            elif line.strip():
                series, _, value = line.rpartition(" ")
                values[series] = values.get(series, 0.0) + float(value)
                family_of.setdefault(series, family)
    out: list[str] = []
    done: set[str] = set()
    for series, value in values.items():
        family = family_of[series]
        if family not in done:
            out.extend(meta.get(family, []))
            done.add(family)
        out.append(f"{series} {int(value) if value.is_integer() else value!r}")
    return "\n".join(out) + "\n"


class SignallingFront:
    def __init__(self, backends: list[str]) -> None:
        self.backends = backends  # base URLs, "http://127.0.0.1:PORT"
        self._next = itertools.cycle(range(len(backends)))
        self.owners: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[cors_middleware])
        app.router.add_post(SESSIONS_PATH, self.create)
        app.router.add_route("OPTIONS", SESSIONS_PATH, self.sessions_options)
        app.router.add_route("PATCH", SESSIONS_PATH + "/{session_id}", self.forward)
        app.router.add_delete(SESSIONS_PATH + "/{session_id}", self.forward)
        app.router.add_get(SESSIONS_PATH + "/{session_id}", self.forward)
        app.router.add_route("OPTIONS", SESSIONS_PATH + "/{session_id}", preflight)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        return app

    def _client(self) -> aiohttp.ClientSession:
        if self.http is None:
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=OFFER_TIMEOUT_S,
                                                                            connect=CONNECT_TIMEOUT_S))
        return self.http

    async def _send(self, method: str, url: str, request: web.Request, body: bytes) -> web.Response:
        headers = {k: request.headers[k] for k in FORWARDED_REQUEST if k in request.headers}
        async with self._client().request(method, url, data=body, headers=headers) as resp:
            # every value kept: a WHIP answer may carry several Link headers
            out = CIMultiDict((k, v) for k, v in resp.headers.items() if k.lower() in FORWARDED_RESPONSE_LOWER)
            return web.Response(status=resp.status, body=await resp.read(), headers=out)

    async def create(self, request: web.Request) -> web.Response:
        body = await request.read()
        last: web.Response | None = None
        first = next(self._next)  # each request tries every backend once, from its own start
        for base in self.backends[first:] + self.backends[:first]:
            try:
                response = await self._send("POST", base + SESSIONS_PATH, request, body)
            except (TimeoutError, aiohttp.ClientError):
                continue  # down or restarting: the next one
            if response.status == 503:
                last = response
                continue
            location = response.headers.get("Location", "")
            if response.status == 201 and location.startswith(SESSIONS_PATH + "/"):
                self.owners[location.rsplit("/", 1)[1]] = base
                while len(self.owners) > MAX_OWNERS:
                    self.owners.popitem(last=False)
            return response
        return last or web.Response(status=503, text="no transceiver is up\n", headers={"Retry-After": "1"})

    async def sessions_options(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers={**PREFLIGHT_HEADERS, **ACCEPT_POST})

    async def forward(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        base = self.owners.get(session_id)
        if base is None:
            return web.Response(status=404, text="unknown session\n")
        try:
            response = await self._send(request.method, f"{base}{SESSIONS_PATH}/{session_id}", request,
                                        await request.read())
        except (TimeoutError, aiohttp.ClientError):
            self.owners.pop(session_id, None)  # its transceiver is gone, and the session with it
            return web.Response(status=404, text="unknown session (its transceiver is gone)\n")
        if request.method == "DELETE" or response.status == 404:
            self.owners.pop(session_id, None)
        return response

    async def _get_all(self, path: str) -> list[tuple[int, str]]:
        async def one(base: str) -> tuple[int, str]:
            try:
                async with self._client().get(base + path) as resp:
                    return resp.status, await resp.text()
            except (TimeoutError, aiohttp.ClientError):
                return 0, ""

        return list(await asyncio.gather(*(one(b) for b in self.backends)))

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        ready = sum(1 for status, _ in await self._get_all("/readyz") if status == 200)
        return web.Response(status=200 if ready else 503, text=f"{ready} of {len(self.backends)} transceivers ready\n")

    async def metrics(self, request: web.Request) -> web.Response:
        texts = [text for status, text in await self._get_all("/metrics") if status == 200]
        return web.Response(text=sum_metrics(texts),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
