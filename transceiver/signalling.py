"""HTTP signalling, WHIP-style (RFC 9725), plus health, readiness and metrics.

- ``POST /v1/sessions`` with ``Content-Type: application/sdp`` and an SDP offer:
  ``201 Created``, the SDP answer (``application/sdp``), ``Location: /v1/sessions/{id}``.
  ``415`` for another content type, ``400`` with a ``reason: detail`` line for an offer this
  service will not answer (malformed, not BUNDLE, no audio/data channel, ...), ``413`` when
  too large, ``503`` with ``Retry-After`` at capacity (``max_sessions``) or overloaded (the
  process's CPU or event-loop lag: transceiver/admission.py), ``503`` while draining; the
  body's first line is ``reason: detail``. An offer of a call that moves here (drain) may carry
  its old pipeline's state in the ``Rtcrelay-Handoff`` header (transceiver/handoff.py): ``400``
  ``handoff_malformed``/``_forged``/``_expired``/``_unknown_key`` when it cannot be used.
- ``DELETE /v1/sessions/{id}``: ``204``, or ``404`` for an unknown (or already ended) session.
- ``GET /v1/sessions/{id}``: ``{"state": ...}`` and the ETag, or ``404``: what a client whose
  media stopped asks before it calls again.
- ``PATCH /v1/sessions/{id}`` with ``Content-Type: application/trickle-ice-sdpfrag`` (RFC 9725
  section 4.3, RFC 8840): the ``201`` carries a strong ``ETag``; a PATCH needs ``If-Match``
  (``428`` without, ``412`` unless it is ``*`` or the current ETag). New ``a=ice-ufrag``/
  ``a=ice-pwd`` restart ICE: ``200`` with our fragment (new ufrag, password, candidates,
  ``a=end-of-candidates``) and the new ETag. A fragment without new credentials (trickled
  candidates) gets ``204``: its candidates are not needed, since the relay is the only path
  and the client's addresses are learned from its checks (peer-reflexive). ``400`` for a
  malformed fragment, ``415`` for another content type, ``404`` for an unknown session.
- ``GET /healthz`` (the process answers), ``GET /readyz`` (``503`` while draining),
  ``GET /metrics`` (Prometheus text).

The answer carries every candidate (there is one: the relay's address) and
``a=end-of-candidates``. CORS is open (``*``, exposing ``Location`` and ``ETag``) so a demo
page served elsewhere can call it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aiohttp import web
from multidict import CIMultiDict

from daemon.cors import ACCEPT_POST, PREFLIGHT_HEADERS, cors_middleware, preflight
from transceiver.bearer import BearerError, BearerVerifier
from transceiver.handoff import HANDOFF_HEADER, HandoffError, open_state
from transceiver.metrics import render
from transceiver.sdp import MAX_OFFER_BYTES, OfferError
from transceiver.sdpfrag import FRAGMENT_TYPE, FragmentError, build_answer_fragment, parse_fragment
from transceiver.session import Session, SessionManager, SessionRejected

__all__ = ["make_app", "SESSIONS_PATH"]

log = logging.getLogger("rtcrelay.transceiver.signalling")

SESSIONS_PATH = "/v1/sessions"
SDP = "application/sdp"
def make_app(manager: SessionManager, verifier: BearerVerifier | None = None,
             ice_links: Sequence[str] = ()) -> web.Application:
    """``verifier``: bearer-token authentication (None: off); ``ice_links``: ``Link`` header
    values for ICE servers (transceiver/ice_links.py)."""
    # client_max_size: aiohttp answers 413 itself past it.
    app = web.Application(middlewares=[cors_middleware], client_max_size=MAX_OFFER_BYTES)
    metrics = manager.metrics

    def with_links(headers: dict[str, str]) -> CIMultiDict[str]:
        out = CIMultiDict(headers)
        for value in ice_links:
            out.add("Link", value)
        return out

    def denied(exc: BearerError) -> web.Response:
        metrics.auth_failures[exc.reason] += 1
        return web.Response(status=exc.status, text=f"{exc.error or 'unauthorized'}: {exc.description}\n",
                            headers={"WWW-Authenticate": exc.www_authenticate()})

    def subject_of(request: web.Request) -> str | None:
        """The request's subject (None: authentication is off); BearerError if it has none."""
        if verifier is None:
            return None
        return verifier.subject(request.headers.get("Authorization"), manager.clock())

    def owned_session(request: web.Request) -> Session | web.Response:
        """The session the path names, if the request may touch it: else 401, 403 or 404."""
        try:
            subject = subject_of(request)
        except BearerError as exc:
            return denied(exc)
        session = manager.get(request.match_info["session_id"])
        if session is None:
            return web.Response(status=404, text="unknown session\n")
        if subject is not None and session.subject != subject:
            return denied(BearerVerifier.forbid(subject))
        return session

    def reject(status: int, reason: str, detail: str = "", headers: dict[str, str] | None = None) -> web.Response:
        metrics.rejected[reason] += 1
        text = f"{reason}: {detail}\n" if detail else f"{reason}\n"
        return web.Response(status=status, text=text, headers=headers)

    async def create_session(request: web.Request) -> web.Response:
        if request.content_type != SDP:
            return reject(415, "unsupported_media_type", f"Content-Type must be {SDP}, not {request.content_type!r}")
        try:
            offer = await request.text()
        except web.HTTPRequestEntityTooLarge:
            return reject(413, "sdp_too_large", f"at most {MAX_OFFER_BYTES} bytes")
        except UnicodeDecodeError:
            return reject(400, "sdp_malformed", "the offer is not text")
        try:
            subject = subject_of(request)
        except BearerError as exc:
            return denied(exc)
        handoff = None
        if HANDOFF_HEADER in request.headers:
            try:
                handoff = open_state(manager.keyring, request.headers[HANDOFF_HEADER], manager.clock())
            except HandoffError as exc:
                return reject(400, exc.reason, exc.detail)
        try:
            session, answer = await manager.create(offer, handoff, subject)
        except SessionRejected as exc:
            headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
            return reject(429 if exc.reason == "subject_limit" else 503, exc.reason, exc.detail, headers)
        except OfferError as exc:
            return reject(400, exc.reason, exc.detail)
        except Exception:
            log.exception("offer failed")
            return reject(500, "internal_error")
        return web.Response(
            status=201,
            body=answer.encode(),
            content_type=SDP,
            headers=with_links({"Location": f"{SESSIONS_PATH}/{session.id}", "ETag": session.etag}),
        )

    async def patch_session(request: web.Request) -> web.Response:
        session = owned_session(request)
        if isinstance(session, web.Response):
            return session
        if request.content_type != FRAGMENT_TYPE:
            return web.Response(status=415, text=f"Content-Type must be {FRAGMENT_TYPE}\n")
        if_match = request.headers.get("If-Match")
        if if_match is None:
            return web.Response(status=428, text="If-Match required (the session's ETag, or * for an ICE restart)\n")
        if if_match.strip() not in ("*", session.etag):
            return web.Response(status=412, text="the session's ICE state changed: its ETag is no longer that\n")
        try:
            fragment = parse_fragment(await request.text())
        except (FragmentError, UnicodeDecodeError) as exc:
            return web.Response(status=400, text=f"sdpfrag_malformed: {exc}\n")
        credentials = fragment.credentials
        if credentials is None or credentials == session.remote_credentials:
            return web.Response(status=204, headers={"ETag": session.etag})  # trickle: nothing to do
        try:
            ufrag, password, candidates = session.restart_ice(*credentials)
        except RuntimeError:
            return web.Response(status=404, text="unknown session\n")
        return web.Response(
            status=200,
            body=build_answer_fragment(fragment, ufrag, password, candidates).encode(),
            content_type=FRAGMENT_TYPE,
            headers={"ETag": session.etag},
        )

    async def delete_session(request: web.Request) -> web.Response:
        session = owned_session(request)
        if isinstance(session, web.Response):
            return session
        if not await manager.end(session.id):
            return web.Response(status=404, text="unknown session\n")
        return web.Response(status=204)

    async def get_session(request: web.Request) -> web.Response:
        # A client whose media stopped asks: 404 means its call is gone (its transceiver
        # restarted, or the front says so when the transceiver is dead): call again.
        session = owned_session(request)
        if isinstance(session, web.Response):
            return session
        return web.json_response({"state": session.state}, headers={"ETag": session.etag})

    async def sessions_options(request: web.Request) -> web.Response:
        # WHIP (RFC 9725 section 4.2): what a POST takes, and the ICE servers (section 4.6).
        return web.Response(status=204, headers=with_links({**PREFLIGHT_HEADERS, **ACCEPT_POST}))

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if manager.draining:
            return web.Response(status=503, text="draining\n")
        return web.Response(text="ready\n")

    async def metrics_text(request: web.Request) -> web.Response:
        body = render(
            metrics,
            manager.tunnel.counters,
            sessions=len(manager.sessions),
            capacity=manager.max_sessions,
            draining=manager.draining,
            admission=manager.admission,
            media=manager.media_totals(),
        )
        return web.Response(text=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app.router.add_post(SESSIONS_PATH, create_session)
    app.router.add_route("OPTIONS", SESSIONS_PATH, sessions_options)
    app.router.add_delete(SESSIONS_PATH + "/{session_id}", delete_session)
    app.router.add_patch(SESSIONS_PATH + "/{session_id}", patch_session)
    app.router.add_get(SESSIONS_PATH + "/{session_id}", get_session)
    app.router.add_route("OPTIONS", SESSIONS_PATH + "/{session_id}", preflight)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
    return app
