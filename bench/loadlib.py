"""Plumbing for the relay benchmark (bench/relay.py): build the C tools, start and reap
processes, pin them to cores, stop/resume them, and run the C load generator, churn and sink.

Every process started here gets its own session (process group) and is registered, so
`kill_all()` (run at exit and on SIGINT/SIGTERM) stops exactly the groups this harness
started, by id. Every wait has a timeout.
"""
from __future__ import annotations

import atexit
import ipaddress
import json
import os
import random
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
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
    if err is None:  # reaped: what _forget kept
        return getattr(p, "_bench_err_tail", "")[-limit:]
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


def summary(p: subprocess.Popen, timeout: float, what: str) -> dict:
    """Wait for a tool to exit and return its JSON summary line; BenchError with its exit
    status and stderr (e.g. loadgen's reason for exiting 2) when there is none."""
    text = finish(p, timeout)
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError(f"{what}: no JSON summary (exit status {p.returncode}); stdout: {text[-500:]!r}; "
                     f"stderr: {stderr_of(p).strip() or '(empty)'}")


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
        p._bench_err_tail = stderr_of(p)  # type: ignore[attr-defined]  # for error messages after the reaping
        p._bench_err = None  # type: ignore[attr-defined]
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

_CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of pid (all its threads) so far; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of pid (shared memory it touched included); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (FileNotFoundError, IndexError, ValueError):
        return 0


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
    rx_queue: int   # bytes queued (receive memory in use)
    drops: int      # datagrams dropped (receive buffer full, ...)
    inode: int


# sock_diag (NETLINK_SOCK_DIAG, linux/inet_diag.h): the kernel filters by port itself. Reading
# /proc/net/udp instead formats every UDP socket of the host as text: with a 50k-flow generator
# that took tens of ms per read, on whatever CPU the harness ran, a worker's included.
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP, _NLMSG_DONE, _NLMSG_ERROR = 0x1, 0x300, 3, 2
_INET_DIAG_REQ_BYTECODE, _INET_DIAG_SKMEMINFO = 1, 7
_INET_DIAG_BC_S_EQ = 11
_SK_MEMINFO_RMEM_ALLOC, _SK_MEMINFO_DROPS = 0, 8


def _diag_request(family: int, port: int, seq: int) -> bytes:
    # bytecode: "source port == port" (an S_EQ op, then an op whose `no` holds the port);
    # yes = go on after these 8 bytes (accept), no = jump past the end (reject)
    bytecode = struct.pack("=BBH", _INET_DIAG_BC_S_EQ, 8, 12) + struct.pack("=BBH", 0, 0, port)
    attr = struct.pack("=HH", 4 + len(bytecode), _INET_DIAG_REQ_BYTECODE) + bytecode
    # inet_diag_req_v2: family, protocol, ext (SKMEMINFO), pad, states, then an empty sockid
    req = struct.pack("=BBBBI", family, socket.IPPROTO_UDP, 1 << (_INET_DIAG_SKMEMINFO - 1), 0, 0xFFFFFFFF)
    req += bytes(48)
    body = req + attr
    return struct.pack("=IHHII", 16 + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + body


def _diag_dump(family: int, port: int) -> list[UdpSock]:
    out = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:  # NETLINK_SOCK_DIAG
        nl.settimeout(5)
        nl.send(_diag_request(family, port, 1))
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if kind == _NLMSG_DONE:
                    return out
                if kind == _NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, off + 16)[0]
                    raise OSError(err, f"sock_diag: {os.strerror(err)}")
                msg = off + 16  # inet_diag_msg: family..retrans (4 B), sockid (48 B), expires, rqueue, wqueue, uid, inode
                sport = struct.unpack_from("!H", data, msg + 4)[0]
                inode = struct.unpack_from("=I", data, msg + 4 + 48 + 16)[0]
                rx_queue, drops = struct.unpack_from("=I", data, msg + 4 + 48 + 4)[0], 0
                attr = msg + 4 + 48 + 20
                while attr + 4 <= off + length:
                    alen, atype = struct.unpack_from("=HH", data, attr)
                    if alen < 4:
                        break
                    if atype == _INET_DIAG_SKMEMINFO and alen >= 4 + 4 * (_SK_MEMINFO_DROPS + 1):
                        mem = struct.unpack_from(f"={_SK_MEMINFO_DROPS + 1}I", data, attr + 4)
                        rx_queue, drops = mem[_SK_MEMINFO_RMEM_ALLOC], mem[_SK_MEMINFO_DROPS]
                    attr += (alen + 3) & ~3
                if sport == port:
                    out.append(UdpSock(sport, rx_queue, drops, inode))
                off += (length + 3) & ~3


def udp_sockets(port: int) -> list[UdpSock]:
    """The UDP sockets bound to a local port (IPv4 and IPv6), from sock_diag."""
    return _diag_dump(socket.AF_INET, port) + _diag_dump(socket.AF_INET6, port)


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

EPHEMERAL_LO = 32768  # Linux's default ephemeral ports start here: source plans stay below


