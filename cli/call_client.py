"""A reusable aiortc caller for rtcrelay's WHIP-style signalling, that calls again when its
call is lost (what a voice client should do; `rtcrelay call` and the tests use it).

:class:`ReconnectingCall` POSTs an offer (a tone, an "echo" data channel), applies the answer
and watches the call: when no media has come in for ``silence_s`` it asks the session
resource (``GET``); a ``404`` means the session is gone with its transceiver (a crash, or a
restart that lost it), and so does a connection that went ``failed``: it calls again, and the
signalling sends the new call to a live transceiver. A call on hold (no media, session
``200``) is left alone. The browser side of the same logic is in cli/static/call.js.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
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
        await self._call()
        self._watch = asyncio.ensure_future(self._watchdog())

    async def _call(self) -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(SineTrack())
        pc.createDataChannel("echo")
        pc.on("track", lambda track: self._spawn(self._read(pc, track)))
        await pc.setLocalDescription(await pc.createOffer())
        async with self.http.post(self.signalling_url, data=pc.localDescription.sdp,
                                  headers={"Content-Type": SDP}) as resp:
            answer = await resp.text()
            if resp.status != 201:
                await pc.close()
                raise RuntimeError(f"signalling answered {resp.status}: {answer.strip()}")
            location = resp.headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        self.pc, self.location = pc, str(URL(self.signalling_url).join(URL(location)))
        deadline = time.monotonic() + self.connect_timeout_s
        while pc.connectionState != "connected":
            if time.monotonic() > deadline or pc.connectionState in ("failed", "closed"):
                raise RuntimeError(f"the call did not connect ({pc.connectionState})")
            await asyncio.sleep(0.01)
        if self.on_call is not None:
            self.on_call(pc)

    async def _read(self, pc: RTCPeerConnection, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
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
