"""The same-run reference for the relay's housekeeping steps: fixed work, run in steps by the
worker's own StepRunner, on the worker's CPU, at idle priority (it runs when the worker waits;
yet its wake-ups and cache traffic cost the worker's p99, so bench/relay.py stops it for its
latency and CPU runs).

Why: a step's CPU time (``thread_time``) counts whatever the CPU did while the step was on it.
This kernel charges interrupt and softirq time to the running task (no IRQ_TIME_ACCOUNTING),
and a vCPU stall that the hypervisor does not report as steal looks like CPU time too. A unit
here is a fixed ~3-10 µs of work (16 reads and writes at random in a 50,000-entry table, the
shape of a counter-flush unit) and a step runs them for ~20 µs (most take 25-50 µs of CPU on an
idle machine), so a step of this reference longer than ~100 µs is the machine's doing, not the
work's. bench/relay.py runs one beside every forwarder it measures (learning, drain, paced
search) and reports the relay's steps over 200 µs beside the reference's.

    python bench/step_reference.py [--interval 0.01] [--entries 50000]

It steps every ``interval`` seconds until a line arrives on stdin (or it closes), then prints
one JSON line: steps, max_us, over_200us, cpu_ms (summary(), as for a worker) and buckets.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.housekeeping_steps import STEP_BUCKET_COUNTERS, STEP_BUCKETS_US, StepRunner

UNITS_PER_STEP_AT_MOST = 64  # a step ends on its 20 µs first; this only bounds a tick's generator
WRITES_PER_UNIT = 16


def fixed_units(table: list[list[int]], rng: random.Random) -> Iterator[None]:
    """Units of fixed work: each reads and bumps WRITES_PER_UNIT entries of ``table`` at random."""
    size = len(table)
    for _ in range(UNITS_PER_STEP_AT_MOST):
        for _ in range(WRITES_PER_UNIT):
            entry = table[rng.randrange(size)]
            entry[1] = entry[0] + entry[2]
        yield None


def summary(row: Mapping[str, int]) -> dict:
    """A StepRunner's counters (a worker's counter row, or this reference's): how many steps,
    the longest, how many over 200 µs by the histogram, and their CPU time."""
    over = [name for bound, name in zip((*STEP_BUCKETS_US, None), STEP_BUCKET_COUNTERS) if bound is None or bound > 200]
    return {"steps": sum(row[name] for name in STEP_BUCKET_COUNTERS),
            "max_us": row["housekeeping_step_max_us"],
            "over_200us": sum(row[name] for name in over),
            "cpu_ms": row["housekeeping_step_us_total"] / 1e3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=0.01, help="seconds between steps")
    ap.add_argument("--entries", type=int, default=50_000, help="entries of the table a unit reads")
    args = ap.parse_args(argv)
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    names = ("housekeeping_step_max_us", "housekeeping_step_us_total", *STEP_BUCKET_COUNTERS)
    index = {name: i for i, name in enumerate(names)}
    counts = [0] * len(names)
    runner = StepRunner(counts, index)
    rng = random.Random(1)
    table = [[n, 0, n + 1] for n in range(args.entries)]
    while True:
        runner.step(fixed_units(table, rng))
        if select.select([sys.stdin], [], [], args.interval)[0]:  # (a line, or closed: stop)
            break
    print(json.dumps({**summary(dict(zip(names, counts))), "buckets": counts[2:]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
