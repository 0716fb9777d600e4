#!/usr/bin/env python3
"""Transceiver benchmark: concurrent echo calls per core, and offer -> connected time,
rtcrelay against stock aiortc in the same run.

    .venv/bin/python bench/transceiver.py             # full run (~2-3 minutes)
    .venv/bin/python bench/transceiver.py --quick     # smoke run (~30 s), used by the tests
    .venv/bin/python bench/transceiver.py --variants rtcrelay --calls 10,20 --window 10
    .venv/bin/python bench/transceiver.py --variants rtcrelay --calls 12 --profile /tmp/prof  # py-spy

Variants (servers in bench/echo_calls.py, each a process of its own, both on uvloop):

  rtcrelay  the real relay (`rtcrelay relay`, 1 worker) -> tunnel -> the transceiver
            (transceiver.service.Transceiver, EchoPipeline, vectorised audio level).
  stock     plain aiortc: RTCPeerConnection(iceServers=[]) with host candidates on 127.0.0.1,
            MediaRelay echo + data-channel echo; no tunnel, no audio-level patch.

Cores: the system under test (the transceiver or the stock server, and the relay's supervisor
and worker) is pinned to CPU 1 (`taskset -c 1`), the callers (this process) to CPU 0. The
callers are light (bench/echo_calls.py: aiortc does signalling, ICE, DTLS and SCTP; the audio
is pre-encoded Opus sent as SRTP at 50 packets/s per call, and the echo is counted, not
decoded): a few % of a core per 10 calls, so the callers' core is never the limit.

Echo calls per core: calls are added to the running ones level by level (adaptive: a jump
towards ~0.92 server cores from the CPU cost per call, then +15% steps; or --calls); after
a warm-up, a steady window per level. The server's CPU time over the window (psutil, every
thread) gives its load in cores. A level passes when every call connected and >= 99% of the
audio packets sent in the window came back as authenticated SRTP, on time: an echo more than
500 ms (--late-ms) later than its call's best echo delay counts as lost. Calls per core =
calls / server cores at the highest passing level; "server CPU per call" is the same cost
in ms of CPU per second of call. The relay worker shares CPU 1: its CPU is shown (and calls
per core counting it), the targets are for the transceiver. Other processes' CPU on each core
is measured ("foreign"); before each level the harness waits (bounded) for CPU 1 to be
quiet, and a level that fails while disturbed, or with every echo arrived but late (an echo
that fell behind never catches up), is measured once more with fresh calls.

Offer -> connected: client-observed (offer POSTed -> the caller's connectionState is
"connected": ICE and DTLS done) and server-side (offer received -> connected), p50/p99, for
1 call at a time (repeated) and for 20 calls at once (a few rounds).

Output: one line per level, a table with absolute figures and ratios, PASS/MISS per target
(>= 40 echo calls per core; >= 2x stock aiortc; offer -> connected p50 <= 50 ms), and a
`RESULT {json}` line (--json: also to a file). Experiment knobs for the servers (not
defaults): --server-inline-executor, --server-switch-interval. Only 127.0.0.1 is used; every
wait is bounded; every process group started here is stopped on exit, on error and on
Ctrl-C/SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
_ROOT = _BENCH.parent
# Run as a script, Python puts bench/ first on sys.path, where this very file would shadow the
# `transceiver` package (and bench/relay.py the `relay` one): use the repository root.
if sys.path and Path(sys.path[0] or ".").resolve() == _BENCH:
    sys.path[0] = str(_ROOT)


from bench import echo_calls  # noqa: E402  (bench/ as a namespace package: nothing shadowed)

HOST = "127.0.0.1"
SERVER_CPU = 1
CALLER_CPU = 0
DELIVERED_MIN = 0.99
TARGET_CALLS_PER_CORE = 40.0
TARGET_RATIO = 2.0
TARGET_SETUP_P50_MS = 50.0
FOREIGN_RETRY = 0.15  # other processes used more than this much of CPU 1: repeat the level once
QUIET = 0.10  # before a level: wait (bounded) until other processes use less than this of CPU 1
CALLER_BUSY = 0.90  # the caller core above this: the result may be load-bound
DIAL_CONCURRENCY = 10


class BenchError(RuntimeError):
    pass


# =========================================================================== processes

_procs: list[subprocess.Popen] = []


SERVER_ENV: dict[str, str] = {}  # experiment knobs for the server processes (see --server-switch-interval)


def spawn(argv: list[str], *, cpu: int | None, log: Path) -> subprocess.Popen:
    """argv in its own session (process group), pinned to one CPU; stdout piped, stderr to log."""
    if cpu is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", str(cpu), *argv]
    with open(log, "wb") as err:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                             start_new_session=True, cwd=_ROOT, bufsize=0, env={**os.environ, **SERVER_ENV})
    _procs.append(p)
    if cpu is not None and not shutil.which("taskset"):
        try:
            os.sched_setaffinity(p.pid, {cpu})
        except OSError:
            pass
    return p


def read_ready(p: subprocess.Popen, log: Path, timeout: float = 30.0) -> dict[str, int]:
    """The server's `READY k=v ...` line."""
    import select

    assert p.stdout is not None
    fd, line, deadline = p.stdout.fileno(), b"", time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"no READY line within {timeout:.0f} s\n{_tail(log)}")
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if not ready:
            continue
        c = os.read(fd, 1)
        if not c:
            raise BenchError(f"server exited ({p.wait(5)}) before READY\n{_tail(log)}")
        if c != b"\n":
            line += c
            continue
        text, line = line.decode(errors="replace").strip(), b""
        if text.startswith("READY"):
            return {k: int(v) for k, v in (kv.split("=", 1) for kv in text.split()[1:])}


