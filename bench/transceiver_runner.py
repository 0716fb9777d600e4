"""The measurements of bench/transceiver.py on one variant: offer -> connected times, then
levels of concurrent echo calls (the ramp), each measured over a steady window: delivered
echoes, the server's and relay's CPU, and what other processes took of each core."""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import echo_calls
from bench.harness import processes
from bench.harness.cpu import busy_fractions, cpu_seconds, per_cpu_times, thread_cpu_split
from bench.harness.procinfo import rss_bytes
from bench.transceiver_stacks import CALLER_CPU, SERVER_CPU, Stack, start_rtcrelay, start_stock

DELIVERED_MIN = 0.99
FOREIGN_RETRY = 0.15  # other processes used more than this much of CPU 1: repeat the level once
QUIET = 0.10  # before a level: wait (bounded) until other processes use less than this of CPU 1
CALLER_BUSY = 0.90  # the caller core above this: the result may be load-bound
DIAL_CONCURRENCY = 10


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]



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
    relay_packets: int = 0  # datagrams the relay forwarded in the window, both ways (kernel path included)

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
            ours0, cores0, t0 = cpu_seconds(stack.server_pids() + stack.relay_pids()), per_cpu_times(), time.monotonic()
            await asyncio.sleep(0.5)
            ours1, cores1, t1 = cpu_seconds(stack.server_pids() + stack.relay_pids()), per_cpu_times(), time.monotonic()
            busy = busy_fractions(cores0, cores1)
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
        a = self.args
        await self._wait_quiet(stack)
        await asyncio.sleep(a.warmup)
        stack.check_alive()
        stats0 = await self._json(http, stack.control_url + "/bench/stats")
        me = [os.getpid()]  # the callers
        before = [c.counters.minus(echo_calls.Counters()) for c in callers]
        server0, relay0 = cpu_seconds(stack.server_pids()), cpu_seconds(stack.relay_pids())
        packets0 = stack.relay_packets()
        caller0, cores0 = cpu_seconds(me), per_cpu_times()
        split0 = thread_cpu_split(stack.server.pid)
        clock.lateness.clear()
        echo_calls.ECHO_DELAYS.clear()
        profiler = self._start_profile(stack, len(callers))
        t0 = time.monotonic()
        await asyncio.sleep(a.window)
        t1 = time.monotonic()
        if profiler is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._finish_profile, *profiler)
        after = [c.counters.minus(echo_calls.Counters()) for c in callers]
        server1, relay1 = cpu_seconds(stack.server_pids()), cpu_seconds(stack.relay_pids())
        packets1 = stack.relay_packets()
        caller1, cores1 = cpu_seconds(me), per_cpu_times()
        split1 = thread_cpu_split(stack.server.pid)
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
        caller_cores = (caller1 - caller0) / wall
        busy = busy_fractions(cores0, cores1)
        foreign_server = max(0.0, busy[SERVER_CPU] - server_cores - relay_cores) if len(busy) > SERVER_CPU else 0.0
        foreign_caller = max(0.0, busy[CALLER_CPU] - caller_cores) if busy else 0.0
        rss = rss_bytes(stack.server.pid) / 2**20 or float("nan")  # nan: the server is gone
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
                     note="; ".join(notes), relay_packets=packets1 - packets0)

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
        return processes.spawn(argv, stdout=False), out

    def _finish_profile(self, proc: subprocess.Popen, out: Path) -> None:
        try:
            proc.wait(self.args.window + 15)
        except subprocess.TimeoutExpired:
            pass
        processes.stop(proc, grace=2.0)
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

