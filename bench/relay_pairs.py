"""The p99 target's measurement: a forwarder and the C reference up side by side (same flows,
same worker CPU), their latency runs alternating (ref, relay, relay, ref, ...).

Each variant's own latency runs (bench/relay_runs.py) are minutes apart from the other
forwarder's; on this VM the tail moves 10-50x between minutes (the reference's own p99 read
60 µs and 4 ms in one evening), so a ratio of two such figures is mostly the machine's. Runs
seconds apart see the same machine: the ratio of each pair, and the median of those, is the
forwarder's.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness.errors import describe_error
from bench.relay_forwarders import Forwarder
from bench.relay_runs import (
    FOREIGN_MAX_LATENCY,
    Config,
    free_ports,
    latency,
    learn,
    measurer,
    placement,
    ratio,
    start_and_pin,
    variant_load,
)


@dataclass
class PairedLatency:
    kind: str                     # the forwarder measured against "ref"
    workers: int
    flows: int                    # per worker
    status: str = "ok"            # ok | error
    message: str = ""
    runs: dict = field(default_factory=dict)     # kind -> its latency runs, in order
    ratios: list = field(default_factory=list)   # per pair: kind's p99 / ref's (None: a run timed nothing)
    ratio: float | None = None                   # the median of the pairs' ratios


def pair_ratios(mine: list[dict], ref: list[dict]) -> tuple[list[float | None], float | None]:
    """Each pair's p99 ratio, and their median (of the pairs that have one)."""
    ratios = [ratio(a["p99_us"], b["p99_us"]) for a, b in zip(mine, ref)]
    known = [r for r in ratios if r is not None]
    return ratios, (statistics.median(known) if known else None)


def paired_latency(mine: Forwarder, ref: Forwarder, cfg: Config, tools: dict[str, Path], pin: bool, log,
                   wait_quiet: float = 0.0) -> PairedLatency:
    """Both forwarders started (their workers on the same CPUs) and their flows learned, then
    cfg.latency_pairs pairs of latency runs, the order reversed every other pair."""
    res = PairedLatency(mine.kind, mine.workers, mine.flows)
    _, worker_cpus = placement(mine.workers, pin)
    load = variant_load(cfg, tools, mine.workers, mine.flows, pin)
    measure = measurer(cfg, log, wait_quiet)
    fwds = {"ref": ref, mine.kind: mine}
    ports = {}
    try:
        for kind, fwd in fwds.items():
            ports[kind] = free_ports()
            start_and_pin(fwd, ports[kind], worker_cpus)
            learn(fwd, load, ports[kind])
        duration = max(cfg.latency_duration, 1.25 * load.flows / cfg.latency_rate)
        res.runs = {kind: [] for kind in fwds}
        order = list(fwds)
        for i in range(cfg.latency_pairs):
            for kind in (order if i % 2 == 0 else order[::-1]):
                fwd, p = fwds[kind], ports[kind]
                res.runs[kind].append(measure(lambda fwd=fwd, p=p: latency(fwd, load, p, cfg.latency_rate, duration),
                                              "latency", FOREIGN_MAX_LATENCY))
        res.ratios, res.ratio = pair_ratios(res.runs[mine.kind], res.runs["ref"])
        log(f"  paired latency, {mine.label} and the C reference x{mine.workers}, {mine.flows:,} flows/worker: "
            f"p99 {', '.join(_pair(a, b) for a, b in zip(res.runs[mine.kind], res.runs['ref']))} us; "
            f"median ratio {'-' if res.ratio is None else f'{res.ratio:.2f}x'}")
    except Exception as e:  # reported, the rest of the report still prints
        res.status, res.message = "error", describe_error(e)
        log(f"  paired latency, {mine.label} x{mine.workers}, {mine.flows:,} flows/worker: ERROR: {res.message}")
    finally:
        for fwd in fwds.values():
            fwd.stop()
    return res


def _pair(mine: dict, ref: dict) -> str:
    def us(r: dict) -> str:
        return "-" if r["p99_us"] is None else f"{r['p99_us']:.0f}"
    return f"{us(mine)}/{us(ref)}"
