#!/usr/bin/env python3
"""Echo calls for bench/transceiver.py: the two servers under test, and a light caller.

Servers (each runs as its own process, ``python bench/echo_calls.py serve KIND ...``):

``rtcrelay``
    ``transceiver.service.Transceiver`` with the default ``EchoPipeline``: ICE through the
    relay tunnel, the vectorised audio level (installed by ``transceiver.session``), uvloop.
``stock``
    A plain aiortc server: ``RTCPeerConnection(iceServers=[])``, host candidates on 127.0.0.1
    only (aioice's ``get_host_addresses`` patched), echo with ``MediaRelay().subscribe(track)``
    and a data channel that sends every message back; uvloop (same loop as rtcrelay, so the
    comparison isolates the tunnel and the audio-level fix). Imports nothing of transceiver/.

Both answer ``POST /v1/sessions`` (``application/sdp``: 201, the answer, ``Location``) and
``DELETE /v1/sessions/{id}``, and serve ``GET /bench/stats`` (JSON: server-side offer ->
connected times, sessions, frames the echo dropped) on a control port. Each prints one line
``READY http=PORT control=PORT pid=PID`` on stdout and runs until SIGTERM/SIGINT.

Caller (:class:`Caller`, in the benchmark's own process): a stock aiortc
``RTCPeerConnection`` does the signalling, ICE, DTLS and SCTP (and answers consent checks),
but no media work: its audio track never yields a frame. Once connected, the caller sends
pre-encoded Opus (the 440 Hz tone of ``tests/webrtc_peer.SineTrack``, encoded once by
aiortc's own ``OpusEncoder``: what an aiortc caller would send) as SRTP with the negotiated
SSRC, payload type and header extensions (mid, audio level), at 50 packets/s, straight to the
nominated ICE pair's transport; the echoed SRTP packets are taken off the ICE connection
before aiortc's queue, unprotected (so they are authenticated) and counted, never decoded.
A data-channel message goes out every second and its echo is counted too. Per call that is
a few tens of microseconds per packet instead of an Opus encode + decode: one core of callers
drives many times more calls than full aiortc callers could.

Loopback only (127.0.0.1). Every wait is bounded.
"""
from __future__ import annotations

import argparse
import asyncio
import fractions
import os
import random
import re
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
# Run as a script, Python puts bench/ first on sys.path, where bench/transceiver.py and
# bench/relay.py would shadow the `transceiver` and `relay` packages: use the repository root.
if sys.path and Path(sys.path[0] or ".").resolve() == _BENCH:
    sys.path[0] = str(_BENCH.parent)

HOST = "127.0.0.1"
SESSIONS_PATH = "/v1/sessions"
SDP = {"Content-Type": "application/sdp"}
CLOCK_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms
FRAME_S = FRAME_SAMPLES / CLOCK_RATE
# An echo this much later than the call's best echo delay counts as lost. Not lower: one lost
# packet makes aiortc's audio jitter buffer (capacity 16, prefetch 4) wait for 16 more, and the
# call's echo stays ~200 ms later from then on; a backlog that keeps growing crosses 0.5 s soon.
LATE_S = 0.5
DC_INTERVAL_S = 1.0
#: Every echoed packet's delay above its call's best echo delay (s); the benchmark clears it per window.
ECHO_DELAYS: list[float] = []


