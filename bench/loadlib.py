"""Plumbing for the relay benchmark (bench/relay.py): build the C tools, start and reap
processes, pin them to cores, stop/resume them, and run the C load generator and sink.

Every process started here gets its own session (process group) and is registered, so
`kill_all()` (run at exit and on SIGINT/SIGTERM) stops exactly the groups this harness
started, by id. Every wait has a timeout.
"""
from __future__ import annotations

import atexit
import json
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
C_SRC = BENCH / "c"
BUILD = BENCH / ".build"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11"]
TOOLS = ("fwd_ref", "loadgen")


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and why."""


# --------------------------------------------------------------------------- build

def build(force: bool = False) -> dict[str, Path]:
    """Compile bench/c/*.c into bench/.build/ (only when a source or the flags changed)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc not found on PATH: the relay benchmark builds its C tools with gcc "
                         "(Debian/Ubuntu: apt-get install gcc)")
    BUILD.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name in TOOLS:
        src, exe, stamp = C_SRC / f"{name}.c", BUILD / name, BUILD / f"{name}.flags"
        flags = " ".join(CFLAGS)
        fresh = (exe.exists() and stamp.exists() and stamp.read_text() == flags
                 and exe.stat().st_mtime >= src.stat().st_mtime)
        if force or not fresh:
            tmp = BUILD / f".{name}.{os.getpid()}.tmp"  # then renamed: a running copy is never rewritten
            cmd = [gcc, *CFLAGS, "-o", str(tmp), str(src)]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if r.returncode != 0:
                    raise BenchError(f"gcc failed for {src.name}:\n{r.stderr}")
                os.replace(tmp, exe)
            finally:
                tmp.unlink(missing_ok=True)
            stamp.write_text(flags)
        out[name] = exe
    return out


# --------------------------------------------------------------------------- processes

_procs: list[subprocess.Popen] = []


def spawn(argv: list[str], *, stdin: bool = False, cpus: set[int] | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start argv in its own session; stdout is an unbuffered pipe (read with read_line and
    finish), stderr goes to a temp file (stderr_of)."""
    err = tempfile.TemporaryFile(mode="w+")
    p = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=err, bufsize=0,
                         start_new_session=True, env=env)
    p._bench_err = err  # type: ignore[attr-defined]
    _procs.append(p)
    if cpus:
        pin(p.pid, cpus)
    return p


def stderr_of(p: subprocess.Popen, limit: int = 4000) -> str:
    err = getattr(p, "_bench_err", None)
    if err is None:
        return ""
    try:
        err.seek(0)
        return err.read()[-limit:]
    except (OSError, ValueError):
        return ""


def read_line(p: subprocess.Popen, prefix: str, timeout: float) -> str:
    """The first stdout line starting with prefix; BenchError on timeout or exit."""
    deadline = time.monotonic() + timeout
    assert p.stdout is not None
    fd = p.stdout.fileno()
    line = b""
    while True:  # byte by byte from the raw pipe: nothing read ahead is hidden from finish()
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"{p.args[0]}: no '{prefix}' line within {timeout:.1f}s\n{stderr_of(p)}")
        r, _, _ = select.select([fd], [], [], min(left, 0.2))
        if not r:
            continue
        c = os.read(fd, 1)
        if not c:
            p.wait(timeout=2)
            raise BenchError(f"{p.args[0]} exited ({p.returncode}) before '{prefix}'\n{stderr_of(p)}")
        if c != b"\n":
            line += c
            continue
        text = line.decode(errors="replace").strip()
        line = b""
        if text.startswith(prefix):
            return text


def finish(p: subprocess.Popen, timeout: float) -> str:
    """Wait for p to exit (kill its group after timeout); returns the rest of its stdout."""
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, _ = p.communicate(timeout=5)
        raise BenchError(f"{' '.join(map(str, p.args[:3]))}: timed out after {timeout:.1f}s\n{stderr_of(p)}")
    finally:
        _forget(p)
    return (out or b"").decode(errors="replace")


def last_json(text: str, what: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError(f"{what}: no JSON summary in its output: {text[-500:]!r}")


def kill_group(p: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGCONT + SIGTERM the process group p leads, then SIGKILL after grace."""
    if p.poll() is not None:
        return
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(p.pid, signal.SIGKILL)  # also reaps leftovers of an exited leader's group
    except ProcessLookupError:
        pass
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def _forget(p: subprocess.Popen) -> None:
    if p in _procs:
        _procs.remove(p)
    err = getattr(p, "_bench_err", None)
    if err is not None:
        err.close()


def stop_process(p: subprocess.Popen, grace: float = 3.0) -> str:
    """Graceful stop of a process group we started; returns its stderr tail."""
    kill_group(p, grace)
    tail = stderr_of(p)
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
            stop_process(p, grace=1.0)


def kill_all() -> None:
    for p in list(_procs):
        kill_group(p, grace=1.0)
        _forget(p)


atexit.register(kill_all)


def install_signal_handlers() -> None:
    """SIGTERM/SIGINT: stop everything we started, then exit."""
    def handler(signum, _frame):
        kill_all()
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# --------------------------------------------------------------------------- /proc helpers

def tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def pin(pid: int, cpus: set[int]) -> None:
    """Like `taskset -a -p -c CPUS PID`: every thread of pid."""
    for tid in tasks(pid) or [pid]:
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, PermissionError):
            pass


def proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "?"


def child_pids(pid: int, recursive: bool = True) -> list[int]:
    """Children of pid (from /proc/*/stat), e.g. the workers of a supervisor."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in sorted(parents.get(todo.pop(), [])):
            out.append(c)
            if recursive:
                todo.append(c)
    return out


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