def _tail(log: Path, limit: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def stop(p: subprocess.Popen, grace: float = 8.0) -> None:
    """SIGTERM the process group p leads, SIGKILL it after grace."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)  # leftovers of the group, if any
    except ProcessLookupError:
        pass
    try:
        p.wait(3)
    except subprocess.TimeoutExpired:
        pass
    if p in _procs:
        _procs.remove(p)


def stop_all() -> None:
    for p in _procs:
        stop(p, grace=3.0)


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class Stack:
    """One variant's running processes: what the calls go to, and whose CPU counts."""

    variant: str
    base_url: str
    control_url: str
    server: subprocess.Popen
    relay: subprocess.Popen | None = None
    cleanup_dirs: list[Path] = field(default_factory=list)
    relay_admin: str = ""

    def relay_drops(self) -> dict[str, float]:
        """Non-zero drop counters from the relay's /metrics (empty without a relay)."""
        if not self.relay_admin:
            return {}
        try:
            with urllib.request.urlopen(self.relay_admin + "/metrics", timeout=3) as r:
                text = r.read().decode(errors="replace")
        except OSError:
            return {}
        drops: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or "drop" not in line:
                continue
            name, _, value = line.rpartition(" ")
            try:
                v = float(value)
            except ValueError:
                continue
            if v:
                drops[name] = drops.get(name, 0.0) + v
        return drops

    def server_pids(self) -> list[int]:
        return [self.server.pid]

    def relay_pids(self) -> list[int]:
        if self.relay is None:
            return []
        import psutil

        try:
            root = psutil.Process(self.relay.pid)
            return [root.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.Error:
            return []

    def check_alive(self) -> None:
        for name, p in (("server", self.server), ("relay", self.relay)):
            if p is not None and p.poll() is not None:
                raise BenchError(f"{self.variant}: the {name} exited with {p.returncode}")

    def close(self) -> None:
        stop(self.server)
        if self.relay is not None:
            stop(self.relay)
        for d in self.cleanup_dirs:
            shutil.rmtree(d, ignore_errors=True)


def start_rtcrelay(workdir: Path) -> Stack:
    name = "bench" + secrets.token_hex(5)
    table_dir = Path("/dev/shm") / f"rtcrelay-{name}"
    table_dir.mkdir()
    keys = workdir / "route-keys.toml"
    keys.write_text(f'active = 1\n[keys]\n1 = "{base64.b64encode(secrets.token_bytes(32)).decode()}"\n')
    port, admin = free_port(), free_port(socket.SOCK_STREAM)
    settings = {"name": name, "listen": [f"{HOST}:{port}"], "workers": 1, "table_dir": str(table_dir),
                "route_keys_file": str(keys), "admin_listen": f"{HOST}:{admin}", "flow_capacity": 4096,
                "session_capacity": 4096}
    config = workdir / "relay.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    relay_log = workdir / "relay.log"
    relay = spawn([sys.executable, "-c", "from cli.main import app; app()", "relay", "--config", str(config)],
                  cpu=SERVER_CPU, log=relay_log)
    stack_dirs = [table_dir]
    try:
        deadline = time.monotonic() + 30
        while True:
            if relay.poll() is not None:
                raise BenchError(f"relay exited ({relay.returncode})\n{_tail(relay_log)}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{admin}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"relay not ready within 30 s\n{_tail(relay_log)}")
            time.sleep(0.1)
        log = workdir / "transceiver.log"
        server = spawn([sys.executable, str(_BENCH / "echo_calls.py"), "serve", "rtcrelay",
                        "--relay-public", f"{HOST}:{port}", "--route-keys", str(keys)], cpu=SERVER_CPU, log=log)
        ready = read_ready(server, log)
    except BaseException:
        stop(relay)
        shutil.rmtree(table_dir, ignore_errors=True)
        raise
    return Stack("rtcrelay", f"http://{HOST}:{ready['http']}", f"http://{HOST}:{ready['control']}", server, relay,
                 stack_dirs, relay_admin=f"http://{HOST}:{admin}")


def start_stock(workdir: Path) -> Stack:
    log = workdir / "stock.log"
    server = spawn([sys.executable, str(_BENCH / "echo_calls.py"), "serve", "stock"], cpu=SERVER_CPU, log=log)
    ready = read_ready(server, log)
    return Stack("stock", f"http://{HOST}:{ready['http']}", f"http://{HOST}:{ready['control']}", server)


# =========================================================================== measurement

def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def _cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _thread_split(pid: int) -> tuple[float, float, float]:
    """(main thread CPU s, other threads CPU s, system CPU s) of a process."""
    import psutil

    try:
        proc = psutil.Process(pid)
        threads = proc.threads()
        system = proc.cpu_times().system
    except psutil.Error:
        return 0.0, 0.0, 0.0
    main = sum(t.user_time + t.system_time for t in threads if t.id == pid)
    other = sum(t.user_time + t.system_time for t in threads if t.id != pid)
    return main, other, system


def _core_times() -> list[tuple[float, float]]:
    """(busy, total) seconds per CPU."""
    import psutil

    out = []
    for t in psutil.cpu_times(percpu=True):
        idle = t.idle + getattr(t, "iowait", 0.0)
        total = sum(getattr(t, f) for f in t._fields if f not in ("guest", "guest_nice"))
        out.append((total - idle, total))
    return out


def _busy_fractions(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> list[float]:
    return [(b1 - b0) / (t1 - t0) if t1 > t0 else 0.0 for (b0, t0), (b1, t1) in zip(before, after)]


@dataclass
class Level:
    calls: int
    window_s: float
    tx: int
    rx: int
    late: int
    delivered: float  # (rx - late) / tx
    worst_call: float  # the lowest per-call delivered fraction
    dc_tx: int
    dc_rx: int
    server_cores: float  # server CPU seconds / wall seconds
    relay_cores: float
    caller_cores: float
    foreign_server_cpu: float  # others' CPU on the server's core, in cores
    foreign_caller_cpu: float
    caller_late_p99_ms: float
    server_rss_mib: float
    server_main_cores: float  # the event-loop thread
    server_thread_cores: float  # the others: aiortc's Opus decoder threads, the encoder thread pool
    server_system_share: float  # kernel share of the server's CPU
    arrived: float  # rx / tx, late or not
    rx_gaps: int  # echo packets missing by sequence number (lost after the server sent them)
    echo_dropped: int  # frames the server's echo dropped (rtcrelay: its outgoing queue was full)
    server_rtp_in: int  # the server's RTP counters over the window (aiortc's receiver/sender)
    server_rtp_in_lost: int  # by sequence number: lost on the way in (caller -> [relay ->] server)
    server_rtp_out: int
    extra_delay_p50_ms: float  # echo delay above each call's best, over the window's packets
    extra_delay_p99_ms: float
    failed_calls: int
    passed: bool
    note: str = ""

    @property
    def calls_per_core(self) -> float:
        return self.calls / self.server_cores if self.server_cores > 0 else 0.0

    @property
    def calls_per_core_with_relay(self) -> float:
        cores = self.server_cores + self.relay_cores
        return self.calls / cores if cores > 0 else 0.0


@dataclass
class SetupStats:
    client_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    answer_ms: list[float] = field(default_factory=list)  # offer POSTed -> answer received
    ice_ms: list[float] = field(default_factory=list)  # offer POSTed -> the caller's ICE connected
    failures: int = 0

    def summary(self) -> dict:
        return {"n": len(self.client_ms), "failures": self.failures,
                "client_p50_ms": pct(self.client_ms, 50), "client_p99_ms": pct(self.client_ms, 99),
                "server_p50_ms": pct(self.server_ms, 50), "server_p99_ms": pct(self.server_ms, 99),
                "answer_p50_ms": pct(self.answer_ms, 50), "ice_p50_ms": pct(self.ice_ms, 50),
                "ice_p99_ms": pct(self.ice_ms, 99), "slowest_ms": max(self.client_ms, default=float("nan"))}


@dataclass
class VariantResult:
    variant: str
    levels: list[Level] = field(default_factory=list)
    best: Level | None = None
    setup_one: SetupStats = field(default_factory=SetupStats)
    setup_twenty: SetupStats = field(default_factory=SetupStats)
    limit: str = ""  # why the ramp stopped


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.payloads = echo_calls.encoded_tone()

    async def _json(self, http, url: str, method: str = "GET") -> dict:
        async with http.request(method, url, timeout=echo_calls._client_timeout(5)) as r:
            return await r.json()

    # -- offer -> connected --------------------------------------------------------------

    async def setup_times(self, stack: Stack, http, result: VariantResult) -> None:
        a = self.args
        await self._json(http, stack.control_url + "/bench/reset", "POST")
        for _ in range(a.setup_repeats):
            await self._setup_round(stack, http, 1, result.setup_one)
        server = await self._json(http, stack.control_url + "/bench/stats")
        result.setup_one.server_ms = server["setup_ms"]
        await self._json(http, stack.control_url + "/bench/reset", "POST")
        for _ in range(a.setup_rounds):
            await self._setup_round(stack, http, a.setup_concurrency, result.setup_twenty)
        server = await self._json(http, stack.control_url + "/bench/stats")
        result.setup_twenty.server_ms = server["setup_ms"]

    async def _setup_round(self, stack: Stack, http, n: int, stats: SetupStats) -> None:
        callers = [echo_calls.Caller(stack.base_url) for _ in range(n)]
        outcomes = await asyncio.gather(*(c.dial(http, timeout=20) for c in callers), return_exceptions=True)
        for caller, outcome in zip(callers, outcomes):
            if isinstance(outcome, BaseException):
                stats.failures += 1
            else:
                stats.client_ms.append(caller.setup_ms)
                stats.answer_ms.append((caller.answered_at - caller.offered_at) * 1000)
                if caller.ice_connected_at:
                    stats.ice_ms.append((caller.ice_connected_at - caller.offered_at) * 1000)
        await asyncio.wait_for(asyncio.gather(*(c.hang_up(http) for c in callers), return_exceptions=True), 30)
        await asyncio.sleep(0.2 if n > 1 else 0.05)  # let the server finish closing
        stack.check_alive()

    # -- echo calls ----------------------------------------------------------------------

    async def ramp(self, stack: Stack, http, result: VariantResult) -> None:
        """Levels of concurrent echo calls until one fails (or a limit): see the module doc.

        Calls are added to the running ones. A level that fails after a jump is followed by
        the midpoint between it and the last passing level, with fresh calls (at most twice).
        """
        a = self.args
        clock = echo_calls.MediaClock(self.payloads)
        clock.start()
        callers: list = []
        deadline = time.monotonic() + a.ramp_budget
        fixed = list(a.calls_list)
        target = fixed.pop(0) if fixed else a.start_calls
        ceiling: int | None = None  # the lowest failing level
        bisections = 0
        try:
            for _ in range(a.max_levels if not a.calls_list else len(a.calls_list)):
                if len(callers) > target:  # going down: start afresh
                    await self._hang_up_all(http, clock, callers)
                    await asyncio.sleep(1.0)
                failed = await self._grow(stack, http, clock, callers, target)
                level = await self._measure(stack, http, clock, callers, failed)
                why = self._retry_reason(level)
                if why:
                    # Fresh calls: an echo that fell behind once stays behind (see the report).
                    self._print_level(stack.variant, level)
                    print(f"  {stack.variant}: {level.calls} calls again, with fresh calls ({why})", flush=True)
                    await self._hang_up_all(http, clock, callers)
                    await asyncio.sleep(1.0)
                    failed = await self._grow(stack, http, clock, callers, target)
                    level = await self._measure(stack, http, clock, callers, failed)
                    level.note = "; ".join(x for x in (level.note, f"repeated: {why}") if x)
                result.levels.append(level)
                self._print_level(stack.variant, level)
                if level.passed and (result.best is None or level.calls > result.best.calls):
                    result.best = level
                if a.calls_list:
                    if not level.passed:
                        result.limit = f"{level.calls} calls: {level.note or 'under 99% delivered'}"
                        break
                    if not fixed:
                        result.limit = "--calls levels done"
                        break
                    target = fixed.pop(0)
                    continue
                if time.monotonic() + a.warmup + a.window + 5 > deadline:
                    result.limit = f"time budget ({a.ramp_budget:.0f} s) used"
                    if not level.passed:
                        result.limit = f"{level.calls} calls: {level.note or 'under 99% delivered'}; " + result.limit
                    break
                if not level.passed:
                    ceiling = level.calls if ceiling is None else min(ceiling, level.calls)
                    low = result.best.calls if result.best is not None else 0
                    mid = (low + level.calls) // 2
                    result.limit = f"{level.calls} calls: {level.note or 'under 99% delivered'}"
                    if bisections >= 2 or mid <= low or mid >= level.calls:
                        break
                    bisections += 1
                    target = mid
                    continue
                if level.server_cores >= a.saturated:
                    result.limit = f"server CPU saturated at {level.calls} calls ({level.server_cores:.2f} cores)"
                    break
                if level.caller_cores >= CALLER_BUSY:
                    result.limit = f"caller core busy ({level.caller_cores:.2f}): load-bound"
                    break
                if level.calls >= a.max_calls:
                    result.limit = f"--max-calls {a.max_calls} reached"
                    break
                target = self._next_target(level)
                if ceiling is not None and target >= ceiling:
                    target = ceiling - 1
                    if target <= level.calls:
                        break  # the limit lies between this level and the ceiling
            else:
                result.limit = result.limit or f"--max-levels {a.max_levels} reached"
        finally:
            await clock.stop()
            await self._hang_up_all(http, clock, callers)

    def _retry_reason(self, level: Level) -> str:
        if level.passed or level.failed_calls:
            return ""
        if level.foreign_server_cpu > FOREIGN_RETRY:
            return f"other processes used {level.foreign_server_cpu:.2f} of CPU {SERVER_CPU}"
        if level.arrived >= DELIVERED_MIN:
            return f"all echoes arrived but {level.late} late: the echo fell behind once"
        return ""

    async def _hang_up_all(self, http, clock, callers: list) -> None:
        clock.callers.clear()
        await asyncio.wait_for(asyncio.gather(*(c.hang_up(http) for c in callers), return_exceptions=True), 60)
        callers.clear()

    async def _wait_quiet(self, stack: Stack) -> float:
        """Wait (bounded) until other processes leave the server's CPU alone; returns their last load."""
        deadline = time.monotonic() + self.args.quiet_wait
        while True:
            ours0, cores0, t0 = _cpu_seconds(stack.server_pids() + stack.relay_pids()), _core_times(), time.monotonic()
            await asyncio.sleep(0.5)
            ours1, cores1, t1 = _cpu_seconds(stack.server_pids() + stack.relay_pids()), _core_times(), time.monotonic()
            busy = _busy_fractions(cores0, cores1)
            foreign = max(0.0, busy[SERVER_CPU] - (ours1 - ours0) / (t1 - t0)) if len(busy) > SERVER_CPU else 0.0
            if foreign < QUIET or time.monotonic() > deadline:
                return foreign

    def _next_target(self, level: Level) -> int:
        a = self.args
        n = level.calls
        per_call = level.server_cores / n if n else 0.0
        step = max(1, round(n * a.step))
        if per_call > 0:
            predicted = a.aim / per_call  # calls at `aim` cores if the cost per call held
            if n + step < 0.8 * predicted:
                return min(a.max_calls, max(n + step, int(0.85 * predicted)))
        return min(a.max_calls, n + step)

    async def _grow(self, stack: Stack, http, clock, callers: list, target: int) -> int:
        """Dial calls until `target` run; returns how many of the new ones failed."""
        failed = 0
        while len(callers) < target:
            batch = [echo_calls.Caller(stack.base_url) for _ in range(min(DIAL_CONCURRENCY, target - len(callers)))]
            outcomes = await asyncio.gather(*(c.dial(http, timeout=20) for c in batch), return_exceptions=True)
            now = time.monotonic()
            for caller, outcome in zip(batch, outcomes):
                if isinstance(outcome, BaseException):
                    failed += 1
                    await caller.hang_up(http)
                    continue
                caller.start_media(now)
                callers.append(caller)
                clock.callers.append(caller)
            if failed:
                break
            stack.check_alive()
        return failed

    async def _measure(self, stack: Stack, http, clock, callers: list, failed: int) -> Level:
        import psutil

        a = self.args
        await self._wait_quiet(stack)
        await asyncio.sleep(a.warmup)
        stack.check_alive()
        stats0 = await self._json(http, stack.control_url + "/bench/stats")
        me = psutil.Process()
        before = [c.counters.minus(echo_calls.Counters()) for c in callers]
        server0, relay0 = _cpu_seconds(stack.server_pids()), _cpu_seconds(stack.relay_pids())
        caller0, cores0 = me.cpu_times(), _core_times()
        split0 = _thread_split(stack.server.pid)
        clock.lateness.clear()
        echo_calls.ECHO_DELAYS.clear()
        profiler = self._start_profile(stack, len(callers))
        t0 = time.monotonic()
        await asyncio.sleep(a.window)
        t1 = time.monotonic()
        if profiler is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._finish_profile, *profiler)
        after = [c.counters.minus(echo_calls.Counters()) for c in callers]
        server1, relay1 = _cpu_seconds(stack.server_pids()), _cpu_seconds(stack.relay_pids())
        caller1, cores1 = me.cpu_times(), _core_times()
        split1 = _thread_split(stack.server.pid)
        stats1 = await self._json(http, stack.control_url + "/bench/stats")

        def server(key: str) -> int:
            return int(stats1.get(key, 0)) - int(stats0.get(key, 0))

        wall = t1 - t0
        deltas = [b.minus(a_) for a_, b in zip(before, after)]
        tx = sum(d.tx for d in deltas)
        rx = sum(d.rx for d in deltas)
        late = sum(d.rx_late for d in deltas)
        per_call = [min(1.0, (d.rx - d.rx_late) / d.tx) if d.tx else 0.0 for d in deltas]
        server_cores = (server1 - server0) / wall
        relay_cores = (relay1 - relay0) / wall
        caller_cores = (caller1.user + caller1.system - caller0.user - caller0.system) / wall
        busy = _busy_fractions(cores0, cores1)
        foreign_server = max(0.0, busy[SERVER_CPU] - server_cores - relay_cores) if len(busy) > SERVER_CPU else 0.0
        foreign_caller = max(0.0, busy[CALLER_CPU] - caller_cores) if busy else 0.0
        try:
            rss = psutil.Process(stack.server.pid).memory_info().rss / 2**20
        except psutil.Error:
            rss = float("nan")
        delays = list(echo_calls.ECHO_DELAYS)
        delivered = (rx - late) / tx if tx else 0.0
        lateness = pct(clock.lateness, 99) * 1000 if clock.lateness else float("nan")
        passed = failed == 0 and tx > 0 and delivered >= DELIVERED_MIN
        notes = []
        if failed:
            notes.append(f"{failed} calls failed to connect")
        if caller_cores >= CALLER_BUSY or lateness > 20:
            notes.append("caller-bound?")
        if tx and delivered < DELIVERED_MIN:
            notes.append(f"{delivered:.1%} delivered")
        return Level(calls=len(callers), window_s=wall, tx=tx, rx=rx, late=late, delivered=delivered,
                     worst_call=min(per_call) if per_call else 0.0,
                     dc_tx=sum(d.dc_tx for d in deltas), dc_rx=sum(d.dc_rx for d in deltas),
                     server_cores=server_cores, relay_cores=relay_cores, caller_cores=caller_cores,
                     foreign_server_cpu=foreign_server, foreign_caller_cpu=foreign_caller,
                     caller_late_p99_ms=lateness, server_rss_mib=rss,
                     server_main_cores=(split1[0] - split0[0]) / wall, server_thread_cores=(split1[1] - split0[1]) / wall,
                     server_system_share=(split1[2] - split0[2]) / (server1 - server0) if server1 > server0 else 0.0,
                     arrived=rx / tx if tx else 0.0, rx_gaps=sum(d.rx_gaps for d in deltas),
                     echo_dropped=server("echo_dropped"), server_rtp_in=server("rtp_in"),
                     server_rtp_in_lost=server("rtp_in_lost"), server_rtp_out=server("rtp_out"),
                     extra_delay_p50_ms=pct(delays, 50) * 1000, extra_delay_p99_ms=pct(delays, 99) * 1000, failed_calls=failed, passed=passed,
                     note="; ".join(notes))

    def _print_drops(self, stack: Stack, stats: dict, when: str) -> None:
        parts = []
        if stats.get("echo_dropped"):
            parts.append(f"echo frames dropped {stats['echo_dropped']}")
        if stats.get("tunnel_drops"):
            parts.append(f"transceiver tunnel drops {stats['tunnel_drops']}")
        relay = stack.relay_drops()
        if relay:
            parts.append(f"relay drops {relay}")
        if parts:
            print(f"  {stack.variant} {when}: " + "; ".join(parts), flush=True)

    def _start_profile(self, stack: Stack, calls: int):
        """py-spy (if installed) samples the server during the window: DIR/VARIANT-CALLS.txt."""
        if not self.args.profile:
            return None
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.path.exists(spy):
            print("  --profile: py-spy not found (pip install py-spy)", flush=True)
            return None
        out = Path(self.args.profile) / f"{stack.variant}-{calls}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        # --native needs the process stopped while sampled (py-spy refuses --nonblocking with it).
        mode = ["--native", "--rate", "100"] if self.args.profile_native else ["--gil", "--rate", "250"]
        argv = [spy, "record", *mode, "--format", "raw", "--duration", str(max(1, int(self.args.window))),
                "--output", str(out), "--pid", str(stack.server.pid)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _procs.append(proc)
        return proc, out

    def _finish_profile(self, proc: subprocess.Popen, out: Path) -> None:
        try:
            proc.wait(self.args.window + 15)
        except subprocess.TimeoutExpired:
            pass
        stop(proc, grace=2.0)
        if out.exists():
            print(f"  profile: {out}", flush=True)
            for line in top_functions(out, 12):
                print(f"    {line}", flush=True)

    def _print_level(self, variant: str, lv: Level) -> None:
        print(f"  {variant:<8} {lv.calls:>4} calls  delivered {lv.delivered:7.2%} (worst call {lv.worst_call:6.1%}, "
              f"late {lv.late}, seq gaps {lv.rx_gaps}, server in {lv.server_rtp_in} (lost {lv.server_rtp_in_lost}) out {lv.server_rtp_out} drops {lv.echo_dropped}, delay +{lv.extra_delay_p50_ms:.0f}/{lv.extra_delay_p99_ms:.0f} ms)  dc {lv.dc_rx}/{lv.dc_tx}  server {lv.server_cores:.2f} cores "
              f"(loop {lv.server_main_cores:.2f}, threads {lv.server_thread_cores:.2f}, sys {lv.server_system_share:.0%})"
              f"{f' + relay {lv.relay_cores:.2f}' if variant == 'rtcrelay' else ''}  callers {lv.caller_cores:.2f}  "
              f"foreign {lv.foreign_server_cpu:.2f}/{lv.foreign_caller_cpu:.2f}  -> {lv.calls_per_core:.1f} calls/core  "
              f"{'pass' if lv.passed else 'FAIL'}{'  ' + lv.note if lv.note else ''}", flush=True)

    # -- a variant -------------------------------------------------------------------------

    async def variant(self, name: str, workdir: Path) -> VariantResult:
        import aiohttp

        result = VariantResult(name)
        sub = workdir / name
        sub.mkdir()
        stack = start_rtcrelay(sub) if name == "rtcrelay" else start_stock(sub)
        try:
            async with aiohttp.ClientSession() as http:
                print(f"{name}: offer -> connected ({self.args.setup_repeats} x 1 call, "
                      f"{self.args.setup_rounds} x {self.args.setup_concurrency} at once)", flush=True)
                await self.setup_times(stack, http, result)
                self._print_drops(stack, await self._json(http, stack.control_url + "/bench/stats"), "after setup")
                print(f"{name}: echo calls (warm-up {self.args.warmup:g} s, window {self.args.window:g} s per level)",
                      flush=True)
                await self.ramp(stack, http, result)
                self._print_drops(stack, await self._json(http, stack.control_url + "/bench/stats"), "at the end")
        finally:
            stack.close()
        return result


# =========================================================================== report

def cost_level(r: VariantResult | None) -> Level | None:
    """The level whose CPU per call is reported: the best passing one, else the first measured."""
    if r is None:
        return None
    return r.best or (r.levels[0] if r.levels else None)


def top_functions(raw: Path, n: int = 12) -> list[str]:
    """Self and inclusive sample shares from py-spy's raw (collapsed stacks) output."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
    if not total:
        return []
    lines = [f"{'self':>6} {'incl':>6}  function (of {total} samples)"]
    for name, c in sorted(own.items(), key=lambda kv: -kv[1])[:n]:
        lines.append(f"{c / total:6.1%} {incl[name] / total:6.1%}  {name}")
    return lines


def _f(x: float, fmt: str = "{:.1f}") -> str:
    return "n/a" if math.isnan(x) else fmt.format(x)


def report(results: dict[str, VariantResult], args: argparse.Namespace, elapsed: float) -> dict:
    rt, st = results.get("rtcrelay"), results.get("stock")
    rows: list[tuple[str, str, str, str]] = []

    def cpc(r: VariantResult | None, relay: bool = False) -> float:
        if r is None or r.best is None:
            return 0.0
        return r.best.calls_per_core_with_relay if relay else r.best.calls_per_core

    def cost(r: VariantResult | None, relay: bool = False) -> float:
        lv = cost_level(r)
        if lv is None or not lv.calls:
            return float("nan")
        return (lv.relay_cores if relay else lv.server_cores) * 1000 / lv.calls

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if a > 0 and b > 0 else "n/a"  # False for nan too

    a_cpc, s_cpc = cpc(rt), cpc(st)
    rows.append(("echo calls per core (server CPU)", _f(a_cpc), _f(s_cpc), ratio(a_cpc, s_cpc)))
    rows.append(("  ... counting the relay worker too", _f(cpc(rt, True)), _f(s_cpc), ratio(cpc(rt, True), s_cpc)))
    a_ms, s_ms = cost(rt), cost(st)
    rows.append(("server CPU per call (ms/s)", _f(a_ms), _f(s_ms), ratio(a_ms, s_ms)))
    r_ms = cost(rt, relay=True)
    rows.append(("  relay worker CPU per call (ms/s)", _f(r_ms), "", ""))
    for label, attr, fmt in (("  calls at the best level", "calls", "{:.0f}"),
                             ("  server cores at that level", "server_cores", "{:.2f}"),
                             ("  delivered at that level", "delivered", "{:.2%}"),
                             ("  server RSS at that level (MiB)", "server_rss_mib", "{:.0f}")):
        av = getattr(rt.best, attr) if rt and rt.best else float("nan")
        sv = getattr(st.best, attr) if st and st.best else float("nan")
        rows.append((label, _f(av, fmt), _f(sv, fmt), ratio(av, sv) if attr == "calls" else ""))
    for label, key, pick in (("offer->connected 1 call p50 (ms)", "setup_one", "client_p50_ms"),
                             ("offer->connected 1 call p99 (ms)", "setup_one", "client_p99_ms"),
                             ("  server-side 1 call p50 (ms)", "setup_one", "server_p50_ms"),
                             (f"offer->connected {args.setup_concurrency} at once p50 (ms)", "setup_twenty", "client_p50_ms"),
                             (f"offer->connected {args.setup_concurrency} at once p99 (ms)", "setup_twenty", "client_p99_ms"),
                             (f"  server-side {args.setup_concurrency} at once p50 (ms)", "setup_twenty", "server_p50_ms")):
        av = getattr(rt, key).summary()[pick] if rt else float("nan")
        sv = getattr(st, key).summary()[pick] if st else float("nan")
        rows.append((label, _f(av), _f(sv), ratio(av, sv)))

    width = max(len(r[0]) for r in rows) + 2
    print()
    print(f"rtcrelay transceiver benchmark: {os.cpu_count()} CPUs, servers on CPU {SERVER_CPU}, callers on CPU "
          f"{CALLER_CPU}; window {args.window:g} s; {'quick' if args.quick else 'full'} run, {elapsed:.0f} s")
    print(f"{'':<{width}}{'rtcrelay':>12}{'stock':>12}{'ratio':>10}")
    for label, av, sv, rat in rows:
        print(f"{label:<{width}}{av:>12}{sv:>12}{rat:>10}")
    for r in results.values():
        print(f"{r.variant} ramp stopped: {r.limit or 'n/a'}; setup failures {r.setup_one.failures + r.setup_twenty.failures}")

    targets = []
    if rt is not None:
        targets.append((a_cpc >= TARGET_CALLS_PER_CORE, f"echo calls per core >= {TARGET_CALLS_PER_CORE:g}: {a_cpc:.1f}"))
        if st is not None:
            ok = s_cpc > 0 and a_cpc >= TARGET_RATIO * s_cpc
            targets.append((ok, f">= {TARGET_RATIO:g}x stock aiortc calls per core: {ratio(a_cpc, s_cpc)}"))
        p50 = rt.setup_one.summary()["client_p50_ms"]
        targets.append((not math.isnan(p50) and p50 <= TARGET_SETUP_P50_MS,
                        f"offer->connected p50 (1 call) <= {TARGET_SETUP_P50_MS:g} ms: {_f(p50)} ms"))
    print()
    for ok, text in targets:
        print(f"{'PASS' if ok else 'MISS'}  {text}")

    summary = {
        "quick": args.quick, "window_s": args.window, "elapsed_s": elapsed, "cpus": os.cpu_count(),
        "variants": {name: {"calls_per_core": cpc(r), "calls_per_core_with_relay": cpc(r, True),
                            "cpu_ms_per_call_second": cost(r), "relay_cpu_ms_per_call_second": cost(r, relay=True),
                            "best": asdict(r.best) if r.best else None, "levels": [asdict(lv) for lv in r.levels],
                            "limit": r.limit, "setup_1": r.setup_one.summary(), "setup_n": r.setup_twenty.summary()}
                     for name, r in results.items()},
        "targets": [{"pass": ok, "text": text} for ok, text in targets],
    }
    print("RESULT " + json.dumps(_json_safe(summary)))
    return summary


def _json_safe(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


# =========================================================================== main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short smoke run (the tests use it)")
    p.add_argument("--variants", default="rtcrelay,stock", help="comma-separated: rtcrelay, stock")
    p.add_argument("--window", type=float, help="steady measurement window per level, s (default 8; quick 2)")
    p.add_argument("--warmup", type=float, help="after adding calls, before the window, s (default 2; quick 1)")
    p.add_argument("--start-calls", type=int, help="first level (default 4; quick 2)")
    p.add_argument("--max-calls", type=int, default=200)
    p.add_argument("--max-levels", type=int, help="levels per variant at most (default 8; quick 2)")
    p.add_argument("--ramp-budget", type=float, help="seconds per variant for the ramp (default 75; quick 12)")
    p.add_argument("--step", type=float, default=0.15, help="ramp step near saturation, fraction of the calls")
    p.add_argument("--aim", type=float, default=0.92, help="server cores the ramp jumps towards")
    p.add_argument("--saturated", type=float, default=0.97, help="server cores at which the ramp stops")
    p.add_argument("--setup-repeats", type=int, help="1-call offer->connected, sequential (default 20; quick 5)")
    p.add_argument("--setup-concurrency", type=int, default=20)
    p.add_argument("--setup-rounds", type=int, help="rounds of --setup-concurrency calls at once (default 3; quick 1)")
    p.add_argument("--timeout", type=float, help="whole-run limit, s (default 400; quick 150)")
    p.add_argument("--quiet-wait", type=float, help="wait at most this long for CPU 1 to be quiet per level (default 10; quick 2)")
    p.add_argument("--calls", default="", help="explicit levels instead of the adaptive ramp, e.g. 10,20,30")
    p.add_argument("--profile", default="", help="py-spy every window of the server into this directory")
    p.add_argument("--profile-native", action="store_true", help="with --profile: also native frames")
    p.add_argument("--server-switch-interval", type=float, default=0.0,
                   help="experiment: sys.setswitchinterval() in the server processes (default: Python's 5 ms)")
    p.add_argument("--server-inline-executor", action="store_true",
                   help="experiment: the servers run run_in_executor() work (aiortc's Opus encode) inline")
    p.add_argument("--late-ms", type=float, default=500.0,
                   help="an echo this much later than its call's best echo delay counts as lost (default 500)")
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"window": (8.0, 2.0), "warmup": (2.0, 1.0), "start_calls": (4, 2), "max_levels": (8, 2),
                "ramp_budget": (75.0, 20.0), "setup_repeats": (20, 5), "setup_rounds": (3, 1),
                "timeout": (400.0, 150.0), "quiet_wait": (10.0, 2.0)}
    for key, (full, short) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, short if quick else full)
    args.calls_list = [int(x) for x in args.calls.split(",") if x.strip()]
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variant_list:
        if v not in ("rtcrelay", "stock"):
            p.error(f"unknown variant {v!r}")
    return args


async def _run(args: argparse.Namespace) -> dict[str, VariantResult]:
    runner = Runner(args)
    results: dict[str, VariantResult] = {}
    workdir = Path(tempfile.mkdtemp(prefix="rtcrelay-bench-tx-"))
    try:
        for name in args.variant_list:
            results[name] = await runner.variant(name, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        print("note: fewer than 2 CPUs: callers and servers share the CPU", file=sys.stderr)
    else:
        os.sched_setaffinity(0, {CALLER_CPU})
    echo_calls.loopback_only_ice()
    echo_calls.LATE_S = args.late_ms / 1000
    if args.server_inline_executor:
        SERVER_ENV["RTCRELAY_BENCH_INLINE_EXECUTOR"] = "1"
    if args.server_switch_interval:
        SERVER_ENV["RTCRELAY_BENCH_SWITCH_INTERVAL"] = str(args.server_switch_interval)
    import logging

    logging.basicConfig(level=logging.ERROR)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    import uvloop

    started = time.monotonic()
    try:
        results = uvloop.run(asyncio.wait_for(_run(args), args.timeout))
    except KeyboardInterrupt:
        print("interrupted: stopping the servers", file=sys.stderr)
        return 130
    except (TimeoutError, BenchError) as exc:
        print(f"bench/transceiver.py: {exc or 'timed out'}", file=sys.stderr)
        return 1
    finally:
        stop_all()
    summary = report(results, args, time.monotonic() - started)
    if args.json:
        Path(args.json).write_text(json.dumps(_json_safe(summary), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