@dataclass(frozen=True)
class SourcePlan:
    """loadgen's -S plan: address i = (ip + i // per_ip, port + i % per_ip), per_ip = 32768 - port.
    Two runs with one plan send from the same 5-tuples, so what a forwarder learned stays learned."""
    ip: str = "127.1.0.1"
    port: int = 2000

    def __post_init__(self) -> None:
        if not ipaddress.IPv4Address(self.ip).is_loopback or not 1 <= self.port < EPHEMERAL_LO:
            raise BenchError(f"source plan {self}: wants a 127/8 address and a port in 1..{EPHEMERAL_LO - 1}")

    @classmethod
    def parse(cls, text: str) -> "SourcePlan":
        ip, _, port = text.rpartition(":")
        return cls(ip, int(port))

    @property
    def per_ip(self) -> int:
        return EPHEMERAL_LO - self.port

    def address(self, i: int) -> tuple[str, int]:
        return str(ipaddress.IPv4Address(self.ip) + i // self.per_ip), self.port + i % self.per_ip

    def after(self, n: int) -> "SourcePlan":
        """A plan disjoint from this one's first n addresses (from the next IP it leaves unused)."""
        return SourcePlan(str(ipaddress.IPv4Address(self.ip) + -(-n // self.per_ip)), self.port)

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


def flows_per_process() -> int:
    """How many flows (one socket each) one loadgen may open: it raises its soft RLIMIT_NOFILE up
    to the hard limit, which only CAP_SYS_RESOURCE raises (not granted in every container)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    return max(hard - 64, 1)


def _share(total: int, k: int, n: int) -> int:
    """Part k of n of total (the parts add up to total)."""
    return total * (k + 1) // n - total * k // n


class Gen:
    """One generator run: one loadgen, or several when the flows exceed flows_per_process().
    Shard k sends flows [lo, hi) (-o lo: same flow ids, plan addresses and preamble records as
    one process would) with its share of the count or rate; shards start armed and are
    released together."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        self.procs = procs

    def wait_armed(self, timeout: float) -> None:
        for p in self.procs:
            read_line(p, "ARMED", timeout)

    def go(self) -> None:
        for p in self.procs:
            go(p)

    def result(self, timeout: float) -> dict:
        """The summary, summed over the shards (pps: all sent over the whole span)."""
        parts = [summary(p, timeout, "loadgen gen") for p in self.procs]
        if len(parts) == 1:
            return parts[0]
        out = dict(parts[0], shards=len(parts))
        for k in ("flows", "planned", "sent", "send_errors", "preambles", "target_pps", "cpu_s"):
            out[k] = sum(x[k] for x in parts)
        out["start_ns"], out["end_ns"] = min(x["start_ns"] for x in parts), max(x["end_ns"] for x in parts)
        out["elapsed_ns"] = out["end_ns"] - out["start_ns"]
        out["pps"] = out["sent"] * 1e9 / out["elapsed_ns"] if out["elapsed_ns"] else 0.0
        return out

    def reap(self) -> None:
        reap(*self.procs)


@dataclass
class Load:
    """Where the load tools run and what they send."""
    tools: dict[str, Path]
    flows: int = 64
    size: int = 140
    cpus: set[int] | None = None      # generator + sink affinity (None: unpinned)
    host: str = "127.0.0.1"
    source: SourcePlan | None = None  # fixed source addresses (None: ephemeral ports, new each run)
    max_flows_per_process: int = field(default_factory=flows_per_process)

    def _target(self, port: int) -> str:
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

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
            preamble_file: str | None = None, preamble_rate: float = 0, preamble_wait_ms: int = 100,
            armed: bool = False, max_s: float = 30) -> Gen:
        """count > 0: as fast as possible; rate: paced for duration s; count 0 with a preamble
        file: the preambles only. armed: call wait_armed() and go() (else it sends right away)."""
        n = -(-self.flows // self.max_flows_per_process)
        if not rate and count:
            n = min(n, count)  # every shard needs a datagram to send
        if rate and not batch:  # as loadgen picks it for the whole rate, not for a shard's share
            batch = min(max(int(rate * 50e-6), 1), 64)
        procs = []
        try:
            for k in range(n):
                lo, flows = self.flows * k // n, _share(self.flows, k, n)
                argv = [str(self.tools["loadgen"]), "gen", "-t", self._target(target_port), "-f", str(flows),
                        "-o", str(lo), "-s", str(self.size), "-T", str(max_s), "-w", str(preamble_wait_ms)]
                argv += ["-r", str(rate / n), "-d", str(duration)] if rate else ["-n", str(_share(count, k, n))]
                if batch:
                    argv += ["-b", str(batch)]
                if self.source:
                    argv += ["-S", str(self.source)]
                if preamble_file:
                    argv += ["-P", preamble_file]
                    if preamble_rate:
                        argv += ["-R", str(preamble_rate / n)]
                if armed or n > 1:
                    argv.append("-G")
                procs.append(spawn(argv, stdin=armed or n > 1, cpus=self.cpus))
            g = Gen(procs)
            if n > 1 and not armed:
                g.wait_armed(timeout=max_s)
                g.go()
            return g
        except BaseException:
            reap(*procs)
            raise

    def churn(self, target_port: int, preamble_file: str, source: SourcePlan, rate: float, duration: float,
              max_s: float = 60) -> subprocess.Popen:
        """New sessions: record i of preamble_file from a new socket on source address i, at rate/s."""
        argv = [str(self.tools["loadgen"]), "churn", "-t", self._target(target_port), "-P", preamble_file,
                "-S", str(source), "-r", str(rate), "-d", str(duration), "-T", str(max_s)]
        return spawn(argv, cpus=self.cpus)


def go(p: subprocess.Popen) -> None:
    """Release a generator started with armed=True (after its ARMED line)."""
    assert p.stdin is not None
    p.stdin.write(b"\n")
    p.stdin.flush()
