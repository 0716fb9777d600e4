"""The relay benchmark harness (bench/relay.py, bench/loadlib.py, bench/c/*.c) works.

The C tools build with gcc; the C reference forwarder writes exactly the relay's 24-byte tunnel
header; generator -> forwarder -> sink delivers every packet of a paced low-rate run with
latency figures; the drain test (SIGSTOP, queue, SIGCONT) measures a rate; and the
command line's --quick run completes. Loopback only, every step bounded. gcc is required:
without it these tests fail (they never skip).
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# As bench.relay (bench/ is a namespace package): it cannot shadow the `relay` package.
from bench import relay as bench  # noqa: E402

loadlib = bench.loadlib


@pytest.fixture(scope="module")
def tools():
    if shutil.which("gcc") is None:
        pytest.fail("gcc is not installed: the relay benchmark builds its C tools with gcc "
                    "(apt-get install gcc)", pytrace=False)
    try:
        return loadlib.build()
    except loadlib.BenchError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(autouse=True)
def _reap():
    yield
    loadlib.kill_all()  # only the process groups this harness started


@pytest.mark.timeout(120)
def test_c_tools_build(tools):
    built = loadlib.build(force=True)
    for name in ("fwd_ref", "loadgen"):
        assert built[name].is_file() and built[name].stat().st_mode & 0o111, name
        assert built[name].parent == BENCH / ".build"


@pytest.mark.timeout(30)
def test_reference_forwarder_writes_the_relay_tunnel_header(tools):
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind(("127.0.0.1", 0))
    target.settimeout(5)
    fwd = bench.CReferenceForwarder(1, tools=tools, rcvbuf=4 << 20)
    listen = loadlib.free_udp_port()
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
    assert fwd.pids() and loadlib.proc_state(fwd.pids()[0]) in ("?", "Z")


def _variant(tools, workers=1, flows=8):
    load = loadlib.Load(tools, flows=flows, size=140, cpus=None)
    listen = loadlib.free_udp_port()
    ports = bench.Ports(listen, loadlib.free_udp_port(avoid=(listen,)))
    fwd = bench.CReferenceForwarder(workers, tools=tools, rcvbuf=32 << 20)
    fwd.start(ports.listen, ("127.0.0.1", ports.sink))
    return fwd, load, ports


@pytest.mark.timeout(60)
def test_generator_forwarder_sink_deliver_with_latency(tools):
    fwd, load, ports = _variant(tools)
    try:
        r = bench.paced_run(fwd, load, ports, 2000, 0.5, batch=1, check_header=True)
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
def test_preambles_are_sent_first_and_counted_apart(tools):
    class WithPreambles(bench.CReferenceForwarder):
        def preambles(self, n_flows):
            return [b"\x00\x01stun-ish %d" % i for i in range(n_flows)]

    load = loadlib.Load(tools, flows=4, size=140)
    listen = loadlib.free_udp_port()
    ports = bench.Ports(listen, loadlib.free_udp_port(avoid=(listen,)))
    fwd = WithPreambles(1, tools=tools, rcvbuf=8 << 20)
    fwd.start(ports.listen, ("127.0.0.1", ports.sink))
    try:
        r = bench.paced_run(fwd, load, ports, 1000, 0.2, batch=1)
    finally:
        fwd.stop()
    assert r["gen"]["preambles"] == 4
    assert r["sink"]["other"] == 4 and r["sink"]["received"] == r["sent"] == 200


@pytest.mark.timeout(90)
def test_drain_measures_a_queued_burst(tools):
    fwd, load, ports = _variant(tools, workers=2, flows=16)
    try:
        d = bench.drain(fwd, load, ports, 5000)
        assert all(loadlib.proc_state(p) not in ("T", "t") for p in fwd.pids())  # resumed
    finally:
        fwd.stop()
    assert d["sent"] == 5000 and d["received"] == 5000, d
    assert d["dropped_while_stopped"] == 0 and d["queued_bytes"] > 0, d
    assert d["valid"] and d["pps"] > 1000 and d["drain_s"] > 0, d
    assert d["pps_per_core"] == pytest.approx(d["pps"] / 2)


@pytest.mark.timeout(30)
def test_unimplemented_forwarder_is_reported_not_measured(tools):
    class Missing(bench.Forwarder):
        kind, label = "relay", "missing"

        def start(self, listen_port, target):
            raise NotImplementedError("not yet")

        def pids(self):
            return []

        def stop(self):
            pass

    res = bench.run_variant(Missing(1), bench.Config.quick(), tools, pin=False, log=lambda _m: None)
    assert res.status == "not measured" and "not yet" in res.message
    table, targets = bench.report([res])
    assert {t["verdict"] for t in targets} == {"NOT MEASURED"}
    assert "NOT MEASURED" in table


@pytest.mark.timeout(240)
def test_quick_command_line_run(tools, tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(BENCH / "relay.py"), "--quick", "--forwarders", "ref",
                        "--workers", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=200, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "C reference" in p.stdout and "drain pps" in p.stdout
    data = json.loads(out.read_text())
    (res,) = data["results"]
    assert res["status"] == "ok", res["message"]
    assert res["drain"]["pps"] > 0 and res["drain"]["received"] == res["drain"]["sent"]
    # the paced search ran (its result depends on how busy the machine is: not asserted)
    assert res["paced"]["runs"] and all(r["sent"] > 0 for r in res["paced"]["runs"])
    assert res["latency"]["p99_us"] > 0 and res["smoke"]["hdr_len"] == [24, 24]


def _result(kind, workers, drain_pps, paced_pps, p99_us, load_bound=False):
    r = bench.VariantResult(kind, "C reference" if kind == "ref" else "rtcrelay relay", workers)
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
    table, targets = bench.report(results)
    verdicts = {t["target"]: (round(t["value"], 3), t["verdict"]) for t in targets}
    assert verdicts == {
        "relay 1 worker, drain pps per core vs reference": (0.9, "PASS"),
        "relay 1 worker, paced max pps per core vs reference": (0.833, "MISS"),
        "relay 2 workers vs 1 worker, drain pps": (1.593, "PASS"),
        "relay p99 latency at 20k pps vs reference (1 worker)": (2.0, "MISS"),
    }
    assert "load-bound" in next(t["note"] for t in targets if "paced" in t["target"])
    relay2 = next(line for line in table.splitlines() if line.startswith("rtcrelay relay  2"))
    assert "0.80x" in relay2 and "1.59x" in relay2  # vs ref x2 per core; scale vs relay x1


@pytest.mark.timeout(30)
def test_a_forwarder_that_fails_to_start_is_an_error_not_a_crash(tools):
    class Broken(bench.CReferenceForwarder):
        def start(self, listen_port, target):
            raise OSError("no such thing")

    res = bench.run_variant(Broken(1, tools=tools), bench.Config.quick(), tools, pin=False, log=lambda _m: None)
    assert res.status == "error" and "no such thing" in res.message
    table, _ = bench.report([res])
    assert "ERROR: start failed: OSError: no such thing" in table


def test_rounds_are_pooled_per_forwarder():
    """Two rounds of one forwarder: drain runs and latency runs pooled (median, best p99),
    the best paced round; a failed round fails the whole."""
    def round_(pps: list[float], p99s: list[float], paced: float) -> bench.VariantResult:
        r = bench.VariantResult("relay", "relay", 1)
        r.drain_runs = [{"pps": p, "valid": True, "noisy": False} for p in pps]
        r.latency_runs = [{"p99_us": x, "p50_us": 20.0, "noisy": False} for x in p99s]
        r.paced = {"max_pps": paced}
        bench.summarise_drain(r)
        bench.summarise_latency(r)
        return r

    first, second = round_([100, 300, 200], [50, 40, 60], 1000), round_([400, 500, 600], [45, 35, 70], 900)
    assert (first.drain["pps"], first.latency["p99_us"]) == (200, 40)
    merged = bench.merge_rounds([first, second])
    assert merged.rounds == 2
    assert merged.drain["pps"] == 400  # median of the six
    assert merged.drain["runs_pps"] == [100, 300, 200, 400, 500, 600]
    assert merged.latency["p99_us"] == 35 and len(merged.latency["runs_p99_us"]) == 6
    assert merged.paced["max_pps"] == 1000
    broken = bench.VariantResult("relay", "relay", 1, status="error", message="start failed")
    assert bench.merge_rounds([round_([1], [1], 1), broken]) is broken
