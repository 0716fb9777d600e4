"""The report of bench/relay.py: the results table with ratios to the reference measured in the
same run, the CPU-per-datagram table, the churn table, and the PASS/MISS lines of the targets."""
from __future__ import annotations

import statistics

from bench.relay_churn import CHURN_IDLE_TIMEOUT, ChurnResult
from bench.relay_pairs import PairedLatency
from bench.relay_runs import FOREIGN_MAX, FOREIGN_MAX_LATENCY, LATE_NS, MAX_BAD_FRACTION, VariantResult, ratio

TARGET_PER_CORE = 0.85
TARGET_SCALING = 1.5
TARGET_P99 = 1.5
TARGET_STEP_US = 200          # the longest housekeeping step of a relay worker (CPU µs)
TARGET_CHURN_P99 = 2.0        # established p99 under churn vs without ...
CHURN_P99_UP_TO = 2000        # ... up to this many new sessions per second per worker
TARGET_KERNEL_CPU = 0.35      # the kernel path's CPU per datagram vs the reference's, each way
TARGET_KERNEL_P99 = 1.0       # the kernel path's p99 at 20k pps vs the reference's
TARGET_KERNEL_PACED = 1.0     # the kernel path's paced max vs the reference's
KERNEL_KINDS = ("ebpf", "ebpf-egress")


def _find(results: list[VariantResult], kind: str, workers: int, flows: int) -> VariantResult | None:
    for r in results:
        if r.kind == kind and r.workers == workers and r.flows == flows and r.status == "ok":
            return r
    return None


