"""Latency runs only, for A/B comparisons of one forwarder: learn the flows, then several
latency runs at a fixed rate (what bench/relay.py does between its other phases, without the
drain and the paced search). Prints each run's p50 / p99 / p99.9 and the median p99, and the
worker's housekeeping steps (with --step-reference, beside those of a fixed-work reference on
its CPU: bench/step_reference.py).

    .venv/bin/python bench/relay_latency.py --forwarder relay --flows 50000 --runs 5

Run two builds one after the other, several times (this VM's p99 moves ±20% between runs):
one of them from a git worktree with ``--root``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forwarder", default="relay", help="ref, relay, ebpf, ... (bench/relay_forwarders.py)")
    ap.add_argument("--flows", type=int, default=10_000, help="flows (1 worker)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rate", type=int, default=20_000, help="pps")
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per run (at least every flow sends once)")
    ap.add_argument("--step-reference", action="store_true",
                    help="run bench/step_reference.py on the worker's CPU meanwhile: its steps beside the "
                         "worker's (it costs the p99: bench/relay.py pauses it for its latency runs)")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose relay runs (default: this one)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.root))
    os.chdir(args.root)
    from bench import ctools
    from bench.harness import processes
    from bench.relay_forwarders import make_forwarder
    from bench.relay_runs import (
        Config,
        describe_housekeeping,
        free_ports,
        housekeeping,
        latency,
        learn,
        placement,
        start_and_pin,
        start_step_reference,
        stop_step_reference,
        variant_load,
    )

    cfg = Config()
    tools = ctools.build()
    fwd = make_forwarder(args.forwarder, 1, args.flows, tools)
    _, worker_cpus = placement(1, True)
    load = variant_load(cfg, tools, 1, args.flows, True)
    ports = free_ports()
    p99s: list[float] = []
    reference = None
    try:
        start_and_pin(fwd, ports, worker_cpus)
        if args.step_reference:
            reference = start_step_reference(worker_cpus[0] if worker_cpus else None)
        learn(fwd, load, ports)
        duration = max(args.duration, 1.25 * args.flows / args.rate)
        for i in range(args.runs):
            r = latency(fwd, load, ports, args.rate, duration)
            if r["p99_us"] is None:
                print(f"run {i + 1}: nothing timed")
                continue
            p99s.append(r["p99_us"])
            print(f"run {i + 1}: p50 {r['p50_us']:.1f} us, p99 {r['p99_us']:.1f} us, p99.9 {r['p999_us']:.1f} us",
                  flush=True)
            time.sleep(0.5)
        steps = housekeeping(fwd)
        if steps:
            print(describe_housekeeping(steps))
        if reference is not None:
            print(describe_housekeeping(stop_step_reference(reference), "fixed-work reference steps on the worker's CPU"))
    finally:
        processes.reap(reference)
        fwd.stop()
    if not p99s:
        return 1
    print(f"{fwd.label} ({args.root}), {args.flows:,} flows: p99 median {statistics.median(p99s):.1f} us, "
          f"best {min(p99s):.1f} us of {len(p99s)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
