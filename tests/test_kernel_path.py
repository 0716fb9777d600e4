"""The in-kernel fast path (relay/ebpf/fastpath.bpf.c, relay/kernel_path.py, relay/kernel_flows.py)
with the real program in the real kernel, on the loopback: both directions forwarded by the
kernel and counted, nothing sent that is not a flow's, closed sessions out of the kernel at once,
a dead worker's flows still forwarded, and the fallback where BPF is not allowed. The veth path
(routed, not delivered locally) is tests/test_netns.py's call; the hostile-input suite runs with
the kernel path on (tests/test_faults_hostile.py).

These tests need root (CAP_BPF + CAP_NET_ADMIN), as the kernel path does: without it they fail
saying so, as the namespace tests do.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import (
    Client,
    FakeTransceiver,
    RelayProcess,
    assert_both_ways,
    cleanup_relay,
    connect,
    metric_sum,
    rtp_like,
    start_relay,
    wait_for,
)

from relay import kernel_maps
from relay.kernel_path import OBJECT_PATH
from wire.tunnel_frame import SessionClosed, data_header

N = 300  # datagrams each way: paced, read as they come (a burst would overflow a default buffer)


def require_kernel_path() -> None:
    if not OBJECT_PATH.exists():
        pytest.fail(f"{OBJECT_PATH} is not built (clang/libbpf-dev missing at install: scripts/bootstrap.sh)")
    if os.geteuid() != 0:
        pytest.fail("the kernel path needs root (CAP_BPF + CAP_NET_ADMIN) to load and attach")


@pytest.fixture
def transceiver() -> Iterator[FakeTransceiver]:
    fake = FakeTransceiver()
    fake.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    yield fake
    fake.close()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    require_kernel_path()
    proc = start_relay(tmp_path, workers=2, config={"hit_path": "ebpf", "heartbeat_timeout": 30.0})
    yield proc
    cleanup_relay(proc)


def metrics(relay: RelayProcess) -> str:
    status, text = relay.http("/metrics")
    assert status == 200
    return text


def kernel_event(text: str, event: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(f'rtcrelay_kernel_events_total{{event="{event}"}}'))


def kernel_packets(text: str, direction: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("rtcrelay_kernel_packets_total") and f'direction="{direction}"' in line)


def pump(client: Client, transceiver: FakeTransceiver, tunnel: tuple[str, int], first, relay: RelayProcess,
         n: int = N) -> None:
    """n datagrams client → transceiver and n back, each checked byte for byte and by source."""
    for i in range(n):
        assert_both_ways(client, first, tunnel, transceiver, relay, i)


# -- the map layouts are the program's --------------------------------------------------------


def _offsets(layout: struct.Struct) -> list[int]:
    """Offsets of a struct format's fields (pad bytes, 'x', are not fields)."""
    offsets, at = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z])", layout.format.lstrip("=")):
        size = struct.calcsize(f"={count}{code}")
        if code != "x":
            offsets.append(at)
        at += size
    return offsets


