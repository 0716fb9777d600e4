#!/usr/bin/env python3
"""Relay forwarding benchmark: the rtcrelay relay against a C reference forwarder.

    .venv/bin/python bench/relay.py            # full run (2 rounds of ~1 min per forwarder and worker count)
    .venv/bin/python bench/relay.py --quick    # short run (a few seconds each), used by the tests
    .venv/bin/python bench/relay.py --forwarders ref --workers 1 --json /tmp/r.json

One invocation builds the C tools (bench/c/*.c -> bench/.build/, gcc -O2), then runs every
forwarder variant (C reference and the relay, 1 worker then 2) under the same load (64 flows,
140-byte payloads), in rounds: ref then relay, then relay then ref (--rounds; the machine
drifts over minutes, this way alike for both), each forwarder's rounds pooled:

  drain    the forwarder's worker processes and the sink are SIGSTOPped, the generator queues N
           datagrams in the workers' (large) receive buffers, the workers get SIGCONT and drain
           into the stopped sink's buffer; its kernel receive timestamps (SO_TIMESTAMPNS) give the
           first -> last delivery time: pps = packets / drain time, per core = / workers. Neither
           the generator nor the sink takes CPU meanwhile. Median of 3 runs a round.
  paced    live search over the offered rate (bounded steps) for the highest rate with
           < 0.1% of packets lost or late (> 10 ms one-way: a packet that late is useless to a
           jitter buffer, and a big receive buffer would otherwise hide overload as delay).
           On a 2-CPU machine the generator + sink core saturates first: a result marked
           "load-bound" is a lower bound for the forwarder.
  latency  one-way latency p50/p99/p99.9 at 20k pps (generator batch 1, timestamps in the
           payload, CLOCK_MONOTONIC); the run with the best p99 of 3 a round.

With one worker the forwarder is pinned to CPU 1 and generator + sink to CPU 0 (like
`taskset -a`); with two on a 2-CPU machine each worker gets a CPU and the load floats.
Other processes' CPU use is measured during every measurement; a disturbed one is repeated
(--retries) after waiting for quiet, and marked '~' if it stays disturbed. Results are printed
as a table with ratios to the reference measured in the same run, and PASS/MISS lines for the
targets (relay >= 0.85x the reference per core; 2 workers >= 1.5x one; relay p99 at 20k pps
<= 1.5x the reference's). Only 127.0.0.1 is used; every subprocess has a timeout and every
process group the harness starts is killed on exit.

A forwarder is a `Forwarder` (start / pids / stop, optional preambles). The C reference is
`CReferenceForwarder`; `PythonRelayForwarder` is where the relay plugs in (see its TODOs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
# Run as a script, Python puts bench/ first on sys.path, where this file would shadow the
# project's `relay` package (which a Forwarder may import, e.g. to build STUN preambles):
# put the repository root there instead.
if sys.path and Path(sys.path[0] or ".").resolve() == _BENCH:
    sys.path[0] = str(_BENCH.parent)


from bench import loadlib  # noqa: E402  (bench/ as a namespace package: nothing shadowed)

BenchError, Load = loadlib.BenchError, loadlib.Load

HOST = "127.0.0.1"
LATE_NS = 10_000_000          # paced search: a packet later than this counts as lost
MAX_BAD_FRACTION = 0.001      # paced search: < 0.1% lost or late
LOAD_SHORTFALL = 0.97         # paced search: generator must reach 97% of the asked rate
BUSY_WARN = 0.10              # warn when other processes use more than this much CPU
FOREIGN_MAX = 0.05            # a measurement during which others used more CPU is noisy
FOREIGN_MAX_LATENCY = 0.01    # tail latency is more fragile
TARGET_PER_CORE = 0.85
TARGET_SCALING = 1.5
TARGET_P99 = 1.5


# =========================================================================== forwarders

class Forwarder(ABC):
    """A UDP forwarder under test: datagrams to 127.0.0.1:listen_port come out at `target`
    with the relay's 24-byte tunnel header in front of the unchanged payload.

    Contract (what the harness relies on):
      start(listen_port, target)  bind 127.0.0.1:listen_port with `self.workers` worker
                                  processes and return only once every worker's socket is bound
                                  and forwarding; raise on failure. Use a big receive buffer
                                  (>= 128 MiB: the drain test queues 100k x ~832 B).
      pids()                      the processes that do the packet work, one per worker
                                  (SIGSTOP/SIGCONT and CPU pinning apply to these only).
      stop()                      stop everything start() started, bounded; idempotent.
      preambles(n_flows)          optional: one datagram per flow, sent once from that flow's
                                  socket before its traffic (after start()); None = none.
    Processes should be started with loadlib.spawn() (own process group, killed at exit).
    """

    kind = "?"        # "ref" or "relay": ratios compare a relay row with the ref row
    label = "?"

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self.target: tuple[str, int] | None = None

    @abstractmethod
    def start(self, listen_port: int, target: tuple[str, int]) -> None: ...

    @abstractmethod
    def pids(self) -> list[int]: ...

    @abstractmethod
    def stop(self) -> None: ...

    def preambles(self, n_flows: int) -> list[bytes] | None:
        return None

    def describe(self) -> str:
        return ""


class CReferenceForwarder(Forwarder):
    """bench/c/fwd_ref.c: recvmmsg/sendmmsg batch 64, connected destination, tiny flow table."""

    kind = "ref"
    label = "C reference"

    def __init__(self, workers: int = 1, *, tools: dict[str, Path], rcvbuf: int = 256 << 20) -> None:
        super().__init__(workers)
        self.tools, self.rcvbuf = tools, rcvbuf
        self._proc = None
        self._pids: list[int] = []
        self.effective_rcvbuf = 0

    def start(self, listen_port: int, target: tuple[str, int]) -> None:
        self.target = target
        argv = [str(self.tools["fwd_ref"]), "-l", f"{HOST}:{listen_port}", "-t", f"{target[0]}:{target[1]}",
                "-n", str(self.workers), "-r", str(self.rcvbuf)]
        self._proc = loadlib.spawn(argv)
        line = loadlib.read_line(self._proc, "READY", timeout=10)
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        self._pids = [int(p) for p in fields["pids"].split(",")]
        self.effective_rcvbuf = int(fields["rcvbuf"])
        loadlib.wait_udp_bound(listen_port, self.workers, proc=self._proc)

    def pids(self) -> list[int]:
        return list(self._pids)

    def stop(self) -> None:
        if self._proc is not None:
            loadlib.stop_process(self._proc)
            self._proc = None

    def describe(self) -> str:
        return f"rcvbuf {self.effective_rcvbuf >> 20} MiB (effective)"


class PythonRelayForwarder(Forwarder):
    """The rtcrelay relay (`rtcrelay relay ...`): a supervisor and its SO_REUSEPORT workers,
    with its full logic: flows learned from authenticated STUN, shm table, counters."""

    kind = "relay"
    label = "rtcrelay relay"

    def __init__(self, workers: int = 1, **_: object) -> None:
        super().__init__(workers)
        self._proc = None
        self._pids: list[int] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.keyring = None

    def start(self, listen_port: int, target: tuple[str, int]) -> None:
        from relay.keys import generate_keys_toml, load_keyring
        from shm.counters import CounterBlock

        self.target = target
        self._tmp = tempfile.TemporaryDirectory(prefix="rtcrelay-bench-", dir="/dev/shm")
        tmp = Path(self._tmp.name)
        keys = tmp / "keys.toml"
        keys.write_text(generate_keys_toml())
        self.keyring = load_keyring(str(keys))
        name = f"bench{os.getpid()}"
        settings = {
            "name": name, "listen": [f"{HOST}:{listen_port}"], "workers": self.workers,
            "route_keys_file": str(keys), "admin_listen": "", "table_dir": str(tmp),
            "socket_buffer": 256 << 20,  # the drain test queues ~83 MB
            "heartbeat_timeout": 3600.0,  # the sink is no transceiver: it never heartbeats
            "standby_workers": False,  # only the serving processes, for SIGSTOP and pinning
        }
        config = tmp / "relay.toml"
        config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
        self._proc = loadlib.spawn([sys.executable, "-m", "cli.main", "relay", "--config", str(config), "--ephemeral"])
        loadlib.wait_udp_bound(listen_port, self.workers, timeout=20, proc=self._proc)
        stats = tmp / f"rtcrelay-{name}.stats"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if stats.exists():
                block = CounterBlock.attach(str(stats))
                rows = [block.load_row(i) for i in range(block.rows)]
                block.close()
                if all(r["ready"] == 1 and r["pid"] for r in rows):
                    self._pids = [r["pid"] for r in rows]
                    return
            time.sleep(0.05)
        raise RuntimeError("the relay's workers did not become ready within 20 s")

    def preambles(self, n_flows: int) -> list[bytes] | None:
        """One authenticated STUN Binding Request per flow: the relay learns each flow from it."""
        from relay.route_token import derive_password, issue_token
        from relay.stun import build_binding_request

        assert self.target is not None and self.keyring is not None
        out = []
        for i in range(n_flows):
            ufrag = issue_token(self.keyring, socket.inet_aton(self.target[0]), self.target[1], time.time())
            pwd = derive_password(self.keyring, ufrag)
            out.append(build_binding_request(os.urandom(12), f"{ufrag}:cli{i}", pwd.encode(), 1 << 24,
                                             controlling=True, tie_breaker=i))
        return out

    def pids(self) -> list[int]:
        return list(self._pids)

    def stop(self) -> None:
        if self._proc is not None:
            loadlib.stop_process(self._proc, grace=5.0)
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


FORWARDERS: dict[str, type[Forwarder]] = {"ref": CReferenceForwarder, "relay": PythonRelayForwarder}


# =========================================================================== measurements

@dataclass
class Config:
    drain_count: int = 100_000
    drain_reps: int = 3
    search_steps: int = 6
    search_duration: float = 1.0
    latency_rate: int = 20_000
    latency_duration: float = 2.0
    latency_reps: int = 3
    flows: int = 64
    size: int = 140
    noise_retries: int = 2        # measurements repeated when other processes took CPU meanwhile

    @classmethod
    def quick(cls) -> "Config":
        return cls(drain_count=20_000, drain_reps=1, search_steps=3, search_duration=0.3,
                   latency_duration=0.5, latency_reps=1, noise_retries=0)


@dataclass
class Ports:
    listen: int
    sink: int


def _preamble_file(fwd: Forwarder, flows: int) -> str | None:
    pre = fwd.preambles(flows)
    if pre is None:
        return None
    if len(pre) < flows:
        raise BenchError(f"{fwd.label}: preambles() gave {len(pre)} datagrams for {flows} flows")
    return loadlib.write_preambles(pre)


def paced_run(fwd: Forwarder, load: Load, ports: Ports, rate: float, duration: float, *,
              batch: int = 0, check_header: bool = False) -> dict:
    """Offer `rate` pps for `duration` s; the sink's summary plus the generator's, and a verdict."""
    pre = _preamble_file(fwd, load.flows)
    sink = gen = None
    try:
        planned = int(round(rate * duration))
        sink = load.sink(ports.sink, expected=planned, idle_ms=500, max_s=duration + 20, late_ns=LATE_NS,
                         check_header=check_header)
        gen = load.gen(ports.listen, rate=rate, duration=duration, batch=batch, preamble_file=pre,
                       max_s=duration * 2 + 5)
        g = loadlib.last_json(loadlib.finish(gen, timeout=duration * 2 + 15), "loadgen gen")
        s = loadlib.last_json(loadlib.finish(sink, timeout=duration + 25), "loadgen sink")
    finally:
        loadlib.reap(gen, sink)
        if pre:
            os.unlink(pre)
    sent = max(g["sent"], 1)
    bad = max(g["sent"] - s["received"], 0) + s["late"]
    res = {"rate": rate, "sent": g["sent"], "gen_pps": g["pps"], "received": s["received"], "late": s["late"],
           "bad_fraction": bad / sent, "sink": s, "gen": g}
    if bad / sent >= MAX_BAD_FRACTION:
        res["ok"], res["why"] = False, "loss"
    elif g["pps"] < LOAD_SHORTFALL * rate or g["sent"] < 0.99 * planned:
        res["ok"], res["why"] = False, "load"      # the generator could not offer that rate
    else:
        res["ok"], res["why"] = True, ""
    return res


def smoke(fwd: Forwarder, load: Load, ports: Ports) -> dict:
    """A short low-rate run: the forwarder forwards, and which header length it writes."""
    r = paced_run(fwd, load, ports, 2000, 0.25, batch=1, check_header=True)
    if r["received"] < 0.99 * r["sent"]:
        raise BenchError(f"{fwd.label}: smoke test delivered {r['received']} of {r['sent']} datagrams "
                         f"(sink: {json.dumps(r['sink'])})")
    s = r["sink"]
    return {"hdr_len": [s["hdr_len_min"], s["hdr_len_max"]], "hdr_ok": s.get("hdr_ok", 0),
            "received": s["received"], "sent": r["sent"]}


def drain(fwd: Forwarder, load: Load, ports: Ports, count: int) -> dict:
    """Queue `count` datagrams while the workers are stopped, then time how fast they drain.

    The sink is stopped too while the forwarder drains (it reads afterwards), so on a small
    machine it takes no CPU from the workers; its kernel receive timestamps (SO_TIMESTAMPNS,
    stamped in the forwarder's send path on loopback) give the first -> last delivery time.
    """
    pre = _preamble_file(fwd, load.flows)
    pids = fwd.pids()
    stopped: list[int] = []
    sink = gen = None
    try:
        sink = load.sink(ports.sink, expected=count, idle_ms=1000, max_s=90, kernel_stamps=True,
                         rcvbuf=512 << 20)
        gen = load.gen(ports.listen, count=count, batch=64, preamble_file=pre, armed=True, max_s=60)
        loadlib.read_line(gen, "ARMED", timeout=15)
        drops0 = sum(s.drops for s in loadlib.udp_sockets(ports.listen))
        loadlib.signal_pids(pids + [sink.pid], signal.SIGSTOP, wait_state="T")
        stopped = pids + [sink.pid]
        loadlib.go(gen)
        g = loadlib.last_json(loadlib.finish(gen, timeout=60), "loadgen gen")
        time.sleep(0.02)
        socks = loadlib.udp_sockets(ports.listen)
        queued = sum(s.rx_queue for s in socks)
        dropped = sum(s.drops for s in socks) - drops0
        sink_drops0 = sum(s.drops for s in loadlib.udp_sockets(ports.sink))
        loadlib.signal_pids(pids, signal.SIGCONT)
        stopped = [sink.pid]
        loadlib.wait_queues_empty(ports.listen, timeout=30)
        sink_dropped = sum(s.drops for s in loadlib.udp_sockets(ports.sink)) - sink_drops0
        loadlib.signal_pids([sink.pid], signal.SIGCONT)
        stopped = []
        s = loadlib.last_json(loadlib.finish(sink, timeout=30), "loadgen sink")
    finally:
        for pid in stopped:
            try:
                loadlib.signal_pids([pid], signal.SIGCONT)
            except BenchError:
                pass
        loadlib.reap(gen, sink)
        if pre:
            os.unlink(pre)
    pps = s["k_pps"]
    return {"sent": g["sent"], "received": s["received"], "queued_bytes": queued, "dropped_while_stopped": dropped,
            "dropped_at_sink": sink_dropped, "drain_s": s["k_span_ns"] / 1e9, "pps": pps,
            "pps_per_core": pps / fwd.workers,
            "valid": s["received"] >= 0.99 * g["sent"] and s["received"] > 1 and s["k_missing"] == 0}


def quiet(fn, what: str, log=lambda _m: None, retries: int = 0, wait: float = 10.0,
          max_foreign: float = FOREIGN_MAX) -> dict:
    """Run a measurement; when other processes used more than FOREIGN_MAX of the CPUs meanwhile,
    wait for quiet and run it again (at most `retries` times). Adds "foreign_cpu" to the result."""
    for attempt in range(retries + 1):
        with loadlib.ForeignCpu() as fc:
            r = fn()
        r["foreign_cpu"] = round(fc.fraction, 3)
        r["noisy"] = fc.fraction > max_foreign
        if not r["noisy"] or attempt == retries:
            return r
        log(f"    ({what}: other processes used {fc.fraction:.0%} of the CPUs meanwhile; again)")
        loadlib.wait_quiet(wait, BUSY_WARN)
    raise AssertionError("unreachable")


def paced_search(fwd: Forwarder, load: Load, ports: Ports, guess: float, steps: int, duration: float,
                 measure=lambda fn, what: fn()) -> dict:
    """Bounded search for the highest offered rate with < 0.1% lost or late."""
    lo, hi = 0.0, None
    why_hi = ""
    runs = []
    rate = guess
    for _ in range(steps):
        r = measure(lambda: paced_run(fwd, load, ports, rate, duration), f"paced {rate / 1e3:.0f}k")
        runs.append({k: r.get(k) for k in ("rate", "sent", "gen_pps", "received", "late", "bad_fraction", "ok",
                                           "why", "foreign_cpu", "noisy")})
        if r["ok"]:
            lo = max(lo, rate)
        else:
            # it failed at what was really offered (the generator may fall short of the asked rate)
            fail_at = min(rate, r["gen_pps"])
            if hi is None or fail_at <= hi:
                hi, why_hi = fail_at, r["why"]
        if hi is None:
            rate = rate * 1.3
        elif lo == 0:
            rate = hi * (0.97 if why_hi == "load" else 0.6)
        else:
            if hi <= lo or (hi - lo) / hi < 0.03:
                break
            rate = (lo + hi) / 2
        rate = float(int(rate / 1000) * 1000 or 1000)
    return {"max_pps": lo, "max_pps_per_core": lo / fwd.workers, "first_fail_pps": hi,
            "load_bound": why_hi == "load", "runs": runs}


def latency(fwd: Forwarder, load: Load, ports: Ports, rate: int, duration: float) -> dict:
    r = paced_run(fwd, load, ports, rate, duration, batch=1)
    s = r["sink"]
    return {"rate": rate, "sent": r["sent"], "received": r["received"], "p50_us": s["lat_p50_ns"] / 1e3,
            "p99_us": s["lat_p99_ns"] / 1e3, "p999_us": s["lat_p999_ns"] / 1e3, "max_us": s["lat_max_ns"] / 1e3,
            "ok": r["ok"]}


# =========================================================================== placement + variants

def placement(workers: int, pin: bool) -> tuple[set[int] | None, list[set[int]] | None]:
    """(generator+sink CPUs, per-worker CPUs). Worker i gets its own CPU; the load gets CPU 0 when
    there is a spare one (1 worker on 2 CPUs), else it floats (2 workers on 2 CPUs)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    if len(cpus) >= workers + 1:
        return {cpus[0]}, [{cpus[1 + i]} for i in range(workers)]
    return None, [{cpus[i % len(cpus)]} for i in range(workers)]


@dataclass
class VariantResult:
    kind: str
    label: str
    workers: int
    status: str = "ok"                   # ok | not measured | error
    message: str = ""
    describe: str = ""
    pinning: str = ""
    background_cpu: float = 0.0          # CPU used by other processes just before (0..1)
    smoke: dict = field(default_factory=dict)
    drain: dict = field(default_factory=dict)
    drain_runs: list = field(default_factory=list)
    paced: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    latency_runs: list = field(default_factory=list)
    rounds: int = 1


def summarise_drain(res: VariantResult) -> None:
    """res.drain: the median of the valid, quiet drain runs (of every round)."""
    valid = ([d for d in res.drain_runs if d["valid"] and not d["noisy"]]
             or [d for d in res.drain_runs if d["valid"]] or res.drain_runs)
    res.drain = dict(sorted(valid, key=lambda d: d["pps"])[len(valid) // 2])
    res.drain["runs_pps"] = [round(d["pps"]) for d in res.drain_runs]
    res.drain["all_valid"] = all(d["valid"] for d in res.drain_runs)


def summarise_latency(res: VariantResult) -> None:
    """res.latency: the quiet run with the best p99 (of every round): a tail percentile is
    easily spoiled by one scheduling hiccup of the machine."""
    res.latency = dict(min(res.latency_runs, key=lambda r: (r["noisy"], r["p99_us"])))
    res.latency["runs_p99_us"] = [round(r["p99_us"], 1) for r in res.latency_runs]


def merge_rounds(rounds: list[VariantResult]) -> VariantResult:
    """One result from the rounds of one forwarder and worker count: drain runs and latency
    runs pooled (median and best p99 as in a round), the round with the highest paced max.
    A round that failed makes the whole a failure."""
    failed = [r for r in rounds if r.status != "ok"]
    if failed or len(rounds) == 1:
        return failed[0] if failed else rounds[0]
    merged = rounds[0]
    merged.drain_runs = [d for r in rounds for d in r.drain_runs]
    merged.latency_runs = [x for r in rounds for x in r.latency_runs]
    merged.paced = max((r.paced for r in rounds), key=lambda p: p["max_pps"])
    merged.background_cpu = max(r.background_cpu for r in rounds)
    merged.rounds = len(rounds)
    summarise_drain(merged)
    summarise_latency(merged)
    return merged


def run_variant(fwd: Forwarder, cfg: Config, tools: dict[str, Path], pin: bool, log,
                wait_quiet: float = 0.0) -> VariantResult:
    res = VariantResult(fwd.kind, fwd.label, fwd.workers)
    load_cpus, worker_cpus = placement(fwd.workers, pin)
    load = Load(tools, flows=cfg.flows, size=cfg.size, cpus=load_cpus, host=HOST)
    listen = loadlib.free_udp_port(HOST)
    sink = loadlib.free_udp_port(HOST, avoid=(listen,))
    ports = Ports(listen, sink)
    res.background_cpu = loadlib.wait_quiet(wait_quiet, BUSY_WARN) if wait_quiet > 0 else loadlib.cpu_busy(0.3)
    if res.background_cpu > BUSY_WARN:
        log(f"  warning: {res.background_cpu:.0%} of the CPUs busy with other processes: noisy figures")
    try:
        fwd.start(listen, (HOST, sink))
    except NotImplementedError as e:
        res.status, res.message = "not measured", str(e)
        log(f"  {fwd.label} x{fwd.workers}: NOT MEASURED: {e}")
        fwd.stop()
        return res
    except Exception as e:  # noqa: BLE001 - one broken forwarder must not stop the others
        res.status, res.message = "error", f"start failed: {type(e).__name__}: {e}"
        log(f"  {fwd.label} x{fwd.workers}: ERROR: {res.message}")
        fwd.stop()
        return res
    try:
        pids = fwd.pids()
        if len(pids) != fwd.workers:
            raise BenchError(f"{fwd.label}: pids() gave {len(pids)} processes for {fwd.workers} workers")
        if worker_cpus:
            for pid, c in zip(pids, worker_cpus):
                loadlib.pin(pid, c)
        res.pinning = (f"workers on CPU {','.join(str(min(c)) for c in worker_cpus)}" if worker_cpus else "unpinned")
        res.pinning += f"; load on CPU {min(load_cpus)}" if load_cpus else "; load unpinned"
        res.describe = fwd.describe()
        log(f"  {fwd.label} x{fwd.workers} ({res.pinning}) smoke...")
        res.smoke = smoke(fwd, load, ports)

        def measure(fn, what, max_foreign=FOREIGN_MAX):
            return quiet(fn, what, log, cfg.noise_retries, min(wait_quiet, 10.0), max_foreign)

        for i in range(cfg.drain_reps):
            d = measure(lambda: drain(fwd, load, ports, cfg.drain_count), "drain")
            res.drain_runs.append(d)
            log(f"    drain {i + 1}/{cfg.drain_reps}: {d['pps']:,.0f} pps ({d['received']}/{d['sent']} in "
                f"{d['drain_s'] * 1e3:.1f} ms; dropped: {d['dropped_while_stopped']} while queued, "
                f"{d['dropped_at_sink']} at the sink; others used {d['foreign_cpu']:.0%} CPU)")
        summarise_drain(res)
        guess = 0.8 * res.drain["pps"] if res.drain["valid"] else 100_000 * fwd.workers
        guess = max(round(guess, -3), 10_000)
        res.paced = paced_search(fwd, load, ports, guess, cfg.search_steps, cfg.search_duration,
                                 measure)
        res.paced["foreign_cpu"] = max((r["foreign_cpu"] or 0) for r in res.paced["runs"])
        res.paced["noisy"] = any(r.get("noisy") for r in res.paced["runs"])
        log(f"    paced: max {res.paced['max_pps']:,.0f} pps"
            f"{' (load-bound)' if res.paced['load_bound'] else ''}; runs "
            + ", ".join(f"{r['rate'] / 1e3:.0f}k{'✓' if r['ok'] else '✗' + r['why']}" for r in res.paced["runs"]))
        res.latency_runs = [measure(lambda: latency(fwd, load, ports, cfg.latency_rate, cfg.latency_duration),
                                    "latency", FOREIGN_MAX_LATENCY) for _ in range(cfg.latency_reps)]
        summarise_latency(res)
        log(f"    latency at {cfg.latency_rate:,} pps: p50 {res.latency['p50_us']:.1f} us, "
            f"p99 {res.latency['p99_us']:.1f} us, p99.9 {res.latency['p999_us']:.1f} us (best p99 of "
            f"{res.latency['runs_p99_us']}; others used {res.latency['foreign_cpu']:.1%} CPU)")
    except Exception as e:  # noqa: BLE001 - reported in the table, the other variants still run
        res.status, res.message = "error", (str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}")
        log(f"  {fwd.label} x{fwd.workers}: ERROR: {res.message}")
    finally:
        fwd.stop()
    return res


# =========================================================================== report

def _find(results: list[VariantResult], kind: str, workers: int) -> VariantResult | None:
    for r in results:
        if r.kind == kind and r.workers == workers and r.status == "ok":
            return r
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _fmt(x: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def report(results: list[VariantResult]) -> tuple[str, list[dict]]:
    rows = []
    head = ("forwarder", "wk", "drain pps", "/core", "vs ref", "scale", "paced max", "/core", "vs ref",
            "p50 us", "p99 us", "p99 vs ref", "hdr")
    for r in results:
        if r.status != "ok":
            rows.append((r.label, str(r.workers), r.status.upper() + ": " + (r.message.splitlines() or [""])[0][:90]))
            continue
        ref = _find(results, "ref", r.workers)
        one = _find(results, r.kind, 1)
        dp, dpc = r.drain["pps"], r.drain["pps_per_core"]
        pp, ppc = r.paced["max_pps"], r.paced["max_pps_per_core"]
        def noisy(m: dict) -> str:
            return "~" if m.get("noisy") else ""

        rows.append((
            r.label, str(r.workers),
            _fmt(dp) + ("" if r.drain["all_valid"] else "!") + noisy(r.drain), _fmt(dpc),
            _fmt(_ratio(dpc, ref.drain["pps_per_core"] if ref else None), ".2f", "x"),
            _fmt(_ratio(dp, one.drain["pps"] if one else None), ".2f", "x"),
            _fmt(pp) + ("*" if r.paced["load_bound"] else "") + noisy(r.paced), _fmt(ppc),
            _fmt(_ratio(ppc, ref.paced["max_pps_per_core"] if ref else None), ".2f", "x"),
            _fmt(r.latency["p50_us"], ".1f"), _fmt(r.latency["p99_us"], ".1f") + noisy(r.latency),
            _fmt(_ratio(r.latency["p99_us"], ref.latency["p99_us"] if ref else None), ".2f", "x"),
            "-".join(str(x) for x in sorted(set(r.smoke["hdr_len"]))) + "B",
        ))
    widths = [max([len(head[i])] + [len(row[i]) for row in rows if len(row) == len(head)])
              for i in range(len(head))]
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(head))]
    for row in rows:
        if len(row) == 3:
            lines.append(f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}")
        else:
            lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)))
    if any("~" in c for row in rows for c in row[2:]):
        lines.append(f"WARNING: '~' = other processes used more than {FOREIGN_MAX:.0%} of the CPUs during that "
                     f"measurement ({FOREIGN_MAX_LATENCY:.0%} for latency), even after retries: noisy, rerun on a "
                     "quiet machine.")
    lines.append("vs ref: against the C reference with the same number of workers, measured in this run; "
                 "scale: total against 1 worker of the same forwarder.")
    lines.append(f"drain: SIGSTOP, queue packets, SIGCONT, time to drain (median of runs; '!' = some were "
                 f"dropped while queued). paced: highest offered rate with < {MAX_BAD_FRACTION:.1%} lost or "
                 f"later than {LATE_NS // 1_000_000} ms ('*' = load-bound: the generator+sink could not offer "
                 f"more, a lower bound).")

    targets = []
    ref1, rel1, rel2 = _find(results, "ref", 1), _find(results, "relay", 1), _find(results, "relay", 2)

    def target(name: str, value: float | None, op: str, bound: float, inputs: list[dict],
               notes: list[str] | None = None) -> None:
        notes = list(notes or [])
        if value is None:
            verdict = "NOT MEASURED"
        else:
            passed = value >= bound if op == ">=" else value <= bound
            verdict = "PASS" if passed else "MISS"
            if any(m.get("noisy") for m in inputs):
                notes.append("noisy: other processes took CPU during a measurement, rerun")
        targets.append({"target": name, "value": value, "op": op, "bound": bound, "verdict": verdict,
                        "note": "; ".join(notes)})

    def get(r: VariantResult | None, part: str, key: str) -> float | None:
        return getattr(r, part)[key] if r else None

    def parts(part: str, *rs: VariantResult | None) -> list[dict]:
        return [getattr(r, part) for r in rs if r]

    target("relay 1 worker, drain pps per core vs reference",
           _ratio(get(rel1, "drain", "pps_per_core"), get(ref1, "drain", "pps_per_core")),
           ">=", TARGET_PER_CORE, parts("drain", rel1, ref1))
    bound_by_load = [x.label for x in (ref1, rel1) if x and x.paced["load_bound"]]
    target("relay 1 worker, paced max pps per core vs reference",
           _ratio(get(rel1, "paced", "max_pps_per_core"), get(ref1, "paced", "max_pps_per_core")),
           ">=", TARGET_PER_CORE, parts("paced", rel1, ref1),
           ["load-bound: the generator limited " + " and ".join(bound_by_load)] if bound_by_load else [])
    target("relay 2 workers vs 1 worker, drain pps", _ratio(get(rel2, "drain", "pps"), get(rel1, "drain", "pps")),
           ">=", TARGET_SCALING, parts("drain", rel2, rel1))
    target("relay p99 latency at 20k pps vs reference (1 worker)",
           _ratio(get(rel1, "latency", "p99_us"), get(ref1, "latency", "p99_us")),
           "<=", TARGET_P99, parts("latency", rel1, ref1))
    for t in targets:
        v = "-" if t["value"] is None else f"{t['value']:.2f}x"
        lines.append(f"{t['verdict']:<12} {t['target']}: {v} (target {t['op']} {t['bound']}x)"
                     + (f"  [{t['note']}]" if t["note"] else ""))
    return "\n".join(lines), targets


