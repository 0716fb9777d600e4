"""A stock aiortc caller for tests: a 440 Hz tone, an "echo" data channel, what comes back.

Shared by the transceiver tests (fake relay) and the end-to-end tests (real relay).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from cli.call_client import SineTrack

# A transceiver run in the test's own process shares its event loop and CPU with the test's
# aiortc callers: their work would count as the transceiver's load (transceiver/admission.py).
# Admission by load is off for such transceivers unless a test asks; tests/test_admission.py
# measures it on a transceiver process of its own.
IN_PROCESS_ADMISSION: dict[str, float] = {"admission_cpu_budget": 0, "admission_max_loop_lag": 0}


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


class Client:
    """A stock aiortc caller: a tone, a data channel, and what comes back."""

    def __init__(self, audio: bool = True) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.track = SineTrack() if audio else None
        if self.track is not None:
            self.pc.addTrack(self.track)
        self.dc = self.pc.createDataChannel("echo")
        self.messages: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.dc.on("message", self.messages.put_nowait)
        self.rms: list[float] = []  # per received frame
        self.arrivals: list[float] = []  # monotonic time of each received frame
        self.location: str | None = None
        self.answer: str | None = None
        self._reader: asyncio.Task[None] | None = None

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._reader = asyncio.ensure_future(self._read(track))

    async def _read(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                self.arrivals.append(time.monotonic())
                samples = frame.to_ndarray().astype(np.float64)
                self.rms.append(math.sqrt(float(np.mean(samples * samples))))
        except MediaStreamError:
            pass

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def accept(self, answer: str) -> None:
        self.answer = answer
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))

    @property
    def server_ufrag(self) -> str:
        assert self.answer is not None
        return next(line.split(":", 1)[1] for line in self.answer.splitlines() if line.startswith("a=ice-ufrag:"))

    async def roundtrip(self, text: str, timeout: float = 5) -> str | bytes:
        await wait_for(lambda: self.dc.readyState == "open", timeout, "the data channel to open")
        self.dc.send(text)
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def hears_echo(self, timeout: float = 8) -> float:
        await wait_for(lambda: any(r > 1000 for r in self.rms), timeout, "echoed audio that is not silence")
        return max(self.rms)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest silence (s) between received frames in [start, end], edges included."""
        times = [start] + [t for t in self.arrivals if start <= t <= end] + [end]
        return max(b - a for a, b in itertools.pairwise(times))

    def selected_remote(self) -> tuple[str, int]:
        # aiortc has no public API for the selected pair; the nominated pair is it.
        return self.pc.sctp.transport.transport._connection._nominated[1].remote_addr  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.pc.close()


async def bearer_echo_call(base: str, token: str, text: str, diagnostics: Callable[[], str],
                           public: str | None = None) -> None:
    """A data-channel call to a WHIP endpoint (``base``) that requires bearer tokens, as a
    deployment's client makes it: refused 401 without the token, answered 201 with it (the
    answer's only candidate ``public``, "ip:port", when given), ``text`` echoed, then DELETE.
    ``diagnostics``: what to show when it does not connect (the services' logs)."""
    import aiohttp

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("echo")
    echoed: asyncio.Queue[str] = asyncio.Queue()
    channel.on("message", echoed.put_nowait)
    await pc.setLocalDescription(await pc.createOffer())
    sdp = {"Content-Type": "application/sdp"}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        async with aiohttp.ClientSession() as anonymous, \
                anonymous.post(f"{base}/v1/sessions", data=pc.localDescription.sdp, headers=sdp) as response:
            assert response.status == 401, await response.text()
        async with http.post(f"{base}/v1/sessions", data=pc.localDescription.sdp, headers=sdp) as response:
            answer = await response.text()
            assert response.status == 201, answer
            location = response.headers["Location"]
        if public is not None:  # the relay's public address is the only candidate: the call goes through it
            candidates = [line for line in answer.splitlines() if line.startswith("a=candidate")]
            assert candidates and all(public.replace(":", " ") in line for line in candidates), candidates
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        deadline = time.monotonic() + 20
        while channel.readyState != "open":
            assert time.monotonic() < deadline, f"no connection: {pc.connectionState}\n{diagnostics()}"
            await asyncio.sleep(0.05)
        channel.send(text)
        assert await asyncio.wait_for(echoed.get(), 10) == text
        async with http.delete(location if location.startswith("http") else base + location) as response:
            assert response.status in (200, 204), await response.text()
    await pc.close()
