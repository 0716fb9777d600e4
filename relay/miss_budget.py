"""How much of a worker's time misses (new sessions) may take. Sans-IO: times in, a verdict out.

Misses (a new session: ~250 µs of a worker's CPU at 20k pps, in seven steps of 15-27 µs but
the learning, ~55 µs: relay.worker.Worker.public_miss_steps) wait in a queue and
are served between loop iterations, at most MISS_SLICE_S of miss work at a time (at least one
step); between two steps the datagrams that wait on the worker's sockets are served
(Worker.serve_waiting, not counted as miss work), so an established flow's datagram waits
behind one step of a new session at most, and a slice lasts at most MISS_SLICE_WALL_S. And
while established flows have traffic, misses get at most MISS_CPU_SHARE of the worker's time
(a credit that accrues with wall time, bursts up to MISS_CREDIT_MAX_S): at 10,000 new
sessions/s a worker with no such bound spent all of its time on them, and the established
flows' datagrams waited in the socket behind theirs (p50 250 ms). A worker with nothing else
to do (a relay that lost its table and re-learns every client) gives misses all of its time.
A full queue (MISS_QUEUE_MAX) refuses new misses (counted "miss_queue_full"): the client's
ICE retransmits its check.
"""

from __future__ import annotations

__all__ = ["MissBudget", "MISS_QUEUE_MAX", "MISS_SLICE_WALL_S"]

MISS_SLICE_S = 100e-6
# A slice serves the datagrams that arrive meanwhile between its steps (not counted as miss
# time): the loop's other work (timers, housekeeping) waits no longer than this for it.
MISS_SLICE_WALL_S = 400e-6
MISS_CPU_SHARE = 0.5
MISS_CREDIT_MAX_S = 0.005
MISS_QUEUE_MAX = 1024  # ~0.2-0.3 s of work: beyond that a new session is better refused
TIMER_RESOLUTION_S = 0.001  # the loop's timers: no spinning on shorter waits


class MissBudget:
    def __init__(self, now: float) -> None:
        self.credit = MISS_CREDIT_MAX_S  # seconds of miss work allowed now
        self._credit_at = now
        self._established_seen = -1
        self.alone = False  # no established datagram since the last slice

    def start(self, now: float, established: int) -> float | None:
        """A slice begins at ``now`` with ``established`` datagrams forwarded so far: until
        when misses may be served, or None (out of credit while calls have traffic)."""
        self.credit = min(MISS_CREDIT_MAX_S, self.credit + (now - self._credit_at) * MISS_CPU_SHARE)
        self._credit_at = now
        self.alone = established == self._established_seen
        self._established_seen = established
        if self.credit > 0 or self.alone:
            return now + min(self.credit, MISS_SLICE_S)
        return None

    def spent(self, seconds: float) -> None:
        self.credit -= seconds

    def wait_s(self) -> float:
        """0: serve the rest at the next loop iteration; else after this many seconds."""
        if self.credit > 0 or self.alone:
            return 0.0
        return max(-self.credit / MISS_CPU_SHARE, TIMER_RESOLUTION_S)
