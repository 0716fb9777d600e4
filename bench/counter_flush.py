"""The worker's counter flush, C (relay/_counter_flush.c) against Python (shm/writer.py), on a
real shm table at production shape: time per flow written, as a ratio in the same run.

    .venv/bin/python bench/counter_flush.py [--flows 50000] [--rounds 3]

Why it matters: a worker writes every flow that moved once per pass (relay/worker.py), and
the datagrams that arrive during a step wait for it (bench/relay.py's p99 at 20k pps).
"""
from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.batchio import sockaddr_for
from relay.config import RelayConfig
from relay.decision import Learn
from relay.flows import LocalFlows
from shm import FlowTable

PUBLIC = (socket.inet_aton("127.0.0.1"), 3478)
TRANSCEIVERS = [(socket.inet_aton("127.0.0.2"), 40000 + i) for i in range(4)]


def flows_at_scale(directory: str, count: int) -> tuple[LocalFlows, FlowTable]:
    """One worker's partition with `count` flows, two per session, over four transceivers."""
    capacity = max(1 << 16, 1 << (2 * count - 1).bit_length())
    config = RelayConfig(name="flushbench", workers=1, table_dir=directory, flow_capacity=capacity,
                         session_capacity=capacity, idle_timeout=30.0)
    table = FlowTable.create(config.table_path, partitions=1, flow_capacity=capacity, session_capacity=capacity)
    flows = LocalFlows(config, 0, socket.AF_INET, [PUBLIC])
    flows.take_over(now=100.0)
    for n in range(count):
        source = (bytes([10, n >> 16, (n >> 8) & 255, n & 255]), 5000 + n % 7)
        entry, refusal = flows.learn(sockaddr_for(*source), source, 0,
                                     Learn(f"session{n // 2:07d}", *TRANSCEIVERS[n % 4], 1), 100.0)
        if entry is None:
            raise SystemExit(f"flow {n} not learned: {refusal}")
    return flows, table


def flush_time(flows: LocalFlows, now: float) -> float:
    """Seconds per flow to write every flow once (all of them moved)."""
    for entry in flows.entries:
        entry.packets_in += 1
    started = time.perf_counter()
    written = 0
    for written in flows.flush_counters_steps(now, chunk=32, budget=len(flows.entries)):  # noqa: B007
        pass
    elapsed = time.perf_counter() - started
    if written != len(flows.entries):
        raise SystemExit(f"the flush wrote {written} of {len(flows.entries)} flows")
    return elapsed / written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3, help="alternating C and Python passes each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        flows, table = flows_at_scale(directory, args.flows)
        c_flush = flows.counter_flush
        if c_flush is None:
            raise SystemExit("relay._counter_flush is not built (pip install -e . with gcc)")
        times: dict[str, list[float]] = {"c": [], "python": []}
        now = 200.0
        for _ in range(args.rounds):
            for name, impl in (("python", None), ("c", c_flush)):
                flows.counter_flush = impl
                now += 2.0  # (every pass also moves the sessions' last_seen)
                times[name].append(flow_time := flush_time(flows, now))
                print(f"  {name:6} {flow_time * 1e6:6.2f} µs a flow")
        flows.close()
        table.close()
    best = {name: min(values) for name, values in times.items()}
    print(f"counter flush at {args.flows:,} flows: C {best['c'] * 1e6:.2f} µs a flow, Python "
          f"{best['python'] * 1e6:.2f} µs: C takes {best['c'] / best['python']:.2f}x Python's time "
          f"(best of {args.rounds})")


if __name__ == "__main__":
    main()
