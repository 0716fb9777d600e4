"""The I/O shell of transceiver/admission.py: a lag probe on the event loop and CPU samples.

One task: it sleeps TICK_S and records how late it woke (the loop's lag), and every SAMPLE_S
reads the process's CPU time (``time.process_time``: every thread, user + system).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from transceiver.admission import SAMPLE_S, TICK_S, LoadAdmission

__all__ = ["LoadMonitor"]


class LoadMonitor:
    def __init__(self, admission: LoadAdmission, connected_calls: Callable[[], int]) -> None:
        self.admission = admission
        self.connected_calls = connected_calls
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="load-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        admission = self.admission
        clock = time.monotonic
        admission.cpu(clock(), time.process_time(), self.connected_calls())
        next_sample = clock() + SAMPLE_S
        while True:
            due = clock() + TICK_S
            await asyncio.sleep(TICK_S)
            now = clock()
            admission.lag(now, now - due)
            if now >= next_sample:
                admission.cpu(now, time.process_time(), self.connected_calls())
                next_sample = now + SAMPLE_S
