"""Housekeeping's units of work, grouped into steps of bounded time between the packet path's
turns, and the histogram of how long those steps held it.

A tick's work is a generator that yields after each small unit (a few dozen counter writes, a
few hundred slots swept, a few deletes: ~5-40 µs each). A step runs units until STEP_S of
wall time has passed, then the worker's loop serves its sockets. A unit's cost is not known
ahead (at 50,000 flows a counter write costs ~1 µs with the caches cold, ~0.27 µs warm), a
step's wall time is: so a step holds the packet path for STEP_S plus at most one unit, at any
flow count. Sans-IO: the clocks are parameters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, MutableSequence

STEP_S = 20e-6  # a step's wall-time budget: units run until it is spent
STEP_BUCKETS_US = (25, 50, 100, 200, 400)  # the histogram's bounds (its last bucket: longer)
STEP_BUCKET_COUNTERS = (*(f"housekeeping_steps_le_{us}us" for us in STEP_BUCKETS_US),
                        f"housekeeping_steps_over_{STEP_BUCKETS_US[-1]}us")
_DONE = object()


class StepRunner:
    """Runs a tick's units in steps; counts every step's CPU time in the worker's counter row:
    ``housekeeping_step_max_us``, ``housekeeping_step_us_total`` and one bucket counter per
    STEP_BUCKETS_US bound (not cumulative: /metrics renders the Prometheus histogram)."""

    def __init__(self, counts: MutableSequence[int], index: dict[str, int], step_s: float = STEP_S,
                 wall: Callable[[], float] = time.perf_counter,
                 cpu: Callable[[], float] = time.thread_time) -> None:
        self.counts = counts
        self.step_s = step_s
        self.wall = wall
        self.cpu = cpu
        self._max = index["housekeeping_step_max_us"]
        self._total = index["housekeeping_step_us_total"]
        self._buckets = [index[name] for name in STEP_BUCKET_COUNTERS]

    def step(self, units: Iterator[object]) -> bool:
        """Run units until the step's time is spent; False once ``units`` is exhausted."""
        started = self.wall()
        started_cpu = self.cpu()  # CPU time, not wall time: what the step cost, not when the host preempted it
        more = True
        while True:
            if next(units, _DONE) is _DONE:
                more = False
                break
            if self.wall() - started >= self.step_s:
                break
        self.record(round((self.cpu() - started_cpu) * 1e6))
        return more

    def record(self, us: int) -> None:
        counts = self.counts
        counts[self._total] += us
        if us > counts[self._max]:
            counts[self._max] = us
        for bucket, bound in zip(self._buckets, STEP_BUCKETS_US):
            if us <= bound:
                counts[bucket] += 1
                return
        counts[self._buckets[-1]] += 1
