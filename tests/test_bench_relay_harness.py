"""The relay benchmark harness (bench/relay*.py, bench/udpload.py, bench/harness/, bench/c/*.c) works.

The C tools build with gcc; the C reference forwarder writes exactly the relay's 24-byte tunnel
header, and forwards a Data frame back to its flow's source by handle; generator -> forwarder ->
sink delivers every packet of a paced low-rate run with latency figures; the cpu phase's runs
deliver both ways (tgen learns the flows' prefixes through the forwarder) and its report has
the kernel path's targets; the drain test (SIGSTOP, queue, SIGCONT) measures a rate; the source plan
gives every run the same 5-tuples (the relay learns its flows once and keeps exactly those),
a generator beyond its open files limit raises it or is split over processes, churn sends
from new tuples the relay learns, a tool's failure carries its stderr; and the command line's
--quick run completes. Loopback only (each test its own 127.x.0.0/16 of source addresses),
every step bounded. gcc is required: without it these tests fail (they never skip).
"""
from __future__ import annotations

import json
import resource
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# bench/ is a namespace package: its modules cannot shadow the `relay` package.
from bench import ctools, relay_churn, relay_cpu, relay_forwarders, relay_pairs, relay_report, relay_runs, udpload  # noqa: E402
from bench.harness import processes, procinfo  # noqa: E402
from bench.harness.errors import BenchError  # noqa: E402
from bench.harness.ports import free_port  # noqa: E402


@pytest.fixture(scope="module")
def tools():
    if shutil.which("gcc") is None:
        pytest.fail("gcc is not installed: the relay benchmark builds its C tools with gcc "
                    "(apt-get install gcc)", pytrace=False)
    try:
        return ctools.build()
    except BenchError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(autouse=True)
def _reap():
    yield
    processes.stop_all()  # only the process groups this harness started


@pytest.mark.timeout(120)
def test_c_tools_build(tools):
    built = ctools.build(force=True)
    for name in ("fwd_ref", "loadgen"):
        assert built[name].is_file() and built[name].stat().st_mode & 0o111, name
        assert built[name].parent == BENCH / ".build"


@pytest.mark.timeout(30)
def test_reference_forwarder_writes_the_relay_tunnel_header(tools):
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind(("127.0.0.1", 0))
    target.settimeout(5)
    fwd = relay_forwarders.CReferenceForwarder(1, tools=tools, rcvbuf=4 << 20)
    listen = free_port()
    fwd.start(listen, target.getsockname())
    try:
        assert len(fwd.pids()) == 1
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        sent = [(a, b"\x80hello rtp"), (a, b"x" * 300), (b, b"")]
        for sock, payload in sent:
            sock.sendto(payload, ("127.0.0.1", listen))
        got = [target.recv(4096) for _ in sent]
        handles = []
        for (sock, payload), frame in zip(sent, got):
            port = sock.getsockname()[1]
            head = frame[:24]
            assert len(frame) == 24 + len(payload)
            assert head[:4] == b"\x01\x95\x01\xcf"
            assert head[12:18] == b"\xc4\x04" + socket.inet_aton("127.0.0.1")
            assert head[18:21] == b"\xcd" + port.to_bytes(2, "big")
            assert head[21:24] == b"\xc5" + len(payload).to_bytes(2, "big")
            assert frame[24:] == payload
            # a version byte, then the MessagePack array [1, handle, ip, port, payload]
            kind, handle, ip, cport, data = msgspec.msgpack.decode(frame[1:])
            assert (kind, ip, cport, data) == (1, socket.inet_aton("127.0.0.1"), port, payload)
            assert handle == int.from_bytes(head[4:12], "big")
            handles.append(handle)
        assert handles[0] == handles[1] != handles[2]  # fixed per source address
    finally:
        fwd.stop()
        target.close()
    assert fwd.pids() and procinfo.proc_state(fwd.pids()[0]) in ("?", "Z")


@pytest.mark.timeout(30)
def test_reference_forwarder_returns_data_frames_by_handle(tools):
    """-R: a frame from the target whose handle names a flow, with that flow's address and the
    payload's length, goes to that flow's source without its header, from the listen address;
    anything else is dropped."""
    target = _receiver()
    fwd = relay_forwarders.CReferenceForwarder(1, tools=tools, rcvbuf=4 << 20)
    listen = free_port()
    fwd.start(listen, target.getsockname())
    clients = [_receiver(), _receiver()]
    try:
        frames = []
        for c in clients:
            c.sendto(b"hello", ("127.0.0.1", listen))
            frames.append(target.recvfrom(4096))
        (first, relay_side), (second, _) = frames
        answer = b"\x80 answer rtp"
        back = first[:22] + len(answer).to_bytes(2, "big") + answer
        target.sendto(second[:12] + back[12:], relay_side)  # another flow's handle: dropped
        target.sendto(back[:22] + (len(answer) + 1).to_bytes(2, "big") + answer, relay_side)  # wrong length
        target.sendto(back, relay_side)
        got, sender = clients[0].recvfrom(4096)
        assert (got, sender) == (answer, ("127.0.0.1", listen))
        clients[1].settimeout(0.3)
        with pytest.raises(TimeoutError):
            clients[1].recvfrom(4096)
        clients[0].settimeout(0.3)
        with pytest.raises(TimeoutError):
            clients[0].recvfrom(4096)  # only the good one came
    finally:
        fwd.stop()
        for sock in (target, *clients):
            sock.close()


