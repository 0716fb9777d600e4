"""Admission by load: whether one more call fits, from what the process actually spends.

An aiortc transceiver runs every call on one event loop, so overload is a cliff, not a slope:
past one core every call's audio falls behind at once (bench/transceiver.py: 36 echo calls
with 100% of audio in time, 37 with 45%). ``max_sessions`` cannot know where the cliff is (it
moves with the pipeline, the codec, the machine, and whatever else shares the core), so a new
offer is also refused when either measure says the loop is near it:

- **CPU**: the process's CPU time (every thread) over the last sample window, in cores, plus
  what the new call and the calls still being set up will add (the measured CPU per connected
  call, or ``call_cpu_prior`` until a few calls are up), must stay within ``cpu_budget``.
- **Loop lag**: how late a timer that should fire every TICK_S wakes up (the time callbacks
  wait to run; audio frames are due every 20 ms). Its 90th percentile over the window must
  stay within ``max_loop_lag``: this also catches a core that other processes take away.

Sans-IO: the I/O shell (transceiver/load_monitor.py) feeds samples and the session manager
asks :meth:`LoadAdmission.refusal`. A refused offer gets ``503`` + ``Retry-After``, so the
client or the signalling in front tries another transceiver.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

__all__ = ["AdmissionLimits", "LoadAdmission", "TICK_S", "SAMPLE_S"]

TICK_S = 0.05  # the lag probe's period
SAMPLE_S = 1.0  # the CPU sample's period
WINDOW_S = 2.0  # the lag percentile's window
MEASURED_CALLS = 3  # below this many connected calls the prior per-call cost is used
CALL_CPU_SMOOTHING = 0.3  # weight of the newest per-call sample (EWMA)


@dataclass(frozen=True)
class AdmissionLimits:
    cpu_budget: float  # cores; 0 turns the CPU check off
    max_loop_lag: float  # seconds; 0 turns the lag check off
    call_cpu_prior: float  # cores per call, until calls are measured


class LoadAdmission:
    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.cpu_cores = 0.0  # the last window's CPU use
        self.call_cpu: float | None = None  # measured cores per connected call (EWMA)
        self._lags: collections.deque[tuple[float, float]] = collections.deque()
        self._last_cpu: tuple[float, float] | None = None  # (wall, cpu seconds)
        self._window_start = float("-inf")  # wall time the last CPU window began
        self._admitted: collections.deque[float] = collections.deque()  # wall times of admissions

    # -- samples ------------------------------------------------------------------------------

    def lag(self, now: float, lag_s: float) -> None:
        """The lag probe woke ``lag_s`` late at ``now``."""
        self._lags.append((now, max(0.0, lag_s)))
        while self._lags and self._lags[0][0] < now - WINDOW_S:
            self._lags.popleft()

    def cpu(self, now: float, cpu_seconds: float, calls: int) -> None:
        """The process's CPU time so far at wall time ``now``, with ``calls`` connected calls."""
        if self._last_cpu is not None:
            wall = now - self._last_cpu[0]
            if wall > 0:
                self.cpu_cores = max(0.0, cpu_seconds - self._last_cpu[1]) / wall
                if calls >= MEASURED_CALLS:
                    per_call = self.cpu_cores / calls  # idle cost included: errs on the safe side
                    previous = self.call_cpu if self.call_cpu is not None else per_call
                    self.call_cpu = previous + CALL_CPU_SMOOTHING * (per_call - previous)
            self._window_start = self._last_cpu[0]
        self._last_cpu = (now, cpu_seconds)
        while self._admitted and self._admitted[0] <= self._window_start:
            self._admitted.popleft()

    def admitted(self, now: float) -> None:
        """A call was admitted at ``now``: until a whole CPU window has seen it, its cost is
        added to the measured load by hand."""
        self._admitted.append(now)

    # -- the decision -------------------------------------------------------------------------

    @property
    def loop_lag(self) -> float:
        """The 90th percentile of the lag over the window (0 before any sample)."""
        if not self._lags:
            return 0.0
        lags = sorted(lag for _, lag in self._lags)
        return lags[min(len(lags) - 1, int(0.9 * len(lags)))]

    @property
    def cost_per_call(self) -> float:
        return self.call_cpu if self.call_cpu is not None else self.limits.call_cpu_prior

    def refusal(self, pending: int) -> str | None:
        """Why a new call would not fit now (a log/503 detail), or None: admit it.
        ``pending``: offers being negotiated; they and the calls admitted since the last CPU
        window began are costs the measurement has not seen (whole) yet."""
        limits = self.limits
        unseen = pending + len(self._admitted)
        lag = self.loop_lag
        if limits.max_loop_lag and lag > limits.max_loop_lag:
            return f"event-loop lag {lag * 1000:.0f} ms > {limits.max_loop_lag * 1000:.0f} ms"
        projected = self.cpu_cores + self.cost_per_call * (unseen + 1)
        if limits.cpu_budget and projected > limits.cpu_budget:
            return (f"CPU {self.cpu_cores:.2f} cores + {self.cost_per_call:.3f} per call "
                    f"x {unseen + 1} new > budget {limits.cpu_budget:.2f}")
        return None