# =========================================================================== main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (fewer packets, steps and seconds)")
    ap.add_argument("--forwarders", default="ref,relay", help="comma list of: " + ",".join(FORWARDERS))
    ap.add_argument("--workers", default="1,2", help="comma list of worker counts (default 1,2)")
    ap.add_argument("--flows", type=int, help="distinct client flows (default 64)")
    ap.add_argument("--size", type=int, help="payload bytes (default 140)")
    ap.add_argument("--drain-count", type=int, help="packets queued per drain run")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--wait-quiet", type=float, metavar="S",
                    help="before each forwarder, wait up to S seconds for other processes to leave the "
                         "CPUs idle (default 30, --quick 0)")
    ap.add_argument("--rounds", type=int, help="rounds per worker count, the forwarders' order reversed every "
                                                "other round, results pooled (default 2, --quick 1)")
    ap.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 unless every target PASSes")
    ap.add_argument("--retries", type=int, help="repeat a measurement disturbed by other processes up to N "
                                                "times (default 2, --quick 0)")
    args = ap.parse_args(argv)

    cfg = Config.quick() if args.quick else Config()
    if args.flows:
        cfg.flows = args.flows
    if args.size:
        cfg.size = args.size
    if args.drain_count:
        cfg.drain_count = args.drain_count
    if args.retries is not None:
        cfg.noise_retries = args.retries
    kinds = [k.strip() for k in args.forwarders.split(",") if k.strip()]
    workers = [int(w) for w in args.workers.split(",")]
    for k in kinds:
        if k not in FORWARDERS:
            ap.error(f"unknown forwarder {k!r} (choose from {', '.join(FORWARDERS)})")

    wait_quiet = args.wait_quiet if args.wait_quiet is not None else (0.0 if args.quick else 30.0)
    loadlib.install_signal_handlers()

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        tools = loadlib.build()
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    log(f"rtcrelay relay benchmark: {platform.node()} {platform.release()}, CPUs {cpus}, "
        f"{'root' if os.geteuid() == 0 else 'not root (receive buffers capped by net.core.rmem_max)'}; "
        f"{cfg.flows} flows, {cfg.size} B payload, drain {cfg.drain_count:,} x{cfg.drain_reps}, "
        f"{'quick' if args.quick else 'full'} run")
    if os.geteuid() != 0:
        # without CAP_NET_ADMIN receive buffers stop at net.core.rmem_max (doubled by the kernel);
        # a loopback datagram of this size takes ~1 KB of it
        fit = int(loadlib.rmem_max() * 2 * 0.8 / 1000)
        if fit < cfg.drain_count:
            log(f"note: not root: drain count capped at {fit:,} (net.core.rmem_max = {loadlib.rmem_max():,}); "
                f"run as root or raise rmem_max for {cfg.drain_count:,}")
            cfg.drain_count = max(fit, 1000)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    results: list[VariantResult] = []
    t0 = time.monotonic()
    # At each worker count the forwarders take turns, in the reverse order every other round
    # (ref, relay, relay, ref): the machine drifts by ~10% over minutes, and this way a drift
    # hits both alike. The rounds are pooled per forwarder.
    for w in workers:
        by_kind: dict[str, list[VariantResult]] = {k: [] for k in kinds}
        for r in range(rounds):
            if rounds > 1:
                log(f"round {r + 1}/{rounds}, {w} worker(s)")
            for k in (kinds if r % 2 == 0 else kinds[::-1]):
                cls = FORWARDERS[k]
                fwd = cls(w, tools=tools) if cls is CReferenceForwarder else cls(w)
                by_kind[k].append(run_variant(fwd, cfg, tools, not args.no_pin, log, wait_quiet))
        results.extend(merge_rounds(by_kind[k]) for k in kinds)
    table, targets = report(results)
    log("")
    log(table)
    log(f"({time.monotonic() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": asdict(cfg), "rounds": rounds,
                                               "results": [asdict(r) for r in results],
                                               "targets": targets}, indent=2))
    if any(r.status == "error" for r in results):
        return 1
    if args.check and any(t["verdict"] != "PASS" for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