@pytest.mark.timeout(60)
def test_cpu_runs_deliver_both_ways_through_the_reference(tools):
    """The cpu phase's runs: client -> transceiver, and tgen's Data frames (each flow's prefix,
    learned through the forwarder) back to the clients; the baseline without a forwarder; the
    CPU of the window, less the baseline's, per datagram."""
    fwd, load, ports = _variant(tools, flows=20)
    load.source = udpload.SourcePlan("127.40.0.1", 2000)
    try:
        runs = {way: relay_cpu.cpu_run(load, ports.listen, ports.sink, 4000, 0.2, 0.05, way) for way in relay_cpu.WAYS}
    finally:
        fwd.stop()
    base_port = free_port()
    base = {way: relay_cpu.cpu_run(load, base_port, base_port, 4000, 0.2, 0.05, way, load_only=True)
            for way in relay_cpu.WAYS}
    for way in relay_cpu.WAYS:
        r, b = runs[way], base[way]
        assert r["delivered"] == r["sent"] >= 1000 and b["delivered"] == b["sent"] >= 1000, (r, b)
        assert r["busy_ns"] > 0 and 0.15 < r["wall_s"] < 0.5 and r["sent_w"] > 0, r
        per = relay_cpu.per_datagram(r, {"busy_ns": b["busy_ns"] / b["sent_w"]})
        assert per is not None and per == pytest.approx((r["busy_ns"] - b["busy_ns"] / b["sent_w"] * r["sent_w"])
                                                        / r["delivered_w"])
    assert relay_cpu.summarise([dict(runs[w], ns=100.0, stat_ns=None) for w in relay_cpu.WAYS], [4000])["4000"][
        "t2c_ns"] == 100.0


def _variant(tools, workers=1, flows=8):
    load = udpload.Load(tools, flows=flows, size=140, cpus=None)
    listen = free_port()
    ports = relay_runs.Ports(listen, free_port(avoid=(listen,)))
    fwd = relay_forwarders.CReferenceForwarder(workers, tools=tools, rcvbuf=32 << 20)
    fwd.start(ports.listen, ("127.0.0.1", ports.sink))
    return fwd, load, ports


@pytest.mark.timeout(60)
def test_generator_forwarder_sink_deliver_with_latency(tools):
    fwd, load, ports = _variant(tools)
    try:
        r = relay_runs.paced_run(fwd, load, ports, 2000, 0.5, batch=1, check_header=True)
    finally:
        fwd.stop()
    s = r["sink"]
    assert r["sent"] == 1000 and r["gen"]["send_errors"] == 0
    assert s["received"] >= 0.99 * r["sent"], s
    assert s["hdr_ok"] == s["received"] and s["hdr_bad"] == 0, s
    assert s["hdr_len_min"] == s["hdr_len_max"] == 24
    assert s["flows_seen"] == 8 and s["other"] == 0
    assert s["lost_seq"] == r["sent"] - s["received"]
    assert 0 < s["lat_min_ns"] <= s["lat_p50_ns"] <= s["lat_p99_ns"] <= s["lat_p999_ns"] <= s["lat_max_ns"]
    assert s["lat_p50_ns"] < 50_000_000, s  # loopback: far below 50 ms
    assert r["ok"], r


@pytest.mark.timeout(60)
def test_preambles_only_run_then_runs_without_them(tools):
    """-n 0 with a preamble file sends the preambles alone (learning); measured runs send none."""
    fwd, load, ports = _variant(tools, flows=4)
    pre = udpload.write_preambles([b"\x00\x01stun-ish %d" % i for i in range(4)])
    try:
        sink = load.sink(ports.sink, idle_ms=300, max_s=10)
        g = load.gen(ports.listen, count=0, preamble_file=pre, preamble_rate=1000, preamble_wait_ms=0).result(10)
        time.sleep(0.3)
        processes.stop(sink)
        r = relay_runs.paced_run(fwd, load, ports, 1000, 0.2, batch=1)
    finally:
        fwd.stop()
        Path(pre).unlink()
    assert g["preambles"] == 4 and g["sent"] == 0
    assert r["gen"]["preambles"] == 0
    assert r["sink"]["other"] == 0 and r["sink"]["received"] == r["sent"] == 200