def _fmt(x: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Aligned columns; a shorter row (an error) runs its last cell on without alignment."""
    widths = [max([len(head[i])] + [len(row[i]) for row in rows if len(row) == len(head)])
              for i in range(len(head))]
    return ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in [head, *rows]]


class Targets(list):
    """The PASS/MISS lines: each {target, value, op, bound, verdict, note}."""

    def add(self, name: str, value: float | None, op: str, bound: float, inputs: list[dict] | None = None,
            notes: list[str] | None = None, unit: str = "x") -> None:
        notes = list(notes or [])
        if value is None:
            verdict = "NOT MEASURED"
        else:
            verdict = "PASS" if (value >= bound if op == ">=" else value <= bound) else "MISS"
            if any(m.get("noisy") for m in inputs or []):
                notes.append("noisy: other processes took CPU during a measurement, rerun")
        self.append({"target": name, "value": value, "op": op, "bound": bound, "unit": unit, "verdict": verdict,
                     "note": "; ".join(notes)})

    def lines(self) -> list[str]:
        out = []
        for t in self:
            v = "-" if t["value"] is None else (f"{t['value']:.2f}x" if t["unit"] == "x" else f"{t['value']:,}")
            out.append(f"{t['verdict']:<12} {t['target']}: {v} (target {t['op']} {t['bound']}{t['unit']})"
                       + (f"  [{t['note']}]" if t["note"] else ""))
        return out


def report(results: list[VariantResult], churn: list[ChurnResult] = (),
           pairs: list[PairedLatency] = ()) -> tuple[str, list[dict]]:
    rows = []
    head = ("flows/wk", "forwarder", "wk", "drain pps", "/core", "vs ref", "scale", "paced max", "/core", "vs ref",
            "p50 us", "p99 us", "p99 vs ref", "hdr", "flows held")

    def noisy(m: dict) -> str:
        return "~" if m.get("noisy") else ""

    for r in results:
        if r.status != "ok":
            rows.append((f"{r.flows:,}", r.label, str(r.workers),
                         r.status.upper() + ": " + (r.message.splitlines() or [""])[0][:90]))
            continue
        ref = _find(results, "ref", r.workers, r.flows)
        one = _find(results, r.kind, 1, r.flows)
        dp, dpc = r.drain.get("pps"), r.drain.get("pps_per_core")
        pp, ppc = r.paced["max_pps"], r.paced["max_pps_per_core"]
        held = r.flow_check.get("held")
        rows.append((
            f"{r.flows:,}", r.label, str(r.workers),
            ("skipped" if "skipped" in r.drain else
             _fmt(dp) + ("" if r.drain["all_valid"] else "!") + noisy(r.drain)), _fmt(dpc),
            _fmt(ratio(dpc, ref.drain.get("pps_per_core") if ref else None), ".2f", "x"),
            _fmt(ratio(dp, one.drain.get("pps") if one else None), ".2f", "x"),
            _fmt(pp) + ("*" if r.paced["load_bound"] else "") + noisy(r.paced), _fmt(ppc),
            _fmt(ratio(ppc, ref.paced["max_pps_per_core"] if ref else None), ".2f", "x"),
            _fmt(r.latency["p50_us"], ".1f"), _fmt(r.latency["p99_us"], ".1f") + noisy(r.latency),
            _fmt(ratio(r.latency["p99_us"], ref.latency["p99_us"] if ref else None), ".2f", "x"),
            "-".join(str(x) for x in sorted(set(r.smoke["hdr_len"]))) + "B",
            "-" if held is None else f"{held:,}" + ("" if r.flow_check["ok"] else f" != {r.flow_check['expected']:,}"),
        ))
    lines = _table(head, rows)
    if any("~" in c for row in rows for c in row[3:]):
        lines.append(f"WARNING: '~' = other processes used more than {FOREIGN_MAX:.0%} of the CPUs during that "
                     f"measurement ({FOREIGN_MAX_LATENCY:.0%} for latency), even after retries: noisy, rerun on a "
                     "quiet machine.")
    if any(r.status == "ok" and not r.flow_check.get("ok", True) for r in results):
        lines.append("WARNING: 'flows held' != flows: the relay did not hold exactly the flows it learned after the "
                     "measurements (some runs met the miss path): those figures are not all-hit figures.")
    lines.append("flows/wk: flows per worker (the load sends from flows x workers 5-tuples, learned once before the "
                 "runs: every datagram is a hit). vs ref: against the C reference with the same workers and flows, "
                 "measured in this run; scale: total against 1 worker of the same forwarder and flows.")
    lines.append(f"drain: SIGSTOP, queue packets, SIGCONT, time to drain (median of runs; '!' = some were "
                 f"dropped while queued). paced: highest offered rate with < {MAX_BAD_FRACTION:.1%} lost or "
                 f"later than {LATE_NS // 1_000_000} ms ('*' = load-bound: the generator fell short or generator + "
                 f"sink saturated their CPU, a lower bound). flows held: the relay's flow count after the measurements.")
    skipped = {r.label: r.drain["skipped"] for r in results if r.status == "ok" and "skipped" in r.drain}
    for label, why in skipped.items():
        lines.append(f"drain skipped for {label}: {why}.")
    top = max((r.flows for r in results if r.status == "ok" and r.memory), default=None)
    for r in results:
        if r.flows == top and r.status == "ok" and r.memory:
            m, total = r.memory, r.flows * r.workers
            text = f"memory at {top:,} flows/worker: {r.label} x{r.workers}: worker RSS {m['rss_mib']} MiB"
            if "table_bytes" in m:
                text += (f"; shm table {m['table_bytes'] / 2**20:.1f} MiB = {m['table_bytes_per_flow']:,} B/flow "
                         f"({m['table_allocated'] / 2**20:.1f} MiB allocated = {m['allocated_per_flow']:,} B/flow) "
                         f"for {total:,} flows")
            lines.append(text)

    targets = Targets()

    def get(r: VariantResult | None, part: str, key: str) -> float | None:
        return getattr(r, part)[key] if r else None

    def parts(part: str, *rs: VariantResult | None) -> list[dict]:
        return [getattr(r, part) for r in rs if r]

    for n in dict.fromkeys(r.flows for r in results):
        ref1, rel1, rel2 = _find(results, "ref", 1, n), _find(results, "relay", 1, n), _find(results, "relay", 2, n)
        at = f"{n:,} flows/worker: relay"
        targets.add(f"{at} 1 worker, drain pps per core vs reference",
                    ratio(get(rel1, "drain", "pps_per_core"), get(ref1, "drain", "pps_per_core")),
                    ">=", TARGET_PER_CORE, parts("drain", rel1, ref1))
        bound_by_load = [x.label for x in (ref1, rel1) if x and x.paced["load_bound"]]
        targets.add(f"{at} 1 worker, paced max pps per core vs reference",
                    ratio(get(rel1, "paced", "max_pps_per_core"), get(ref1, "paced", "max_pps_per_core")),
                    ">=", TARGET_PER_CORE, parts("paced", rel1, ref1),
                    ["load-bound: the generator limited " + " and ".join(bound_by_load)] if bound_by_load else [])
        targets.add(f"{at} 2 workers vs 1 worker, drain pps",
                    ratio(get(rel2, "drain", "pps"), get(rel1, "drain", "pps")),
                    ">=", TARGET_SCALING, parts("drain", rel2, rel1))
        best = ratio(get(rel1, "latency", "p99_us"), get(ref1, "latency", "p99_us"))
        paired = next((p for p in pairs if p.kind == "relay" and p.workers == 1 and p.flows == n), None)
        if paired is None:
            targets.add(f"{at} p99 latency at 20k pps vs reference (1 worker)", best, "<=", TARGET_P99,
                        parts("latency", rel1, ref1))
        else:
            targets.add(f"{at} p99 latency at 20k pps vs reference (1 worker)", paired.ratio, "<=", TARGET_P99,
                        [*paired.runs.get("relay", []), *paired.runs.get("ref", [])],
                        [paired_note(paired) + ("" if best is None else f"; best runs of the variants: {best:.2f}x")])
        with_steps = [r for r in (rel1, rel2) if r and r.housekeeping]
        targets.add(f"{at} longest housekeeping step (us of CPU)",
                    max(r.housekeeping["max_us"] for r in with_steps) if with_steps else None,
                    "<=", TARGET_STEP_US, notes=[step_note(r) for r in with_steps], unit=" us")
    if any(r.status == "ok" and r.cpu for r in results):
        lines += cpu_table(results)
    for kind in dict.fromkeys(r.kind for r in results if r.kind in KERNEL_KINDS):
        kernel_targets(results, kind, targets)
    if churn:
        lines += churn_table(churn, targets)
    lines += targets.lines()
    return "\n".join(lines), list(targets)


def step_note(r: VariantResult) -> str:
    """A relay's steps over 200 µs beside the machine's: the fixed-work reference's on its CPU."""
    h, ref = r.housekeeping, r.step_reference
    text = f"x{r.workers}: {h['over_200us']} of {h['steps']:,} steps over 200 us"
    if ref:
        text += (f", the fixed-work reference on its CPU {ref['over_200us']} of {ref['steps']:,} "
                 f"(longest {ref['max_us']:,} us)")
    return text


def _cpu_row(r: VariantResult | None, rate: str) -> dict | None:
    return r.cpu.get(rate) if r and r.cpu else None


def _cpu_ratio(r: VariantResult, ref: VariantResult | None, rate: str, key: str) -> float | None:
    mine, theirs = _cpu_row(r, rate), _cpu_row(ref, rate)
    return ratio(mine and mine[key], theirs and theirs[key]) if mine and theirs else None


def cpu_table(results: list[VariantResult]) -> list[str]:
    """CPU per forwarded datagram, each way, with the ratio to the reference's of the same round(s)."""
    head = ("flows/wk", "forwarder", "wk", "rate", "c->t ns", "vs ref", "t->c ns", "vs ref", "delivered c->t / t->c",
            "p50 us c->t / t->c", "/proc/stat ns c->t / t->c", "BPF prog ns c->t / t->c", "idle ms/s")
    rows = []

    def mark(row: dict, way: str) -> str:
        return ("!" if row[f"{way}_saturated"] else "") + ("~" if row[f"{way}_noisy"] else "")

    def both(row: dict, key: str, spec: str = ",.0f", scale: float = 1.0, suffix: str = "") -> str:
        return " / ".join(_fmt(None if row[f"{w}_{key}"] is None else row[f"{w}_{key}"] * scale, spec, suffix)
                          for w in ("c2t", "t2c"))

    for r in results:
        if r.status != "ok" or not r.cpu:
            continue
        ref = _find(results, "ref", r.workers, r.flows)
        for rate, row in r.cpu.items():
            bpf = {b["way"]: b["ns_per_datagram"] for b in r.bpf if str(b["rate"]) == rate}
            rows.append((
                f"{r.flows:,}", r.label, str(r.workers), f"{int(rate):,}",
                _fmt(row["c2t_ns"]) + mark(row, "c2t"), _fmt(_cpu_ratio(r, ref, rate, "c2t_ns"), ".2f", "x"),
                _fmt(row["t2c_ns"]) + mark(row, "t2c"), _fmt(_cpu_ratio(r, ref, rate, "t2c_ns"), ".2f", "x"),
                both(row, "delivered", ".1f", 100, "%"), both(row, "p50_us"), both(row, "stat_ns"),
                " / ".join(_fmt(bpf.get(w)) for w in ("c2t", "t2c")) if bpf else "-",
                _fmt(statistics.median([x["idle_ns_per_s"] / 1e6 for x in r.cpu_idle]) if r.cpu_idle else None, ".1f"),
            ))
    if not rows:
        return []
    lines = ["", "cpu: CPU per forwarded datagram, ns (all CPUs: every thread of the forwarder, the load and the "
                 "kernel threads, from schedstat, less the same load's without a forwarder in a run right before or "
                 "after; median of the pairs)"]
    lines += _table(head, rows)
    lines.append("c->t: client -> transceiver (generator -> forwarder -> sink). t->c: transceiver -> client (tgen sends "
                 "each flow's Data frames to the forwarder, which sends the payload to the flow's client socket). "
                 "'!' = saturated in a run or its baseline (less than 99% delivered, the sender fell short, the load's "
                 "CPU >= 90% busy or a p50 past 1 ms: the CPU then went to bigger batches or to drops, not to the "
                 "rate: not a figure to compare); '~' = other processes took CPU during every run. /proc/stat: the same from both CPUs' busy "
                 "ticks (sampled per 4 ms tick, other processes included: a cross-check only). BPF prog: the "
                 "program's own run time (kernel.bpf_stats_enabled) per datagram delivered, a run of its own. idle: "
                 "the forwarder's processes with no traffic, ms of CPU per s (in the figures: that / rate per "
                 "datagram).")
    return lines


def kernel_targets(results: list[VariantResult], kind: str, targets: Targets) -> None:
    """The kernel path's targets (1 worker, against the reference in the same run): CPU per
    datagram <= 0.35x each way at every flow count and rate (the worst rate counts), p99 at
    20k pps <= the reference's, paced max >= the reference's."""
    for n in dict.fromkeys(r.flows for r in results):
        ref, mine = _find(results, "ref", 1, n), _find(results, kind, 1, n)
        at = f"{n:,} flows/worker: {mine.label if mine else kind}"
        for name, way in (("c2t", "client -> transceiver"), ("t2c", "transceiver -> client")):
            rates = list(mine.cpu) if mine and mine.cpu else []
            by_rate = {rate: _cpu_ratio(mine, ref, rate, f"{name}_ns") for rate in rates} if mine else {}
            saturated = {k: sorted(x.label for x in (mine, ref) if x and (_cpu_row(x, k) or {}).get(f"{name}_saturated"))
                         for k in by_rate}
            # the worst rate where neither was saturated (a saturated figure is not the rate's), else the worst
            counted = [v for k, v in by_rate.items() if v is not None and not saturated[k]]
            worst = max(counted or [v for v in by_rate.values() if v is not None], default=None)
            inputs = [{"noisy": row[f"{name}_noisy"]} for x in (mine, ref) for row in (x.cpu.values() if x else [])]
            notes = [", ".join(f"{int(k) / 1e3:.0f}k pps {_fmt(v, '.2f', 'x')}"
                               + (f" (saturated: {' and '.join(saturated[k])}"
                                  + ("; not counted)" if counted else ")") if saturated[k] else "")
                               for k, v in by_rate.items())]
            if by_rate and not counted:
                notes.append("every rate saturated: the worst of them")
            targets.add(f"{at} CPU per datagram, {way}, vs reference (worst unsaturated rate)", worst, "<=", TARGET_KERNEL_CPU,
                        inputs, [x for x in notes if x])
        targets.add(f"{at} p99 latency at 20k pps vs reference (1 worker)",
                    ratio(mine.latency["p99_us"] if mine else None, ref.latency["p99_us"] if ref else None),
                    "<=", TARGET_KERNEL_P99, [x.latency for x in (mine, ref) if x])
        bound_by_load = [x.label for x in (ref, mine) if x and x.paced["load_bound"]]
        targets.add(f"{at} paced max pps vs reference (1 worker)",
                    ratio(mine.paced["max_pps"] if mine else None, ref.paced["max_pps"] if ref else None),
                    ">=", TARGET_KERNEL_PACED, [x.paced for x in (mine, ref) if x],
                    ["load-bound: the generator limited " + " and ".join(bound_by_load)] if bound_by_load else [])


def paired_note(p: PairedLatency) -> str:
    if p.status != "ok":
        return f"paired runs: ERROR: {p.message}"
    pairs = ", ".join("-" if r is None else f"{r:.2f}" for r in p.ratios)
    return f"median of {len(p.ratios)} paired runs' ratios ({pairs})"


def churn_table(churn: list[ChurnResult], targets: Targets) -> list[str]:
    """The churn phase's table; adds its targets."""
    head = ("forwarder", "wk", "new/s/wk", "sent/s", "learned", "expired", "p50 us", "p99 us", "p99.9 us",
            "no-churn p99", "ratio", "lost", "late (no churn)", "worker CPU", "CPU/new flow", "load CPU",
            "drops that grew")
    rows = []
    control = {(c.workers, r["rate"]): r["p99_ratio"] for c in churn if c.kind == "ref" for r in c.runs}
    for c in churn:
        label = {"ref": "C reference", "ebpf": "rtcrelay relay, eBPF"}.get(c.kind, "rtcrelay relay")
        if c.status != "ok" and not c.runs:
            rows.append((label, str(c.workers), "ERROR: " + (c.message.splitlines() or [""])[0][:110]))
        for r in c.runs:
            rows.append((label, str(c.workers), f"{r['rate']:,}", _fmt(r["churn"]["rate"]), _fmt(r["learned"]),
                         _fmt(r["expired"]), _fmt(r["p50_us"], ".1f"), _fmt(r["p99_us"], ".1f"),
                         _fmt(r["p999_us"], ".1f"), _fmt(r["base_p99_us"], ".1f"), _fmt(r["p99_ratio"], ".2f", "x"),
                         str(r["lost"]), f"{r['late']:,} ({r['base_lost']:,})",
                         _fmt(r["worker_cpu_s"] / r["wall_s"] * 100 / c.workers, ".0f", "%"),
                         _fmt(r["cpu_per_learned_us"], ".1f", " us"),
                         _fmt(r["load_cpu"] and r["load_cpu"] * 100, ".0f", "%"),
                         ", ".join(f"{k[5:]} {v:,}" for k, v in r["drops"].items()) or "none"))
            if c.kind == "ref":
                continue
            at = f"churn x{c.workers}, {r['rate']:,} new sessions/s/worker: established"
            ref_ratio = control.get((c.workers, r["rate"]))
            note = [f"the C reference's under the same load: {ref_ratio:.2f}x"] if ref_ratio else []
            if r["rate"] <= CHURN_P99_UP_TO:
                targets.add(f"{at} p99 vs no churn", r["p99_ratio"], "<=", TARGET_CHURN_P99, notes=note)
            targets.add(f"{at} datagrams lost", r["lost"], "<=", 0, unit="")
    first = next((c for c in churn if c.runs), churn[0])
    lines = ["", f"churn: new sessions (authenticated Binding Requests, each from a new 5-tuple) while "
                 f"{first.flows:,} established flows/worker carry 20,000 pps; relay idle_timeout "
                 f"{CHURN_IDLE_TIMEOUT:g} s; no-churn p99: runs of the same relay without the new sessions, alternating with "
                 f"the churn runs (p50, p99, p99.9: medians of the runs; counts and CPU: sums)"]
    lines += _table(head, rows)
    lines.append("late (no churn): later than 10 ms, in the churn run (lost + late in the no-churn run). worker "
                 "CPU: per worker, of one CPU (near 100%: saturated, CPU/new flow is then a lower bound). "
                 "CPU/new flow: the workers' CPU time beyond the no-churn run's (scaled to the same wall time), per "
                 "flow learned. load CPU: generator + churn + sink, of the CPU they are pinned to (near 100%: the "
                 "load side, not the relay, was the limit). drops: the relay's drop_* counters that grew during the "
                 "churn run.")
    if any(c.status != "ok" for c in churn):
        lines += [f"churn {c.kind} x{c.workers}: ERROR: {c.message}" for c in churn if c.status != "ok"]
    return lines + [""]

