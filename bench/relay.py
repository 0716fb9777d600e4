#!/usr/bin/env python3
"""Relay forwarding benchmark: the rtcrelay relay against a C reference forwarder.

    .venv/bin/python bench/relay.py            # full run (2 rounds of ~1 min per forwarder, flow and worker count; churn)
    .venv/bin/python bench/relay.py --quick    # short run (a few seconds each), used by the tests
    .venv/bin/python bench/relay.py --forwarders ref --workers 1 --json /tmp/r.json
    .venv/bin/python bench/relay.py --workers 1 --rounds 1 --flows 64,10000,50000 --churn 500,2000,10000

One invocation builds the C tools (bench/c/*.c -> bench/.build/, gcc -O2), then runs every
forwarder variant (C reference and the relay, 1 worker then 2) at every flow count (--flows,
per worker: 64, 1,000, 10,000 and 50,000; the load has flows x workers), 140-byte payloads, in
rounds: ref then relay, then relay then ref (--rounds; the machine drifts over minutes, this
way alike for both), each forwarder's rounds pooled.

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
           the generator nor the sink takes CPU meanwhile. Median of 3 runs a round.
  paced    live search over the offered rate (bounded steps) for the highest rate with
           < 0.1% of packets lost or late (> 10 ms one-way: a packet that late is useless to a
           jitter buffer, and a big receive buffer would otherwise hide overload as delay).
           On a 2-CPU machine the generator + sink core saturates first: a result marked
           "load-bound" (the generator fell short of the rate, or generator + sink used
           >= 90% of their CPU in a failed step) is a lower bound for the forwarder.
  latency  one-way latency p50/p99/p99.9 at 20k pps (generator batch 1, timestamps in the
           payload, CLOCK_MONOTONIC); the run with the best p99 of 3 a round.

With one worker the forwarder is pinned to CPU 1 and generator + sink to CPU 0 (like
`taskset -a`); with two on a 2-CPU machine each worker gets a CPU and the load floats.
Other processes' CPU use is measured during every measurement; a disturbed one is repeated
(--retries) after waiting for quiet, and marked '~' if it stays disturbed. Results are printed
as a table with ratios to the reference measured in the same run, and PASS/MISS lines for the
targets (relay >= 0.85x the reference per core; 2 workers >= 1.5x one; relay p99 at 20k pps
<= 1.5x the reference's), per flow count; the memory of the relay's workers and the size of its
shm table per flow at the largest flow count.

  churn    (--churn, rates per second per worker) a relay with the default idle timeout carries
           10,000 established flows per worker (or the largest count measured below that) at
           20k pps while `loadgen churn` sends authenticated Binding Requests from new 5-tuples
           (new sessions) at each rate: the established traffic's latency and loss against a
           no-churn run right before, the flows learned, the drop counters that grew, and the
           workers' CPU per learned flow.

Only 127/8 is used (sources 127.1.0.1:2000 on, churn 127.2.0.1:2000 on, --source); every
subprocess has a timeout and every process group the harness starts is killed on exit.

A forwarder is a `Forwarder` (start / pids / stop, optional preambles and counters). The C
reference is `CReferenceForwarder`; `PythonRelayForwarder` runs the relay.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
# Run as a script, Python puts bench/ first on sys.path, where this file would shadow the
# project's `relay` package (which a Forwarder may import, e.g. to build STUN preambles):
# put the repository root there instead.
if sys.path and Path(sys.path[0] or ".").resolve() == _BENCH:
    sys.path[0] = str(_BENCH.parent)


from bench import loadlib  # noqa: E402  (bench/ as a namespace package: nothing shadowed)

BenchError, Load, SourcePlan = loadlib.BenchError, loadlib.Load, loadlib.SourcePlan

HOST = "127.0.0.1"
LATE_NS = 10_000_000          # paced search: a packet later than this counts as lost
MAX_BAD_FRACTION = 0.001      # paced search: < 0.1% lost or late
LOAD_SHORTFALL = 0.97         # paced search: generator must reach 97% of the asked rate
LOAD_CPU_MAX = 0.9            # ... and generator + sink must have left some of their CPU(s) idle
BUSY_WARN = 0.10              # warn when other processes use more than this much CPU
FOREIGN_MAX = 0.05            # a measurement during which others used more CPU is noisy
FOREIGN_MAX_LATENCY = 0.01    # tail latency is more fragile
TARGET_PER_CORE = 0.85
TARGET_SCALING = 1.5
TARGET_P99 = 1.5
TARGET_CHURN_P99 = 2.0        # established p99 under churn vs without ...
CHURN_P99_UP_TO = 2000        # ... up to this many new sessions per second per worker
LEARN_RATE = 20_000           # preambles per second per worker (halved on each retransmission)
LEARN_ATTEMPTS = 4
RELAY_IDLE_TIMEOUT = 30.0     # the default: flush and sweep at their production pace (every run sends to
                              # every flow within seconds; "flows held" checks none expired)
CHURN_IDLE_TIMEOUT = 30.0     # churn: the default; the first rates' flows expire during the later ones
                              # (with 5 s the counter flush had to pass 6x as often: not production)
CHURN_FLOWS = 10_000          # established flows per worker during churn (at most)


# =========================================================================== forwarders

class Forwarder(ABC):
    """A UDP forwarder under test: datagrams to 127.0.0.1:listen_port come out at `target`
    with the relay's 24-byte tunnel header in front of the unchanged payload.

    Contract (what the harness relies on):
      start(listen_port, target)  bind 127.0.0.1:listen_port with `self.workers` worker
                                  processes and return only once every worker's socket is bound
                                  and forwarding; raise on failure. Use a big receive buffer
                                  (>= 128 MiB: the drain test queues 100k x ~832 B).
      pids()                      the processes that do the packet work, one per worker
                                  (SIGSTOP/SIGCONT and CPU pinning apply to these only).
      stop()                      stop everything start() started, bounded; idempotent.
      preambles(n_flows)          optional: one datagram per flow, sent once from that flow's
                                  socket before its traffic (after start()); None = none.
      counters()                  optional: one dict of counters per worker ("flows", "drop_*",
                                  "flows_learned", ...); None = none.
    `flows` is what each worker must hold (the load has flows x workers).
    Processes should be started with loadlib.spawn() (own process group, killed at exit).
    """

    kind = "?"        # "ref" or "relay": ratios compare a relay row with the ref row
    label = "?"

    def __init__(self, workers: int = 1, *, flows: int = 64) -> None:
        self.workers, self.flows = workers, flows
        self.target: tuple[str, int] | None = None

    @abstractmethod
    def start(self, listen_port: int, target: tuple[str, int]) -> None: ...

    @abstractmethod
    def pids(self) -> list[int]: ...

    @abstractmethod
    def stop(self) -> None: ...

    def preambles(self, n_flows: int) -> list[bytes] | None:
        return None

    def counters(self) -> list[dict[str, int]] | None:
        return None

    def flows_learned(self) -> int | None:
        """The flows the workers hold now (None: the forwarder does not say)."""
        rows = self.counters()
        return None if rows is None else sum(r["flows"] for r in rows)

    def table_path(self) -> Path | None:
        """A file holding the flow table (for its size), if any."""
        return None

    def describe(self) -> str:
        return ""


class CReferenceForwarder(Forwarder):
    """bench/c/fwd_ref.c: recvmmsg/sendmmsg batch 64, connected destination, a flow table sized
    for its flows (-F)."""

    kind = "ref"
    label = "C reference"

    def __init__(self, workers: int = 1, *, tools: dict[str, Path], rcvbuf: int = 256 << 20,
                 flows: int = 64) -> None:
        super().__init__(workers, flows=flows)
        self.tools, self.rcvbuf = tools, rcvbuf
        self._proc = None
        self._pids: list[int] = []
        self.effective_rcvbuf = 0

    def start(self, listen_port: int, target: tuple[str, int]) -> None:
        self.target = target
        argv = [str(self.tools["fwd_ref"]), "-l", f"{HOST}:{listen_port}", "-t", f"{target[0]}:{target[1]}",
                "-n", str(self.workers), "-r", str(self.rcvbuf), "-F", str(self.flows)]
        self._proc = loadlib.spawn(argv)
        line = loadlib.read_line(self._proc, "READY", timeout=10)
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        self._pids = [int(p) for p in fields["pids"].split(",")]
        self.effective_rcvbuf = int(fields["rcvbuf"])
        loadlib.wait_udp_bound(listen_port, self.workers, proc=self._proc)

    def pids(self) -> list[int]:
        return list(self._pids)

    def stop(self) -> None:
        if self._proc is not None:
            loadlib.stop_process(self._proc)
            self._proc = None

    def describe(self) -> str:
        return f"rcvbuf {self.effective_rcvbuf >> 20} MiB (effective)"


class PythonRelayForwarder(Forwarder):
    """The rtcrelay relay (`rtcrelay relay ...`): a supervisor and its SO_REUSEPORT workers,
    with its full logic: flows learned from authenticated STUN, shm table, counters."""

    kind = "relay"
    label = "rtcrelay relay"

    def __init__(self, workers: int = 1, *, flows: int = 64, idle_timeout: float = RELAY_IDLE_TIMEOUT,
                 hit_path: str = "auto", **_: object) -> None:
        super().__init__(workers, flows=flows)
        self.idle_timeout = idle_timeout
        self.hit_path = hit_path  # the relay's `hit_path`: auto, c or python
        self._proc = None
        self._pids: list[int] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._stats: Path | None = None
        self._table: Path | None = None
        self.keyring = None

    def describe(self) -> str:
        return f"hit_path {self.hit_path}"

    def start(self, listen_port: int, target: tuple[str, int]) -> None:
        from daemon.keys import generate_keys_toml, load_keyring

        self.target = target
        self._tmp = tempfile.TemporaryDirectory(prefix="rtcrelay-bench-", dir="/dev/shm")
        tmp = Path(self._tmp.name)
        keys = tmp / "keys.toml"
        keys.write_text(generate_keys_toml())
        self.keyring = load_keyring(str(keys))
        name = f"bench{os.getpid()}"
        settings = {
            "name": name, "listen": [f"{HOST}:{listen_port}"], "workers": self.workers,
            "route_keys_file": str(keys), "admin_listen": "", "table_dir": str(tmp),
            "socket_buffer": 256 << 20,  # the drain test queues ~83 MB
            "heartbeat_timeout": 3600.0,  # the sink is no transceiver: it never heartbeats
            "standby_workers": False,  # only the serving processes, for SIGSTOP and pinning
            # room for the flows (each its own session) at under half load, wherever the kernel's
            # SO_REUSEPORT hash puts them; none expires between the runs of a variant
            "flow_capacity": capacity_for(self.flows), "session_capacity": capacity_for(self.flows),
            "idle_timeout": self.idle_timeout,
            "hit_path": self.hit_path,
        }
        config = tmp / "relay.toml"
        config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
        self._proc = loadlib.spawn([sys.executable, "-m", "cli.main", "relay", "--config", str(config), "--ephemeral"])
        loadlib.wait_udp_bound(listen_port, self.workers, timeout=20, proc=self._proc)
        self._stats, self._table = tmp / f"rtcrelay-{name}.stats", tmp / f"rtcrelay-{name}.table"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = self.counters() if self._stats.exists() else None
            if rows and all(r["ready"] == 1 and r["pid"] for r in rows):
                self._pids = [r["pid"] for r in rows]
                return
            time.sleep(0.05)
        raise RuntimeError("the relay's workers did not become ready within 20 s")

    def counters(self) -> list[dict[str, int]] | None:
        """The workers' counter rows (published about once a second)."""
        from shm.counters import CounterBlock

        assert self._stats is not None, "start() first"
        block = CounterBlock.attach(str(self._stats))
        try:
            return [block.load_row(i) for i in range(block.rows)]
        finally:
            block.close()

    def table_path(self) -> Path | None:
        return self._table

    def preambles(self, n_flows: int) -> list[bytes] | None:
        """One authenticated STUN Binding Request per flow: the relay learns each flow from it."""
        from wire.route_token import derive_password, issue_token
        from wire.stun import build_binding_request

        assert self.target is not None and self.keyring is not None
        out = []
        for i in range(n_flows):
            ufrag = issue_token(self.keyring, socket.inet_aton(self.target[0]), self.target[1], time.time())
            pwd = derive_password(self.keyring, ufrag)
            out.append(build_binding_request(os.urandom(12), f"{ufrag}:cli{i}", pwd.encode(), 1 << 24,
                                             controlling=True, tie_breaker=i))
        return out

    def pids(self) -> list[int]:
        return list(self._pids)

    def stop(self) -> None:
        if self._proc is not None:
            loadlib.stop_process(self._proc, grace=5.0)
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def capacity_for(flows: int) -> int:
    """Relay table slots per worker for `flows`: the power of two >= 2 x flows, at least 65,536."""
    return max(65536, 1 << (2 * flows - 1).bit_length())


