"""The churn phase of bench/relay.py: established flows carry traffic while new sessions
(authenticated Binding Requests from new 5-tuples) arrive at each rate."""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import udpload
from bench.harness import processes
from bench.harness.cpu import cpu_seconds
from bench.harness.errors import describe_error
from bench.relay_forwarders import HOST, CReferenceForwarder, EbpfRelayForwarder, Forwarder, PythonRelayForwarder
from bench.relay_runs import (
    LATE_NS,
    Config,
    Ports,
    drops,
    free_ports,
    fresh_counters,
    learn,
    placement,
    ratio,
    start_and_pin,
)
from bench.udpload import Load, SourcePlan

CHURN_IDLE_TIMEOUT = 30.0     # churn: the default; the first rates' flows expire during the later ones
                              # (with 5 s the counter flush had to pass 6x as often: not production)
CHURN_FLOWS = 10_000          # established flows per worker during churn (at most)


@dataclass
class ChurnResult:
    kind: str                            # "relay", "ebpf" (its kernel path), or "ref": the same load on the C reference (a control)
    workers: int
    flows: int                           # established flows per worker
    status: str = "ok"                   # ok | error
    message: str = ""
    build: dict = field(default_factory=dict)    # the pre-built requests: how many, how long
    learn: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)     # one per rate


