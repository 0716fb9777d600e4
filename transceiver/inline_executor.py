"""Run aiortc's executor work (Opus encoding) inline on the event loop.

aiortc hands every audio frame's encode to the loop's default thread pool. For Opus that
work (~0.1-0.2 ms) is smaller than what the hand-off costs: a thread switch, GIL
contention with the loop and two future callbacks per frame. Measured with
bench/transceiver.py: ~14% less CPU per echo call and more calls per core at >= 99%
delivery. The transceiver answers video m-lines inactive, so no slow codec runs here; a
pipeline that needs real blocking work should use its own executor.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any


class InlineExecutor(concurrent.futures.Executor):
    """An Executor whose submit() runs the call at once and returns a finished future."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to whoever awaits it, as a thread pool would
            future.set_exception(exc)
        return future


def install(loop: asyncio.AbstractEventLoop) -> None:
    loop.set_default_executor(InlineExecutor())
