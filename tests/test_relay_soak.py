"""The relay soak (issue 15, `--long` only, ~12 minutes): 10 minutes at 50,000 flows per worker
(2 workers) with new sessions arriving and departing, through the real relay and the
benchmark's C load tools on loopback; and (~2 minutes) a worker killed at that scale.

Ten one-minute chunks of 20,000 pps over the established flows (each sends every ~5 s, well
inside the 30 s idle timeout) while authenticated Binding Requests from new 5-tuples arrive at
CHURN_PER_WORKER per second per worker; their flows are never used again and expire. Asserted:
no worker crashed (same pids, alive), no established datagram lost in any chunk (a lost flow
would drop all of its datagrams: the load sends no preambles after learning), no internal
error, the new sessions were learned and expired; the workers' RSS slope over the steady
chunks stays small (a leak of frozen objects would show). Figures are printed
(``pytest -s``) as ``FIGURES``: docs/RELIABILITY.md quotes them.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import ClassVar

import pytest

from bench import ctools, udpload
from bench.harness.procinfo import proc_state, rss_bytes
from bench.relay_churn import established_run
from bench.relay_forwarders import HOST, PythonRelayForwarder
from bench.relay_runs import free_ports, fresh_counters, learn, start_and_pin

WORKERS = 2
FLOWS_PER_WORKER = 50_000
CHURN_PER_WORKER = 200  # new sessions per second per worker: ~6k live churn flows each at 30 s idle
RATE = 20_000
CHUNK_S = 60.0
CHUNKS = 10
STEADY_FROM = 3  # chunks before this one fill the table with churn flows up to its steady state
RSS_SLOPE_MAX_MIB_PER_MIN = 1.0

pytestmark = [pytest.mark.long, pytest.mark.timeout(1800)]


def test_ten_minutes_at_50k_flows_per_worker_with_churn() -> None:
    tools = ctools.build()
    churn_flows = int(CHURN_PER_WORKER * 40)  # idle timeout + a sweep pass, with room
    fwd = PythonRelayForwarder(WORKERS, flows=FLOWS_PER_WORKER + churn_flows, idle_timeout=30.0)
    load = udpload.Load(tools, flows=FLOWS_PER_WORKER * WORKERS, size=140, host=HOST,
                        source=udpload.SourcePlan("127.60.0.1", 2000))
    ports = free_ports()
    files: list[str] = []
    try:
        start_and_pin(fwd, ports, None)
        pids = fwd.pids()
        plan = udpload.SourcePlan("127.80.0.1", 2000)
        per_chunk = int(CHURN_PER_WORKER * WORKERS * CHUNK_S)
        learned = learn(fwd, load, ports)
        assert learned["known"] == FLOWS_PER_WORKER * WORKERS
        t0 = time.monotonic()
        chunks, rss = [], []
        for _ in range(CHUNKS):
            # each chunk's requests built just before it: a token older than token_max_age
            # (300 s) starts no session (~0.4 s for 24,000)
            files.append(udpload.write_preambles(fwd.preambles(per_chunk) or []))
            churn = (files[-1], plan, CHURN_PER_WORKER * WORKERS)
            plan = plan.after(per_chunk)
            run = established_run(fwd, load, ports, RATE, CHUNK_S, churn)
            rows = fresh_counters(fwd) or []
            rss.append([round(rss_bytes(p) / 2**20, 1) for p in pids])
            chunks.append({k: run[k] for k in ("sent", "lost", "late", "p50_us", "p99_us", "learned", "expired",
                                               "flows_after", "drops")})
            print(f"chunk {len(chunks)}: {chunks[-1]}; worker RSS {rss[-1]} MiB", flush=True)
            assert all(proc_state(p) not in ("?", "Z") for p in pids), "a worker died"
            assert fwd.pids() == pids, "a worker was replaced"
            assert run["lost"] == 0, f"established datagrams lost: {run}"
            assert sum(r["internal_errors"] for r in rows) == 0
        minutes = (time.monotonic() - t0) / 60
    finally:
        fwd.stop()
        for f in files:
            os.unlink(f)

    steady = rss[STEADY_FROM:]
    slopes = [(steady[-1][w] - steady[0][w]) / ((len(steady) - 1) * CHUNK_S / 60) for w in range(WORKERS)]
    learned_total = sum(c["learned"] for c in chunks)
    print("\nFIGURES test_ten_minutes_at_50k_flows_per_worker_with_churn: " + json.dumps({
        "minutes": round(minutes, 1), "established_flows": FLOWS_PER_WORKER * WORKERS,
        "sent": sum(c["sent"] for c in chunks), "lost": sum(c["lost"] for c in chunks),
        "late": sum(c["late"] for c in chunks), "p99_us_per_chunk": [round(c["p99_us"]) for c in chunks],
        "new_sessions_learned": learned_total, "expired": sum(c["expired"] for c in chunks),
        "rss_mib_per_chunk": rss, "rss_slope_mib_per_min": [round(s, 2) for s in slopes],
        "drops": [c["drops"] for c in chunks]}, sort_keys=True))
    assert learned_total == CHUNKS * int(CHURN_PER_WORKER * WORKERS * CHUNK_S)
    assert sum(c["expired"] for c in chunks) > learned_total // 2  # departed sessions went
    assert max(slopes) < RSS_SLOPE_MAX_MIB_PER_MIN, f"worker RSS grows: {slopes} MiB/min"


class StandbyRelay(PythonRelayForwarder):
    settings: ClassVar[dict[str, object]] = {"standby_workers": True}  # as deployed: a warm standby per worker


def test_a_worker_killed_at_50k_flows_under_churn_loses_no_established_datagram() -> None:
    """Relay failover at scale: 2 workers x 50,000 flows at 20k pps while 200 new sessions/s
    per worker arrive; worker 0 is killed (SIGKILL) 10 s into a 30 s run. Its warm standby takes
    the same sockets and partition and builds its 50,000 entries meanwhile (~1-3 s on this VM):
    the datagrams wait in the socket (the bench's 256 MiB buffer; size `socket_buffer` for the
    rate x that time, README), none is lost, every established flow is still forwarded after,
    and the worker was replaced once. The datagrams later than 10 ms are printed."""
    tools = ctools.build()
    per_run = int(CHURN_PER_WORKER * WORKERS * 30.0)
    fwd = StandbyRelay(WORKERS, flows=FLOWS_PER_WORKER + per_run, idle_timeout=30.0)
    load = udpload.Load(tools, flows=FLOWS_PER_WORKER * WORKERS, size=140, host=HOST,
                        source=udpload.SourcePlan("127.61.0.1", 2000))
    ports = free_ports()
    churn_file = None
    try:
        start_and_pin(fwd, ports, None)
        pids = fwd.pids()
        assert learn(fwd, load, ports)["known"] == FLOWS_PER_WORKER * WORKERS
        churn_file = udpload.write_preambles(fwd.preambles(per_run) or [])
        killed: list[float] = []

        def kill() -> None:
            time.sleep(10.0)
            os.kill(pids[0], signal.SIGKILL)
            killed.append(time.monotonic())

        killer = threading.Thread(target=kill, daemon=True)
        killer.start()
        run = established_run(fwd, load, ports, RATE, 30.0,
                              (churn_file, udpload.SourcePlan("127.81.0.1", 2000), CHURN_PER_WORKER * WORKERS))
        killer.join()
        rows = fresh_counters(fwd) or []
        after = established_run(fwd, load, ports, RATE, 6.0)  # every established flow, once more
        figures = {"sent": run["sent"], "lost": run["lost"], "late": run["late"], "p99_us": round(run["p99_us"]),
                   "p999_us": round(run["p999_us"]), "after_sent": after["sent"], "after_lost": after["lost"], "drops": run["drops"]}
        print("\nFIGURES test_a_worker_killed_at_50k_flows_under_churn: " + json.dumps(figures, sort_keys=True))
        assert killed, "the worker was not killed"
        assert [r["pid"] for r in rows][1] == pids[1] and rows[0]["pid"] not in (0, pids[0]), "replaced once"
        assert run["lost"] == 0, f"established datagrams lost across the kill: {figures}"
        assert after["lost"] == 0, f"established flows lost after the kill: {figures}"
        assert sum(r["internal_errors"] for r in rows) == 0
    finally:
        fwd.stop()
        if churn_file:
            os.unlink(churn_file)