def _receiver(ip: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # bursts of a few hundred datagrams
    s.bind((ip, 0))
    s.settimeout(5)
    return s


def test_source_plan_addresses():
    plan = udpload.SourcePlan("127.30.0.1", 32766)  # 2 ports per IP
    assert [plan.address(i) for i in range(5)] == [
        ("127.30.0.1", 32766), ("127.30.0.1", 32767), ("127.30.0.2", 32766), ("127.30.0.2", 32767),
        ("127.30.0.3", 32766)]
    assert plan.after(3) == udpload.SourcePlan("127.30.0.3", 32766)  # the next unused IP
    assert udpload.SourcePlan.parse("127.30.0.1:2000").per_ip == 30768
    assert str(relay_runs.Config().churn_source) == "127.2.0.1:2000"
    for bad in (("10.0.0.1", 2000), ("127.0.0.1", 32768)):
        with pytest.raises(BenchError):
            udpload.SourcePlan(*bad)


@pytest.mark.timeout(30)
def test_generator_sends_from_the_source_plan_the_same_tuples_each_run(tools):
    """Flow i's datagrams come from plan address i (C and Python agree), in every run."""
    rx = _receiver()
    load = udpload.Load(tools, flows=5, size=140, source=udpload.SourcePlan("127.31.0.1", 32765))
    seen = []
    for _ in range(2):
        load.gen(rx.getsockname()[1], count=5, batch=1).result(10)
        got = {}
        for _ in range(5):
            data, addr = rx.recvfrom(4096)
            got[struct.unpack_from("<I", data, 4)[0]] = addr
        seen.append(got)
    rx.close()
    assert seen[0] == seen[1] == {i: load.source.address(i) for i in range(5)}


@pytest.mark.timeout(30)
def test_generator_raises_its_open_files_limit(tools):
    """More flows than the soft RLIMIT_NOFILE it starts with: it raises the limit (to the hard one)."""
    rx = _receiver()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    argv = [str(tools["loadgen"]), "gen", "-t", f"127.0.0.1:{rx.getsockname()[1]}", "-f", "300", "-n", "300",
            "-b", "1", "-S", "127.32.0.1:2000", "-T", "10"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=20,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard)))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["sent"] == 300
    assert len({rx.recvfrom(4096)[1] for _ in range(300)}) == 300
    rx.close()
    # a limit it cannot raise: a message naming the numbers
    r = subprocess.run(argv, capture_output=True, text=True, timeout=20,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100)))
    if r.returncode == 0:  # CAP_SYS_RESOURCE: it raised the hard limit too
        return
    assert r.returncode == 2 and "need 364 open files" in r.stderr and "hard limit 100" in r.stderr, r.stderr


@pytest.mark.timeout(60)
def test_generator_split_over_processes_sends_every_flow(tools):
    """Beyond one process's open files: shards with their share of flows, count and rate."""
    fwd, _, ports = _variant(tools)
    load = udpload.Load(tools, flows=300, size=140, source=udpload.SourcePlan("127.33.0.1", 2000),
                        max_flows_per_process=100)
    try:
        # (each shard rounds its 1,001.33 pps x 0.5 s up: 1,503 in all, not 1,502; the sink waits for all)
        r = relay_runs.paced_run(fwd, load, ports, 3004, 0.5, batch=1)
        d = relay_runs.drain(fwd, load, ports, 3000)
    finally:
        fwd.stop()
    assert r["gen"]["shards"] == 3 and r["gen"]["flows"] == 300 and r["sent"] == 1503 == load.paced_count(3004, 0.5)
    assert r["gen"]["cpu_s"] > 0 and r["sink"]["cpu_s"] > 0  # summed over the shards; the sink's
    assert r["sink"]["flows_seen"] == 300 and r["received"] == 1503, r["sink"]
    assert d["sent"] == d["received"] == 3000


@pytest.mark.timeout(30)
def test_a_generator_failure_carries_its_stderr(tools):
    plan = udpload.SourcePlan("127.34.0.1", 2000)
    held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    held.bind(plan.address(2))
    rx = _receiver()
    try:
        gen = udpload.Load(tools, flows=4, source=plan).gen(rx.getsockname()[1], count=4)
        with pytest.raises(BenchError) as e:
            gen.result(10)
    finally:
        held.close()
        rx.close()
    assert "127.34.0.1:2002" in str(e.value) and "in use" in str(e.value), e.value


@pytest.mark.timeout(30)
def test_churn_sends_each_record_from_a_new_tuple(tools):
    rx = _receiver()
    plan = udpload.SourcePlan("127.35.0.1", 32760)  # 8 ports per IP
    pre = udpload.write_preambles([b"rec%d" % i for i in range(20)])
    try:
        c = processes.json_summary(udpload.Load(tools).churn(rx.getsockname()[1], pre, plan, rate=40, duration=0.25),
                            timeout=10, what="loadgen churn")
        got = dict(rx.recvfrom(4096) for _ in range(c["sent"]))
    finally:
        Path(pre).unlink()
        rx.close()
    assert c["planned"] == c["sent"] == 10 and c["errors"] == 0  # 40/s for 0.25 s: 10 of the 20 records
    assert 0.2 < c["elapsed_ns"] / 1e9 < 1 and 30 < c["rate"] < 50  # the 10th at 9/40 s
    assert got == {b"rec%d" % i: plan.address(i) for i in range(10)}