FORWARDERS: dict[str, type[Forwarder]] = {"ref": CReferenceForwarder, "relay": PythonRelayForwarder}


def make_forwarder(kind: str, workers: int, flows: int, tools: dict[str, Path], hit_path: str = "auto") -> Forwarder:
    cls = FORWARDERS[kind]
    return cls(workers, tools=tools, flows=flows) if cls is CReferenceForwarder else cls(workers, flows=flows, hit_path=hit_path)


# =========================================================================== measurements

@dataclass
class Config:
    drain_count: int = 100_000
    drain_reps: int = 3
    search_steps: int = 6
    search_duration: float = 1.0
    latency_rate: int = 20_000
    latency_duration: float = 2.0
    latency_reps: int = 3
    flows: tuple[int, ...] = (64, 1000, 10_000, 50_000)   # per worker
    size: int = 140
    noise_retries: int = 2        # measurements repeated when other processes took CPU meanwhile
    churn_rates: tuple[int, ...] = (500, 2000, 10_000)    # new sessions per second per worker
    churn_duration: float = 10.0
    source: SourcePlan = field(default_factory=SourcePlan)  # established flows' addresses
    hit_path: str = "auto"        # the relay's hit path (auto: C when it was built)

    @classmethod
    def quick(cls) -> "Config":
        return cls(drain_count=20_000, drain_reps=1, search_steps=3, search_duration=0.3,
                   latency_duration=0.5, latency_reps=1, noise_retries=0, flows=(64, 1000),
                   churn_rates=(500,), churn_duration=2.0)

    @property
    def churn_source(self) -> SourcePlan:
        """The new sessions' addresses: the next /16 of 127/8 (disjoint from the source plan's)."""
        return self.source.after(65536 * self.source.per_ip)


