"""A reusable aiortc caller for rtcrelay's WHIP-style signalling, that calls again when its
call is lost (what a voice client should do; `rtcrelay call` and the tests use it).

:class:`ReconnectingCall` POSTs an offer (a tone, an "echo" data channel), applies the answer
and watches the call: when no media has come in for ``silence_s`` it asks the session
resource (``GET``); a ``404`` means the session is gone with its transceiver (a crash, or a
restart that lost it), and so does a connection that went ``failed``: it calls again, and the
signalling sends the new call to a live transceiver. A call on hold (no media, session
``200``) is left alone. It also moves when asked: a transceiver that drains sends ``{"type": "migrate"}`` on the
``rtcrelay-control`` data channel; the caller then calls again (the draining transceiver
refuses new calls, so the signalling picks another), with the ``handoff`` the request carried
(the old pipeline's sealed state) in the ``Rtcrelay-Handoff`` header, waits for the new call's
first audio, switches to it and only then hangs up the old one (make-before-break). A ``503``
(every transceiver busy) is tried again after its ``Retry-After`` until the request's
``deadline_s``. The browser side of the same logic is cli/static/rtcrelay-call.js.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import time
from collections.abc import Callable

import aiohttp
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame
from yarl import URL

__all__ = ["ReconnectingCall", "SineTrack"]

log = logging.getLogger("rtcrelay.call")

SDP = "application/sdp"
CONTROL_CHANNEL = "rtcrelay-control"  # as transceiver/session.py
HANDOFF_HEADER = "Rtcrelay-Handoff"  # as transceiver/handoff.py: the old session's pipeline state
# A moved call switches once the new one has played this many frames (0.2 s): its first
# frames come in a burst as its jitter buffer fills, and the old call plays meanwhile.
SWITCH_AFTER_FRAMES = 10
MOVE_DEADLINE_S = 10.0  # a migrate request without deadline_s: how long to keep trying
START_DEADLINE_S = 10.0  # a first call refused with 503 (busy, overloaded) is tried again until then
MOVE_MARGIN_S = 1.0  # stop trying this long before the deadline: the new call needs time to start


class SignallingRefused(RuntimeError):
    """The signalling answered an offer with an error status (503: try again after ``retry_after_s``)."""

    def __init__(self, status: int, text: str, retry_after_s: float | None) -> None:
        super().__init__(f"signalling answered {status}: {text}")
        self.status = status
        self.retry_after_s = retry_after_s


class SineTrack(MediaStreamTrack):
    """A 440 Hz tone at about -12 dBov, paced in real time, 20 ms frames of 48 kHz mono."""

    kind = "audio"

    def __init__(self, amplitude: int = 8000) -> None:
        super().__init__()
        self.amplitude = amplitude
        self._start: float | None = None
        self._pts = 0

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += 960
            await asyncio.sleep(max(0.0, self._start + self._pts / 48000 - time.monotonic()))
        t = (np.arange(960) + self._pts) / 48000
        samples = (self.amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, 48000)
        return frame


class ReconnectingCall:
    """One call that is made again when it is lost. ``arrivals``: monotonic time of every
    audio frame received, across the calls; ``reconnects``: how many times it called again."""

    def __init__(self, signalling_url: str, *, silence_s: float = 0.5, connect_timeout_s: float = 15.0,
                 http: aiohttp.ClientSession | None = None,
                 on_call: Callable[[RTCPeerConnection], None] | None = None) -> None:
        self.signalling_url = signalling_url
        self.silence_s = silence_s
        self.connect_timeout_s = connect_timeout_s
        self._http = http
        self._own_http = http is None
        self.on_call = on_call
        self.pc: RTCPeerConnection | None = None
        self.location: str | None = None
        self.arrivals: list[float] = []
        self.reconnects = 0
        self.migrations = 0  # calls moved on request (make-before-break)
        self._audio_ready: dict[int, asyncio.Event] = {}  # id(pc) -> SWITCH_AFTER_FRAMES frames came
        self._migrating = False
        self.lost_at: float | None = None  # monotonic time the last call was found lost
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        return self._http

    async def start(self) -> None:
        """The first call; a 503 (every transceiver busy, or one overloaded for a moment: the
        admission's event-loop lag) is tried again after its Retry-After, for START_DEADLINE_S."""
        self.pc, self.location = await self._dial_before(time.monotonic() + START_DEADLINE_S, None)
        self._watch = asyncio.ensure_future(self._watchdog())

    async def _dial(self, handoff: str | None = None) -> tuple[RTCPeerConnection, str]:
        """A new connected call: (its connection, its session URL). ``handoff``: the old
        session's sealed pipeline state, for the new one (a moved call)."""
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(SineTrack())
        pc.createDataChannel("echo")
        control = pc.createDataChannel(CONTROL_CHANNEL)
        control.on("message", lambda message: self._on_control(pc, message))
        self._audio_ready[id(pc)] = asyncio.Event()
        pc.on("track", lambda track: self._spawn(self._read(pc, track)))
        await pc.setLocalDescription(await pc.createOffer())
        headers = {"Content-Type": SDP}
        if handoff:
            headers[HANDOFF_HEADER] = handoff
        async with self.http.post(self.signalling_url, data=pc.localDescription.sdp, headers=headers) as resp:
            answer = await resp.text()
            if resp.status != 201:
                await pc.close()
                retry_after = resp.headers.get("Retry-After", "")
                raise SignallingRefused(resp.status, answer.strip(),
                                        float(retry_after) if retry_after.isdigit() else None)
            location = str(URL(self.signalling_url).join(URL(resp.headers["Location"])))
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        deadline = time.monotonic() + self.connect_timeout_s
        while pc.connectionState != "connected":
            if time.monotonic() > deadline or pc.connectionState in ("failed", "closed"):
                await pc.close()
                raise RuntimeError(f"the call did not connect ({pc.connectionState})")
            await asyncio.sleep(0.01)
        if self.on_call is not None:
            self.on_call(pc)
        return pc, location

    async def _call(self) -> None:
        self.pc, self.location = await self._dial()

    def _on_control(self, pc: RTCPeerConnection, message: str | bytes) -> None:
        try:
            request = json.loads(message)
            kind = request.get("type")
            deadline_s = float(request.get("deadline_s", MOVE_DEADLINE_S))
            handoff = request.get("handoff")
        except (ValueError, AttributeError, TypeError):
            return
        if kind == "migrate" and pc is self.pc:
            self._spawn(self._migrate(time.monotonic() + deadline_s - MOVE_MARGIN_S,
                                      handoff if isinstance(handoff, str) else None))

    async def _dial_before(self, deadline: float, handoff: str | None) -> tuple[RTCPeerConnection, str]:
        """:meth:`_dial`, again after each 503's Retry-After (every transceiver busy) until ``deadline``."""
        while True:
            try:
                return await self._dial(handoff)
            except SignallingRefused as exc:
                wait = exc.retry_after_s if exc.retry_after_s is not None else 1.0
                if exc.status != 503 or time.monotonic() + wait > deadline:
                    raise
                log.info("no room for the call yet (%s): again in %.0f s", exc, wait)
                await asyncio.sleep(wait)

    async def _migrate(self, deadline: float, handoff: str | None) -> None:
        """Make-before-break: the new call first, its audio playing, then hang up the old one."""
        if self._migrating:
            return
        self._migrating = True
        try:
            new_pc, new_location = await self._dial_before(deadline, handoff)
            await asyncio.wait_for(self._audio_ready.pop(id(new_pc)).wait(), self.connect_timeout_s)
            old_pc, old_location = self.pc, self.location
            self.pc, self.location = new_pc, new_location
            self.migrations += 1
            with contextlib.suppress(aiohttp.ClientError):
                async with self.http.delete(old_location or ""):
                    pass
            if old_pc is not None:
                await old_pc.close()
        except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("moving the call failed (it stays where it is): %s", exc)
        finally:
            self._migrating = False

    async def _read(self, pc: RTCPeerConnection, track: MediaStreamTrack) -> None:
        ready = self._audio_ready.get(id(pc))
        frames = 0
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                frames += 1
                if ready is not None and frames >= SWITCH_AFTER_FRAMES:
                    ready.set()
                if pc is self.pc:
                    self.arrivals.append(time.monotonic())

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lost(self) -> bool:
        """Is the current call gone? (failed, or the session resource says 404)"""
        pc = self.pc
        if pc is None or pc.connectionState in ("failed", "closed"):
            return True
        last = self.arrivals[-1] if self.arrivals else 0.0
        if time.monotonic() - last < self.silence_s:
            return False
        try:
            async with self.http.get(self.location or "") as resp:
                return resp.status == 404
        except aiohttp.ClientError:
            return False  # the signalling itself is unreachable: nothing to learn from it

    async def _watchdog(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.silence_s / 2)
            if not await self._lost():
                continue
            self.lost_at = time.monotonic()
            self.reconnects += 1
            log.warning("the call is lost: calling again (%d)", self.reconnects)
            old, self.pc = self.pc, None
            if old is not None:
                await old.close()
            while not self._closed:
                try:
                    await self._call()
                    break
                except (RuntimeError, aiohttp.ClientError) as exc:
                    log.warning("calling again failed: %s", exc)
                    await asyncio.sleep(0.5)

    async def close(self) -> None:
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
        if self.location is not None:
            with contextlib.suppress(aiohttp.ClientError):
                async with self.http.delete(self.location):
                    pass
        if self.pc is not None:
            await self.pc.close()
        for task in list(self._tasks):
            task.cancel()
        if self._own_http and self._http is not None:
            await self._http.close()