@pytest.mark.timeout(90)
def test_relay_learns_its_flows_once_and_churn_adds_new_ones(tools):
    """The relay learns the load's flows once; later runs (no preambles, same tuples) are all
    hits and add none; churn's new tuples are learned, one flow each."""
    fwd = relay_forwarders.PythonRelayForwarder(1, flows=200)
    load = udpload.Load(tools, flows=200, size=140, source=udpload.SourcePlan("127.36.0.1", 2000))
    ports = relay_runs.free_ports()
    pre = None
    fwd.start(ports.listen, ("127.0.0.1", ports.sink))
    try:
        learned = relay_runs.learn(fwd, load, ports)
        assert learned["known"] == 200
        for _ in range(2):
            r = relay_runs.paced_run(fwd, load, ports, 2000, 0.3, batch=1, check_header=True)
            assert r["received"] == r["sent"] == 600 and r["sink"]["flows_seen"] == 200, r["sink"]
        check = relay_runs.flow_check(fwd, 200)
        assert check["ok"] and check["held"] == 200 and not check["drops"], check
        rows = relay_runs.fresh_counters(fwd)
        assert sum(row["flows_learned"] for row in rows) == 200  # nothing learned after learn()
        pre = udpload.write_preambles(fwd.preambles(100))
        run = relay_churn.established_run(fwd, load, ports, 2000, 0.5,
                                    (pre, udpload.SourcePlan("127.37.0.1", 2000), 200))
    finally:
        fwd.stop()
        if pre:
            Path(pre).unlink()
    assert run["churn"]["sent"] == 100 and run["learned"] == 100 and run["flows_after"] == 300, run
    assert run["lost"] == 0 and run["sent"] == 1000 and not run["drops"], run
    assert run["worker_cpu_s"] > 0


@pytest.mark.timeout(30)
def test_learning_fails_loudly_when_flows_stay_unlearned(tools, monkeypatch):
    class Forgetful(relay_forwarders.CReferenceForwarder):
        """Says it holds one flow fewer than it was sent."""

        def preambles(self, n_flows):
            return [b"x"] * n_flows

        def counters(self):
            return [{"flows": 9, "heartbeat_ms": 0, "drop_table_full": 1}]

    monkeypatch.setattr(relay_runs, "LEARN_ATTEMPTS", 1)
    fwd = Forgetful(1, tools=tools, rcvbuf=4 << 20)
    load = udpload.Load(tools, flows=10, size=140, source=udpload.SourcePlan("127.38.0.1", 2000))
    ports = relay_runs.free_ports()
    fwd.start(ports.listen, ("127.0.0.1", ports.sink))
    try:
        with pytest.raises(BenchError, match=r"learned 9 of 10 flows .*drop_table_full"):
            relay_runs.learn(fwd, load, ports)
    finally:
        fwd.stop()


@pytest.mark.timeout(90)
def test_drain_measures_a_queued_burst(tools):
    fwd, load, ports = _variant(tools, workers=2, flows=16)
    try:
        d = relay_runs.drain(fwd, load, ports, 5000)
        assert all(procinfo.proc_state(p) not in ("T", "t") for p in fwd.pids())  # resumed
    finally:
        fwd.stop()
    assert d["sent"] == 5000 and d["received"] == 5000, d
    assert d["dropped_while_stopped"] == 0 and d["queued_bytes"] > 0, d
    assert d["valid"] and d["pps"] > 1000 and d["drain_s"] > 0, d
    assert d["pps_per_core"] == pytest.approx(d["pps"] / 2)


@pytest.mark.timeout(30)
def test_unimplemented_forwarder_is_reported_not_measured(tools):
    class Missing(relay_forwarders.Forwarder):
        kind, label = "relay", "missing"

        def start(self, listen_port, target):
            raise NotImplementedError("not yet")

        def pids(self):
            return []

        def stop(self):
            pass

    res = relay_runs.run_variant(Missing(1), relay_runs.Config.quick(), tools, pin=False, log=lambda _m: None)
    assert res.status == "not measured" and "not yet" in res.message
    table, targets = relay_report.report([res])
    assert {t["verdict"] for t in targets} == {"NOT MEASURED"}
    assert "NOT MEASURED" in table