@dataclass
class UdpSock:
    local_port: int
    rx_queue: int   # bytes queued
    drops: int      # datagrams dropped (receive buffer full, ...)
    inode: int


def udp_sockets(port: int) -> list[UdpSock]:
    """The UDP sockets bound to a local port (from /proc/net/udp and udp6)."""
    out = []
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            lport = int(f[1].rsplit(":", 1)[1], 16)
            if lport == port:
                rxq = int(f[4].split(":")[1], 16)
                out.append(UdpSock(lport, rxq, int(f[-1]), int(f[9])))
    return out


def wait_queues_empty(port: int, timeout: float, poll: float = 0.005, settle: float = 0.02) -> float:
    """Wait until the receive queues of every socket on port are empty (and stay empty for
    `settle` s); returns the time waited. BenchError after timeout."""
    t0 = time.monotonic()
    empty_since = None
    while True:
        now = time.monotonic()
        if sum(s.rx_queue for s in udp_sockets(port)) == 0:
            empty_since = empty_since or now
            if now - empty_since >= settle:
                return now - t0
        else:
            empty_since = None
        if now - t0 > timeout:
            raise BenchError(f"receive queue on port {port} not drained after {timeout:.0f}s")
        time.sleep(poll)


def _cpu_times() -> tuple[int, int]:
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f[:8]), idle


def cpu_busy(interval: float = 0.3) -> float:
    """Fraction of all CPUs busy over `interval` (call it when none of our load runs: it then
    measures what other processes use, i.e. how noisy the figures will be)."""
    t0, i0 = _cpu_times()
    time.sleep(interval)
    t1, i1 = _cpu_times()
    return 1 - (i1 - i0) / (t1 - t0) if t1 > t0 else 0.0


_PF_KTHREAD = 0x00200000
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_snapshot() -> dict[tuple[int, int], tuple[int, int, int]]:
    """(pid, starttime) -> (ppid, cpu ticks incl. reaped children, is_kthread) for every process."""
    snap = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                f = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        snap[(int(d), int(f[19]))] = (int(f[1]), ticks, int(f[6]) & _PF_KTHREAD)
    return snap


def _stat_busy_ticks() -> int:
    """user + nice + system + steal of all CPUs (irq/softirq left out: mostly our own traffic)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
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

    def __enter__(self) -> "ForeignCpu":
        self._me = os.getpid()
        self._t0 = time.monotonic()
        self._busy0 = _stat_busy_ticks()
        self._ours0 = _ours_and_kthread_ticks(_proc_snapshot(), self._me)
        self.fraction = 0.0
        return self

    def __exit__(self, *exc) -> None:
        ours1 = _ours_and_kthread_ticks(_proc_snapshot(), self._me)
        busy = _stat_busy_ticks() - self._busy0
        wall = time.monotonic() - self._t0
        ours = sum(max(t - self._ours0.get(k, 0), 0) for k, t in ours1.items())
        ncpu = len(os.sched_getaffinity(0)) or 1
        self.fraction = max(busy - ours, 0) / _CLK_TCK / (wall * ncpu) if wall > 0 else 0.0


def wait_quiet(max_wait: float, threshold: float = 0.10, interval: float = 0.5) -> float:
    """Wait (at most max_wait s) for other processes to leave the CPUs idle; returns the last
    busy fraction seen."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = cpu_busy(interval)
        if busy <= threshold or time.monotonic() >= deadline:
            return busy
        time.sleep(0.5)