def loopback_only_ice() -> None:
    """aioice skips 127.0.0.1 when gathering host candidates: use only it (both sides)."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [HOST]


# =========================================================================== servers

class _SetupLog:
    """Server-side offer -> connected times and a few counters, for GET /bench/stats."""

    def __init__(self) -> None:
        self.setup_ms: list[float] = []
        self.first_check_ms: list[float] = []
        self.echo_dropped = 0
        self.sessions = lambda: 0

    def json(self) -> dict:
        return {"setup_ms": self.setup_ms, "first_check_ms": self.first_check_ms, "sessions": self.sessions(),
                "echo_dropped": self.echo_dropped}


def rtp_totals(pcs) -> dict:
    """Server-side RTP counters summed over live connections: in (received, lost by sequence), out."""
    from transceiver.rtp_stats import rtp_counts

    counts = rtp_counts(pcs)
    return {"rtp_in": counts.received, "rtp_in_lost": counts.lost, "rtp_out": counts.sent}


def _control_routes(app, log: _SetupLog, extra=None) -> None:
    from aiohttp import web

    async def stats(request):
        body = log.json()
        if extra is not None:
            body.update(extra())
        return web.json_response(body)

    async def reset(request):
        log.setup_ms.clear()
        log.first_check_ms.clear()
        return web.json_response({})

    app.router.add_get("/bench/stats", stats)
    app.router.add_post("/bench/reset", reset)


async def _site(app, port: int = 0):
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def _until_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def serve_rtcrelay(relay_public: str, keys_file: str, max_sessions: int, cpu_budget: float = 0.0,
                         max_loop_lag: float = 0.0) -> None:
    from aiohttp import web

    from transceiver.service import Transceiver, TransceiverConfig

    config = TransceiverConfig(relay_public_addresses=[relay_public], route_keys_file=keys_file, http_host=HOST,
                               http_port=0, max_sessions=max_sessions, connect_timeout=20.0,
                               admission_cpu_budget=cpu_budget, admission_max_loop_lag=max_loop_lag)
    tx = Transceiver(config)
    await tx.start()
    manager = tx.manager
    assert manager is not None and tx.http_address is not None
    log = _SetupLog()
    log.sessions = lambda: len(manager.sessions)
    connected, closed = manager._session_connected, manager._session_closed

    def on_connected(session) -> None:
        if session.setup_seconds is not None:
            log.setup_ms.append(session.setup_seconds * 1000)
        connected(session)

    def on_closed(session, reason) -> None:
        log.echo_dropped += session.outgoing.dropped
        closed(session, reason)

    # Offer received -> the session's first ICE check arrived through the tunnel.
    tunnel = tx.tunnel
    assert tunnel is not None
    bind = tunnel._bind_by_ufrag
    seen: set[str] = set()

    def bind_by_ufrag(relay, frame):
        flow = bind(relay, frame)
        if flow is not None and flow.link.ufrag not in seen:
            seen.add(flow.link.ufrag)
            session = next((s for s in manager.sessions.values() if s.ufrag == flow.link.ufrag), None)
            if session is not None:
                log.first_check_ms.append((time.monotonic() - session.started) * 1000)
        return flow

    tunnel._bind_by_ufrag = bind_by_ufrag  # type: ignore[method-assign]
    manager._session_connected = on_connected  # type: ignore[method-assign]
    manager._session_closed = on_closed  # type: ignore[method-assign]

    def extra() -> dict:
        live = sum(s.outgoing.dropped for s in manager.sessions.values())
        assert tx.tunnel is not None
        drops = {k: v for k, v in tx.tunnel.counters.drops.items() if v}
        totals = rtp_totals(s.pc for s in manager.sessions.values() if s.pc is not None)
        return {"echo_dropped": log.echo_dropped + live, "tunnel_drops": drops, **totals}

    control = web.Application()
    _control_routes(control, log, extra)
    runner, control_port = await _site(control)
    print(f"READY http={tx.http_address[1]} control={control_port} pid={os.getpid()}", flush=True)
    try:
        await _until_signal()
    finally:
        await asyncio.wait_for(tx.stop(), 15)
        await runner.cleanup()


async def serve_stock(max_sessions: int) -> None:
    import secrets

    from aiohttp import web
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.contrib.media import MediaRelay

    loopback_only_ice()
    media_relay = MediaRelay()
    sessions: dict[str, RTCPeerConnection] = {}
    closing: set[asyncio.Future] = set()  # the close tasks, held until done (the loop keeps weak references)
    log = _SetupLog()
    log.sessions = lambda: len(sessions)

    async def close(sid: str) -> None:
        pc = sessions.pop(sid, None)
        if pc is not None:
            await asyncio.wait_for(pc.close(), 5)

    async def create(request: web.Request) -> web.Response:
        started = time.monotonic()
        if len(sessions) >= max_sessions:
            return web.Response(status=503, text="at_capacity\n", headers={"Retry-After": "2"})
        offer = await request.text()
        sid = secrets.token_urlsafe(12)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        sessions[sid] = pc
        done = False

        @pc.on("connectionstatechange")
        def on_state() -> None:
            nonlocal done
            if pc.connectionState == "connected" and not done:
                done = True
                log.setup_ms.append((time.monotonic() - started) * 1000)
            elif pc.connectionState in ("failed", "closed"):
                task = asyncio.ensure_future(close(sid))
                closing.add(task)
                task.add_done_callback(closing.discard)

        @pc.on("track")
        def on_track(track) -> None:
            if track.kind == "audio":
                pc.addTrack(media_relay.subscribe(track))

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            @channel.on("message")
            def on_message(message) -> None:
                if channel.readyState == "open":
                    channel.send(message)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc's parser raises anything on a bad offer
            await close(sid)
            return web.Response(status=400, text=f"sdp_rejected: {type(exc).__name__}: {exc}\n")
        return web.Response(status=201, body=pc.localDescription.sdp.encode(), content_type="application/sdp",
                            headers={"Location": f"{SESSIONS_PATH}/{sid}"})

    async def delete(request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        if sid not in sessions:
            return web.Response(status=404)
        await close(sid)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post(SESSIONS_PATH, create)
    app.router.add_delete(SESSIONS_PATH + "/{sid}", delete)
    _control_routes(app, log, lambda: rtp_totals(sessions.values()))
    runner, port = await _site(app)
    print(f"READY http={port} control={port} pid={os.getpid()}", flush=True)
    try:
        await _until_signal()
    finally:
        await asyncio.wait_for(asyncio.gather(*(close(s) for s in list(sessions)), return_exceptions=True), 15)
        await runner.cleanup()


# =========================================================================== caller

def encoded_tone(frames: int = 50, amplitude: int = 8000) -> list[bytes]:
    """One second of SineTrack's 440 Hz tone as Opus payloads, by aiortc's own encoder."""
    import numpy as np
    from aiortc.codecs.opus import OpusEncoder
    from av import AudioFrame

    encoder = OpusEncoder()
    payloads: list[bytes] = []
    pts = 0
    for _ in range(frames + 10):
        t = (np.arange(FRAME_SAMPLES) + pts) / CLOCK_RATE
        samples = (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = CLOCK_RATE
        frame.pts = pts
        frame.time_base = fractions.Fraction(1, CLOCK_RATE)
        pts += FRAME_SAMPLES
        out, _ = encoder.encode(frame)
        payloads += out
        if len(payloads) >= frames:
            break
    return payloads[:frames]


def _silent_track():
    from aiortc.mediastreams import MediaStreamTrack

    class SilentTrack(MediaStreamTrack):
        """Never yields a frame: aiortc's sender waits forever; the caller sends the RTP itself."""

        kind = "audio"

        async def recv(self):
            await asyncio.Future()

    return SilentTrack()