@pytest.mark.timeout(240)
def test_quick_command_line_run(tools, tmp_path):
    """Both forwarders at the quick flow counts, then the churn phase: the table has a row per
    flow count and forwarder, the relay still held exactly its flows, churn has its line."""
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(BENCH / "relay.py"), "--quick", "--workers", "1",
                        "--source", "127.39.0.1:2000", "--json", str(out)],
                       capture_output=True, text=True, timeout=200, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    table = p.stdout[p.stdout.index("flows/wk"):]
    for flows in ("64", "1,000"):
        for label in ("C reference", "rtcrelay relay"):
            assert any(line.split()[0] == flows and label in line for line in table.splitlines()), table
    assert "churn: new sessions" in table and "churn x1, 500 new sessions/s/worker" in table
    data = json.loads(out.read_text())
    assert [(r["flows"], r["kind"]) for r in data["results"]] == [(64, "ref"), (64, "relay"), (1000, "ref"),
                                                                  (1000, "relay")]
    for res in data["results"]:
        assert res["status"] == "ok", res["message"]
        assert res["drain"]["pps"] > 0 and res["drain"]["received"] == res["drain"]["sent"]
        # the paced search ran (its result depends on how busy the machine is: not asserted)
        assert res["paced"]["runs"] and all(r["sent"] > 0 for r in res["paced"]["runs"])
        assert res["latency"]["p99_us"] > 0 and res["smoke"]["hdr_len"] == [24, 24]
        assert res["flow_check"]["ok"]
    assert data["results"][3]["flow_check"]["held"] == 1000 and data["results"][3]["memory"]["table_bytes"] > 0
    # the cpu phase (--quick: at the first flow count only): both ways, for both forwarders, each
    # run with its baseline
    for res in data["results"]:
        assert bool(res["cpu"]) == (res["flows"] == 64)
        assert all(r["base"]["ns_per_sent"] > 0 for r in res["cpu_runs"])
        for row in res["cpu"].values():
            assert row["c2t_ns"] is not None and row["t2c_ns"] is not None, row
            assert row["c2t_delivered"] == row["t2c_delivered"] == 1.0, row
    assert data["results"][1]["cpu_counters"]["kernel_to_transceiver"] == 0  # the relay's workers forwarded
    assert "cpu: CPU per forwarded datagram" in table
    ref, churn = data["churn"]  # the C reference's control run, then the relay's
    assert ref["kind"] == "ref" and ref["status"] == "ok", ref["message"]
    assert churn["kind"] == "relay" and churn["status"] == "ok" and churn["flows"] == 1000, churn["message"]
    (run,) = churn["runs"]
    assert run["rate"] == 500 and run["churn"]["sent"] == 1000 and run["learned"] == 1000, run
    # the p99 target from runs beside the reference, one pair at each flow count (--quick)
    assert [(p["flows"], p["kind"], p["status"]) for p in data["latency_pairs"]] == [(64, "relay", "ok"),
                                                                                   (1000, "relay", "ok")]
    for pair in data["latency_pairs"]:
        assert len(pair["runs"]["relay"]) == len(pair["runs"]["ref"]) == 1 and pair["ratio"] == pair["ratios"][0] > 0
    p99 = next(t for t in data["targets"] if t["target"] == "1,000 flows/worker: relay p99 latency at 20k pps vs "
               "reference (1 worker)")
    assert p99["value"] == data["latency_pairs"][1]["ratio"] and "median of 1 paired runs" in p99["note"]


def test_paired_latency_ratio_is_the_median_of_the_pairs():
    """A noisy stretch lands on both runs of a pair: each pair's ratio, then their median;
    a run that timed nothing has no ratio and no vote."""
    def runs(*p99s):
        return [{"p99_us": p} for p in p99s]

    ratios, median = relay_pairs.pair_ratios(runs(60.0, 4000.0, 90.0, None), runs(50.0, 3000.0, 30.0, 40.0))
    assert ratios == [1.2, 4000.0 / 3000.0, 3.0, None] and median == 4000.0 / 3000.0
    assert relay_pairs.pair_ratios(runs(None), runs(50.0)) == ([None], None)
    paired = relay_pairs.PairedLatency("relay", 1, 64, runs={"relay": runs(60.0, 70.0), "ref": runs(50.0, 35.0)},
                                       ratios=[1.2, 2.0], ratio=1.6)
    ref, rel = _result("ref", 1, 100_000, 90_000, 5000.0), _result("relay", 1, 100_000, 90_000, 60.0)
    _, targets = relay_report.report([ref, rel], [], [paired])
    (p99,) = [t for t in targets if "p99 latency" in t["target"]]
    assert p99["value"] == 1.6 and p99["verdict"] == "MISS"  # not the variants' 60 / 5,000 us
    assert "median of 2 paired runs' ratios (1.20, 2.00); best runs of the variants: 0.01x" in p99["note"]


def _result(kind, workers, drain_pps, paced_pps, p99_us, load_bound=False, flows=64):
    r = relay_runs.VariantResult(kind, "C reference" if kind == "ref" else "rtcrelay relay", workers, flows)
    r.smoke = {"hdr_len": [24, 24]}
    r.drain = {"pps": drain_pps, "pps_per_core": drain_pps / workers, "all_valid": True}
    r.paced = {"max_pps": paced_pps, "max_pps_per_core": paced_pps / workers, "load_bound": load_bound}
    r.latency = {"p50_us": 20.0, "p99_us": p99_us}
    return r


