"""The cpu phase of bench/relay.py: the CPU time a forwarder takes per datagram it forwards,
each way, at fixed offered rates (--cpu-rates).

A drain test cannot stop the kernel path, and on 2 CPUs the generator saturates before it,
so what tells the forwarders apart at a rate all of them carry is their CPU per datagram:

  c2t          client -> transceiver: generator -> forwarder -> sink, as every other phase.
  t2c          transceiver -> client: `loadgen tgen`, bound where the forwarder sends (the
               sink's address), learns each flow from one datagram the clients' generator sends
               through the forwarder: where it came from (the relay worker's tunnel address) and
               its header's first 22 bytes (the flow's Data prefix: real handle, client address);
               then it sends each flow's Data frames there, paced, and the forwarder sends the
               payloads to the clients' flow sockets, which the generator reads (`gen -E`). The C
               reference does this with -R. Measured directly: a round trip (through an echo)
               doubles the load, which alone then fills the load's CPU at 100k pps.
  baselines    the same load without a forwarder, right before (or after: the order alternates)
               each run: generator -> sink, and tgen -> clients (headerless), counting the load's
               processes and the kernel threads only (the forwarder waits meanwhile). Paired, a
               drift of the machine (other processes, the host) cancels: the load costs several
               times what the kernel path does, so its figure is a small difference of two.

Each run offers `rate` datagrams per second for warm-up + window + tail; over the window the
CPU time of every thread of our processes (this harness's descendants, the harness itself
left out) and of the kernel threads (ksoftirqd, ...; kdamond left out: a page-out scanner) is
summed from /proc/<pid>/task/<tid>/schedstat (ns, steal excluded). Softirq work is charged to
the task it interrupted (no IRQ time accounting on this kernel); for the kernel path that is
the sender, on whichever CPU sent: all CPUs count, other processes do not. The same window's
busy time from /proc/stat (both CPUs) is kept as a cross-check: it is sampled per 4 ms tick
(±50 ms over 2 s here; bursts between ticks on a NO_HZ idle CPU go unseen) and counts other
processes.

  forwarder ns per datagram = (CPU in the window - its baseline's CPU per datagram sent x
                               datagrams sent in the window) / datagrams delivered in it

A run is marked saturated when less than 99% arrived, the sender fell short of the rate, the
load's processes used >= 90% of their CPU, or the median datagram took > 1 ms: its CPU then
went to bigger batches or to drops, not to the rate. The forwarder's processes' CPU with no
traffic (idle) is measured once. For a forwarder whose work is a BPF program, one more run each
way with kernel.bpf_stats_enabled = 1 (the setting restored after) reads the program's run
count and time; those runs are not in the CPU figures (the stats cost two clock reads a run).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from bench.harness import cpu, processes
from bench.harness.errors import BenchError
from bench.harness.ports import free_port
from bench.harness.procinfo import CLK_TCK, tasks
from bench.relay_forwarders import Forwarder
from bench.udpload import Load

TAIL_S = 0.3                 # sending goes on up to this long after the window (at most a window)
DELIVERED_MIN = 0.99         # below: saturated somewhere, the figure is marked
LOAD_CPU_FULL = 0.9          # ... and so it is when the load's processes used this much of their CPU(s)
QUEUEING_NS = 1_000_000      # ... or when the median datagram took this long
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
_PF_KTHREAD = 0x00200000
_KTHREADS_LEFT_OUT = ("kdamond",)


def _scan() -> tuple[list[int], list[int]]:
    """(our processes: this one's descendants, not itself; the kernel threads counted)."""
    me = os.getpid()
    children: dict[int, list[int]] = {}
    kthreads = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        pid, ppid, flags = int(d), int(rest[1]), int(rest[6])
        if flags & _PF_KTHREAD:
            if not comm.startswith(_KTHREADS_LEFT_OUT):
                kthreads.append(pid)
        else:
            children.setdefault(ppid, []).append(pid)
    ours, todo = [], [me]
    while todo:
        for c in children.get(todo.pop(), []):
            ours.append(c)
            todo.append(c)
    return ours, kthreads


def _task_ns(kthreads_too: bool = True, only: list[int] | None = None) -> dict[tuple[int, int], int]:
    """(pid, tid) -> CPU time so far (ns) of every thread of our processes (or of `only`), and
    of the kernel threads counted when kthreads_too."""
    ours, kthreads = _scan()
    out = {}
    for pid in (ours if only is None else only) + (kthreads if kthreads_too else []):
        for tid in tasks(pid):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    out[(pid, tid)] = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return out


class Snapshot:
    """The threads' CPU time and /proc/stat's busy ticks of each CPU, at one moment."""

    def __init__(self, kthreads_too: bool = True, only: list[int] | None = None) -> None:
        t0 = time.monotonic()
        self.tasks = _task_ns(kthreads_too, only)
        self.stat = cpu.per_cpu_times()
        self.t = (t0 + time.monotonic()) / 2

    def since(self, before: Snapshot) -> dict:
        ns = sum(v - before.tasks.get(k, 0) for k, v in self.tasks.items())  # (new threads: all of theirs)
        busy = [(b1 - b0) for (b0, _), (b1, _) in zip(before.stat, self.stat)]
        return {"wall_s": self.t - before.t, "busy_ns": ns, "stat_busy_ns": sum(busy) * 1e9 / CLK_TCK,
                "cpu_busy": [round(x, 3) for x in cpu.busy_fractions(before.stat, self.stat)]}


WAYS = ("c2t", "t2c")  # client -> transceiver, transceiver -> client


def cpu_run(load: Load, target_port: int, sink_port: int, rate: float, window: float, warmup: float,
            way: str = "c2t", load_only: bool = False) -> dict:
    """Offer `rate` pps one way for warmup + window + tail, and take the CPU of the window.

    c2t: generator -> target_port (the forwarder, or for a baseline the sink itself) -> sink.
    t2c: `tgen` on sink_port learns the flows from one datagram each (the clients' generator
    sends them to target_port), then sends their Data frames back to where those came from (the
    forwarder's tunnel address; a baseline: straight to the clients), read on the flow sockets.
    load_only (a baseline): count the load's processes and the kernel threads, not the rest of
    ours (a forwarder waiting meanwhile)."""
    duration = warmup + window + min(TAIL_S, window)
    # (c2t: the gen's shards each round their share; t2c: one tgen rounds the whole)
    planned = load.paced_count(rate, duration) if way == "c2t" else int(rate * duration + 0.5)
    far = gen = None
    try:
        if way == "c2t":
            far = load.sink(sink_port, expected=planned, idle_ms=500, max_s=duration + 30)
            gen = load.gen(target_port, rate=rate, duration=duration, armed=True, max_s=duration * 2 + 5)
            gen.wait_armed(timeout=60)
            gen.go()
        else:
            far = load.tgen(sink_port, rate, duration, max_s=duration * 2 + 60)
            gen = load.gen(target_port, count=load.flows, batch=1, receive=planned, receive_idle_ms=500,
                           max_s=duration * 2 + 60)
            processes.read_line(far, "ARMED", timeout=60)
            assert far.stdin is not None
            far.stdin.write(b"\n")
            far.stdin.flush()
        only = [far.pid, *(p.pid for p in gen.procs)] if load_only else None
        time.sleep(warmup)
        before = Snapshot(only=only)
        time.sleep(window)
        win = Snapshot(only=only).since(before)
        if way == "c2t":
            g = sender = gen.result(timeout=duration * 2 + 15)
            s = processes.json_summary(far, timeout=duration + 35, what="loadgen sink")
            delivered, lat = s["received"], (s["lat_p50_ns"], s["lat_p99_ns"])
        else:
            s = sender = processes.json_summary(far, timeout=duration * 2 + 65, what="loadgen tgen")
            g = gen.result(timeout=duration * 2 + 65)
            delivered, lat = g["back"], (g["back_p50_ns"], g["back_p99_ns"])
    finally:
        if gen:
            gen.reap()
        processes.reap(far)
    sent = max(sender["sent"], 1)
    sent_w = sender["pps"] * win["wall_s"]  # (paced: evenly over the run)
    load_cpu = (g["cpu_s"] + s["cpu_s"]) / duration / len(load.cpus) if load.cpus else None
    out = {"rate": rate, "way": way, "sent": sender["sent"], "gen_pps": round(sender["pps"]), "delivered": delivered,
           "delivered_fraction": round(delivered / sent, 4), "sent_w": sent_w, "delivered_w": sent_w * delivered / sent,
           **win, "load_cpu": None if load_cpu is None else round(load_cpu, 3),
           "p50_us": lat[0] / 1e3, "p99_us": lat[1] / 1e3}
    # saturated: lost, the sender fell short, the load's CPU full, or queueing (a p50 past 1 ms):
    # the CPU then went to other work than at the rate (batches grow, drops cost)
    why = [w for w, bad in (("lost", delivered < DELIVERED_MIN * sent), ("sender short", sender["pps"] < 0.97 * rate),
                            ("load CPU full", load_cpu is not None and load_cpu >= LOAD_CPU_FULL),
                            ("queueing", lat[0] > QUEUEING_NS)) if bad]
    out["saturated"] = ", ".join(why)
    return out


def idle_run(window: float) -> dict:
    """What our processes (the forwarder alone, between runs) take with no traffic: ns per s."""
    before = Snapshot(kthreads_too=False)
    time.sleep(window)
    win = Snapshot(kthreads_too=False).since(before)
    return {"idle_ns_per_s": win["busy_ns"] / win["wall_s"], "wall_s": win["wall_s"]}


def run_key(rate: float, way: str) -> str:
    return f"{rate:.0f}/{way}"


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _quiet_first(runs: list[dict]) -> list[dict]:
    return [r for r in runs if not r.get("noisy")] or runs


def paired(load: Load, target_port: int, sink_port: int, rate: float, window: float, warmup: float, way: str,
           measure, base_first: bool = True) -> dict:
    """A forwarder's run and, right before or after it (base_first), the same load without it:
    the run with its figures against that baseline ("ns", "stat_ns") and the baseline's "base"."""
    base_port = free_port("127.0.0.1")
    name = f"{rate / 1e3:.0f}k {way}"

    def base() -> dict:
        return measure(lambda: cpu_run(load, base_port, base_port, rate, window, warmup, way, load_only=True),
                       f"cpu baseline {name}")

    b = base() if base_first else None
    r = measure(lambda: cpu_run(load, target_port, sink_port, rate, window, warmup, way), f"cpu {name}")
    b = b or base()
    per_sent = {k: b[k] / b["sent_w"] for k in ("busy_ns", "stat_busy_ns")}
    r["ns"], r["stat_ns"] = per_datagram(r, per_sent), per_datagram(r, per_sent, "stat_busy_ns")
    r["base_saturated"] = bool(b["saturated"])
    r["base"] = {"ns_per_sent": per_sent["busy_ns"], "load_cpu": b["load_cpu"], "saturated": b["saturated"],
                 "delivered_fraction": b["delivered_fraction"], "noisy": b.get("noisy"),
                 "foreign_cpu": b.get("foreign_cpu")}
    return r


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def per_datagram(run: dict, base: dict | None, key: str = "busy_ns") -> float | None:
    """The forwarder's ns per datagram delivered: the run's CPU less the load's (the baseline's
    per datagram sent, times the datagrams sent in the window)."""
    if not base or base.get(key) is None or not run["delivered_w"]:
        return None
    return (run[key] - base[key] * run["sent_w"]) / run["delivered_w"]


def summarise(runs: list[dict], rates: tuple[int, ...] | list[int]) -> dict:
    """Per rate and way: the median of the runs (c2t_ns, t2c_ns, ...): of the quiet and not
    saturated ones where there are any, else of the quiet ones; what marks them: saturated
    runs among those (or a saturated baseline), every run noisy."""
    out = {}
    for rate in rates:
        row: dict = {"rate": rate}
        for way in WAYS:
            mine = [r for r in runs if r["rate"] == rate and r["way"] == way]
            quiet = [r for r in _quiet_first(mine) if r.get("ns") is not None]
            use = [r for r in quiet if not r["saturated"]] or quiet
            row[f"{way}_ns"] = _median([r["ns"] for r in use])
            row[f"{way}_stat_ns"] = _median([r["stat_ns"] for r in use if r.get("stat_ns") is not None])
            row[f"{way}_runs_ns"] = [round(r["ns"]) for r in mine if r.get("ns") is not None]
            row[f"{way}_saturated"] = "; ".join(dict.fromkeys(
                x for r in use for x in (r["saturated"], "baseline" if r.get("base_saturated") else "") if x))
            row[f"{way}_noisy"] = bool(mine) and all(r.get("noisy") for r in mine)
            row[f"{way}_delivered"] = _median([r["delivered_fraction"] for r in mine])
            row[f"{way}_p50_us"] = _median([r["p50_us"] for r in mine])
        out[str(rate)] = row
    return out


# --------------------------------------------------------------------------- BPF program stats

@contextmanager
def bpf_stats():
    """kernel.bpf_stats_enabled = 1 meanwhile (then what it was); yields False when not allowed."""
    try:
        before = BPF_STATS.read_text().strip()
        BPF_STATS.write_text("1")
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        try:
            BPF_STATS.write_text(before)
        except OSError:
            pass


def prog_stats(prog_id: int) -> tuple[int, int]:
    """(run_cnt, run_time_ns) of a BPF program (bpftool; zeros while stats are off)."""
    r = subprocess.run(["bpftool", "--json", "prog", "show", "id", str(prog_id)], capture_output=True, text=True,
                       timeout=10)
    if r.returncode != 0:
        raise BenchError(f"bpftool prog show id {prog_id}: {r.stderr.strip()}")
    info = json.loads(r.stdout)
    return int(info.get("run_cnt", 0)), int(info.get("run_time_ns", 0))


def program_time(fwd: Forwarder, load: Load, target_port: int, sink_port: int, rate: float, window: float,
                 warmup: float, way: str) -> dict | None:
    """One run with BPF stats on: the forwarder's program's runs and time per datagram
    delivered (whatever else crossed lo meanwhile ran it too, briefly). None: no program, or
    no stats."""
    prog = fwd.kernel_program()
    if prog is None or shutil.which("bpftool") is None:
        return None
    with bpf_stats() as on:
        if not on:
            return None
        cnt0, ns0 = prog_stats(prog)
        r = cpu_run(load, target_port, sink_port, rate, window, warmup, way)
        cnt1, ns1 = prog_stats(prog)
    runs, ns, n = cnt1 - cnt0, ns1 - ns0, r["delivered"]
    return {"rate": rate, "way": way, "prog_id": prog, "runs": runs, "run_time_ns": ns, "delivered": n,
            "ns_per_run": ns / runs if runs else None, "runs_per_datagram": runs / n if n else None,
            "ns_per_datagram": ns / n if n else None}