def test_map_layouts_are_the_programs() -> None:
    """relay/kernel_maps.py packs what relay/ebpf/fastpath.bpf.c declares: the object's BTF says
    each struct's size and its members' offsets."""
    require_kernel_path()
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    dump = subprocess.run([bpftool, "-j", "btf", "dump", "file", str(OBJECT_PATH)], capture_output=True,
                          text=True, timeout=30, check=True)
    btf = {t["name"]: t for t in json.loads(dump.stdout)["types"] if t.get("kind") == "STRUCT"}
    for name, layout in kernel_maps.LAYOUTS.items():
        members = [m for m in btf[name]["members"] if m["name"] != "pad"]
        assert btf[name]["size"] == layout.size, name
        assert [m["bits_offset"] // 8 for m in members] == _offsets(layout), name


# -- forwarding ---------------------------------------------------------------------------------


def test_established_flows_go_through_the_kernel_both_ways(relay: RelayProcess, transceiver: FakeTransceiver) -> None:
    assert relay.kernel_path_serves(), relay.log()[-2000:]
    client, first, tunnel, _ufrag = connect(relay, transceiver)
    transceiver.heartbeat(tunnel)
    pump(client, transceiver, tunnel, first, relay)
    # Counted by the kernel, folded into the worker's counters (the flush: ≤ ~1 s) and the
    # flow's own in shm; the workers' own hit path sent none of them (the STUN check was theirs).
    wait_for(lambda: kernel_packets(metrics(relay), "to_transceiver") >= N
             and kernel_packets(metrics(relay), "to_client") >= N, 5, "kernel counters on /metrics")
    text = metrics(relay)
    assert kernel_event(text, "to_transceiver") >= N and kernel_event(text, "to_client") >= N
    assert kernel_event(text, "mismatch") == 0 and kernel_event(text, "no_route") == 0
    assert relay.total("client_packets") == N + 1  # the check + the kernel's, counted once each
    assert relay.total("transceiver_packets") == N
    assert relay.total("hit_path_packets") == 0
    assert metric_sum(text, "rtcrelay_kernel_flows") == 1
    wait_for(lambda: [(f.pkts_in, f.pkts_out) for f in relay.table_flows()] == [(N + 1, N)], 5,
             "the flow's counters in shm")


def test_the_kernel_sends_nothing_that_is_not_a_flows(relay: RelayProcess, transceiver: FakeTransceiver) -> None:
    """Frames naming a live handle but from another address, with another client, with a wrong
    length; a datagram from an unknown source: the kernel leaves them all to the workers, which
    drop and count them; nothing reaches the client or anyone else."""
    client, first, tunnel, _ufrag = connect(relay, transceiver)
    transceiver.heartbeat(tunnel)
    pump(client, transceiver, tunnel, first, relay, n=5)
    impostor = FakeTransceiver()
    stranger = Client(relay.address)
    try:
        good = data_header(first.handle, first.ip, first.port, 10) + b"0123456789"
        impostor.sock.sendto(good, tunnel)  # right frame, wrong source
        other_port = data_header(first.handle, first.ip, stranger.address[1], 10) + b"0123456789"
        transceiver.sock.sendto(other_port, tunnel)  # the flow's handle, another client
        transceiver.sock.sendto(data_header(first.handle, first.ip, first.port, 11) + b"0123456789", tunnel)
        stranger.send(rtp_like(7))  # not a flow: the workers drop it
        assert client.nothing_arrives(0.5) and stranger.nothing_arrives(0.1)
        assert transceiver.drain(0.2) == [] and impostor.drain(0.1) == []
        text = metrics(relay)
        assert kernel_event(text, "mismatch") == 3
        wait_for(lambda: relay.total("drop_tunnel_source_not_allowed") + relay.total("drop_tunnel_foreign_flow")
                 + relay.total("drop_frame_malformed") + relay.total("drop_tunnel_unknown_flow") >= 3, 5,
                 "the workers' drop counters")
        assert relay.total("drop_unknown_flow") + relay.total("drop_not_webrtc") >= 1
        pump(client, transceiver, tunnel, first, relay, n=5)  # the flow itself still goes both ways
    finally:
        impostor.close()
        stranger.close()


def test_a_closed_session_leaves_the_kernel_at_once(relay: RelayProcess, transceiver: FakeTransceiver) -> None:
    client, first, tunnel, ufrag = connect(relay, transceiver)
    transceiver.heartbeat(tunnel)
    pump(client, transceiver, tunnel, first, relay, n=5)
    transceiver.send(tunnel, SessionClosed(ufrag))
    wait_for(lambda: relay.table_flows() == [], 2, "the flow removed")
    before = kernel_event(metrics(relay), "to_transceiver")
    client.send(rtp_like(99))
    assert transceiver.drain(0.4) == []  # not by the kernel, and the workers refuse it too
    transceiver.reply(tunnel, first, b"late")
    assert client.nothing_arrives(0.3)
    text = metrics(relay)
    assert kernel_event(text, "to_transceiver") == before
    wait_for(lambda: metric_sum(metrics(relay), "rtcrelay_kernel_flows") == 0, 3, "kernel_flows back to 0")


def test_the_kernel_forwards_while_a_worker_is_down_and_its_successor_takes_over(
        tmp_path: Path, transceiver: FakeTransceiver) -> None:
    """SIGKILL the flow's worker (no standby): its established flow keeps going both ways in the
    kernel while the supervisor restarts it; the successor re-adopts the flow from shm."""
    require_kernel_path()
    relay = start_relay(tmp_path, workers=1, config={"hit_path": "ebpf", "heartbeat_timeout": 30.0,
                                                     "standby_workers": False})
    try:
        client, first, tunnel, _ufrag = connect(relay, transceiver)
        transceiver.heartbeat(tunnel)
        worker = relay.worker_pids()[0]
        os.kill(worker, signal.SIGSTOP)  # a hung worker first: the kernel does not need it
        try:
            pump(client, transceiver, tunnel, first, relay, n=20)
        finally:
            os.kill(worker, signal.SIGCONT)
        os.kill(worker, signal.SIGKILL)
        pump(client, transceiver, tunnel, first, relay, n=20)  # before, during and after the restart
        wait_for(lambda: relay.worker_pids()[0] not in (0, worker) and relay.rows()[0]["ready"] == 1, 10,
                 "the restarted worker")
        pump(client, transceiver, tunnel, first, relay, n=20)
        wait_for(lambda: metric_sum(metrics(relay), "rtcrelay_kernel_flows") == 1, 5, "the flow in the kernel again")
        assert "Traceback" not in relay.log()
    finally:
        cleanup_relay(relay)


# -- where BPF is not allowed ------------------------------------------------------------------


def unprivileged(relay_prefix_caps: str = "-bpf,-net_admin,-sys_admin,-perfmon") -> list[str]:
    """Run the relay as root without the capabilities BPF needs (as in a container without them)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is missing")
    return [setpriv, f"--bounding-set={relay_prefix_caps}", "--inh-caps=-all"]


def test_auto_falls_back_to_the_workers_where_bpf_is_refused(tmp_path: Path, transceiver: FakeTransceiver) -> None:
    require_kernel_path()
    relay = start_relay(tmp_path, workers=1, prefix=unprivileged(), config={"heartbeat_timeout": 30.0})
    try:
        line = next(line for line in relay.log().splitlines() if "kernel path:" in line)
        assert "not used" in line and "CAP_BPF" in line, line
        assert not relay.kernel_path_serves()
        client, first, tunnel, _ufrag = connect(relay, transceiver)
        pump(client, transceiver, tunnel, first, relay, n=20)
        assert kernel_packets(metrics(relay), "to_transceiver") == 0
        assert "rtcrelay_kernel_events_total" not in metrics(relay)
    finally:
        cleanup_relay(relay)


def test_ebpf_refuses_to_start_where_bpf_is_refused_and_says_why(tmp_path: Path) -> None:
    require_kernel_path()
    relay = start_relay(tmp_path, workers=1, prefix=unprivileged(), config={"hit_path": "ebpf"}, wait=False)
    try:
        assert relay.proc.wait(20) != 0
        log = relay.log()
        assert '`hit_path` = "ebpf", but the kernel path cannot serve here' in log and "CAP_BPF" in log, log
        assert "Traceback" not in log
    finally:
        cleanup_relay(relay)


def test_a_wildcard_listen_address_is_served_in_the_kernel(tmp_path: Path, transceiver: FakeTransceiver) -> None:
    """0.0.0.0 (the default listen address): the program matches any local address on that
    port, and answers from the address the client sent to."""
    require_kernel_path()
    port = _free_port()
    relay = start_relay(tmp_path, workers=1, port=port, config={"listen": [f"0.0.0.0:{port}"], "hit_path": "ebpf"})
    try:
        assert relay.kernel_path_serves()
        for address in ("127.0.0.1", "127.0.0.9"):  # two local addresses, one socket
            client = Client((address, port))
            client_first = connect(relay, transceiver, client=client)
            _client, _first, tunnel, _ufrag = client_first
            transceiver.heartbeat(tunnel)
            for i in range(20):
                client.send(rtp_like(i))
                frame, _source = transceiver.recv_data()
                transceiver.reply(tunnel, frame, b"back %d" % i)
                got, sender = client.recv()
                assert got == b"back %d" % i and sender == (address, port)
            client.close()
        wait_for(lambda: kernel_packets(metrics(relay), "to_client") >= 38, 5, "kernel counters")
    finally:
        cleanup_relay(relay)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_filter_is_detached_at_stop(relay: RelayProcess) -> None:
    assert relay.kernel_path_serves()
    assert relay.stop() == 0
    shown = subprocess.run(["tc", "filter", "show", "dev", "lo", "ingress"], capture_output=True, text=True,
                           timeout=10, check=False).stdout
    handle = f"handle 0x{_handle(relay):x}"
    assert handle not in shown, shown


def _handle(relay: RelayProcess) -> int:
    from relay.kernel_path import filter_handle

    return filter_handle([relay.address])


def test_kernel_counters_reach_the_cli(relay: RelayProcess, transceiver: FakeTransceiver) -> None:
    """`rtcrelay flows` and `rtcrelay stats` read shm: the kernel's packets are in the flow's
    counters and the workers' rows there."""
    client, first, tunnel, _ufrag = connect(relay, transceiver)
    transceiver.heartbeat(tunnel)
    pump(client, transceiver, tunnel, first, relay, n=50)
    time.sleep(1.5)
    out = subprocess.run([*_rtcrelay(), "flows", "list", "--name", relay.name, "--table-dir", str(relay.table_dir), "--json"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    flows = json.loads(out.stdout)
    assert len(flows) == 1 and flows[0]["packets_in"] == 51 and flows[0]["packets_out"] == 50, flows
    stats = subprocess.run([*_rtcrelay(), "stats", "--name", relay.name, "--table-dir", str(relay.table_dir), "--json"],
                           capture_output=True, text=True, timeout=30, check=True)
    totals = json.loads(stats.stdout)
    assert (totals["kernel_packets_to_transceivers"], totals["kernel_packets_to_clients"]) == (50, 50), totals
    assert sum(w["kernel_flows"] for w in totals["workers"]) == 1
    human = subprocess.run([*_rtcrelay(), "stats", "--name", relay.name, "--table-dir", str(relay.table_dir)],
                           capture_output=True, text=True, timeout=30, check=True, env={**os.environ, "COLUMNS": "200"})
    assert "in the kernel 50 / 50 pkts" in human.stdout, human.stdout


def _rtcrelay() -> list[str]:
    from relayproc import RTCRELAY

    return RTCRELAY