def test_report_ratios_and_target_verdicts():
    results = [_result("ref", 1, 300_000, 180_000, 30.0, load_bound=True),
               _result("relay", 1, 270_000, 150_000, 60.0),
               _result("ref", 2, 540_000, 170_000, 35.0),
               _result("relay", 2, 430_000, 160_000, 50.0)]
    results += [_result("ref", 1, 200_000, 100_000, 40.0, flows=10_000),
                _result("relay", 1, 100_000, 90_000, 50.0, flows=10_000)]
    results[-1].flow_check = {"expected": 10_000, "held": 9_000, "ok": False}
    results[1].housekeeping = {"steps": 900, "max_us": 150, "over_200us": 0, "cpu_ms": 40.0}
    results[3].housekeeping = {"steps": 950, "max_us": 260, "over_200us": 1, "cpu_ms": 42.0}  # the worst worker counts
    results[3].step_reference = {"steps": 1000, "max_us": 900, "over_200us": 2, "cpu_ms": 30.0}
    table, targets = relay_report.report(results)
    verdicts = {t["target"]: (round(t["value"], 3) if t["value"] else None, t["verdict"]) for t in targets}
    assert verdicts == {
        "64 flows/worker: relay 1 worker, drain pps per core vs reference": (0.9, "PASS"),
        "64 flows/worker: relay 1 worker, paced max pps per core vs reference": (0.833, "MISS"),
        "64 flows/worker: relay 2 workers vs 1 worker, drain pps": (1.593, "PASS"),
        "64 flows/worker: relay p99 latency at 20k pps vs reference (1 worker)": (2.0, "MISS"),
        "64 flows/worker: relay longest housekeeping step (us of CPU)": (260, "MISS"),
        "10,000 flows/worker: relay 1 worker, drain pps per core vs reference": (0.5, "MISS"),
        "10,000 flows/worker: relay 1 worker, paced max pps per core vs reference": (0.9, "PASS"),
        "10,000 flows/worker: relay 2 workers vs 1 worker, drain pps": (None, "NOT MEASURED"),
        "10,000 flows/worker: relay p99 latency at 20k pps vs reference (1 worker)": (1.25, "PASS"),
        "10,000 flows/worker: relay longest housekeeping step (us of CPU)": (None, "NOT MEASURED"),
    }
    assert "load-bound" in next(t["note"] for t in targets if "paced" in t["target"])
    step_note = next(t["note"] for t in targets if t["target"].startswith("64 flows/worker: relay longest"))
    assert step_note == ("x1: 0 of 900 steps over 200 us; "  # (no reference ran beside x1)
                         "x2: 1 of 950 steps over 200 us, the fixed-work reference on its CPU 2 of 1,000 (longest 900 us)")
    relay2 = next(line for line in table.splitlines() if line.startswith("64        rtcrelay relay  2"))
    assert "0.80x" in relay2 and "1.59x" in relay2  # vs ref x2 per core; scale vs relay x1
    assert "9,000 != 10,000" in table and "WARNING: 'flows held'" in table


def test_relay_forwarders_name_their_hit_path():
    """The `relay` forwarder measures the workers (hit_path c, never auto: that loads the kernel
    path as root); the eBPF ones set theirs; the eBPF forwarders skip the drain."""
    made = {k: relay_forwarders.make_forwarder(k, 1, 64, {}) for k in ("relay", "ebpf", "ebpf-egress")}
    assert [f.hit_path for f in made.values()] == ["c", "ebpf", "ebpf"]
    assert made["ebpf-egress"].settings == {"kernel_loopback": "egress"} and not made["ebpf"].settings
    assert not made["relay"].in_kernel and made["ebpf"].in_kernel
    assert relay_forwarders.make_forwarder("relay", 1, 64, {}, "python").hit_path == "python"


def _cpu_result(kind, flows, c2t, t2c, saturated=""):
    r = _result(kind, 1, 0, 100_000, 30.0, flows=flows)
    if kind != "ref":
        r.label, r.drain = f"rtcrelay relay, {kind}", {"skipped": "kernel"}
    rows = {}
    for rate, (a, b) in {"100000": (c2t[0], t2c[0]), "200000": (c2t[1], t2c[1])}.items():
        rows[rate] = {"rate": int(rate)}
        for way, ns in (("c2t", a), ("t2c", b)):
            rows[rate].update({f"{way}_ns": ns, f"{way}_stat_ns": None, f"{way}_saturated": "",
                               f"{way}_noisy": False, f"{way}_delivered": 1.0, f"{way}_p50_us": 20.0})
    rows["200000"]["c2t_saturated"] = saturated
    r.cpu = rows
    return r


