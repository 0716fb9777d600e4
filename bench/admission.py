#!/usr/bin/env python3
"""Admission by load: ramp echo calls past a transceiver's capacity; the calls already up must
keep their audio, the extra ones must be refused (503 overloaded) and counted.

    .venv/bin/python bench/admission.py                     # default admission settings
    .venv/bin/python bench/admission.py --attempts 30 --cpu-budget 0.4 --json out.json

The same processes as bench/transceiver.py (bench/transceiver_stacks.py): the real relay and
an echo transceiver pinned to CPU 1, light callers (bench/echo_calls.py) in this process on
CPU 0. One offer every --interval seconds, --attempts offers in all, each accepted call sends
Opus at 50 packets/s until the end; then --window more seconds with every call up. Per call,
"in time" is the share of its audio packets echoed back no more than 500 ms behind its best
echo (bench/echo_calls.py), counted from 1 s after its media started.

Prints one line per offer and a summary; ``RESULT {json}`` (and --json FILE): accepted,
refused (by reason, and the transceiver's own rtcrelay_transceiver_offers_rejected_total),
the worst and median call's audio in time, the transceiver's CPU, loop lag and per-call cost
from its /metrics. Exit 0 when it ran; the verdict lines say PASS/MISS.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _BENCH:
    sys.path[0] = str(_BENCH.parent)  # bench/transceiver.py would shadow the transceiver package

from bench import echo_calls
from bench.harness import processes
from bench.transceiver_stacks import CALLER_CPU, Stack, start_rtcrelay

WARMUP_S = 1.0  # of each call's media, not counted
IN_TIME_MIN = 0.99


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attempts", type=int, default=50, help="offers in all")
    p.add_argument("--interval", type=float, default=0.3, help="seconds between offers")
    p.add_argument("--window", type=float, default=8.0, help="seconds with every call up, after the ramp")
    p.add_argument("--cpu-budget", type=float, default=None, help="admission_cpu_budget (default: the product's)")
    p.add_argument("--max-loop-lag", type=float, default=None, help="admission_max_loop_lag (default: the product's)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else float("nan")


class CallMeter:
    """A call's counters from WARMUP_S after its media started to the end."""

    def __init__(self, caller: echo_calls.Caller) -> None:
        self.caller = caller
        self.base: echo_calls.Counters | None = None

    def mark(self) -> None:
        self.base = self.caller.counters.minus(echo_calls.Counters())

    def in_time(self) -> float:
        assert self.base is not None
        d = self.caller.counters.minus(self.base)
        return min(1.0, (d.rx - d.rx_late) / d.tx) if d.tx else 0.0


async def run(args: argparse.Namespace, stack: Stack) -> dict:
    import aiohttp

    clock = echo_calls.MediaClock(echo_calls.encoded_tone())
    clock.start()
    meters: list[CallMeter] = []
    refused: dict[str, int] = {}
    failed = 0
    async with aiohttp.ClientSession() as http:
        try:
            for attempt in range(args.attempts):
                caller = echo_calls.Caller(stack.base_url)
                try:
                    await caller.dial(http, timeout=20)
                except AssertionError as exc:
                    m = re.search(r"offer refused: 503 (\w+)", str(exc))
                    if m:
                        refused[m.group(1)] = refused.get(m.group(1), 0) + 1
                    else:
                        failed += 1
                    print(f"offer {attempt + 1:3d}: {str(exc)[:110]}", flush=True)
                    await caller.hang_up(http)
                else:
                    caller.start_media(time.monotonic())
                    clock.callers.append(caller)
                    meter = CallMeter(caller)
                    meters.append(meter)
                    asyncio.get_running_loop().call_later(WARMUP_S, meter.mark)
                    print(f"offer {attempt + 1:3d}: accepted, {len(meters)} calls up", flush=True)
                stack.check_alive()
                await asyncio.sleep(args.interval)
            await asyncio.sleep(max(args.window, WARMUP_S))
            for c in clock.callers:
                c.media = False
            await asyncio.sleep(0.6)  # the last echoes come home
            async with http.get(stack.base_url + "/metrics") as response:
                text = await response.text()
            in_time = [m.in_time() for m in meters if m.base is not None]
        finally:
            await clock.stop()
            await asyncio.gather(*(c.hang_up(http) for c in clock.callers), return_exceptions=True)
    name = "rtcrelay_transceiver_offers_rejected_total"
    return {
        "attempts": args.attempts, "accepted": len(meters), "refused": refused, "failed": failed,
        "refused_counted": {r: metric(text, name, f'{{reason="{r}"}}') for r in ("overloaded", "at_capacity")},
        "in_time_worst": min(in_time) if in_time else 0.0,
        "in_time_median": statistics.median(in_time) if in_time else 0.0,
        "calls_below": sum(1 for x in in_time if x < IN_TIME_MIN),
        "cpu_cores": metric(text, "rtcrelay_transceiver_cpu_cores"),
        "call_cpu_cores": metric(text, "rtcrelay_transceiver_call_cpu_cores"),
        "loop_lag_s": metric(text, "rtcrelay_transceiver_loop_lag_seconds"),
        "cpu_budget": args.cpu_budget, "max_loop_lag": args.max_loop_lag,
    }


def report(result: dict) -> None:
    print(f"\noffers {result['attempts']}: accepted {result['accepted']}, refused {result['refused']}, "
          f"failed {result['failed']}; the transceiver counted {result['refused_counted']}")
    print(f"audio in time per call: worst {result['in_time_worst']:.2%}, median {result['in_time_median']:.2%}, "
          f"{result['calls_below']} calls below {IN_TIME_MIN:.0%}")
    print(f"transceiver at the end: {result['cpu_cores']:.2f} cores (budget {result['cpu_budget']}), "
          f"{result['call_cpu_cores'] * 1000:.1f} ms CPU/s per call, loop lag p90 {result['loop_lag_s'] * 1000:.1f} ms "
          f"(limit {result['max_loop_lag'] * 1000:.0f} ms)")
    ok = result["calls_below"] == 0 and result["accepted"] > 0
    print(f"{'PASS' if ok else 'MISS'}  calls up keep >= {IN_TIME_MIN:.0%} of their audio in time")
    refused = sum(result["refused"].values())
    print(f"{'PASS' if refused else 'MISS'}  offers past capacity refused ({refused})")
    print("RESULT " + json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transceiver.service import TransceiverConfig

    defaults = TransceiverConfig(relay_public_addresses=["127.0.0.1:1"])
    if args.cpu_budget is None:
        args.cpu_budget = defaults.admission_cpu_budget
    if args.max_loop_lag is None:
        args.max_loop_lag = defaults.admission_max_loop_lag
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {CALLER_CPU})
    echo_calls.loopback_only_ice()
    server_args = ("--max-sessions", "1000", "--admission-cpu-budget", str(args.cpu_budget),
                   "--admission-max-loop-lag", str(args.max_loop_lag))
    import uvloop

    try:
        with tempfile.TemporaryDirectory(prefix="rtcrelay-admission-") as tmp:
            stack = start_rtcrelay(Path(tmp), server_args)
            try:
                result = uvloop.run(run(args, stack))
            finally:
                stack.close()
    finally:
        processes.stop_all(grace=3.0)
    report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
