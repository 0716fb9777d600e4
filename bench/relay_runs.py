"""The measurements of bench/relay.py on one forwarder: learning the flows, a smoke run, drain,
paced search, latency and CPU per datagram (bench/relay_cpu.py) runs, each repeated when other
processes disturbed it, and the result of a forwarder variant (flow and worker count), its
rounds pooled."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import relay_cpu, step_reference, udpload
from bench.harness import cpu, processes, procinfo
from bench.harness.errors import BenchError, describe_error
from bench.harness.ports import free_port
from bench.relay_forwarders import HOST, Forwarder
from bench.udpload import Load, SourcePlan

LATE_NS = 10_000_000          # paced search: a packet later than this counts as lost
MAX_BAD_FRACTION = 0.001      # paced search: < 0.1% lost or late
LOAD_SHORTFALL = 0.97         # paced search: generator must reach 97% of the asked rate
LOAD_CPU_MAX = 0.9            # ... and generator + sink must have left some of their CPU(s) idle
BUSY_WARN = 0.10              # warn when other processes use more than this much CPU
FOREIGN_MAX = 0.05            # a measurement during which others used more CPU is noisy
FOREIGN_MAX_LATENCY = 0.01    # tail latency is more fragile
LEARN_RATE = 20_000           # preambles per second per worker (halved on each retransmission)
LEARN_ATTEMPTS = 4


@dataclass
class Config:
    drain_count: int = 100_000
    drain_reps: int = 3
    search_steps: int = 6
    search_duration: float = 1.0
    latency_rate: int = 20_000
    latency_duration: float = 2.0
    latency_reps: int = 3
    latency_pairs: int = 4        # paired runs beside the reference for the p99 target (bench/relay_pairs.py)
    flows: tuple[int, ...] = (64, 1000, 10_000, 50_000)   # per worker
    size: int = 140
    noise_retries: int = 2        # measurements repeated when other processes took CPU meanwhile
    churn_rates: tuple[int, ...] = (500, 2000, 10_000)    # new sessions per second per worker
    churn_duration: float = 10.0  # per rate, in churn_pairs no-churn/churn pairs of runs
    churn_pairs: int = 5
    source: SourcePlan = field(default_factory=SourcePlan)  # established flows' addresses
    hit_path: str = "c"           # the `relay` forwarder's hit path: c or python (the kernel path: `ebpf`)
    cpu_rates: tuple[int, ...] = (100_000, 200_000)  # the cpu phase's offered rates (pps, all workers)
    cpu_window: float = 2.0       # s of CPU accounting per run, after cpu_warmup s of sending
    cpu_warmup: float = 0.3
    cpu_reps: int = 3             # runs per rate and direction (median)
    cpu_flow_counts: int = 0      # the cpu phase at the first N flow counts only (0: at every one)

    @classmethod
    def quick(cls) -> Config:
        return cls(drain_count=20_000, drain_reps=1, search_steps=3, search_duration=0.3,
                   latency_duration=0.5, latency_reps=1, latency_pairs=1, noise_retries=0, flows=(64, 1000),
                   churn_rates=(500,), churn_duration=2.0, churn_pairs=1, cpu_rates=(20_000,), cpu_window=0.15,
                   cpu_warmup=0.05, cpu_reps=1, cpu_flow_counts=1)

    @property
    def churn_source(self) -> SourcePlan:
        """The new sessions' addresses: the next /16 of 127/8 (disjoint from the source plan's)."""
        return self.source.after(65536 * self.source.per_ip)


@dataclass
class Ports:
    listen: int
    sink: int
    #: the sink's port, bound for as long as these Ports live (udpload.hold_port)
    sink_socket: socket.socket | None = None


def _preamble_file(fwd: Forwarder, flows: int) -> str | None:
    pre = fwd.preambles(flows)
    if pre is None:
        return None
    if len(pre) < flows:
        raise BenchError(f"{fwd.label}: preambles() gave {len(pre)} datagrams for {flows} flows")
    return udpload.write_preambles(pre)


def drops(rows: list[dict[str, int]]) -> dict[str, int]:
    """The nonzero drop_* counters, summed over the workers."""
    out = {k: sum(r[k] for r in rows) for k in rows[0] if k.startswith("drop_")} if rows else {}
    return {k: v for k, v in out.items() if v}


def fresh_counters(fwd: Forwarder, timeout: float = 5.0) -> list[dict[str, int]] | None:
    """The counter rows once every worker has published after this call (they do about once a
    second), so they include everything that happened before it; the latest rows after timeout."""
    rows = fwd.counters()
    if rows is None:
        return None
    since = time.time() * 1000
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(r["heartbeat_ms"] > since for r in rows):
        time.sleep(0.05)
        rows = fwd.counters()
    return rows


def _wait_learned(fwd: Forwarder, want: int, timeout: float, stall: float = 3.0) -> int:
    """Wait until the forwarder holds `want` flows; returns how many it holds at the end (when
    they stop growing for `stall` s, or at timeout)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        n = fwd.flows_learned() or 0
        now = time.monotonic()
        if n == want or now > deadline or (n == last and now - since > stall):
            return n
        if n != last:
            last, since = n, now
        time.sleep(0.1)


