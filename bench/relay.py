#!/usr/bin/env python3
"""Relay forwarding benchmark: the rtcrelay relay against a C reference forwarder.

    .venv/bin/python bench/relay.py            # full run (2 rounds of ~2.5 min per forwarder, flow and worker count; churn)
    .venv/bin/python bench/relay.py --quick    # short run (a few seconds each), used by the tests
    .venv/bin/python bench/relay.py --forwarders ref --workers 1 --json /tmp/r.json
    .venv/bin/python bench/relay.py --workers 1 --rounds 1 --flows 64,10000,50000 --churn 500,2000,10000
    .venv/bin/python bench/relay.py --forwarders ref,relay,ebpf,ebpf-egress --workers 1 --rounds 1 \
        --flows 64,10000 --churn '' --source 127.60.0.1:2000    # the kernel path (as root)

One invocation builds the C tools (bench/c/*.c -> bench/.build/, gcc -O2), then runs every
forwarder variant (--forwarders, default ref,relay; 1 worker then 2) at every flow count
(--flows, per worker: 64, 1,000, 10,000 and 50,000; the load has flows x workers), 140-byte
payloads, in rounds: ref then relay, then relay then ref (--rounds; the machine drifts over
minutes, this way alike for both), each forwarder's rounds pooled. The forwarders:

  ref          bench/c/fwd_ref.c: recvmmsg/sendmmsg, a flat flow table; with -R (always here) a
               thread per worker forwards the target's Data frames back by handle
  relay        `rtcrelay relay` with `hit_path = "c"` given explicitly: its workers' C hit path
               (--hit-path python for the Python one). Not "auto", which loads the kernel path
               where it can (as root): that is the next one
  ebpf         the relay with `hit_path = "ebpf"`: the TC program (relay/ebpf/fastpath.bpf.c)
               forwards the established flows both ways in the kernel, in softirq context of the
               CPU that sent the datagram (here the load's CPU: loopback delivers on the sender's)
  ebpf-egress  the same with `kernel_loopback = "egress"`: a forwarded loopback datagram goes
               out through lo again (and through the program once more) instead of in place
  hops         an edge relay and a cluster relay in a row (#19)

Each forwarder is started once per flow count, worker count and round, and first learns its
flows: the load sends from fixed source addresses (loadgen -S, a "source plan": every run uses
the same 5-tuples), the relay's preambles (authenticated STUN Binding Requests) go out once,
paced, and the harness waits until the relay's workers count that many flows. Every run after
that sends no preamble from the same tuples, so every datagram is a hit; at the end the
relay's flow count must still be exactly the flows sent. Then:

  drain    the forwarder's worker processes and the sink are SIGSTOPped, the generator queues N
           datagrams in the workers' (large) receive buffers, the workers get SIGCONT and drain
           into the stopped sink's buffer; its kernel receive timestamps (SO_TIMESTAMPNS) give the
           first -> last delivery time: pps = packets / drain time, per core = / workers. Neither
           the generator nor the sink takes CPU meanwhile. Median of 3 runs a round. Skipped
           for the eBPF forwarders (saying why): stopping the workers does not stop the
           kernel, which forwards as the generator sends: nothing queues.
  paced    live search over the offered rate (bounded steps) for the highest rate with
           < 0.1% of packets lost or late (> 10 ms one-way: a packet that late is useless to a
           jitter buffer, and a big receive buffer would otherwise hide overload as delay).
           On a 2-CPU machine the generator + sink core saturates first: a result marked
           "load-bound" (the generator fell short of the rate, or generator + sink used
           >= 90% of their CPU in a failed step) is a lower bound for the forwarder. (The
           kernel path's work lands on the load's CPU too: there it competes with the load.)
  latency  one-way latency p50/p99/p99.9 at 20k pps (generator batch 1, timestamps in the
           payload, CLOCK_MONOTONIC); the run with the best p99 of 3 a round. The p99 target
           is measured apart (bench/relay_pairs.py, 1 worker): the relay and the reference up
           side by side, 4 latency runs each in turn; the median of the pairs' ratios.
  cpu      (--cpu-rates, default 100,000 and 200,000 pps; bench/relay_cpu.py) the CPU per
           forwarded datagram, each way, at fixed offered rates: what tells the forwarders
           apart where a drain cannot run and the load saturates before the kernel path.
             client -> transceiver: generator -> forwarder -> sink, as the phases above.
             transceiver -> client: `loadgen tgen` (the transceivers' side, where the sink was)
               learns every flow from one datagram the clients' generator sends through the
               forwarder (the address it came from: the relay worker's tunnel address; its
               header's first 22 bytes: the flow's Data prefix with its real handle), then sends
               each flow's Data frames there, paced; the forwarder strips the header and sends
               the payload to the client, whose flow socket the generator reads (`gen -E`).
               Measured directly (not as a round trip less the other way: that doubles the
               load, which alone then fills CPU 0 at 100k pps).
             baselines: the same load without a forwarder (generator -> sink; tgen -> the
               clients, headerless), right before or after each run (the order alternates),
               counting the load's processes only: a drift of a noisy machine cancels.
           In a window of --cpu-window s (2) after 0.3 s of sending, the CPU time of every
           thread of this harness's descendants (forwarder and load) and of the kernel threads
           (kdamond left out), from /proc/<pid>/task/<tid>/schedstat (ns): softirq work is
           charged to the task it interrupted (no IRQ time accounting on this kernel), so the
           kernel path's work is counted on whichever CPU sent; other processes are not.
           forwarder ns per datagram = (that CPU - its baseline's CPU per datagram sent x the
           datagrams sent in the window) / datagrams delivered in it; the median of
           --cpu-reps (3) pairs, ratios to the reference's of the same round(s). /proc/stat's
           busy time of both CPUs is kept as a cross-check only: it is sampled per 4 ms tick
           (on this VM ±50 ms over a 2 s window, and with NO_HZ idle it misses short bursts)
           and counts other processes. A run (or its baseline) is marked '!' saturated when
           less than 99% arrived, the sender fell short, the load's processes used >= 90% of
           their CPU or the median datagram took > 1 ms (queueing): its CPU went to bigger
           batches or to drops, not to the rate, and the kernel targets do not count it while
           another rate is clean. Also: the forwarder's processes' CPU with no traffic (idle
           ms/s: in the figures as that / rate per datagram), the relay's counters over the
           phase (the eBPF relay's kernel_to_* must carry it all, the C relay's none), and for
           a BPF program one more run each way with kernel.bpf_stats_enabled = 1 (restored
           after): the program's runs and run time per datagram (not in the CPU figures).

With one worker the forwarder is pinned to CPU 1 and generator + sink (tgen + clients) to CPU 0
(like `taskset -a`); with two on a 2-CPU machine each worker gets a CPU and the load floats.
Other processes' CPU use is measured during every measurement; a disturbed one is repeated
(--retries) after waiting for quiet, and marked '~' if it stays disturbed. Results are printed
as a table with ratios to the reference measured in the same run, the cpu table, and PASS/MISS
lines for the targets, per flow count: relay >= 0.85x the reference per core; 2 workers >= 1.5x
one; relay p99 at 20k pps <= 1.5x the reference's; for each eBPF forwarder (1 worker): CPU per
datagram <= 0.35x the reference's each way (the worst clean rate), p99 at 20k pps <= the
reference's, paced max >= the reference's. Then the memory of the relay's workers and the size
of its shm table per flow at the largest flow count.

  churn    (--churn, rates per second per worker; the relay and the reference) a relay with the
           default idle timeout carries 10,000 established flows per worker (or the largest
           count measured below that) at 20k pps while `loadgen churn` sends authenticated
           Binding Requests from new 5-tuples (new sessions) at each rate: the established
           traffic's latency and loss against no-churn runs of the same relay, the two kinds
           alternating (5 pairs of 2 s a rate; the p99s are the medians of the 5: a few noisy
           seconds of this VM hit one pair, not the ratio), the flows learned, the drop
           counters that grew, and the workers' CPU per learned flow.

Only 127/8 is used (sources 127.1.0.1:2000 on, churn 127.2.0.1:2000 on, --source); every
subprocess has a timeout and every process group the harness starts is killed on exit. The
eBPF forwarders need root (or CAP_BPF + CAP_NET_ADMIN) and the built program; their program
stats need bpftool.

A forwarder is a `Forwarder` (start / pids / stop, optional preambles and counters). The C
reference is `CReferenceForwarder`; `PythonRelayForwarder` runs the relay, `EbpfRelayForwarder`
with its kernel path (all in bench/relay_forwarders.py). The measurements are in
bench/relay_runs.py, the cpu phase in bench/relay_cpu.py, the churn phase in
bench/relay_churn.py, the tables and targets in bench/relay_report.py, the load in
bench/udpload.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
# Run as a script, Python puts bench/ first on sys.path, where this file would shadow the
# project's `relay` package (which a Forwarder may import, e.g. to build STUN preambles):
# put the repository root there instead.
if sys.path and Path(sys.path[0] or ".").resolve() == _BENCH:
    sys.path[0] = str(_BENCH.parent)


# bench/ as a namespace package: nothing shadowed
from bench import ctools, udpload
from bench.harness import processes
from bench.harness.errors import BenchError
from bench.relay_churn import CHURN_FLOWS, ChurnResult, churn_phase
from bench.relay_forwarders import FORWARDERS, make_forwarder
from bench.relay_pairs import PairedLatency, paired_latency
from bench.relay_report import report
from bench.relay_runs import Config, VariantResult, merge_rounds, run_variant
from bench.udpload import SourcePlan


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (fewer packets, steps, seconds and flow counts)")
    ap.add_argument("--forwarders", default="ref,relay", help="comma list of: " + ",".join(FORWARDERS))
    ap.add_argument("--workers", default="1,2", help="comma list of worker counts (default 1,2)")
    ap.add_argument("--flows", help="comma list of flow counts PER WORKER (default 64,1000,10000,50000; "
                                    "--quick 64,1000); the load has flows x workers")
    ap.add_argument("--churn", help="comma list of new sessions per second per worker for the churn phase "
                                    "(default 500,2000,10000; --quick 500; '' skips it)")
    ap.add_argument("--churn-duration", type=float, help="seconds of churn per rate (default 10, --quick 2)")
    ap.add_argument("--churn-pairs", type=int, help="no-churn/churn run pairs the churn-duration is split in, "
                                                    "alternating; p99s are the medians (default 5, --quick 1)")
    ap.add_argument("--cpu-rates", help="comma list of offered rates (pps, all workers together) for the cpu phase: "
                                        "CPU per forwarded datagram, both ways (default 100000,200000; --quick "
                                        "20000, at the first flow count only; '' skips it)")
    ap.add_argument("--cpu-window", type=float, help="seconds of CPU accounting per cpu run (default 2, --quick 0.25)")
    ap.add_argument("--cpu-reps", type=int, help="cpu runs per rate and direction (median; default 3, --quick 1)")
    ap.add_argument("--source", type=SourcePlan.parse, metavar="IP:PORT",
                    help="first source address of the established flows (default 127.1.0.1:2000; the new "
                         "sessions of the churn phase use the next /16); another one lets two runs share a host")
    ap.add_argument("--size", type=int, help="payload bytes (default 140)")
    ap.add_argument("--drain-count", type=int, help="packets queued per drain run")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--wait-quiet", type=float, metavar="S",
                    help="before each forwarder, wait up to S seconds for other processes to leave the "
                         "CPUs idle (default 30, --quick 0)")
    ap.add_argument("--rounds", type=int, help="rounds per flow and worker count, the forwarders' order reversed "
                                                "every other round, results pooled (default 2, --quick 1)")
    ap.add_argument("--hit-path", choices=("c", "python"),
                    help="the `relay` forwarder's hit path (relay/hit_path.py; default c: the relay refuses to "
                         "start without its C extension). Never auto, which loads the kernel path where it "
                         "can: that is the `ebpf` forwarder")
    ap.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 unless every target PASSes")
    ap.add_argument("--retries", type=int, help="repeat a measurement disturbed by other processes up to N "
                                                "times (default 2, --quick 0)")
    args = ap.parse_args(argv)

    cfg = Config.quick() if args.quick else Config()
    if args.flows:
        cfg.flows = _ints(args.flows)
    if args.churn is not None:
        cfg.churn_rates = _ints(args.churn)
    if args.cpu_rates is not None:
        cfg.cpu_rates = _ints(args.cpu_rates)
    if args.cpu_window:
        cfg.cpu_window = args.cpu_window
    if args.cpu_reps:
        cfg.cpu_reps = args.cpu_reps
    if args.hit_path:
        cfg.hit_path = args.hit_path
    if args.churn_duration:
        cfg.churn_duration = args.churn_duration
    if args.churn_pairs:
        cfg.churn_pairs = args.churn_pairs
    if args.source:
        cfg.source = args.source
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
    if not cfg.flows or min(cfg.flows) < 1 or max(cfg.flows) * max(workers) > 1 << 20:
        ap.error("--flows: 1 or more per worker, at most 2^20 in all")

    wait_quiet = args.wait_quiet if args.wait_quiet is not None else (0.0 if args.quick else 30.0)
    processes.stop_all_on_signals()

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        tools = ctools.build()
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    log(f"rtcrelay relay benchmark: {platform.node()} {platform.release()}, CPUs {cpus}, "
        f"{'root' if os.geteuid() == 0 else 'not root (receive buffers capped by net.core.rmem_max)'}; "
        f"{', '.join(f'{n:,}' for n in cfg.flows)} flows PER WORKER (x workers in all) from {cfg.source} on, "
        f"{cfg.size} B payload, drain {cfg.drain_count:,} x{cfg.drain_reps}, "
        + (f"cpu at {', '.join(f'{r:,}' for r in cfg.cpu_rates)} pps x{cfg.cpu_reps} of {cfg.cpu_window:g} s each way, "
           if cfg.cpu_rates else "")
        + f"{'quick' if args.quick else 'full'} run; "
        f"one generator process holds up to {udpload.flows_per_process():,} flows")
    if os.geteuid() != 0:
        # without CAP_NET_ADMIN receive buffers stop at net.core.rmem_max (doubled by the kernel);
        # a loopback datagram of this size takes ~1 KB of it
        fit = int(udpload.rmem_max() * 2 * 0.8 / 1000)
        if fit < cfg.drain_count:
            log(f"note: not root: drain count capped at {fit:,} (net.core.rmem_max = {udpload.rmem_max():,}); "
                f"run as root or raise rmem_max for {cfg.drain_count:,}")
            cfg.drain_count = max(fit, 1000)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    results: list[VariantResult] = []
    pairs: list[PairedLatency] = []
    t0 = time.monotonic()
    # At each flow and worker count the forwarders take turns, in the reverse order every other
    # round (ref, relay, relay, ref): the machine drifts by ~10% over minutes, and this way a
    # drift hits both alike. The rounds are pooled per forwarder.
    for n in cfg.flows:
        cpu_here = not cfg.cpu_flow_counts or n in cfg.flows[:cfg.cpu_flow_counts]
        for w in workers:
            by_kind: dict[str, list[VariantResult]] = {k: [] for k in kinds}
            for r in range(rounds):
                log(f"{n:,} flows per worker, {w} worker(s)" + (f", round {r + 1}/{rounds}" if rounds > 1 else ""))
                for k in (kinds if r % 2 == 0 else kinds[::-1]):
                    fwd = make_forwarder(k, w, n, tools, cfg.hit_path)
                    by_kind[k].append(run_variant(fwd, cfg, tools, not args.no_pin, log, wait_quiet, cpu_here))
            results.extend(merge_rounds(by_kind[k]) for k in kinds)
            if w == 1 and cfg.latency_pairs and "ref" in kinds and "relay" in kinds:
                log(f"{n:,} flows per worker, 1 worker: the relay's and the reference's latency runs in turn")
                pairs.append(paired_latency(make_forwarder("relay", 1, n, tools, cfg.hit_path),
                                            make_forwarder("ref", 1, n, tools), cfg, tools, not args.no_pin, log,
                                            wait_quiet))
    churn: list[ChurnResult] = []
    # the relay's workers (and its kernel path), the reference as control
    churn_kinds = [k for k in kinds if k in ("ref", "relay", "ebpf")]
    if {"relay", "ebpf"} & set(kinds) and cfg.churn_rates:
        established = max((n for n in cfg.flows if n <= CHURN_FLOWS), default=CHURN_FLOWS)
        log(f"churn phase: {established:,} established flows per worker, "
            f"{', '.join(f'{r:,}' for r in cfg.churn_rates)} new sessions/s per worker, {cfg.churn_duration:g} s each in {cfg.churn_pairs} pair(s) with no-churn runs")
        churn = [churn_phase(k, w, established, cfg, tools, not args.no_pin, log)
                 for w in workers for k in churn_kinds]
    table, targets = report(results, churn, pairs)
    log("")
    log(table)
    log(f"({time.monotonic() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": asdict(cfg), "rounds": rounds,
                                               "results": [asdict(r) for r in results],
                                               "churn": [asdict(c) for c in churn],
                                               "latency_pairs": [asdict(p) for p in pairs],
                                               "targets": targets}, indent=2))
    if any(r.status == "error" for r in [*results, *churn, *pairs]):
        return 1
    if args.check and any(t["verdict"] != "PASS" for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