def test_kernel_path_targets_and_cpu_table():
    results = [_cpu_result("ref", 64, (4000, 3000), (5000, 4000)),
               _cpu_result("ebpf", 64, (800, 2000), (1000, 1200), saturated="load CPU full"),
               _cpu_result("ref", 10_000, (4000, 3000), (5000, 4000)),
               _cpu_result("ebpf", 10_000, (1000, 1200), (2000, 1000))]
    results[1].paced["load_bound"] = True
    table, targets = relay_report.report(results)
    verdicts = {t["target"]: (round(t["value"], 3) if t["value"] else None, t["verdict"]) for t in targets
                if "ebpf" in t["target"]}
    assert verdicts == {
        # 64 flows: 200k c->t was saturated: the clean rate counts
        "64 flows/worker: rtcrelay relay, ebpf CPU per datagram, client -> transceiver, vs reference (worst unsaturated rate)":
            (0.2, "PASS"),
        "64 flows/worker: rtcrelay relay, ebpf CPU per datagram, transceiver -> client, vs reference (worst unsaturated rate)":
            (0.3, "PASS"),
        "64 flows/worker: rtcrelay relay, ebpf p99 latency at 20k pps vs reference (1 worker)": (1.0, "PASS"),
        "64 flows/worker: rtcrelay relay, ebpf paced max pps vs reference (1 worker)": (1.0, "PASS"),
        "10,000 flows/worker: rtcrelay relay, ebpf CPU per datagram, client -> transceiver, vs reference (worst unsaturated rate)":
            (0.4, "MISS"),
        "10,000 flows/worker: rtcrelay relay, ebpf CPU per datagram, transceiver -> client, vs reference (worst unsaturated rate)":
            (0.4, "MISS"),
        "10,000 flows/worker: rtcrelay relay, ebpf p99 latency at 20k pps vs reference (1 worker)": (1.0, "PASS"),
        "10,000 flows/worker: rtcrelay relay, ebpf paced max pps vs reference (1 worker)": (1.0, "PASS"),
    }
    note = next(t["note"] for t in targets if t["target"].startswith("64 flows/worker: rtcrelay relay, ebpf CPU"))
    assert "200k pps 0.67x (saturated: rtcrelay relay, ebpf; not counted)" in note
    row = next(line for line in table.splitlines() if line.startswith("64        rtcrelay relay, ebpf  1   200,000"))
    assert "2,000!" in row and "0.67x" in row
    assert "skipped" in table and "drain skipped for rtcrelay relay, ebpf: kernel" in table
    assert not any(t["target"].startswith(("64 flows/worker: relay", "10,000 flows/worker: relay")) and
                   t["verdict"] != "NOT MEASURED" for t in targets)  # no `relay` rows here


def test_churn_report_and_targets():
    def run(rate, p99, base, lost=0, late=0):
        return {"rate": rate, "churn": {"rate": rate * 0.99}, "learned": rate * 10, "expired": 5, "p50_us": 20.0,
                "p99_us": p99, "p999_us": p99 * 2, "base_p99_us": base, "p99_ratio": p99 / base, "lost": lost,
                "late": late, "base_lost": 0, "worker_cpu_s": 5.0, "wall_s": 10.0, "cpu_per_learned_us": 31.5,
                "load_cpu": 0.6,
                "drops": {"drop_miss_queue_full": 7} if lost else {}}

    c = relay_churn.ChurnResult("relay", 1, 10_000, runs=[run(500, 50.0, 40.0), run(2000, 100.0, 40.0, late=9),
                                                    run(10_000, 900.0, 40.0, 3)])
    control = relay_churn.ChurnResult("ref", 1, 10_000, runs=[run(500, 44.0, 40.0), run(2000, 120.0, 40.0)])
    table, targets = relay_report.report([], [control, c])
    verdicts = {t["target"]: t["verdict"] for t in targets}
    assert verdicts == {  # (the control has no targets; late is reported, lost is the target)
        "churn x1, 500 new sessions/s/worker: established p99 vs no churn": "PASS",
        "churn x1, 500 new sessions/s/worker: established datagrams lost": "PASS",
        "churn x1, 2,000 new sessions/s/worker: established p99 vs no churn": "MISS",
        "churn x1, 2,000 new sessions/s/worker: established datagrams lost": "PASS",
        "churn x1, 10,000 new sessions/s/worker: established datagrams lost": "MISS",
    }
    assert "the C reference's under the same load: 3.00x" in next(t["note"] for t in targets if "2,000" in t["target"])
    assert sum(line.startswith("C reference ") for line in table.splitlines()) == 2  # the control rows
    assert "10,000 established flows/worker" in table and "miss_queue_full 7" in table and "31.5 us" in table
    assert "60%" in table and "50%" in table  # load CPU, worker CPU