def established_run(fwd: Forwarder, load: Load, ports: Ports, rate: int, duration: float,
                    churn: tuple[str, SourcePlan, float] | None = None) -> dict:
    """The established flows at `rate` pps (batch 1, as the latency test) for `duration` s,
    with `loadgen churn` (preamble file, source plan, requests per second) alongside if given:
    their latency and loss, what the workers' counters and CPU time did meanwhile."""
    pids = fwd.pids()
    rows0 = fresh_counters(fwd) or []
    cpu0 = cpu_seconds(pids)
    t0 = time.monotonic()
    sink = ch = gen = None
    try:
        sink = load.sink(ports.sink, expected=load.paced_count(rate, duration), idle_ms=500, max_s=duration + 20,
                         late_ns=LATE_NS)
        if churn:
            ch = load.churn(ports.listen, churn[0], churn[1], churn[2], duration, max_s=duration * 2 + 5)
        gen = load.gen(ports.listen, rate=rate, duration=duration, batch=1, max_s=duration * 2 + 5)
        g = gen.result(timeout=duration * 2 + 15)
        c = processes.json_summary(ch, timeout=duration * 2 + 15, what="loadgen churn") if ch else None
        s = processes.json_summary(sink, timeout=duration + 25, what="loadgen sink")
    finally:
        if gen:
            gen.reap()
        processes.reap(ch, sink)
    wall = time.monotonic() - t0
    cpu = cpu_seconds(pids) - cpu0
    load_cpu = (g["cpu_s"] + s["cpu_s"] + (c["cpu_s"] if c else 0)) / duration / len(load.cpus) if load.cpus else None
    rows1 = fresh_counters(fwd) or []

    def grew(name: str) -> int:
        return sum(r[name] for r in rows1) - sum(r[name] for r in rows0)

    return {"sent": g["sent"], "received": s["received"], "lost": max(g["sent"] - s["received"], 0),
            "late": s["late"], "p50_us": s["lat_p50_ns"] / 1e3, "p99_us": s["lat_p99_ns"] / 1e3,
            "p999_us": s["lat_p999_ns"] / 1e3, "gen_pps": g["pps"], "churn": c,
            "learned": grew("flows_learned") if rows1 else None,
            "expired": grew("flows_expired") if rows1 else None,
            "drops": {k: grew(k) for k in drops(rows1) if grew(k) > 0},
            "flows_after": sum(r["flows"] for r in rows1) if rows1 else None,
            "worker_cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "load_cpu": load_cpu}


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` counts that differ by at most one."""
    return [total // parts + (i < total % parts) for i in range(parts)]


_SUMMED = ("sent", "received", "lost", "late", "learned", "expired", "worker_cpu_s", "wall_s")


def combine_runs(runs: list[dict]) -> dict:
    """Several established runs as one: counts and CPU summed, the latency percentiles the median
    of the runs' (robust to one run a noisy host disturbed), the churn generator's summary summed
    (its rate: sent over its seconds of sending)."""
    out = dict(runs[-1])
    for key in _SUMMED:
        values = [r[key] for r in runs]
        out[key] = None if None in values else round(sum(values), 3) if key.endswith("_s") else sum(values)
    for key in ("p50_us", "p99_us", "p999_us", "gen_pps"):
        out[key] = statistics.median(r[key] for r in runs)
    loads = [r["load_cpu"] for r in runs if r["load_cpu"] is not None]
    out["load_cpu"] = statistics.mean(loads) if loads else None
    drops: dict[str, int] = {}
    for r in runs:
        for name, n in r["drops"].items():
            drops[name] = drops.get(name, 0) + n
    out["drops"] = drops
    churns = [r["churn"] for r in runs if r["churn"]]
    if churns:
        out["churn"] = summed = {**churns[-1]}
        for key in ("planned", "attempted", "sent", "errors", "elapsed_ns", "cpu_s"):
            summed[key] = sum(c[key] for c in churns)
        summed["rate"] = summed["sent"] * 1e9 / summed["elapsed_ns"] if summed["elapsed_ns"] else 0.0
    return out


def churn_phase(kind: str, workers: int, flows: int, cfg: Config, tools: dict[str, Path], pin: bool,
                log) -> ChurnResult:
    """The relay under new sessions: `flows` established flows per worker carry the latency test's
    load while new 5-tuples send authenticated Binding Requests at each rate in cfg.churn_rates
    (per second per worker), in cfg.churn_pairs runs alternating with no-churn runs of the same
    relay and flows. The relay runs with the default idle timeout (CHURN_IDLE_TIMEOUT): the
    sessions of the first rates depart and expire during the later ones; its tables hold every
    new session of the phase and the established flows (sizing for the table itself is in the
    README).
    The C reference (kind "ref") takes the same load as a control: it learns any source, so
    what its established flows' p99 does under churn is the load side's doing (on 2 CPUs the
    churn generator's socket per session shares a CPU with the generator and the sink)."""
    res = ChurnResult(kind, workers, flows)
    idle, dur = CHURN_IDLE_TIMEOUT, cfg.churn_duration
    new_sessions = int(sum(cfg.churn_rates) * dur)
    fwd: Forwarder
    if kind == "relay":
        fwd = PythonRelayForwarder(workers, flows=flows + new_sessions, idle_timeout=idle, hit_path=cfg.hit_path)
    elif kind == "ebpf":  # established flows in the kernel: the workers see only the new sessions
        fwd = EbpfRelayForwarder(workers, flows=flows + new_sessions, idle_timeout=idle)
    else:
        fwd = CReferenceForwarder(workers, tools=tools, flows=flows + new_sessions)
    load_cpus, worker_cpus = placement(workers, pin)
    load = Load(tools, flows=flows * workers, size=cfg.size, cpus=load_cpus, host=HOST, source=cfg.source)
    ports = free_ports()
    files: list[str] = []
    try:
        start_and_pin(fwd, ports, worker_cpus)
        # Every request is built (fresh tokens) before the established flows are learned: built
        # between the runs it would take seconds, and established flows idle out after 5.
        t0 = time.monotonic()
        plan = cfg.churn_source  # each rate's tuples follow the last's: none is reused in this relay
        churns: list[list[tuple[str, SourcePlan, float]]] = []   # per rate, one per pair
        for rate in cfg.churn_rates:
            pairs = []
            for n in split_evenly(int(rate * workers * dur), cfg.churn_pairs):
                # (the C reference takes anything: datagrams of a Binding Request's size)
                files.append(udpload.write_preambles(fwd.preambles(n) or [os.urandom(100) for _ in range(n)]))
                pairs.append((files[-1], plan, rate * workers))
                plan = plan.after(n)
            churns.append(pairs)
        res.build = {"requests": sum(int(r * workers * dur) for r in cfg.churn_rates),
                     "build_s": round(time.monotonic() - t0, 2)}
        log(f"  churn, {fwd.label} x{workers}: {res.build['requests']:,} new-session datagrams built in "
            f"{res.build['build_s']} s; learning {load.flows:,} established flows...")
        res.learn = learn(fwd, load, ports)
        sub = dur / cfg.churn_pairs
        for rate, pairs in zip(cfg.churn_rates, churns):
            bases, runs = [], []
            for churn in pairs:  # no-churn and churn runs alternate: a noisy second hits one pair
                bases.append(established_run(fwd, load, ports, cfg.latency_rate, sub))
                runs.append(established_run(fwd, load, ports, cfg.latency_rate, sub, churn))
            base, run = combine_runs(bases), combine_runs(runs)
            run.update(rate=rate, base_p99_us=base["p99_us"], base_lost=base["lost"] + base["late"],
                       base_cpu_s=base["worker_cpu_s"], base=base,
                       pairs=[[b["p99_us"], r["p99_us"]] for b, r in zip(bases, runs)])
            run["p99_ratio"] = ratio(run["p99_us"], base["p99_us"])
            # the workers' CPU beyond what the same established load took without churn
            extra = run["worker_cpu_s"] - base["worker_cpu_s"] * run["wall_s"] / base["wall_s"]
            learned = run["learned"] or run["churn"]["sent"]  # (the C reference learns every one)
            run["cpu_per_learned_us"] = round(extra / learned * 1e6, 1) if learned else None
            res.runs.append(run)
            log(f"    churn {rate:,}/s/worker: sent {run['churn']['sent']:,} ({run['churn']['rate']:,.0f}/s), "
                f"learned {run['learned']}, established p99 {run['p99_us']:.1f} us (no churn "
                f"{base['p99_us']:.1f}; medians of {len(runs)} pairs: "
                f"{', '.join(f'{b:.0f}/{c:.0f}' for b, c in run['pairs'])}), lost {run['lost']}, "
                f"late {run['late']}, drops {run['drops'] or 'none'}")
    except Exception as e:  # reported, the rest of the report still prints
        res.status, res.message = "error", describe_error(e)
        log(f"  churn, {fwd.label} x{workers}: ERROR: {res.message}")
    finally:
        fwd.stop()
        for f in files:
            os.unlink(f)
    return res

