"""CPU accounting for the benches: CPU time of processes and threads, how busy each CPU (or
all of them) was over a window, and how much of it went to processes that are not ours.

Everything is read from /proc in clock ticks (10 ms on most kernels): approximate, good
enough to tell a saturated core from a quiet one and a quiet window from a busy one.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from bench.harness.procinfo import CLK_TCK, all_stat_fields, stat_fields, tasks

# (busy, total) ticks of one CPU or of all; busy = total - idle - iowait, total = user .. steal
# (guest time is already counted in user)
CpuTimes = tuple[int, int]


def _stat_rows() -> list[list[int]]:
    """The cpu lines of /proc/stat as numbers: all CPUs first, then cpu0, cpu1, ..."""
    rows = []
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu"):
            break
        rows.append([int(x) for x in line.split()[1:]])
    return rows


def _busy_total(f: list[int]) -> CpuTimes:
    total = sum(f[:8])
    return total - f[3] - (f[4] if len(f) > 4 else 0), total


def cpu_times() -> CpuTimes:
    """(busy, total) ticks of all CPUs together."""
    return _busy_total(_stat_rows()[0])


def per_cpu_times() -> list[CpuTimes]:
    """(busy, total) ticks of each CPU, by CPU number."""
    return [_busy_total(f) for f in _stat_rows()[1:]]


def busy_fraction(before: CpuTimes, after: CpuTimes) -> float:
    """The busy share (0..1) between two readings of one CPU (or of all)."""
    (b0, t0), (b1, t1) = before, after
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def busy_fractions(before: list[CpuTimes], after: list[CpuTimes]) -> list[float]:
    """busy_fraction of each CPU between two per_cpu_times() readings."""
    return [busy_fraction(b, a) for b, a in zip(before, after)]


def cpu_busy(interval: float = 0.3) -> float:
    """Fraction of all CPUs busy over `interval` (call it when none of our load runs: it then
    measures what other processes use, i.e. how noisy the figures will be)."""
    before = cpu_times()
    time.sleep(interval)
    return busy_fraction(before, cpu_times())


def wait_quiet(max_wait: float, threshold: float = 0.10, interval: float = 0.5) -> float:
    """Wait (at most max_wait s) for other processes to leave the CPUs idle; returns the last
    busy fraction seen."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = cpu_busy(interval)
        if busy <= threshold or time.monotonic() >= deadline:
            return busy
        time.sleep(0.5)


def steal_seconds() -> float:
    """CPU time the hypervisor took from this machine (all CPUs) so far."""
    f = _stat_rows()[0]
    return (f[7] if len(f) > 7 else 0) / CLK_TCK


def _utime_stime(fields: list[str] | None) -> int:
    return int(fields[11]) + int(fields[12]) if fields else 0


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of these processes (all their threads) so far; a process that is
    gone counts 0."""
    return sum(_utime_stime(stat_fields(f"/proc/{pid}/stat")) for pid in pids) / CLK_TCK


def thread_cpu_split(pid: int) -> tuple[float, float, float]:
    """(main thread CPU s, other threads CPU s, system CPU s) of a process; zeros when it is gone."""
    fields = stat_fields(f"/proc/{pid}/stat")
    if fields is None:
        return 0.0, 0.0, 0.0
    main = other = 0
    for tid in tasks(pid):
        ticks = _utime_stime(stat_fields(f"/proc/{pid}/task/{tid}/stat"))
        if tid == pid:
            main += ticks
        else:
            other += ticks
    return main / CLK_TCK, other / CLK_TCK, int(fields[12]) / CLK_TCK


_PF_KTHREAD = 0x00200000


def _proc_snapshot() -> dict[tuple[int, int], tuple[int, int, int]]:
    """(pid, starttime) -> (ppid, cpu ticks incl. reaped children, is_kthread) for every process."""
    snap = {}
    for pid, f in all_stat_fields():
        ticks = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        snap[(pid, int(f[19]))] = (int(f[1]), ticks, int(f[6]) & _PF_KTHREAD)
    return snap


def _stat_busy_ticks() -> int:
    """user + nice + system + steal of all CPUs (irq/softirq left out: mostly our own traffic)."""
    f = _stat_rows()[0]
    return f[0] + f[1] + f[2] + (f[7] if len(f) > 7 else 0)


def _ours_and_kthread_ticks(snap: dict, me: int) -> dict[tuple[int, int], int]:
    children: dict[int, list[int]] = {}
    for (pid, _), (ppid, _, _) in snap.items():
        children.setdefault(ppid, []).append(pid)
    ours, todo = {me}, [me]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in ours:
                ours.add(c)
                todo.append(c)
    return {k: t for k, (_, t, kt) in snap.items() if k[0] in ours or kt}


class ForeignCpu:
    """CPU used during a window by processes that are neither this one nor its descendants
    (nor kernel threads, where softirq work of our own loopback traffic may land), plus time
    stolen by the hypervisor: `with ForeignCpu() as f: ...; f.fraction` (0..1 of all CPUs).
    = all busy CPU time (/proc/stat) - ours; approximate (10 ms ticks), good enough to tell a
    quiet window from a busy one."""

    def __enter__(self) -> ForeignCpu:
        self._me = os.getpid()
        self._t0 = time.monotonic()
        self._busy0 = _stat_busy_ticks()
        self._ours0 = _ours_and_kthread_ticks(_proc_snapshot(), self._me)
        self.fraction = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        ours1 = _ours_and_kthread_ticks(_proc_snapshot(), self._me)
        busy = _stat_busy_ticks() - self._busy0
        wall = time.monotonic() - self._t0
        ours = sum(max(t - self._ours0.get(k, 0), 0) for k, t in ours1.items())
        ncpu = len(os.sched_getaffinity(0)) or 1
        self.fraction = max(busy - ours, 0) / CLK_TCK / (wall * ncpu) if wall > 0 else 0.0
