"""The processes a bench starts: each in its own session (process group), registered, and
stopped by group, so `stop_all()` (run at exit, and on SIGINT/SIGTERM once
`stop_all_on_signals()` was called) stops exactly the groups this harness started, by id.
Every wait has a timeout.

stdout is an unbuffered pipe (read_line, then finish); stderr goes to a log file, or to a
temporary file when no log is named: either way `stderr_tail` gives its end for error messages,
also after the process was reaped.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bench.harness.errors import BenchError
from bench.harness.procinfo import pin, proc_state

_TAIL = 4000


@dataclass
class _Stderr:
    """Where a process's stderr goes: a log, or a temporary file until the process is forgotten
    (then its end is kept in `tail`)."""
    log: Path | None
    file: IO[str] | None
    tail: str = ""


_procs: list[subprocess.Popen] = []
_stderr: weakref.WeakKeyDictionary[subprocess.Popen, _Stderr] = weakref.WeakKeyDictionary()


def spawn(argv: list[str], *, cpus: set[int] | None = None, stdin: bool = False, stdout: bool = True,
          log: Path | None = None, env: dict[str, str] | None = None, cwd: Path | None = None,
          pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start argv in its own session, pinned to cpus (every thread: see procinfo.pin); stdin a
    pipe when asked (else /dev/null), stdout an unbuffered pipe (discarded with stdout=False),
    stderr to log (else a temporary file)."""
    # The child's stderr: the temporary file outlives this function (its tail goes into error messages).
    sink: IO = open(log, "wb") if log is not None else tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
    try:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                             stdout=subprocess.PIPE if stdout else subprocess.DEVNULL, stderr=sink, bufsize=0,
                             start_new_session=True, env=env, cwd=cwd, pass_fds=pass_fds)
    except BaseException:
        sink.close()
        raise
    if log is not None:
        sink.close()  # the child has its own copy
    _stderr[p] = _Stderr(log, None if log is not None else sink)
    _procs.append(p)
    if cpus:
        pin(p.pid, cpus)
    return p


def stderr_tail(p: subprocess.Popen, limit: int = _TAIL) -> str:
    """The end of p's stderr ('' when there is none to read)."""
    err = _stderr.get(p)
    if err is None:
        return ""
    try:
        if err.log is not None:
            return err.log.read_text(errors="replace")[-limit:]
        if err.file is not None:
            err.file.seek(0)
            return err.file.read()[-limit:]
    except (OSError, ValueError):
        return ""
    return err.tail[-limit:]


def read_line(p: subprocess.Popen, prefix: str, timeout: float) -> str:
    """The first stdout line starting with prefix; BenchError on timeout or exit."""
    deadline = time.monotonic() + timeout
    assert p.stdout is not None
    fd = p.stdout.fileno()
    line = b""
    while True:  # byte by byte from the raw pipe: nothing read ahead is hidden from finish()
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"{p.args[0]}: no '{prefix}' line within {timeout:.1f}s\n{stderr_tail(p)}")
        r, _, _ = select.select([fd], [], [], min(left, 0.2))
        if not r:
            continue
        c = os.read(fd, 1)
        if not c:
            p.wait(timeout=2)
            raise BenchError(f"{p.args[0]} exited ({p.returncode}) before '{prefix}'\n{stderr_tail(p)}")
        if c != b"\n":
            line += c
            continue
        text = line.decode(errors="replace").strip()
        line = b""
        if text.startswith(prefix):
            return text


def read_fields(p: subprocess.Popen, prefix: str, timeout: float) -> dict[str, str]:
    """The key=value fields of the first stdout line starting with prefix (`READY a=1 b=2`)."""
    return dict(kv.split("=", 1) for kv in read_line(p, prefix, timeout).split()[1:] if "=" in kv)


def finish(p: subprocess.Popen, timeout: float) -> str:
    """Wait for p to exit (stop its group after timeout); returns the rest of its stdout."""
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(p)
        out, _ = p.communicate(timeout=5)
        raise BenchError(f"{' '.join(map(str, p.args[:3]))}: timed out after {timeout:.1f}s\n"
                         f"{stderr_tail(p)}") from None
    finally:
        _forget(p)
    return (out or b"").decode(errors="replace")


def json_summary(p: subprocess.Popen, timeout: float, what: str) -> dict:
    """Wait for a tool to exit and return its JSON summary line (its last line starting with
    '{'); BenchError with its exit status and stderr (e.g. loadgen's reason for exiting 2)
    when there is none."""
    text = finish(p, timeout)
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError(f"{what}: no JSON summary (exit status {p.returncode}); stdout: {text[-500:]!r}; "
                     f"stderr: {stderr_tail(p).strip() or '(empty)'}")


def stop_group(p: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGCONT + SIGTERM the process group p leads, then SIGKILL the group after grace (also
    what is left of it when the leader has exited)."""
    if p.poll() is None:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def _forget(p: subprocess.Popen) -> None:
    if p in _procs:
        _procs.remove(p)
    err = _stderr.get(p)
    if err is not None and err.file is not None:
        err.tail = stderr_tail(p)  # for error messages after the reaping
        err.file.close()
        err.file = None


def stop(p: subprocess.Popen, grace: float = 3.0) -> str:
    """Stop a process group we started (stop_group), close its pipes; returns its stderr tail."""
    stop_group(p, grace)
    tail = stderr_tail(p)
    try:
        p.communicate(timeout=2)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        pass
    _forget(p)
    return tail


def reap(*procs: subprocess.Popen | None) -> None:
    """Stop whichever of procs still run (cleanup after a failed step)."""
    for p in procs:
        if p is not None and p.poll() is None:
            stop(p, grace=1.0)


def stop_all(grace: float = 1.0) -> None:
    """Stop every process group started here and not yet finished or stopped."""
    for p in list(_procs):  # noqa: PERF101 - a copy: _forget removes p from _procs
        stop_group(p, grace)
        _forget(p)


atexit.register(stop_all)


def stop_all_on_signals() -> None:
    """SIGTERM/SIGINT: stop everything we started, then exit."""
    def handler(signum: int, _frame: object) -> None:
        stop_all()
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def signal_pids(pids: list[int], sig: int, wait_state: str | None = None, timeout: float = 2.0) -> None:
    """Send sig to each pid; with wait_state, wait (bounded) until each is in that state ('T')."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            raise BenchError(f"process {pid} is gone (sending {signal.Signals(sig).name})") from None
    if wait_state is None:
        return
    deadline = time.monotonic() + timeout
    for pid in pids:
        while proc_state(pid) != wait_state:
            if time.monotonic() > deadline:
                raise BenchError(f"pid {pid} not in state {wait_state} after {sig!r}")
            time.sleep(0.002)
