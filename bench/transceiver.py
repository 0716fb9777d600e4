#!/usr/bin/env python3
"""Transceiver benchmark: concurrent echo calls per core, and offer -> connected time,
rtcrelay against stock aiortc in the same run.

    .venv/bin/python bench/transceiver.py             # full run (~2-3 minutes)
    .venv/bin/python bench/transceiver.py --quick     # smoke run (~30 s), used by the tests
    .venv/bin/python bench/transceiver.py --variants rtcrelay --calls 10,20 --window 10
    .venv/bin/python bench/transceiver.py --variants rtcrelay --calls 12 --profile /tmp/prof  # py-spy

Variants (servers in bench/echo_calls.py, each a process of its own, both on uvloop):

  rtcrelay  the real relay (`rtcrelay relay`, 1 worker) -> tunnel -> the transceiver
            (transceiver.service.Transceiver, EchoPipeline, vectorised audio level).
  stock     plain aiortc: RTCPeerConnection(iceServers=[]) with host candidates on 127.0.0.1,
            MediaRelay echo + data-channel echo; no tunnel, no audio-level patch.

Cores: the system under test (the transceiver or the stock server, and the relay's supervisor
and worker) is pinned to CPU 1 (`taskset -c 1`), the callers (this process) to CPU 0. The
callers are light (bench/echo_calls.py: aiortc does signalling, ICE, DTLS and SCTP; the audio
is pre-encoded Opus sent as SRTP at 50 packets/s per call, and the echo is counted, not
decoded): a few % of a core per 10 calls, so the callers' core is never the limit.

Echo calls per core: calls are added to the running ones level by level (adaptive: a jump
towards ~0.92 server cores from the CPU cost per call, then +15% steps; or --calls); after
a warm-up, a steady window per level. The server's CPU time over the window (/proc, every
thread) gives its load in cores. A level passes when every call connected and >= 99% of the
audio packets sent in the window came back as authenticated SRTP, on time: an echo more than
500 ms (--late-ms) later than its call's best echo delay counts as lost. Calls per core =
calls / server cores at the highest passing level; "server CPU per call" is the same cost
in ms of CPU per second of call. The relay worker shares CPU 1: its CPU is shown (and calls
per core counting it), the targets are for the transceiver. Other processes' CPU on each core
is measured ("foreign"); before each level the harness waits (bounded) for CPU 1 to be
quiet, and a level that fails while disturbed, or with every echo arrived but late (an echo
that fell behind never catches up), is measured once more with fresh calls.

Offer -> connected: client-observed (offer POSTed -> the caller's connectionState is
"connected": ICE and DTLS done) and server-side (offer received -> connected), p50/p99, for
1 call at a time (repeated) and for 20 calls at once (a few rounds).

Output: one line per level, a table with absolute figures and ratios, PASS/MISS per target
(>= 40 echo calls per core; >= 2x stock aiortc; offer -> connected p50 <= 50 ms), and a
`RESULT {json}` line (--json: also to a file). Experiment knobs for the servers (not
defaults): --server-inline-executor, --server-switch-interval. Only 127.0.0.1 is used; every
wait is bounded; every process group started here is stopped on exit, on error and on
Ctrl-C/SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
_ROOT = _BENCH.parent
# Run as a script, Python puts bench/ first on sys.path, where this very file would shadow the
# `transceiver` package (and bench/relay.py the `relay` one): use the repository root.
if sys.path and Path(sys.path[0] or ".").resolve() == _BENCH:
    sys.path[0] = str(_ROOT)


# bench/ as a namespace package: nothing shadowed
from bench import echo_calls
from bench.harness import processes
from bench.harness.errors import BenchError
from bench.transceiver_report import json_safe, report
from bench.transceiver_runner import Runner, VariantResult
from bench.transceiver_stacks import CALLER_CPU, SERVER_ENV


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short smoke run (the tests use it)")
    p.add_argument("--variants", default="rtcrelay,stock", help="comma-separated: rtcrelay, stock")
    p.add_argument("--window", type=float, help="steady measurement window per level, s (default 8; quick 2)")
    p.add_argument("--warmup", type=float, help="after adding calls, before the window, s (default 2; quick 1)")
    p.add_argument("--start-calls", type=int, help="first level (default 4; quick 2)")
    p.add_argument("--max-calls", type=int, default=200)
    p.add_argument("--max-levels", type=int, help="levels per variant at most (default 8; quick 2)")
    p.add_argument("--ramp-budget", type=float, help="seconds per variant for the ramp (default 75; quick 12)")
    p.add_argument("--step", type=float, default=0.15, help="ramp step near saturation, fraction of the calls")
    p.add_argument("--aim", type=float, default=0.92, help="server cores the ramp jumps towards")
    p.add_argument("--saturated", type=float, default=0.97, help="server cores at which the ramp stops")
    p.add_argument("--setup-repeats", type=int, help="1-call offer->connected, sequential (default 20; quick 5)")
    p.add_argument("--setup-concurrency", type=int, default=20)
    p.add_argument("--setup-rounds", type=int, help="rounds of --setup-concurrency calls at once (default 3; quick 1)")
    p.add_argument("--timeout", type=float, help="whole-run limit, s (default 400; quick 150)")
    p.add_argument("--quiet-wait", type=float, help="wait at most this long for CPU 1 to be quiet per level (default 10; quick 2)")
    p.add_argument("--calls", default="", help="explicit levels instead of the adaptive ramp, e.g. 10,20,30")
    p.add_argument("--profile", default="", help="py-spy every window of the server into this directory")
    p.add_argument("--profile-native", action="store_true", help="with --profile: also native frames")
    p.add_argument("--server-switch-interval", type=float, default=0.0,
                   help="experiment: sys.setswitchinterval() in the server processes (default: Python's 5 ms)")
    p.add_argument("--server-inline-executor", action="store_true",
                   help="experiment: the servers run run_in_executor() work (aiortc's Opus encode) inline")
    p.add_argument("--late-ms", type=float, default=500.0,
                   help="an echo this much later than its call's best echo delay counts as lost (default 500)")
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"window": (8.0, 2.0), "warmup": (2.0, 1.0), "start_calls": (4, 2), "max_levels": (8, 2),
                "ramp_budget": (75.0, 20.0), "setup_repeats": (20, 5), "setup_rounds": (3, 1),
                "timeout": (400.0, 150.0), "quiet_wait": (10.0, 2.0)}
    for key, (full, short) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, short if quick else full)
    args.calls_list = [int(x) for x in args.calls.split(",") if x.strip()]
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variant_list:
        if v not in ("rtcrelay", "stock"):
            p.error(f"unknown variant {v!r}")
    return args


async def _run(args: argparse.Namespace) -> dict[str, VariantResult]:
    runner = Runner(args)
    results: dict[str, VariantResult] = {}
    workdir = Path(tempfile.mkdtemp(prefix="rtcrelay-bench-tx-"))
    try:
        for name in args.variant_list:
            results[name] = await runner.variant(name, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        print("note: fewer than 2 CPUs: callers and servers share the CPU", file=sys.stderr)
    else:
        os.sched_setaffinity(0, {CALLER_CPU})
    echo_calls.loopback_only_ice()
    echo_calls.LATE_S = args.late_ms / 1000
    if args.server_inline_executor:
        SERVER_ENV["RTCRELAY_BENCH_INLINE_EXECUTOR"] = "1"
    if args.server_switch_interval:
        SERVER_ENV["RTCRELAY_BENCH_SWITCH_INTERVAL"] = str(args.server_switch_interval)
    import logging

    logging.basicConfig(level=logging.ERROR)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    import uvloop

    started = time.monotonic()
    try:
        results = uvloop.run(asyncio.wait_for(_run(args), args.timeout))
    except KeyboardInterrupt:
        print("interrupted: stopping the servers", file=sys.stderr)
        return 130
    except (TimeoutError, BenchError) as exc:
        print(f"bench/transceiver.py: {exc or 'timed out'}", file=sys.stderr)
        return 1
    finally:
        processes.stop_all(grace=3.0)
    summary = report(results, args, time.monotonic() - started)
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(summary), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