@dataclass
class Counters:
    tx: int = 0  # RTP packets sent
    rx: int = 0  # echoed RTP packets received, authenticated
    rx_late: int = 0  # of rx: later than LATE_S behind the call's best echo delay
    rx_gaps: int = 0  # echo packets missing by sequence number (lost between server and caller)
    dc_tx: int = 0
    dc_rx: int = 0

    def minus(self, other: Counters) -> Counters:
        return Counters(*(getattr(self, f) - getattr(other, f) for f in self.__dataclass_fields__))


@dataclass
class Caller:
    """One call: aiortc for signalling/ICE/DTLS/SCTP, hand-made SRTP for the audio (module doc)."""

    base_url: str
    counters: Counters = field(default_factory=Counters)
    location: str | None = None
    offered_at: float = 0.0  # monotonic, just before the offer is POSTed
    answered_at: float = 0.0
    connected_at: float = 0.0
    failed: str | None = None
    media: bool = False
    rx_bad: int = 0
    hangup_errors: int = 0

    def __post_init__(self) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTrack(_silent_track())
        self.dc = self.pc.createDataChannel("echo")
        self.dc.on("message", self._on_message)
        self._connected = asyncio.Event()
        self.pc.on("connectionstatechange", self._on_state)
        self.pc.on("iceconnectionstatechange", self._on_ice_state)
        self.ice_connected_at = 0.0
        self._best_lag: float | None = None
        self._ts_high = 0  # unwrapped echo timestamp
        self._ts_last: int | None = None
        self._rx_seq: int | None = None
        self._seq = random.randrange(1 << 16)
        self._ts = random.randrange(1 << 32)
        self._index = 0
        self.next_due = 0.0
        self.next_dc = 0.0

    def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and not self._connected.is_set():
            self.connected_at = time.monotonic()
            self._connected.set()
        elif state in ("failed", "closed") and not self._connected.is_set():
            self.failed = state
            self._connected.set()

    def _on_ice_state(self) -> None:
        if self.pc.iceConnectionState in ("completed", "connected") and not self.ice_connected_at:
            self.ice_connected_at = time.monotonic()

    def _on_message(self, message) -> None:
        self.counters.dc_rx += 1

    @property
    def setup_ms(self) -> float:
        return (self.connected_at - self.offered_at) * 1000

    async def dial(self, http, timeout: float = 20.0) -> None:
        """Offer, answer, wait until connected (AssertionError on failure or timeout)."""
        from aiortc import RTCSessionDescription

        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.offered_at = time.monotonic()
        async with http.post(self.base_url + SESSIONS_PATH, data=self.pc.localDescription.sdp, headers=SDP,
                             timeout=_client_timeout(timeout)) as response:
            text = await response.text()
            if response.status != 201:
                raise AssertionError(f"offer refused: {response.status} {text.strip()[:200]}")
            self.location = response.headers["Location"]
        self.answered_at = time.monotonic()
        await self.pc.setRemoteDescription(RTCSessionDescription(text, "answer"))
        self._prepare(text)
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"not connected after {timeout} s") from None
        if self.failed:
            raise AssertionError(f"connection {self.failed}")

    def _prepare(self, answer: str) -> None:
        transceiver = self.pc.getTransceivers()[0]
        self._dtls = transceiver.sender.transport
        self._ice = self._dtls.transport._connection
        pt = int(re.search(r"a=rtpmap:(\d+) opus/48000", answer, re.IGNORECASE).group(1))  # type: ignore[union-attr]
        self._ssrc = transceiver.sender._ssrc
        self._pt = pt
        original = self._ice.data_received
        counters = self.counters
        unpack = struct.Struct("!HI").unpack_from
        monotonic = time.monotonic
        dtls = self._dtls
        late_s = LATE_S

        def data_received(data: bytes, component: int) -> None:
            # SRTP (not SRTCP): count it here; everything else goes to aiortc as usual.
            if len(data) > 12 and 127 < data[0] < 192 and not 192 <= data[1] <= 208 and dtls._rx_srtp is not None:
                try:
                    plain = dtls._rx_srtp.unprotect(data)
                except Exception:  # pylibsrtp.Error and friends: not authentic
                    self.rx_bad += 1
                    return
                now = monotonic()
                seq, ts = unpack(plain, 2)
                if self._rx_seq is not None:
                    gap = (seq - self._rx_seq - 1) & 0xFFFF
                    if gap < 1000:
                        counters.rx_gaps += gap
                self._rx_seq = seq
                if self._ts_last is None:
                    self._ts_high = ts
                else:
                    self._ts_high += (ts - self._ts_last + (1 << 31)) % (1 << 32) - (1 << 31)
                self._ts_last = ts
                lag = now - self._ts_high / CLOCK_RATE  # echo delay + a constant (unknown) offset
                if self._best_lag is None or lag < self._best_lag:
                    self._best_lag = lag
                counters.rx += 1
                if len(ECHO_DELAYS) < 200_000:
                    ECHO_DELAYS.append(lag - self._best_lag)
                if lag - self._best_lag > late_s:
                    counters.rx_late += 1
                return
            original(data, component)

        self._ice.data_received = data_received

    def start_media(self, now: float) -> None:
        """Build the RTP header template (after DTLS: the extension map is set) and start sending."""
        from aiortc.rtp import RtpPacket

        packet = RtpPacket(payload_type=self._pt, sequence_number=0, timestamp=0, ssrc=self._ssrc, marker=1)
        mid = self.pc.getTransceivers()[0].mid
        packet.extensions.mid = mid
        packet.extensions.audio_level = (False, 12)
        self._header = bytearray(packet.serialize(self._dtls._rtp_header_extensions_map))
        pair = self._ice._nominated.get(1)
        if pair is None:
            raise AssertionError("no nominated ICE pair")
        self._send = pair.protocol.transport.sendto
        self._remote = pair.remote_addr
        self._protect = self._dtls._tx_srtp.protect
        self.next_due = now + random.uniform(0, FRAME_S)
        self.next_dc = now + random.uniform(0, DC_INTERVAL_S)
        self.media = True

    def send_due(self, now: float, payloads: list[bytes], max_burst: int = 5) -> float:
        """Send the packets due by ``now`` (at most max_burst); returns how late the first was."""
        late = now - self.next_due
        header = self._header
        sent = 0
        while self.next_due <= now and sent < max_burst:
            struct.pack_into("!HI", header, 2, self._seq, self._ts)
            self._send(self._protect(bytes(header) + payloads[self._index]), self._remote)
            self._index = (self._index + 1) % len(payloads)
            self._seq = (self._seq + 1) & 0xFFFF
            self._ts = (self._ts + FRAME_SAMPLES) & 0xFFFFFFFF
            self.counters.tx += 1
            self.next_due += FRAME_S
            sent += 1
        if self.next_due <= now:  # hopelessly behind: skip ahead (those packets were never sent)
            self.next_due = now + FRAME_S
        if now >= self.next_dc:
            self.next_dc = now + DC_INTERVAL_S
            if self.dc.readyState == "open":
                self.dc.send(f"echo {self.counters.dc_tx}")
                self.counters.dc_tx += 1
        return late

    async def hang_up(self, http) -> None:
        """DELETE the session and close the connection; best effort, bounded (errors are counted)."""
        import aiohttp

        self.media = False
        if self.location is not None:
            try:
                async with http.delete(self.base_url + self.location, timeout=_client_timeout(5)):
                    pass
            except (TimeoutError, aiohttp.ClientError):
                self.hangup_errors += 1
        try:
            await asyncio.wait_for(self.pc.close(), 5)
        except Exception:  # aiortc's close may raise anything; the call is over either way
            self.hangup_errors += 1


