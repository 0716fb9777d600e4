"""The report of bench/transceiver.py: a table of rtcrelay against stock aiortc with ratios,
PASS/MISS per target, and the `RESULT {json}` line."""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict

from bench.transceiver_runner import Level, VariantResult
from bench.transceiver_stacks import CALLER_CPU, SERVER_CPU

TARGET_CALLS_PER_CORE = 40.0
TARGET_RATIO = 2.0
TARGET_SETUP_P50_MS = 50.0


def cost_level(r: VariantResult | None) -> Level | None:
    """The level whose CPU per call is reported: the best passing one, else the first measured."""
    if r is None:
        return None
    return r.best or (r.levels[0] if r.levels else None)



def _f(x: float, fmt: str = "{:.1f}") -> str:
    return "n/a" if math.isnan(x) else fmt.format(x)


def report(results: dict[str, VariantResult], args: argparse.Namespace, elapsed: float) -> dict:
    rt, st = results.get("rtcrelay"), results.get("stock")
    rows: list[tuple[str, str, str, str]] = []

    def cpc(r: VariantResult | None, relay: bool = False) -> float:
        if r is None or r.best is None:
            return 0.0
        return r.best.calls_per_core_with_relay if relay else r.best.calls_per_core

    def cost(r: VariantResult | None, relay: bool = False) -> float:
        lv = cost_level(r)
        if lv is None or not lv.calls:
            return float("nan")
        return (lv.relay_cores if relay else lv.server_cores) * 1000 / lv.calls

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if a > 0 and b > 0 else "n/a"  # False for nan too

    a_cpc, s_cpc = cpc(rt), cpc(st)
    rows.append(("echo calls per core (server CPU)", _f(a_cpc), _f(s_cpc), ratio(a_cpc, s_cpc)))
    rows.append(("  ... counting the relay worker too", _f(cpc(rt, True)), _f(s_cpc), ratio(cpc(rt, True), s_cpc)))
    a_ms, s_ms = cost(rt), cost(st)
    rows.append(("server CPU per call (ms/s)", _f(a_ms), _f(s_ms), ratio(a_ms, s_ms)))
    r_ms = cost(rt, relay=True)
    rows.append(("  relay worker CPU per call (ms/s)", _f(r_ms), "", ""))
    for label, attr, fmt in (("  calls at the best level", "calls", "{:.0f}"),
                             ("  server cores at that level", "server_cores", "{:.2f}"),
                             ("  delivered at that level", "delivered", "{:.2%}"),
                             ("  server RSS at that level (MiB)", "server_rss_mib", "{:.0f}")):
        av = getattr(rt.best, attr) if rt and rt.best else float("nan")
        sv = getattr(st.best, attr) if st and st.best else float("nan")
        rows.append((label, _f(av, fmt), _f(sv, fmt), ratio(av, sv) if attr == "calls" else ""))
    for label, key, pick in (("offer->connected 1 call p50 (ms)", "setup_one", "client_p50_ms"),
                             ("offer->connected 1 call p99 (ms)", "setup_one", "client_p99_ms"),
                             ("  server-side 1 call p50 (ms)", "setup_one", "server_p50_ms"),
                             (f"offer->connected {args.setup_concurrency} at once p50 (ms)", "setup_twenty", "client_p50_ms"),
                             (f"offer->connected {args.setup_concurrency} at once p99 (ms)", "setup_twenty", "client_p99_ms"),
                             (f"  server-side {args.setup_concurrency} at once p50 (ms)", "setup_twenty", "server_p50_ms")):
        av = getattr(rt, key).summary()[pick] if rt else float("nan")
        sv = getattr(st, key).summary()[pick] if st else float("nan")
        rows.append((label, _f(av), _f(sv), ratio(av, sv)))

    width = max(len(r[0]) for r in rows) + 2
    print()
    print(f"rtcrelay transceiver benchmark: {os.cpu_count()} CPUs, servers on CPU {SERVER_CPU}, callers on CPU "
          f"{CALLER_CPU}; window {args.window:g} s; {'quick' if args.quick else 'full'} run, {elapsed:.0f} s")
    print(f"{'':<{width}}{'rtcrelay':>12}{'stock':>12}{'ratio':>10}")
    for label, av, sv, rat in rows:
        print(f"{label:<{width}}{av:>12}{sv:>12}{rat:>10}")
    for r in results.values():
        print(f"{r.variant} ramp stopped: {r.limit or 'n/a'}; setup failures {r.setup_one.failures + r.setup_twenty.failures}")

    targets = []
    if rt is not None:
        targets.append((a_cpc >= TARGET_CALLS_PER_CORE, f"echo calls per core >= {TARGET_CALLS_PER_CORE:g}: {a_cpc:.1f}"))
        if st is not None:
            ok = s_cpc > 0 and a_cpc >= TARGET_RATIO * s_cpc
            targets.append((ok, f">= {TARGET_RATIO:g}x stock aiortc calls per core: {ratio(a_cpc, s_cpc)}"))
        p50 = rt.setup_one.summary()["client_p50_ms"]
        targets.append((not math.isnan(p50) and p50 <= TARGET_SETUP_P50_MS,
                        f"offer->connected p50 (1 call) <= {TARGET_SETUP_P50_MS:g} ms: {_f(p50)} ms"))
    print()
    for ok, text in targets:
        print(f"{'PASS' if ok else 'MISS'}  {text}")

    summary = {
        "quick": args.quick, "window_s": args.window, "elapsed_s": elapsed, "cpus": os.cpu_count(),
        "variants": {name: {"calls_per_core": cpc(r), "calls_per_core_with_relay": cpc(r, True),
                            "cpu_ms_per_call_second": cost(r), "relay_cpu_ms_per_call_second": cost(r, relay=True),
                            "best": asdict(r.best) if r.best else None, "levels": [asdict(lv) for lv in r.levels],
                            "limit": r.limit, "setup_1": r.setup_one.summary(), "setup_n": r.setup_twenty.summary()}
                     for name, r in results.items()},
        "targets": [{"pass": ok, "text": text} for ok, text in targets],
    }
    print("RESULT " + json.dumps(json_safe(summary)))
    return summary


def json_safe(x: object) -> object:
    """x with every nan float made None (JSON has no nan)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