@dataclass
class Ports:
    listen: int
    sink: int


def _preamble_file(fwd: Forwarder, flows: int) -> str | None:
    pre = fwd.preambles(flows)
    if pre is None:
        return None
    if len(pre) < flows:
        raise BenchError(f"{fwd.label}: preambles() gave {len(pre)} datagrams for {flows} flows")
    return loadlib.write_preambles(pre)


def drops(rows: list[dict[str, int]]) -> dict[str, int]:
    """The nonzero drop_* counters, summed over the workers."""
    out = {k: sum(r[k] for r in rows) for k in rows[0] if k.startswith("drop_")} if rows else {}
    return {k: v for k, v in out.items() if v}


def fresh_counters(fwd: Forwarder, timeout: float = 5.0) -> list[dict[str, int]] | None:
    """The counter rows once every worker has published after this call (they do about once a
    second), so they include everything that happened before it; the latest rows after timeout."""
    rows = fwd.counters()
    if rows is None:
        return None
    since = time.time() * 1000
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(r["heartbeat_ms"] > since for r in rows):
        time.sleep(0.05)
        rows = fwd.counters()
    return rows


def _wait_learned(fwd: Forwarder, want: int, timeout: float, stall: float = 3.0) -> int:
    """Wait until the forwarder holds `want` flows; returns how many it holds at the end (when
    they stop growing for `stall` s, or at timeout)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        n = fwd.flows_learned() or 0
        now = time.monotonic()
        if n == want or now > deadline or (n == last and now - since > stall):
            return n
        if n != last:
            last, since = n, now
        time.sleep(0.1)


def learn(fwd: Forwarder, load: Load, ports: Ports) -> dict:
    """Make the forwarder know every flow of the load before anything is measured: send its
    preambles from the source plan, paced, and again (slower) for what was not learned, as ICE
    retransmits, until its workers count them all; a forwarder without preambles (the C
    reference learns from any datagram) gets one datagram per flow. BenchError when flows stay
    unlearned: every later run would measure the miss path."""
    t0 = time.monotonic()
    pre = _preamble_file(fwd, load.flows)
    sink = None
    known, attempt = None, 0
    try:
        sink = load.sink(ports.sink, idle_ms=0, max_s=600)  # takes what the forwarder sends on
        for attempt in range(1, LEARN_ATTEMPTS + 1):
            pace = LEARN_RATE * fwd.workers / 2 ** (attempt - 1)
            max_s = load.flows / pace + 30
            gen = load.gen(ports.listen, count=0 if pre else load.flows, batch=1, preamble_file=pre,
                           preamble_rate=pace if pre else 0, preamble_wait_ms=0, max_s=max_s)
            try:
                gen.result(timeout=max_s + 10)
            finally:
                gen.reap()
            if fwd.counters() is None:
                loadlib.wait_queues_empty(ports.listen, timeout=30)
                break
            known = _wait_learned(fwd, load.flows, timeout=load.flows / 2000 + 10)
            if known == load.flows or not pre:
                break
    finally:
        loadlib.reap(sink)
        if pre:
            os.unlink(pre)
    if known is not None and known != load.flows:
        raise BenchError(f"{fwd.label}: learned {known:,} of {load.flows:,} flows after {attempt} rounds of "
                         f"preambles; drops: {drops(fwd.counters() or [])}")
    return {"flows": load.flows, "known": known, "rounds": attempt, "learn_s": round(time.monotonic() - t0, 2)}


def paced_run(fwd: Forwarder, load: Load, ports: Ports, rate: float, duration: float, *,
              batch: int = 0, check_header: bool = False) -> dict:
    """Offer `rate` pps for `duration` s (the flows learned before: no preambles); the sink's
    summary plus the generator's, and a verdict."""
    sink = gen = None
    try:
        planned = int(round(rate * duration))
        sink = load.sink(ports.sink, expected=planned, idle_ms=500, max_s=duration + 20, late_ns=LATE_NS,
                         check_header=check_header)
        gen = load.gen(ports.listen, rate=rate, duration=duration, batch=batch, max_s=duration * 2 + 5)
        g = gen.result(timeout=duration * 2 + 15)
        s = loadlib.summary(sink, timeout=duration + 25, what="loadgen sink")
    finally:
        if gen:
            gen.reap()
        loadlib.reap(sink)
    sent = max(g["sent"], 1)
    bad = max(g["sent"] - s["received"], 0) + s["late"]
    # generator + sink CPU while sending, as a fraction of the CPUs they are pinned to: on a
    # small machine they can saturate their CPU first (a paced wake-up costs ~50 us of CPU in
    # some VMs), and then the sink falls behind and the forwarder gets the blame
    load_cpu = (g["cpu_s"] + s["cpu_s"]) / duration / len(load.cpus) if load.cpus else None
    res = {"rate": rate, "sent": g["sent"], "gen_pps": g["pps"], "received": s["received"], "late": s["late"],
           "bad_fraction": bad / sent, "load_cpu": load_cpu, "sink": s, "gen": g}
    if bad / sent >= MAX_BAD_FRACTION:
        res["ok"], res["why"] = False, "load" if load_cpu and load_cpu >= LOAD_CPU_MAX else "loss"
    elif g["pps"] < LOAD_SHORTFALL * rate or g["sent"] < 0.99 * planned:
        res["ok"], res["why"] = False, "load"      # the generator could not offer that rate
    else:
        res["ok"], res["why"] = True, ""
    return res