def rmem_max() -> int:
    try:
        return int(Path("/proc/sys/net/core/rmem_max").read_text())
    except (OSError, ValueError):
        return 0


def wait_udp_bound(port: int, count: int = 1, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until `count` UDP sockets are bound to port (e.g. all SO_REUSEPORT workers)."""
    deadline = time.monotonic() + timeout
    while len(udp_sockets(port)) < count:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{proc.args[0]} exited ({proc.returncode}) before binding port {port}\n"
                             f"{stderr_of(proc)}")
        if time.monotonic() > deadline:
            raise BenchError(f"fewer than {count} UDP socket(s) on port {port} after {timeout:.0f}s")
        time.sleep(0.02)


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_udp_port(host: str = "127.0.0.1", avoid: tuple[int, ...] = ()) -> int:
    """A free UDP port outside the kernel's ephemeral range: the sink re-binds its port for
    every measurement, and in between any process binding port 0 could take an ephemeral one."""
    lo, hi = _ephemeral_range()
    candidates = range(20000, lo) if lo > 21000 else range(hi + 1, 65536)
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(candidates)
        if port in avoid:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise BenchError(f"no free UDP port found on {host} outside the ephemeral range {lo}-{hi}")


def write_preambles(datagrams: list[bytes]) -> str:
    """The generator's preamble file: u32 big-endian length + bytes, one record per flow."""
    fd, path = tempfile.mkstemp(prefix="rtcrelay-bench-pre-", suffix=".bin")
    with os.fdopen(fd, "wb") as f:
        for d in datagrams:
            f.write(struct.pack("!I", len(d)) + d)
    return path


# --------------------------------------------------------------------------- gen + sink

@dataclass
class Load:
    """Where the load tools run and what they send."""
    tools: dict[str, Path]
    flows: int = 64
    size: int = 140
    cpus: set[int] | None = None      # generator + sink affinity (None: unpinned)
    host: str = "127.0.0.1"

    def sink(self, port: int, *, expected: int = 0, idle_ms: int = 1000, max_s: float = 30,
             late_ns: int = 10_000_000, check_header: bool = False, kernel_stamps: bool = False,
             rcvbuf: int = 64 << 20) -> subprocess.Popen:
        argv = [str(self.tools["loadgen"]), "sink", "-B", self.host, "-p", str(port), "-s", str(self.size),
                "-e", str(expected), "-i", str(idle_ms), "-T", str(max_s), "-D", str(late_ns), "-r", str(rcvbuf)]
        if check_header:
            argv.append("-H")
        if kernel_stamps:
            argv.append("-K")
        p = spawn(argv, cpus=self.cpus)
        read_line(p, "READY", timeout=5)
        return p

    def gen(self, target_port: int, *, count: int = 0, rate: float = 0, duration: float = 0, batch: int = 0,
            preamble_file: str | None = None, preamble_wait_ms: int = 100, armed: bool = False,
            max_s: float = 30) -> subprocess.Popen:
        tgt = f"[{self.host}]:{target_port}" if ":" in self.host else f"{self.host}:{target_port}"
        argv = [str(self.tools["loadgen"]), "gen", "-t", tgt, "-f", str(self.flows), "-s", str(self.size),
                "-T", str(max_s), "-w", str(preamble_wait_ms)]
        if rate:
            argv += ["-r", str(rate), "-d", str(duration)]
        else:
            argv += ["-n", str(count)]
        if batch:
            argv += ["-b", str(batch)]
        if preamble_file:
            argv += ["-P", preamble_file]
        if armed:
            argv.append("-G")
        return spawn(argv, stdin=armed, cpus=self.cpus)


def go(p: subprocess.Popen) -> None:
    """Release a generator started with armed=True (after its ARMED line)."""
    assert p.stdin is not None
    p.stdin.write(b"\n")
    p.stdin.flush()
