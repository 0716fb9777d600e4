#!/usr/bin/env python3
"""How much churn a default-sized relay table absorbs: new sessions at a fixed rate, the relay's
flows, learned, expired and refused every few seconds, and when refusals began.

    .venv/bin/python bench/table_fill.py --rate 2000 --seconds 50     # 1 worker, default table
    .venv/bin/python bench/table_fill.py --rate 1200 --seconds 90 --capacity 65536

The relay runs with the default `idle_timeout` (30 s) and flow/session capacities (65,536 slots
per worker: 49,152 flows at the 75% load cap) unless told otherwise; each new session is an
authenticated Binding Request from a new 5-tuple (`loadgen churn`, 127.3.0.1:2000 on), sent
once and never followed: it expires after the idle timeout. Loopback only; bounded in time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _BENCH:
    sys.path[0] = str(_BENCH.parent)  # as bench/relay.py: bench/ must not shadow `relay`

from bench import ctools, udpload
from bench.harness import processes
from bench.relay_forwarders import HOST, PythonRelayForwarder
from bench.relay_runs import drops, free_ports, start_and_pin


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=2000, help="new sessions per second (all workers)")
    ap.add_argument("--seconds", type=float, default=50.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--capacity", type=int, default=65536, help="flow and session slots per worker")
    ap.add_argument("--idle-timeout", type=float, default=30.0)
    ap.add_argument("--every", type=float, default=5.0, help="seconds between lines")
    args = ap.parse_args(argv)
    processes.stop_all_on_signals()
    tools = ctools.build()
    fwd = PythonRelayForwarder(args.workers, flows=args.capacity // 2, idle_timeout=args.idle_timeout)
    ports = free_ports()
    load = udpload.Load(tools, flows=1, host=HOST)
    start_and_pin(fwd, ports, None)
    path = None
    try:
        n = int(args.rate * args.seconds)
        path = udpload.write_preambles(fwd.preambles(n) or [])
        sink = load.sink(ports.sink, idle_ms=0, max_s=args.seconds + 30)
        churn = load.churn(ports.listen, path, udpload.SourcePlan("127.3.0.1", 2000), args.rate, args.seconds,
                           max_s=args.seconds + 10)
        t0 = time.monotonic()
        first_refusal = None
        print(f"{args.rate:,} new sessions/s for {args.seconds:g} s, {args.workers} worker(s), "
              f"{args.capacity:,} flow + session slots each, idle_timeout {args.idle_timeout:g} s")
        while churn.poll() is None:
            time.sleep(args.every)
            rows = fwd.counters() or []
            refused = {k[5:]: v for k, v in drops(rows).items()
                       if k in ("drop_table_full", "drop_session_table_full", "drop_miss_queue_full")}
            t = time.monotonic() - t0
            if refused and first_refusal is None:
                first_refusal = t
            print(f"t={t:5.1f} s  flows {sum(r['flows'] for r in rows):7,}  learned "
                  f"{sum(r['flows_learned'] for r in rows):7,}  expired {sum(r['flows_expired'] for r in rows):7,}  "
                  f"refused {refused or 'none'}", flush=True)
        print(processes.json_summary(churn, 10, "loadgen churn"))
        processes.reap(sink)
        print("refusals began within " + (f"{first_refusal:.0f} s" if first_refusal else "never"))
    finally:
        fwd.stop()
        if path:
            os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