def learn(fwd: Forwarder, load: Load, ports: Ports) -> dict:
    """Make the forwarder know every flow of the load before anything is measured: send its
    preambles from the source plan, paced, and again (slower) for what was not learned, as ICE
    retransmits, until its workers count them all; a forwarder without preambles (the C
    reference learns from any datagram) gets one datagram per flow. BenchError when flows stay
    unlearned: every later run would measure the miss path."""
    t0 = time.monotonic()
    pre = _preamble_file(fwd, load.flows)
    sink = None
    known, attempt = None, 0
    try:
        sink = load.sink(ports.sink, idle_ms=0, max_s=600)  # takes what the forwarder sends on
        for attempt in range(1, LEARN_ATTEMPTS + 1):
            pace = LEARN_RATE * fwd.workers / 2 ** (attempt - 1)
            max_s = load.flows / pace + 30
            gen = load.gen(ports.listen, count=0 if pre else load.flows, batch=1, preamble_file=pre,
                           preamble_rate=pace if pre else 0, preamble_wait_ms=0, max_s=max_s)
            try:
                gen.result(timeout=max_s + 10)
            finally:
                gen.reap()
            if fwd.counters() is None:
                udpload.wait_queues_empty(ports.listen, timeout=30)
                break
            known = _wait_learned(fwd, load.flows, timeout=load.flows / 2000 + 10)
            if known == load.flows or not pre:
                break
    finally:
        processes.reap(sink)
        if pre:
            os.unlink(pre)
    if known is not None and known != load.flows:
        raise BenchError(f"{fwd.label}: learned {known:,} of {load.flows:,} flows after {attempt} rounds of "
                         f"preambles; drops: {drops(fwd.counters() or [])}")
    return {"flows": load.flows, "known": known, "rounds": attempt, "learn_s": round(time.monotonic() - t0, 2)}