def _client_timeout(seconds: float):
    import aiohttp

    return aiohttp.ClientTimeout(total=seconds)


class MediaClock:
    """Sends every active caller's packets at 50/s, from one task ticking every few ms."""

    def __init__(self, payloads: list[bytes], tick_s: float = 0.004) -> None:
        self.payloads = payloads
        self.tick_s = tick_s
        self.callers: list[Caller] = []
        self.lateness: list[float] = []  # per tick: how late the most late packet was (s)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        monotonic = time.monotonic
        while True:
            now = monotonic()
            worst = 0.0
            for caller in self.callers:
                if caller.media and caller.next_due <= now:
                    try:
                        late = caller.send_due(now, self.payloads)
                    except Exception:  # the call went away under us: stop its media
                        caller.media = False
                        continue
                    worst = max(worst, late)
            self.lateness.append(worst)
            if len(self.lateness) > 100_000:
                del self.lateness[:50_000]
            await asyncio.sleep(self.tick_s)


# =========================================================================== entry point

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one server under test")
    serve.add_argument("kind", choices=("rtcrelay", "stock"))
    serve.add_argument("--relay-public", default="", help="rtcrelay: the relay's public HOST:PORT")
    serve.add_argument("--route-keys", default="", help="rtcrelay: the relay's route keys file")
    serve.add_argument("--max-sessions", type=int, default=1000)
    # Admission by load is off unless asked: bench/transceiver.py looks for the cliff itself.
    serve.add_argument("--admission-cpu-budget", type=float, default=0.0, help="rtcrelay: cores (0: off)")
    serve.add_argument("--admission-max-loop-lag", type=float, default=0.0, help="rtcrelay: seconds (0: off)")
    args = parser.parse_args(argv)

    import logging

    import uvloop

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    switch = os.environ.get("RTCRELAY_BENCH_SWITCH_INTERVAL")
    if switch:  # an experiment knob (bench/transceiver.py --server-switch-interval), not a default
        sys.setswitchinterval(float(switch))
    inline = os.environ.get("RTCRELAY_BENCH_INLINE_EXECUTOR") == "1"
    if args.kind == "rtcrelay":
        server = serve_rtcrelay(args.relay_public, args.route_keys, args.max_sessions, args.admission_cpu_budget,
                                args.admission_max_loop_lag)
        uvloop.run(_with_executor(server, inline))
    else:
        uvloop.run(_with_executor(serve_stock(args.max_sessions), inline))


async def _with_executor(main, inline: bool) -> None:
    """Experiment knob: run run_in_executor() work (aiortc's Opus encode) inline on the loop."""
    if inline:
        import concurrent.futures

        class InlineExecutor(concurrent.futures.Executor):
            def submit(self, fn, /, *args, **kwargs):
                future: concurrent.futures.Future = concurrent.futures.Future()
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # handed to the awaiting caller
                    future.set_exception(exc)
                return future

        asyncio.get_running_loop().set_default_executor(InlineExecutor())
    await main


if __name__ == "__main__":
    main()