def test_churn_pairs_combine_into_medians_and_sums():
    """The churn phase's alternating runs: a rate's new sessions split over the pairs, the
    runs' p99s become their median (one noisy run does not move it), counts and CPU add up."""
    assert relay_churn.split_evenly(10, 3) == [4, 3, 3] and sum(relay_churn.split_evenly(20_001, 5)) == 20_001

    def run(p99, sent, churn_sent=None, drops=None):
        churn = None if churn_sent is None else {"mode": "churn", "planned": churn_sent, "attempted": churn_sent,
                                                 "sent": churn_sent, "errors": 0, "elapsed_ns": 2 * 10**9,
                                                 "cpu_s": 0.1, "rate": churn_sent / 2}
        return {"sent": sent, "received": sent - 1, "lost": 1, "late": 2, "p50_us": 10.0, "p99_us": p99,
                "p999_us": p99 * 2, "gen_pps": 20_000.0, "churn": churn, "learned": churn_sent, "expired": 3,
                "drops": drops or {}, "flows_after": 7, "worker_cpu_s": 0.5, "wall_s": 2.0, "load_cpu": 0.5}

    runs = [run(50.0, 40_000, 4000), run(9000.0, 40_000, 4000, {"drop_miss_queue_full": 2}),
            run(60.0, 40_000, 3000, {"drop_miss_queue_full": 1})]
    combined = relay_churn.combine_runs(runs)
    assert combined["p99_us"] == 60.0 and combined["p999_us"] == 120.0  # the 9 ms run is outvoted
    assert (combined["sent"], combined["lost"], combined["late"], combined["learned"]) == (120_000, 3, 6, 11_000)
    assert combined["worker_cpu_s"] == 1.5 and combined["wall_s"] == 6.0
    assert combined["drops"] == {"drop_miss_queue_full": 3}
    assert combined["churn"]["sent"] == 11_000 and combined["churn"]["rate"] == 11_000 / 6
    base = relay_churn.combine_runs([run(40.0, 40_000), run(45.0, 40_000)])
    assert base["churn"] is None and base["learned"] is None and base["p99_us"] == 42.5


@pytest.mark.timeout(30)
def test_a_forwarder_that_fails_to_start_is_an_error_not_a_crash(tools):
    class Broken(relay_forwarders.CReferenceForwarder):
        def start(self, listen_port, target):
            raise OSError("no such thing")

    res = relay_runs.run_variant(Broken(1, tools=tools), relay_runs.Config.quick(), tools, pin=False, log=lambda _m: None)
    assert res.status == "error" and "no such thing" in res.message
    table, _ = relay_report.report([res])
    assert "ERROR: start failed: OSError: no such thing" in table


def test_rounds_are_pooled_per_forwarder():
    """Two rounds of one forwarder: drain runs and latency runs pooled (median, best p99),
    the best paced round; a failed round fails the whole."""
    def round_(pps: list[float], p99s: list[float], paced: float) -> relay_runs.VariantResult:
        r = relay_runs.VariantResult("relay", "relay", 1)
        r.drain_runs = [{"pps": p, "valid": True, "noisy": False} for p in pps]
        r.latency_runs = [{"p99_us": x, "p50_us": 20.0, "noisy": False, "ok": True} for x in p99s]
        r.paced = {"max_pps": paced}
        relay_runs.summarise_drain(r)
        relay_runs.summarise_latency(r)
        return r

    first, second = round_([100, 300, 200], [50, 40, 60], 1000), round_([400, 500, 600], [45, 35, 70], 900)
    assert (first.drain["pps"], first.latency["p99_us"]) == (200, 40)
    merged = relay_runs.merge_rounds([first, second])
    assert merged.rounds == 2
    assert merged.drain["pps"] == 400  # median of the six
    assert merged.drain["runs_pps"] == [100, 300, 200, 400, 500, 600]
    assert merged.latency["p99_us"] == 35 and len(merged.latency["runs_p99_us"]) == 6
    assert merged.paced["max_pps"] == 1000
    broken = relay_runs.VariantResult("relay", "relay", 1, status="error", message="start failed")
    assert relay_runs.merge_rounds([round_([1], [1], 1), broken]) is broken


def test_a_latency_run_that_lost_everything_passes_no_target():
    """A run that timed nothing (the sink says -1) has no p99: no ratio, "not measured",
    never a negative p99 that is "below" the reference's; a run that lost datagrams yields to
    one that did not, whatever its p99."""
    r = relay_runs.VariantResult("relay", "relay", 1)
    lost = {"p99_us": None, "p50_us": None, "p999_us": None, "noisy": False, "ok": False}
    r.latency_runs = [dict(lost), dict(lost)]
    relay_runs.summarise_latency(r)
    assert r.latency["p99_us"] is None and r.latency["runs_p99_us"] == [None, None]
    assert relay_runs.ratio(r.latency["p99_us"], 40.0) is None
    assert relay_runs.ratio(-0.001, 40.0) is None
    r.latency_runs = [dict(lost), {**lost, "p99_us": 30.0, "ok": False}, {**lost, "p99_us": 90.0, "ok": True}]
    relay_runs.summarise_latency(r)
    assert r.latency["p99_us"] == 90.0 and r.latency["runs_p99_us"] == [None, 30.0, 90.0]