def smoke(fwd: Forwarder, load: Load, ports: Ports) -> dict:
    """A short low-rate run: the forwarder forwards, and which header length it writes."""
    r = paced_run(fwd, load, ports, 2000, 0.25, batch=1, check_header=True)
    if r["received"] < 0.99 * r["sent"]:
        raise BenchError(f"{fwd.label}: smoke test delivered {r['received']} of {r['sent']} datagrams "
                         f"(sink: {json.dumps(r['sink'])})")
    s = r["sink"]
    return {"hdr_len": [s["hdr_len_min"], s["hdr_len_max"]], "hdr_ok": s.get("hdr_ok", 0),
            "received": s["received"], "sent": r["sent"]}


def drain(fwd: Forwarder, load: Load, ports: Ports, count: int) -> dict:
    """Queue `count` datagrams while the workers are stopped, then time how fast they drain.

    The sink is stopped too while the forwarder drains (it reads afterwards), so on a small
    machine it takes no CPU from the workers; its kernel receive timestamps (SO_TIMESTAMPNS,
    stamped in the forwarder's send path on loopback) give the first -> last delivery time.
    Every flow gets some of the datagrams (a batch per flow of count / flows, at most 64).
    """
    pids = fwd.pids()
    stopped: list[int] = []
    sink = gen = None
    try:
        sink = load.sink(ports.sink, expected=count, idle_ms=1000, max_s=90, kernel_stamps=True,
                         rcvbuf=512 << 20)
        gen = load.gen(ports.listen, count=count, batch=min(max(count // load.flows, 1), 64), armed=True,
                       max_s=60)
        gen.wait_armed(timeout=30)
        drops0 = sum(s.drops for s in loadlib.udp_sockets(ports.listen))
        loadlib.signal_pids(pids + [sink.pid], signal.SIGSTOP, wait_state="T")
        stopped = pids + [sink.pid]
        gen.go()
        g = gen.result(timeout=60)
        time.sleep(0.02)
        socks = loadlib.udp_sockets(ports.listen)
        queued = sum(s.rx_queue for s in socks)
        dropped = sum(s.drops for s in socks) - drops0
        sink_drops0 = sum(s.drops for s in loadlib.udp_sockets(ports.sink))
        loadlib.signal_pids(pids, signal.SIGCONT)
        stopped = [sink.pid]
        loadlib.wait_queues_empty(ports.listen, timeout=30)
        sink_dropped = sum(s.drops for s in loadlib.udp_sockets(ports.sink)) - sink_drops0
        loadlib.signal_pids([sink.pid], signal.SIGCONT)
        stopped = []
        s = loadlib.summary(sink, timeout=30, what="loadgen sink")
    finally:
        for pid in stopped:
            try:
                loadlib.signal_pids([pid], signal.SIGCONT)
            except BenchError:
                pass
        if gen:
            gen.reap()
        loadlib.reap(sink)
    pps = s["k_pps"]
    return {"sent": g["sent"], "received": s["received"], "queued_bytes": queued, "dropped_while_stopped": dropped,
            "dropped_at_sink": sink_dropped, "drain_s": s["k_span_ns"] / 1e9, "pps": pps,
            "pps_per_core": pps / fwd.workers,
            "valid": s["received"] >= 0.99 * g["sent"] and s["received"] > 1 and s["k_missing"] == 0}


def quiet(fn, what: str, log=lambda _m: None, retries: int = 0, wait: float = 10.0,
          max_foreign: float = FOREIGN_MAX) -> dict:
    """Run a measurement; when other processes used more than FOREIGN_MAX of the CPUs meanwhile,
    wait for quiet and run it again (at most `retries` times). Adds "foreign_cpu" to the result."""
    for attempt in range(retries + 1):
        with loadlib.ForeignCpu() as fc:
            r = fn()
        r["foreign_cpu"] = round(fc.fraction, 3)
        r["noisy"] = fc.fraction > max_foreign
        if not r["noisy"] or attempt == retries:
            return r
        log(f"    ({what}: other processes used {fc.fraction:.0%} of the CPUs meanwhile; again)")
        loadlib.wait_quiet(wait, BUSY_WARN)
    raise AssertionError("unreachable")


def paced_search(fwd: Forwarder, load: Load, ports: Ports, guess: float, steps: int, duration: float,
                 measure=lambda fn, what: fn()) -> dict:
    """Bounded search for the highest offered rate with < 0.1% lost or late."""
    lo, hi = 0.0, None
    why_hi = ""
    runs = []
    rate = guess
    for _ in range(steps):
        r = measure(lambda: paced_run(fwd, load, ports, rate, duration), f"paced {rate / 1e3:.0f}k")
        runs.append({k: r.get(k) for k in ("rate", "sent", "gen_pps", "received", "late", "bad_fraction", "ok",
                                           "why", "load_cpu", "foreign_cpu", "noisy")})
        if r["ok"]:
            lo = max(lo, rate)
        else:
            # it failed at what was really offered (the generator may fall short of the asked rate),
            # or at what generator + sink could take when they saturated their CPU
            fail_at = min(rate, r["gen_pps"])
            if r["why"] == "load" and r["load_cpu"]:
                fail_at = min(fail_at, rate * LOAD_CPU_MAX / r["load_cpu"])
            if hi is None or fail_at <= hi:
                hi, why_hi = fail_at, r["why"]
        if hi is None:
            rate = rate * 1.3
        elif lo == 0:
            rate = hi * (0.97 if why_hi == "load" else 0.6)
        else:
            if hi <= lo or (hi - lo) / hi < 0.03:
                break
            rate = (lo + hi) / 2
        rate = float(int(rate / 1000) * 1000 or 1000)
    return {"max_pps": lo, "max_pps_per_core": lo / fwd.workers, "first_fail_pps": hi,
            "load_bound": why_hi == "load", "runs": runs}


def latency(fwd: Forwarder, load: Load, ports: Ports, rate: int, duration: float) -> dict:
    r = paced_run(fwd, load, ports, rate, duration, batch=1)
    s = r["sink"]
    return {"rate": rate, "sent": r["sent"], "received": r["received"], "p50_us": s["lat_p50_ns"] / 1e3,
            "p99_us": s["lat_p99_ns"] / 1e3, "p999_us": s["lat_p999_ns"] / 1e3, "max_us": s["lat_max_ns"] / 1e3,
            "load_cpu": r["load_cpu"], "ok": r["ok"]}


# =========================================================================== placement + variants

def placement(workers: int, pin: bool) -> tuple[set[int] | None, list[set[int]] | None]:
    """(generator+sink CPUs, per-worker CPUs). Worker i gets its own CPU; the load gets CPU 0 when
    there is a spare one (1 worker on 2 CPUs), else it floats (2 workers on 2 CPUs)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    if len(cpus) >= workers + 1:
        return {cpus[0]}, [{cpus[1 + i]} for i in range(workers)]
    return None, [{cpus[i % len(cpus)]} for i in range(workers)]


@dataclass
class VariantResult:
    kind: str
    label: str
    workers: int
    flows: int = 64                      # per worker
    status: str = "ok"                   # ok | not measured | error
    message: str = ""
    describe: str = ""
    pinning: str = ""
    background_cpu: float = 0.0          # CPU used by other processes just before (0..1)
    smoke: dict = field(default_factory=dict)
    drain: dict = field(default_factory=dict)
    drain_runs: list = field(default_factory=list)
    paced: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    latency_runs: list = field(default_factory=list)
    learn: dict = field(default_factory=dict)
    flow_check: dict = field(default_factory=dict)   # flows held after the measurements ("ok")
    memory: dict = field(default_factory=dict)
    rounds: int = 1


def summarise_drain(res: VariantResult) -> None:
    """res.drain: the median of the valid, quiet drain runs (of every round)."""
    valid = ([d for d in res.drain_runs if d["valid"] and not d["noisy"]]
             or [d for d in res.drain_runs if d["valid"]] or res.drain_runs)
    res.drain = dict(sorted(valid, key=lambda d: d["pps"])[len(valid) // 2])
    res.drain["runs_pps"] = [round(d["pps"]) for d in res.drain_runs]
    res.drain["all_valid"] = all(d["valid"] for d in res.drain_runs)


def summarise_latency(res: VariantResult) -> None:
    """res.latency: the quiet run with the best p99 (of every round): a tail percentile is
    easily spoiled by one scheduling hiccup of the machine."""
    res.latency = dict(min(res.latency_runs, key=lambda r: (r["noisy"], r["p99_us"])))
    res.latency["runs_p99_us"] = [round(r["p99_us"], 1) for r in res.latency_runs]


def merge_rounds(rounds: list[VariantResult]) -> VariantResult:
    """One result from the rounds of one forwarder and worker count: drain runs and latency
    runs pooled (median and best p99 as in a round), the round with the highest paced max.
    A round that failed makes the whole a failure."""
    failed = [r for r in rounds if r.status != "ok"]
    if failed or len(rounds) == 1:
        return failed[0] if failed else rounds[0]
    merged = rounds[0]
    merged.drain_runs = [d for r in rounds for d in r.drain_runs]
    merged.latency_runs = [x for r in rounds for x in r.latency_runs]
    merged.paced = max((r.paced for r in rounds), key=lambda p: p["max_pps"])
    merged.background_cpu = max(r.background_cpu for r in rounds)
    merged.flow_check = next((r.flow_check for r in rounds if not r.flow_check.get("ok", True)), merged.flow_check)
    merged.rounds = len(rounds)
    summarise_drain(merged)
    summarise_latency(merged)
    return merged


def flow_check(fwd: Forwarder, flows: int) -> dict:
    """Does the forwarder still hold exactly the flows it learned (no run added or lost one)?"""
    rows = fresh_counters(fwd)
    if rows is None:
        return {"expected": flows, "held": None, "ok": True}
    held = sum(r["flows"] for r in rows)
    return {"expected": flows, "held": held, "ok": held == flows, "drops": drops(rows)}


def memory(fwd: Forwarder, flows: int) -> dict:
    """RSS of each worker and the flow table file (apparent size and blocks allocated) per flow."""
    out: dict = {"rss_mib": [round(loadlib.rss_bytes(p) / 2**20, 1) for p in fwd.pids()]}
    path = fwd.table_path()
    if path is not None and path.exists():
        st = path.stat()
        out.update(table_bytes=st.st_size, table_allocated=st.st_blocks * 512,
                   table_bytes_per_flow=round(st.st_size / flows), allocated_per_flow=round(st.st_blocks * 512 / flows))
    return out


def start_and_pin(fwd: Forwarder, ports: Ports, worker_cpus: list[set[int]] | None) -> None:
    fwd.start(ports.listen, (HOST, ports.sink))
    pids = fwd.pids()
    if len(pids) != fwd.workers:
        raise BenchError(f"{fwd.label}: pids() gave {len(pids)} processes for {fwd.workers} workers")
    for pid, c in zip(pids, worker_cpus or []):
        loadlib.pin(pid, c)


def free_ports() -> Ports:
    listen = loadlib.free_udp_port(HOST)
    return Ports(listen, loadlib.free_udp_port(HOST, avoid=(listen,)))


def run_variant(fwd: Forwarder, cfg: Config, tools: dict[str, Path], pin: bool, log,
                wait_quiet: float = 0.0) -> VariantResult:
    res = VariantResult(fwd.kind, fwd.label, fwd.workers, fwd.flows)
    load_cpus, worker_cpus = placement(fwd.workers, pin)
    load = Load(tools, flows=fwd.flows * fwd.workers, size=cfg.size, cpus=load_cpus, host=HOST, source=cfg.source)
    ports = free_ports()
    name = f"{fwd.label} x{fwd.workers}, {fwd.flows:,} flows/worker"
    res.background_cpu = loadlib.wait_quiet(wait_quiet, BUSY_WARN) if wait_quiet > 0 else loadlib.cpu_busy(0.3)
    if res.background_cpu > BUSY_WARN:
        log(f"  warning: {res.background_cpu:.0%} of the CPUs busy with other processes: noisy figures")
    try:
        start_and_pin(fwd, ports, worker_cpus)
    except NotImplementedError as e:
        res.status, res.message = "not measured", str(e)
        log(f"  {name}: NOT MEASURED: {e}")
        fwd.stop()
        return res
    except Exception as e:  # noqa: BLE001 - one broken forwarder must not stop the others
        res.status, res.message = "error", f"start failed: {type(e).__name__}: {e}"
        log(f"  {name}: ERROR: {res.message}")
        fwd.stop()
        return res
    try:
        res.pinning = (f"workers on CPU {','.join(str(min(c)) for c in worker_cpus)}" if worker_cpus else "unpinned")
        res.pinning += f"; load on CPU {min(load_cpus)}" if load_cpus else "; load unpinned"
        res.describe = fwd.describe()
        res.learn = learn(fwd, load, ports)
        log(f"  {name} ({res.pinning}): {load.flows:,} flows learned in {res.learn['learn_s']} s "
            f"({res.learn['rounds']} round(s)); smoke...")
        res.smoke = smoke(fwd, load, ports)

        def measure(fn, what, max_foreign=FOREIGN_MAX):
            return quiet(fn, what, log, cfg.noise_retries, min(wait_quiet, 10.0), max_foreign)

        for i in range(cfg.drain_reps):
            d = measure(lambda: drain(fwd, load, ports, cfg.drain_count), "drain")
            res.drain_runs.append(d)
            log(f"    drain {i + 1}/{cfg.drain_reps}: {d['pps']:,.0f} pps ({d['received']}/{d['sent']} in "
                f"{d['drain_s'] * 1e3:.1f} ms; dropped: {d['dropped_while_stopped']} while queued, "
                f"{d['dropped_at_sink']} at the sink; others used {d['foreign_cpu']:.0%} CPU)")
        summarise_drain(res)
        guess = 0.8 * res.drain["pps"] if res.drain["valid"] else 100_000 * fwd.workers
        guess = max(round(guess, -3), 10_000)
        res.paced = paced_search(fwd, load, ports, guess, cfg.search_steps, cfg.search_duration,
                                 measure)
        res.paced["foreign_cpu"] = max((r["foreign_cpu"] or 0) for r in res.paced["runs"])
        res.paced["noisy"] = any(r.get("noisy") for r in res.paced["runs"])
        log(f"    paced: max {res.paced['max_pps']:,.0f} pps"
            f"{' (load-bound)' if res.paced['load_bound'] else ''}; runs "
            + ", ".join(f"{r['rate'] / 1e3:.0f}k{'✓' if r['ok'] else '✗' + r['why']}"
                        + ("" if r["load_cpu"] is None else f" (load CPU {r['load_cpu']:.0%})")
                        for r in res.paced["runs"]))
        res.latency_runs = [measure(lambda: latency(fwd, load, ports, cfg.latency_rate, cfg.latency_duration),
                                    "latency", FOREIGN_MAX_LATENCY) for _ in range(cfg.latency_reps)]
        summarise_latency(res)
        log(f"    latency at {cfg.latency_rate:,} pps: p50 {res.latency['p50_us']:.1f} us, "
            f"p99 {res.latency['p99_us']:.1f} us, p99.9 {res.latency['p999_us']:.1f} us (best p99 of "
            f"{res.latency['runs_p99_us']}; others used {res.latency['foreign_cpu']:.1%} CPU"
            + (f"; generator + sink used {res.latency['load_cpu']:.0%} of their CPU)" if res.latency["load_cpu"]
               else ")"))
        res.flow_check = flow_check(fwd, load.flows)
        res.memory = memory(fwd, load.flows)
        if not res.flow_check["ok"]:
            log(f"    WARNING: the relay holds {res.flow_check['held']:,} flows after the measurements, "
                f"not {load.flows:,} (drops: {res.flow_check['drops']})")
    except Exception as e:  # noqa: BLE001 - reported in the table, the other variants still run
        res.status, res.message = "error", (str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}")
        log(f"  {name}: ERROR: {res.message}")
    finally:
        fwd.stop()
    return res


# =========================================================================== churn

@dataclass
class ChurnResult:
    kind: str                            # "relay", or "ref": the same load on the C reference (a control)
    workers: int
    flows: int                           # established flows per worker
    status: str = "ok"                   # ok | error
    message: str = ""
    build: dict = field(default_factory=dict)    # the pre-built requests: how many, how long
    learn: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)     # one per rate


def established_run(fwd: Forwarder, load: Load, ports: Ports, rate: int, duration: float,
                    churn: tuple[str, SourcePlan, float] | None = None) -> dict:
    """The established flows at `rate` pps (batch 1, as the latency test) for `duration` s,
    with `loadgen churn` (preamble file, source plan, requests per second) alongside if given:
    their latency and loss, what the workers' counters and CPU time did meanwhile."""
    pids = fwd.pids()
    rows0 = fresh_counters(fwd) or []
    cpu0 = sum(loadlib.cpu_seconds(p) for p in pids)
    t0 = time.monotonic()
    sink = ch = gen = None
    try:
        sink = load.sink(ports.sink, expected=int(round(rate * duration)), idle_ms=500, max_s=duration + 20,
                         late_ns=LATE_NS)
        if churn:
            ch = load.churn(ports.listen, churn[0], churn[1], churn[2], duration, max_s=duration * 2 + 5)
        gen = load.gen(ports.listen, rate=rate, duration=duration, batch=1, max_s=duration * 2 + 5)
        g = gen.result(timeout=duration * 2 + 15)
        c = loadlib.summary(ch, timeout=duration * 2 + 15, what="loadgen churn") if ch else None
        s = loadlib.summary(sink, timeout=duration + 25, what="loadgen sink")
    finally:
        if gen:
            gen.reap()
        loadlib.reap(ch, sink)
    wall = time.monotonic() - t0
    cpu = sum(loadlib.cpu_seconds(p) for p in pids) - cpu0
    load_cpu = (g["cpu_s"] + s["cpu_s"] + (c["cpu_s"] if c else 0)) / duration / len(load.cpus) if load.cpus else None
    rows1 = fresh_counters(fwd) or []

    def grew(name: str) -> int:
        return sum(r[name] for r in rows1) - sum(r[name] for r in rows0)

    return {"sent": g["sent"], "received": s["received"], "lost": max(g["sent"] - s["received"], 0),
            "late": s["late"], "p50_us": s["lat_p50_ns"] / 1e3, "p99_us": s["lat_p99_ns"] / 1e3,
            "p999_us": s["lat_p999_ns"] / 1e3, "gen_pps": g["pps"], "churn": c,
            "learned": grew("flows_learned") if rows1 else None,
            "expired": grew("flows_expired") if rows1 else None,
            "drops": {k: grew(k) for k in drops(rows1) if grew(k) > 0},
            "flows_after": sum(r["flows"] for r in rows1) if rows1 else None,
            "worker_cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "load_cpu": load_cpu}


def churn_phase(kind: str, workers: int, flows: int, cfg: Config, tools: dict[str, Path], pin: bool,
                log) -> ChurnResult:
    """The relay under new sessions: `flows` established flows per worker carry the latency test's
    load while new 5-tuples send authenticated Binding Requests at each rate in cfg.churn_rates
    (per second per worker), each after a no-churn run of the same relay and flows. The relay
    runs with the default idle timeout (CHURN_IDLE_TIMEOUT): the sessions of the first rates
    depart and expire during the later ones; its tables hold every new session of the phase
    and the established flows (sizing for the table itself is in the README).
    The C reference (kind "ref") takes the same load as a control: it learns any source, so
    what its established flows' p99 does under churn is the load side's doing (on 2 CPUs the
    churn generator's socket per session shares a CPU with the generator and the sink)."""
    res = ChurnResult(kind, workers, flows)
    idle, dur = CHURN_IDLE_TIMEOUT, cfg.churn_duration
    new_sessions = int(sum(cfg.churn_rates) * dur)
    fwd = (PythonRelayForwarder(workers, flows=flows + new_sessions, idle_timeout=idle, hit_path=cfg.hit_path) if kind == "relay"
           else CReferenceForwarder(workers, tools=tools, flows=flows + new_sessions))
    load_cpus, worker_cpus = placement(workers, pin)
    load = Load(tools, flows=flows * workers, size=cfg.size, cpus=load_cpus, host=HOST, source=cfg.source)
    ports = free_ports()
    files: list[str] = []
    try:
        start_and_pin(fwd, ports, worker_cpus)
        # Every request is built (fresh tokens) before the established flows are learned: built
        # between the runs it would take seconds, and established flows idle out after 5.
        t0 = time.monotonic()
        plan = cfg.churn_source  # each rate's tuples follow the last's: none is reused in this relay
        churns = []
        for rate in cfg.churn_rates:
            n = int(rate * workers * dur)
            # (the C reference takes anything: datagrams of a Binding Request's size)
            files.append(loadlib.write_preambles(fwd.preambles(n) or [os.urandom(100) for _ in range(n)]))
            churns.append((files[-1], plan, rate * workers))
            plan = plan.after(n)
        res.build = {"requests": sum(int(r * workers * dur) for r in cfg.churn_rates),
                     "build_s": round(time.monotonic() - t0, 2)}
        log(f"  churn, {fwd.label} x{workers}: {res.build['requests']:,} new-session datagrams built in "
            f"{res.build['build_s']} s; learning {load.flows:,} established flows...")
        res.learn = learn(fwd, load, ports)
        for rate, churn in zip(cfg.churn_rates, churns):
            base = established_run(fwd, load, ports, cfg.latency_rate, dur)
            run = established_run(fwd, load, ports, cfg.latency_rate, dur, churn)
            run.update(rate=rate, base_p99_us=base["p99_us"], base_lost=base["lost"] + base["late"],
                       base_cpu_s=base["worker_cpu_s"], base=base)
            run["p99_ratio"] = _ratio(run["p99_us"], base["p99_us"])
            # the workers' CPU beyond what the same established load took without churn
            extra = run["worker_cpu_s"] - base["worker_cpu_s"] * run["wall_s"] / base["wall_s"]
            learned = run["learned"] or run["churn"]["sent"]  # (the C reference learns every one)
            run["cpu_per_learned_us"] = round(extra / learned * 1e6, 1) if learned else None
            res.runs.append(run)
            log(f"    churn {rate:,}/s/worker: sent {run['churn']['sent']:,} ({run['churn']['rate']:,.0f}/s), "
                f"learned {run['learned']}, established p99 {run['p99_us']:.1f} us (no churn "
                f"{base['p99_us']:.1f}), lost {run['lost']}, late {run['late']}, drops {run['drops'] or 'none'}")
    except Exception as e:  # noqa: BLE001 - reported, the rest of the report still prints
        res.status, res.message = "error", (str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}")
        log(f"  churn, {fwd.label} x{workers}: ERROR: {res.message}")
    finally:
        fwd.stop()
        for f in files:
            os.unlink(f)
    return res


# =========================================================================== report

def _find(results: list[VariantResult], kind: str, workers: int, flows: int) -> VariantResult | None:
    for r in results:
        if r.kind == kind and r.workers == workers and r.flows == flows and r.status == "ok":
            return r
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


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


def report(results: list[VariantResult], churn: list[ChurnResult] = ()) -> tuple[str, list[dict]]:
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
        dp, dpc = r.drain["pps"], r.drain["pps_per_core"]
        pp, ppc = r.paced["max_pps"], r.paced["max_pps_per_core"]
        held = r.flow_check.get("held")
        rows.append((
            f"{r.flows:,}", r.label, str(r.workers),
            _fmt(dp) + ("" if r.drain["all_valid"] else "!") + noisy(r.drain), _fmt(dpc),
            _fmt(_ratio(dpc, ref.drain["pps_per_core"] if ref else None), ".2f", "x"),
            _fmt(_ratio(dp, one.drain["pps"] if one else None), ".2f", "x"),
            _fmt(pp) + ("*" if r.paced["load_bound"] else "") + noisy(r.paced), _fmt(ppc),
            _fmt(_ratio(ppc, ref.paced["max_pps_per_core"] if ref else None), ".2f", "x"),
            _fmt(r.latency["p50_us"], ".1f"), _fmt(r.latency["p99_us"], ".1f") + noisy(r.latency),
            _fmt(_ratio(r.latency["p99_us"], ref.latency["p99_us"] if ref else None), ".2f", "x"),
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
                    _ratio(get(rel1, "drain", "pps_per_core"), get(ref1, "drain", "pps_per_core")),
                    ">=", TARGET_PER_CORE, parts("drain", rel1, ref1))
        bound_by_load = [x.label for x in (ref1, rel1) if x and x.paced["load_bound"]]
        targets.add(f"{at} 1 worker, paced max pps per core vs reference",
                    _ratio(get(rel1, "paced", "max_pps_per_core"), get(ref1, "paced", "max_pps_per_core")),
                    ">=", TARGET_PER_CORE, parts("paced", rel1, ref1),
                    ["load-bound: the generator limited " + " and ".join(bound_by_load)] if bound_by_load else [])
        targets.add(f"{at} 2 workers vs 1 worker, drain pps",
                    _ratio(get(rel2, "drain", "pps"), get(rel1, "drain", "pps")),
                    ">=", TARGET_SCALING, parts("drain", rel2, rel1))
        targets.add(f"{at} p99 latency at 20k pps vs reference (1 worker)",
                    _ratio(get(rel1, "latency", "p99_us"), get(ref1, "latency", "p99_us")),
                    "<=", TARGET_P99, parts("latency", rel1, ref1))
    if churn:
        lines += churn_table(churn, targets)
    lines += targets.lines()
    return "\n".join(lines), list(targets)


def churn_table(churn: list[ChurnResult], targets: Targets) -> list[str]:
    """The churn phase's table; adds its targets."""
    head = ("forwarder", "wk", "new/s/wk", "sent/s", "learned", "expired", "p50 us", "p99 us", "p99.9 us",
            "no-churn p99", "ratio", "lost", "late (no churn)", "worker CPU", "CPU/new flow", "load CPU",
            "drops that grew")
    rows = []
    control = {(c.workers, r["rate"]): r["p99_ratio"] for c in churn if c.kind == "ref" for r in c.runs}
    for c in churn:
        label = "C reference" if c.kind == "ref" else "rtcrelay relay"
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
                 f"{CHURN_IDLE_TIMEOUT:g} s; no-churn p99: the same run right before, without the new sessions"]
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


# =========================================================================== main

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
    ap.add_argument("--churn-duration", type=float, help="seconds per churn rate (default 10, --quick 2)")
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
    ap.add_argument("--hit-path", choices=("auto", "c", "python"),
                    help="the relay's hit path (relay/hit_path.py; default auto: C when it was built)")
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
    if args.churn_duration:
        cfg.churn_duration = args.churn_duration
    if args.source:
        cfg.source = args.source
    if args.size:
        cfg.size = args.size
    if args.drain_count:
        cfg.drain_count = args.drain_count
    if args.retries is not None:
        cfg.noise_retries = args.retries
    if args.hit_path:
        cfg.hit_path = args.hit_path
    kinds = [k.strip() for k in args.forwarders.split(",") if k.strip()]
    workers = [int(w) for w in args.workers.split(",")]
    for k in kinds:
        if k not in FORWARDERS:
            ap.error(f"unknown forwarder {k!r} (choose from {', '.join(FORWARDERS)})")
    if not cfg.flows or min(cfg.flows) < 1 or max(cfg.flows) * max(workers) > 1 << 20:
        ap.error("--flows: 1 or more per worker, at most 2^20 in all")

    wait_quiet = args.wait_quiet if args.wait_quiet is not None else (0.0 if args.quick else 30.0)
    loadlib.install_signal_handlers()

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        tools = loadlib.build()
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    log(f"rtcrelay relay benchmark: {platform.node()} {platform.release()}, CPUs {cpus}, "
        f"{'root' if os.geteuid() == 0 else 'not root (receive buffers capped by net.core.rmem_max)'}; "
        f"{', '.join(f'{n:,}' for n in cfg.flows)} flows PER WORKER (x workers in all) from {cfg.source} on, "
        f"{cfg.size} B payload, drain {cfg.drain_count:,} x{cfg.drain_reps}, {'quick' if args.quick else 'full'} run; "
        f"one generator process holds up to {loadlib.flows_per_process():,} flows")
    if os.geteuid() != 0:
        # without CAP_NET_ADMIN receive buffers stop at net.core.rmem_max (doubled by the kernel);
        # a loopback datagram of this size takes ~1 KB of it
        fit = int(loadlib.rmem_max() * 2 * 0.8 / 1000)
        if fit < cfg.drain_count:
            log(f"note: not root: drain count capped at {fit:,} (net.core.rmem_max = {loadlib.rmem_max():,}); "
                f"run as root or raise rmem_max for {cfg.drain_count:,}")
            cfg.drain_count = max(fit, 1000)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    results: list[VariantResult] = []
    t0 = time.monotonic()
    # At each flow and worker count the forwarders take turns, in the reverse order every other
    # round (ref, relay, relay, ref): the machine drifts by ~10% over minutes, and this way a
    # drift hits both alike. The rounds are pooled per forwarder.
    for n in cfg.flows:
        for w in workers:
            by_kind: dict[str, list[VariantResult]] = {k: [] for k in kinds}
            for r in range(rounds):
                log(f"{n:,} flows per worker, {w} worker(s)" + (f", round {r + 1}/{rounds}" if rounds > 1 else ""))
                for k in (kinds if r % 2 == 0 else kinds[::-1]):
                    fwd = make_forwarder(k, w, n, tools, cfg.hit_path)
                    by_kind[k].append(run_variant(fwd, cfg, tools, not args.no_pin, log, wait_quiet))
            results.extend(merge_rounds(by_kind[k]) for k in kinds)
    churn: list[ChurnResult] = []
    if "relay" in kinds and cfg.churn_rates:
        established = max((n for n in cfg.flows if n <= CHURN_FLOWS), default=CHURN_FLOWS)
        log(f"churn phase: {established:,} established flows per worker, "
            f"{', '.join(f'{r:,}' for r in cfg.churn_rates)} new sessions/s per worker, {cfg.churn_duration:g} s each")
        churn = [churn_phase(k, w, established, cfg, tools, not args.no_pin, log)
                 for w in workers for k in kinds]
    table, targets = report(results, churn)
    log("")
    log(table)
    log(f"({time.monotonic() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": asdict(cfg), "rounds": rounds,
                                               "results": [asdict(r) for r in results],
                                               "churn": [asdict(c) for c in churn],
                                               "targets": targets}, indent=2))
    if any(r.status == "error" for r in [*results, *churn]):
        return 1
    if args.check and any(t["verdict"] != "PASS" for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