def paced_run(fwd: Forwarder, load: Load, ports: Ports, rate: float, duration: float, *,
              batch: int = 0, check_header: bool = False) -> dict:
    """Offer `rate` pps for `duration` s (the flows learned before: no preambles); the sink's
    summary plus the generator's, and a verdict."""
    sink = gen = None
    try:
        planned = load.paced_count(rate, duration)
        sink = load.sink(ports.sink, expected=planned, idle_ms=500, max_s=duration + 20, late_ns=LATE_NS,
                         check_header=check_header)
        gen = load.gen(ports.listen, rate=rate, duration=duration, batch=batch, max_s=duration * 2 + 5)
        g = gen.result(timeout=duration * 2 + 15)
        s = processes.json_summary(sink, timeout=duration + 25, what="loadgen sink")
    finally:
        if gen:
            gen.reap()
        processes.reap(sink)
    sent = max(g["sent"], 1)
    bad = max(g["sent"] - s["received"], 0) + s["late"]
    # generator + sink CPU while sending, as a fraction of the CPUs they are pinned to: on a
    # small machine they can saturate their CPU first (a paced wake-up costs ~50 us of CPU in
    # some VMs), and then the sink falls behind and the forwarder gets the blame
    load_cpu = (g["cpu_s"] + s["cpu_s"]) / duration / len(load.cpus) if load.cpus else None
    res = {"rate": rate, "sent": g["sent"], "gen_pps": g["pps"], "received": s["received"], "late": s["late"],
           "bad_fraction": bad / sent, "load_cpu": load_cpu, "sink": s, "gen": g}
    if bad / sent >= MAX_BAD_FRACTION:
        res["ok"], res["why"] = False, "load" if load_cpu and load_cpu >= LOAD_CPU_MAX else "loss"
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
    Every flow gets some of the datagrams (a batch per flow of count / flows, at most 64).
    """
    pids = fwd.pids()
    stopped: list[int] = []
    sink = gen = None
    try:
        sink = load.sink(ports.sink, expected=count, idle_ms=1000, max_s=90, kernel_stamps=True,
                         rcvbuf=512 << 20)
        gen = load.gen(ports.listen, count=count, batch=min(max(count // load.flows, 1), 64), armed=True,
                       max_s=60)
        gen.wait_armed(timeout=30)
        drops0 = sum(s.drops for s in udpload.udp_sockets(ports.listen))
        processes.signal_pids(pids + [sink.pid], signal.SIGSTOP, wait_state="T")
        stopped = pids + [sink.pid]
        gen.go()
        g = gen.result(timeout=60)
        time.sleep(0.02)
        socks = udpload.udp_sockets(ports.listen)
        queued = sum(s.rx_queue for s in socks)
        dropped = sum(s.drops for s in socks) - drops0
        sink_drops0 = sum(s.drops for s in udpload.udp_sockets(ports.sink))
        processes.signal_pids(pids, signal.SIGCONT)
        stopped = [sink.pid]
        udpload.wait_queues_empty(ports.listen, timeout=30)
        sink_dropped = sum(s.drops for s in udpload.udp_sockets(ports.sink)) - sink_drops0
        processes.signal_pids([sink.pid], signal.SIGCONT)
        stopped = []
        s = processes.json_summary(sink, timeout=30, what="loadgen sink")
    finally:
        for pid in stopped:
            try:
                processes.signal_pids([pid], signal.SIGCONT)
            except BenchError:
                pass
        if gen:
            gen.reap()
        processes.reap(sink)
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
        with cpu.ForeignCpu() as fc:
            r = fn()
        r["foreign_cpu"] = round(fc.fraction, 3)
        r["noisy"] = fc.fraction > max_foreign
        if not r["noisy"] or attempt == retries:
            return r
        log(f"    ({what}: other processes used {fc.fraction:.0%} of the CPUs meanwhile; again)")
        cpu.wait_quiet(wait, BUSY_WARN)
    raise AssertionError("unreachable")


def paced_search(fwd: Forwarder, load: Load, ports: Ports, guess: float, steps: int, duration: float,
                 measure=lambda fn, what: fn()) -> dict:
    """Bounded search for the highest offered rate with < 0.1% lost or late."""
    lo, hi = 0.0, None
    why_hi = ""
    runs = []
    rate = guess
    for _ in range(steps):
        r = measure(lambda rate=rate: paced_run(fwd, load, ports, rate, duration), f"paced {rate / 1e3:.0f}k")
        runs.append({k: r.get(k) for k in ("rate", "sent", "gen_pps", "received", "late", "bad_fraction", "ok",
                                           "why", "load_cpu", "foreign_cpu", "noisy")})
        if r["ok"]:
            lo = max(lo, rate)
        else:
            # it failed at what was really offered (the generator may fall short of the asked rate),
            # or at what generator + sink could take when they saturated their CPU
            fail_at = min(rate, r["gen_pps"])
            if r["why"] == "load" and r["load_cpu"]:
                fail_at = min(fail_at, rate * LOAD_CPU_MAX / r["load_cpu"])
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

    def us(key: str) -> float | None:  # (the sink says -1 when it timed nothing: no figure, not 0)
        return s[key] / 1e3 if r["received"] and s[key] >= 0 else None

    return {"rate": rate, "sent": r["sent"], "received": r["received"], "p50_us": us("lat_p50_ns"),
            "p99_us": us("lat_p99_ns"), "p999_us": us("lat_p999_ns"), "max_us": us("lat_max_ns"),
            "load_cpu": r["load_cpu"], "ok": r["ok"]}



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
    flows: int = 64                      # per worker
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
    learn: dict = field(default_factory=dict)
    flow_check: dict = field(default_factory=dict)   # flows held after the measurements ("ok")
    memory: dict = field(default_factory=dict)
    housekeeping: dict = field(default_factory=dict)  # the relay's housekeeping steps (housekeeping())
    step_reference: dict = field(default_factory=dict)  # fixed-work steps on worker 0's CPU meanwhile (bench/step_reference.py)
    rounds: int = 1
    cpu: dict = field(default_factory=dict)          # per rate (str): relay_cpu.summarise
    cpu_runs: list = field(default_factory=list)
    cpu_counters: dict = field(default_factory=dict)  # the relay's traffic counters grown in the cpu phase
    cpu_idle: list = field(default_factory=list)     # the forwarder's CPU with no traffic (relay_cpu.idle_run)
    bpf: list = field(default_factory=list)          # the BPF program's run time (relay_cpu.program_time)


def summarise_drain(res: VariantResult) -> None:
    """res.drain: the median of the valid, quiet drain runs (of every round); {"skipped": why}
    when the forwarder cannot be drained."""
    if not res.drain_runs:
        return
    valid = ([d for d in res.drain_runs if d["valid"] and not d["noisy"]]
             or [d for d in res.drain_runs if d["valid"]] or res.drain_runs)
    res.drain = dict(sorted(valid, key=lambda d: d["pps"])[len(valid) // 2])
    res.drain["runs_pps"] = [round(d["pps"]) for d in res.drain_runs]
    res.drain["all_valid"] = all(d["valid"] for d in res.drain_runs)


def summarise_latency(res: VariantResult) -> None:
    """res.latency: the quiet run with the best p99 (of every round): a tail percentile is
    easily spoiled by one scheduling hiccup of the machine."""
    # A run that lost datagrams (not "ok") times only what arrived: the last resort. One that
    # timed nothing has no p99 (None), and no ratio to pass a target with.
    res.latency = dict(min(res.latency_runs, key=lambda r: (r["p99_us"] is None, not r["ok"], r["noisy"],
                                                            r["p99_us"] or 0.0)))
    res.latency["runs_p99_us"] = [None if r["p99_us"] is None else round(r["p99_us"], 1) for r in res.latency_runs]


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
    merged.cpu_runs = [x for r in rounds for x in r.cpu_runs]  # (each against its own round's baseline)
    merged.bpf = [x for r in rounds for x in r.bpf]
    merged.cpu_idle = [x for r in rounds for x in r.cpu_idle]
    if merged.cpu_runs:
        merged.cpu = relay_cpu.summarise(merged.cpu_runs, sorted({r["rate"] for r in merged.cpu_runs}))
    merged.paced = max((r.paced for r in rounds), key=lambda p: p["max_pps"])
    merged.background_cpu = max(r.background_cpu for r in rounds)
    merged.housekeeping = max((r.housekeeping for r in rounds), key=lambda h: h.get("max_us", -1))
    merged.step_reference = max((r.step_reference for r in rounds), key=lambda h: h.get("max_us", -1))
    merged.flow_check = next((r.flow_check for r in rounds if not r.flow_check.get("ok", True)), merged.flow_check)
    merged.rounds = len(rounds)
    summarise_drain(merged)
    summarise_latency(merged)
    return merged


def flow_check(fwd: Forwarder, flows: int) -> dict:
    """Does the forwarder still hold exactly the flows it learned (no run added or lost one)?"""
    rows = fresh_counters(fwd)
    if rows is None:
        return {"expected": flows, "held": None, "ok": True}
    held = sum(r["flows"] for r in rows)
    return {"expected": flows, "held": held, "ok": held == flows, "drops": drops(rows)}


def flow_trace(fwd: Forwarder, flows: int, after: str, log) -> None:
    """Log where flows went when a phase ends with fewer (or more) than were learned: held,
    expired, closed, adopted, late housekeeping ticks, drops (each worker publishes ~1/s)."""
    rows = fresh_counters(fwd, timeout=2.0)
    if rows is None:
        return
    total = {k: sum(r[k] for r in rows) for k in ("flows", "flows_expired", "flows_closed", "flows_learned",
                                                  "flows_adopted", "housekeeping_stalls")}
    if total["flows"] != flows:
        log(f"    after {after}: holds {total['flows']:,} of {flows:,} flows; "
            + ", ".join(f"{k} {v:,}" for k, v in total.items() if k != "flows")
            + f"; drops {drops(rows)}")


def memory(fwd: Forwarder, flows: int) -> dict:
    """RSS of each worker and the flow table file (apparent size and blocks allocated) per flow."""
    out: dict = {"rss_mib": [round(procinfo.rss_bytes(p) / 2**20, 1) for p in fwd.pids()]}
    path = fwd.table_path()
    if path is not None and path.exists():
        st = path.stat()
        out.update(table_bytes=st.st_size, table_allocated=st.st_blocks * 512,
                   table_bytes_per_flow=round(st.st_size / flows), allocated_per_flow=round(st.st_blocks * 512 / flows))
    return out


def housekeeping(fwd: Forwarder) -> dict:
    """The relay's housekeeping steps since its workers started, from their counters: how many,
    the longest, how many held the packet path over 200 µs, and their CPU time (the worst
    worker's figures; {} for a forwarder without them)."""
    rows = fresh_counters(fwd, timeout=2.0)
    if not rows or "housekeeping_step_us_total" not in rows[0]:
        return {}
    per_worker = [step_reference.summary(r) for r in rows]
    return {key: max(w[key] for w in per_worker) for key in per_worker[0]}


def describe_housekeeping(h: dict, what: str = "housekeeping") -> str:
    share = f" ({h['over_200us'] / h['steps']:.2%})" if h["steps"] else ""
    return (f"{what}: {h['steps']:,} steps, longest {h['max_us']} us, {h['over_200us']} over 200 us{share}, "
            f"{h['cpu_ms']:,.0f} ms of CPU")


def start_step_reference(cpus: set[int] | None) -> subprocess.Popen:
    """bench/step_reference.py on cpus (worker 0's), stepping until stop_step_reference."""
    return processes.spawn([sys.executable, str(Path(__file__).with_name("step_reference.py"))], cpus=cpus, stdin=True)


@contextlib.contextmanager
def step_reference_paused(p: subprocess.Popen | None) -> Iterator[None]:
    """SIGSTOP the reference for the latency and CPU runs: a process stepping on the worker's
    CPU, even at idle priority, took the relay's p99 at 10,000 flows from 60-64 to 105-117 µs
    (bench/relay_latency.py, two runs each way) and its CPU would count as another's."""
    if p is not None and p.poll() is None:
        os.kill(p.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)


def stop_step_reference(p: subprocess.Popen) -> dict:
    assert p.stdin is not None
    p.stdin.write(b"stop\n")  # (readable stdin ends its loop; communicate() closes the pipe)
    p.stdin.flush()
    return processes.json_summary(p, 10.0, "step reference")


def start_and_pin(fwd: Forwarder, ports: Ports, worker_cpus: list[set[int]] | None) -> None:
    fwd.start(ports.listen, (HOST, ports.sink))
    pids = fwd.pids()
    if len(pids) != fwd.workers * fwd.processes_per_worker:
        raise BenchError(f"{fwd.label}: pids() gave {len(pids)} processes for {fwd.workers} workers")
    for i, pid in enumerate(pids if worker_cpus else []):
        procinfo.pin(pid, worker_cpus[i % fwd.workers])  # (two hops: both relays' worker i on its CPU)


def free_ports() -> Ports:
    """A free listen port and a held sink port (the forwarder's "transceiver": never closed
    while the forwarder lives, see udpload.hold_port)."""
    held = udpload.hold_port(HOST)
    return Ports(free_port(HOST), held.getsockname()[1], held)


def variant_load(cfg: Config, tools: dict[str, Path], workers: int, flows: int, pin: bool) -> Load:
    """The load of a variant (flows per worker x workers, from the source plan), where it runs."""
    load_cpus, _ = placement(workers, pin)
    return Load(tools, flows=flows * workers, size=cfg.size, cpus=load_cpus, host=HOST, source=cfg.source)


def measurer(cfg: Config, log, wait_quiet: float):
    """measure(fn, what): fn's result, repeated (cfg.noise_retries) while other processes took CPU."""
    def measure(fn, what, max_foreign=FOREIGN_MAX):
        return quiet(fn, what, log, cfg.noise_retries, min(wait_quiet, 10.0), max_foreign)
    return measure


_CPU_COUNTERS = ("client_packets", "hit_path_packets", "kernel_to_transceiver", "transceiver_packets",
                 "kernel_to_client")


def cpu_phase(res: VariantResult, fwd: Forwarder, load: Load, ports: Ports, cfg: Config, measure, log) -> None:
    """CPU per datagram at each of cfg.cpu_rates, each way, each run paired with a baseline
    (bench/relay_cpu.py); the forwarder's CPU with no traffic; the BPF program's own time for a
    kernel forwarder."""
    rows0 = fresh_counters(fwd)
    idle = measure(lambda: relay_cpu.idle_run(cfg.cpu_window), "cpu idle")
    res.cpu_idle.append(idle)
    log(f"    cpu idle (no traffic): the forwarder's processes took {idle['idle_ns_per_s'] / 1e6:.1f} ms/s")
    for rate in cfg.cpu_rates:
        for way in relay_cpu.WAYS:
            for i in range(cfg.cpu_reps):
                r = relay_cpu.paired(load, ports.listen, ports.sink, rate, cfg.cpu_window, cfg.cpu_warmup, way,
                                     measure, base_first=i % 2 == 0)
                res.cpu_runs.append(r)
                log(f"    cpu {rate:,} pps {_WAY_NAMES[way]}: "
                    + ("-" if r["ns"] is None else f"{r['ns']:,.0f}") + " ns per datagram "
                    f"(/proc/stat {'-' if r['stat_ns'] is None else format(r['stat_ns'], ',.0f')}); delivered "
                    f"{r['delivered_fraction']:.1%}, p50 {r['p50_us']:,.0f} us; load CPU "
                    + ("-" if r["load_cpu"] is None else f"{r['load_cpu']:.0%}")
                    + (f"; SATURATED ({r['saturated']})" if r["saturated"] else "")
                    + f"; baseline {r['base']['ns_per_sent']:,.0f} ns per datagram sent, load CPU "
                    + ("-" if r["base"]["load_cpu"] is None else f"{r['base']['load_cpu']:.0%}")
                    + (f", SATURATED ({r['base']['saturated']})" if r["base_saturated"] else "")
                    + f"; others used {r['foreign_cpu']:.0%}")
    res.cpu = relay_cpu.summarise(res.cpu_runs, cfg.cpu_rates)
    rows1 = fresh_counters(fwd)
    if rows0 and rows1:
        res.cpu_counters = {k: sum(r[k] for r in rows1) - sum(r[k] for r in rows0) for k in _CPU_COUNTERS}
        log(f"    the relay's counters over the cpu phase: {res.cpu_counters}")
    for rate in cfg.cpu_rates if fwd.kernel_program() is not None else ():
        for way in relay_cpu.WAYS:
            t = relay_cpu.program_time(fwd, load, ports.listen, ports.sink, rate, cfg.cpu_window,
                                       cfg.cpu_warmup, way)
            if t is None:
                log("    (BPF program stats: not available)")
                return
            res.bpf.append(t)
            log(f"    BPF program (id {t['prog_id']}) at {rate:,} pps {_WAY_NAMES[way]}: "
                f"{t['runs_per_datagram']:.2f} runs per datagram delivered, {t['ns_per_run']:,.0f} ns per run, "
                f"{t['ns_per_datagram']:,.0f} ns per datagram")


_WAY_NAMES = {"c2t": "client -> transceiver", "t2c": "transceiver -> client"}


def run_variant(fwd: Forwarder, cfg: Config, tools: dict[str, Path], pin: bool, log,
                wait_quiet: float = 0.0, cpu_phase_too: bool = True) -> VariantResult:
    """Every phase on one forwarder (the cpu phase when cpu_phase_too and cfg.cpu_rates)."""
    res = VariantResult(fwd.kind, fwd.label, fwd.workers, fwd.flows)
    load_cpus, worker_cpus = placement(fwd.workers, pin)
    load = variant_load(cfg, tools, fwd.workers, fwd.flows, pin)
    ports = free_ports()
    name = f"{fwd.label} x{fwd.workers}, {fwd.flows:,} flows/worker"
    res.background_cpu = cpu.wait_quiet(wait_quiet, BUSY_WARN) if wait_quiet > 0 else cpu.cpu_busy(0.3)
    if res.background_cpu > BUSY_WARN:
        log(f"  warning: {res.background_cpu:.0%} of the CPUs busy with other processes: noisy figures")
    try:
        start_and_pin(fwd, ports, worker_cpus)
    except NotImplementedError as e:
        res.status, res.message = "not measured", str(e)
        log(f"  {name}: NOT MEASURED: {e}")
        fwd.stop()
        return res
    except Exception as e:  # one broken forwarder must not stop the others
        res.status, res.message = "error", f"start failed: {type(e).__name__}: {e}"
        log(f"  {name}: ERROR: {res.message}")
        fwd.stop()
        return res
    reference = start_step_reference(worker_cpus[0] if worker_cpus else None)
    try:
        res.pinning = (f"workers on CPU {','.join(str(min(c)) for c in worker_cpus)}" if worker_cpus else "unpinned")
        res.pinning += f"; load on CPU {min(load_cpus)}" if load_cpus else "; load unpinned"
        res.describe = fwd.describe()
        res.learn = learn(fwd, load, ports)
        log(f"  {name} ({res.pinning}): {load.flows:,} flows learned in {res.learn['learn_s']} s "
            f"({res.learn['rounds']} round(s)); smoke...")
        res.smoke = smoke(fwd, load, ports)
        flow_trace(fwd, load.flows, "smoke", log)
        measure = measurer(cfg, log, wait_quiet)

        if fwd.in_kernel:
            res.drain = {"skipped": fwd.in_kernel}
            log(f"    drain: skipped: {fwd.in_kernel}")
        for i in range(cfg.drain_reps if not fwd.in_kernel else 0):
            d = measure(lambda: drain(fwd, load, ports, cfg.drain_count), "drain")
            res.drain_runs.append(d)
            log(f"    drain {i + 1}/{cfg.drain_reps}: {d['pps']:,.0f} pps ({d['received']}/{d['sent']} in "
                f"{d['drain_s'] * 1e3:.1f} ms; dropped: {d['dropped_while_stopped']} while queued, "
                f"{d['dropped_at_sink']} at the sink; others used {d['foreign_cpu']:.0%} CPU)")
        summarise_drain(res)
        flow_trace(fwd, load.flows, "drain", log)
        guess = 0.8 * res.drain["pps"] if res.drain.get("valid") else 100_000 * fwd.workers
        guess = max(round(guess, -3), 10_000)
        res.paced = paced_search(fwd, load, ports, guess, cfg.search_steps, cfg.search_duration,
                                 measure)
        flow_trace(fwd, load.flows, "paced search", log)
        res.paced["foreign_cpu"] = max((r["foreign_cpu"] or 0) for r in res.paced["runs"])
        res.paced["noisy"] = any(r.get("noisy") for r in res.paced["runs"])
        log(f"    paced: max {res.paced['max_pps']:,.0f} pps"
            f"{' (load-bound)' if res.paced['load_bound'] else ''}; runs "
            + ", ".join(f"{r['rate'] / 1e3:.0f}k{'✓' if r['ok'] else '✗' + r['why']}"
                        + ("" if r["load_cpu"] is None else f" (load CPU {r['load_cpu']:.0%})")
                        for r in res.paced["runs"]))
        # Every flow sends in every run: at 100,000 flows and 20k pps a 2 s run left 60% of them
        # silent, and over three runs and their quiet waits some idled out (30 s) into misses.
        duration = max(cfg.latency_duration, 1.25 * load.flows / cfg.latency_rate)
        with step_reference_paused(reference):
            res.latency_runs = [measure(lambda: latency(fwd, load, ports, cfg.latency_rate, duration),
                                        "latency", FOREIGN_MAX_LATENCY) for _ in range(cfg.latency_reps)]
        summarise_latency(res)
        flow_trace(fwd, load.flows, "latency", log)
        lat = {k: "-" if res.latency[k] is None else f"{res.latency[k]:.1f}" for k in ("p50_us", "p99_us", "p999_us")}
        log(f"    latency at {cfg.latency_rate:,} pps: p50 {lat['p50_us']} us, "
            f"p99 {lat['p99_us']} us, p99.9 {lat['p999_us']} us (best p99 of "
            f"{res.latency['runs_p99_us']}; others used {res.latency['foreign_cpu']:.1%} CPU"
            + (f"; generator + sink used {res.latency['load_cpu']:.0%} of their CPU)" if res.latency["load_cpu"]
               else ")"))
        if cpu_phase_too and cfg.cpu_rates:
            with step_reference_paused(reference):
                cpu_phase(res, fwd, load, ports, cfg, measure, log)
        res.flow_check = flow_check(fwd, load.flows)
        res.memory = memory(fwd, load.flows)
        res.housekeeping = housekeeping(fwd)
        res.step_reference = stop_step_reference(reference)
        if res.housekeeping:
            log("    " + describe_housekeeping(res.housekeeping))
        log("    " + describe_housekeeping(res.step_reference, "fixed-work reference steps on worker 0's CPU"))
        if not res.flow_check["ok"]:
            log(f"    WARNING: the relay holds {res.flow_check['held']:,} flows after the measurements, "
                f"not {load.flows:,} (drops: {res.flow_check['drops']})")
    except Exception as e:  # reported in the table, the other variants still run
        res.status, res.message = "error", describe_error(e)
        log(f"  {name}: ERROR: {res.message}")
    finally:
        processes.reap(reference)
        fwd.stop()
    return res



def ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None when either is missing, zero or negative (a sink's "nothing timed")."""
    return a / b if a is not None and b is not None and a > 0 and b > 0 else None
