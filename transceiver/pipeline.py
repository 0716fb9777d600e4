"""Media pipelines: where a voice-AI backend plugs in. The default is echo.

The session (transceiver/session.py) does all the WebRTC; a pipeline sees only decoded audio
and data-channel messages, one pipeline object per session:

``await start(io)``
    Once, before the answer is sent. Keep ``io``: it is how the pipeline talks to the caller.
``await on_audio_frame(frame)``
    Every decoded 20 ms frame of the caller's audio, in order, as a PyAV ``AudioFrame``
    (s16, 48 kHz, stereo from Opus). The session awaits it before reading the next frame;
    meanwhile decoded frames queue in aiortc's (unbounded) track queue, so return quickly
    and hand long work (speech recognition, an LLM call) to a task.
``await on_message(message, channel)``
    A data-channel message (``str`` or ``bytes``) and the channel's label, in order.
``await close()``
    Once, when the session ends (hang-up, DELETE, watchdog, drain). Cancel your tasks here.
``await handoff() -> bytes | None``
    When the call is asked to move to another transceiver (drain, rolling upgrade): the state
    the new session's pipeline should continue from (at most 4 KiB: a conversation id in your
    own store, or the state itself when small), or None. The call goes on here until the
    client hangs this session up, once its new one plays.
``await resume(state)``
    On the new session's pipeline, before ``start``: the bytes the old one's ``handoff``
    returned (sealed and verified on the way: transceiver/handoff.py).

``io.send_audio(frame)`` queues an ``AudioFrame`` (s16, mono or stereo, any rate: aiortc's
Opus encoder resamples) for the caller; the queue holds about a second and drops the oldest
frame when full, so generate audio at real-time pace. ``io.send_message(message, channel)``
sends on the named data channel (default: the first open one); before the caller's channel
is open, messages are dropped.

A pipeline must not block the event loop: it shares it with every session of the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

__all__ = ["PipelineIO", "Pipeline", "PipelineFactory", "EchoPipeline", "OutgoingAudioTrack"]

OUTGOING_AUDIO_FRAMES = 50  # ~1 s of 20 ms frames


class PipelineIO(Protocol):
    """What a pipeline can do to its caller."""

    def send_audio(self, frame: AudioFrame) -> None: ...

    def send_message(self, message: str | bytes, channel: str | None = None) -> None: ...


class Pipeline:
    """Base class: every hook does nothing. Subclass and override what you need."""

    async def start(self, io: PipelineIO) -> None:
        self.io = io

    async def on_audio_frame(self, frame: AudioFrame) -> None:
        pass

    async def on_message(self, message: str | bytes, channel: str) -> None:
        pass

    async def close(self) -> None:
        pass

    async def handoff(self) -> bytes | None:
        return None

    async def resume(self, state: bytes) -> None:
        pass


PipelineFactory = Callable[[], Pipeline]


class EchoPipeline(Pipeline):
    """The caller hears itself, and gets every data-channel message back on the same channel."""

    async def on_audio_frame(self, frame: AudioFrame) -> None:
        self.io.send_audio(frame)

    async def on_message(self, message: str | bytes, channel: str) -> None:
        self.io.send_message(message, channel)


class OutgoingAudioTrack(MediaStreamTrack):
    """The session's outgoing audio: aiortc's sender pulls what the pipeline pushed."""

    kind = "audio"

    def __init__(self, max_frames: int = OUTGOING_AUDIO_FRAMES) -> None:
        super().__init__()
        self._queue: asyncio.Queue[AudioFrame | None] = asyncio.Queue(max_frames)
        self.dropped = 0

    def push(self, frame: AudioFrame) -> None:
        if self.readyState != "live":
            return
        if self._queue.full():  # keep latency bounded: the newest audio matters most
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(frame)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._queue.get()
        if frame is None:
            raise MediaStreamError
        return frame

    def stop(self) -> None:
        if self.readyState == "live":
            super().stop()
            if self._queue.full():
                self._queue.get_nowait()
            self._queue.put_nowait(None)  # wake a pending recv()
