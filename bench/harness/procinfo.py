"""What /proc says about a process (any process, not only ours): its threads, state, memory,
children, and its CPU affinity set for all of its threads."""
from __future__ import annotations

import os
from collections.abc import Iterator

CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(path: str) -> list[str] | None:
    """The fields of a /proc/.../stat file after the command name (state first); None when
    the process or thread is gone. The name is in parentheses and may hold spaces."""
    try:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def all_stat_fields() -> Iterator[tuple[int, list[str]]]:
    """(pid, stat_fields) of every process there is."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            fields = stat_fields(f"/proc/{d}/stat")
            if fields is not None:
                yield int(d), fields


def tasks(pid: int) -> list[int]:
    """The thread ids of pid; [] when it is gone."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def pin(pid: int, cpus: set[int]) -> None:
    """Like `taskset -a -p -c CPUS PID`: every thread of pid (threads and children it makes
    later inherit the set). A process that is gone or a set the kernel refuses is left alone."""
    for tid in tasks(pid) or [pid]:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


def proc_state(pid: int) -> str:
    """The state letter of pid ('R', 'S', 'T', 'Z', ...); '?' when it is gone."""
    fields = stat_fields(f"/proc/{pid}/stat")
    return fields[0] if fields else "?"


def rss_bytes(pid: int) -> int:
    """Resident set size of pid (shared memory it touched included); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def child_pids(pid: int, recursive: bool = True) -> list[int]:
    """Children of pid (from /proc/*/stat), e.g. the workers of a supervisor."""
    parents: dict[int, list[int]] = {}
    for child, fields in all_stat_fields():
        parents.setdefault(int(fields[1]), []).append(child)
    out, todo = [], [pid]
    while todo:
        for c in sorted(parents.get(todo.pop(), [])):
            out.append(c)
            if recursive:
                todo.append(c)
    return out
