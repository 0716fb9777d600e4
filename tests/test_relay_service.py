"""The relay as a real multi-process service on loopback: real sockets, workers, shared memory."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import prom
import pytest
from relayproc import (
    RTCRELAY,
    Client,
    FakeTransceiver,
    RelayProcess,
    assert_both_ways,
    cleanup_relay,
    dtls_like,
    rtp_like,
    start_relay,
    wait_for,
    write_keys,
)

from wire.tunnel_frame import Data, HopData


@pytest.fixture(params=["c", "python"], ids=["c-hit-path", "python-hit-path"])
def relay(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RelayProcess]:
    """Both hit paths (relay/_hitpath.c and relay.hit_path.PythonHitPath) face every test."""
    proc = start_relay(tmp_path, workers=2, config={"heartbeat_timeout": 30.0, "hit_path": request.param})
    yield proc
    cleanup_relay(proc)


@pytest.fixture
def transceiver() -> Iterator[FakeTransceiver]:
    fake = FakeTransceiver()
    yield fake
    fake.close()


def connect(relay: RelayProcess, transceiver: FakeTransceiver, client: Client | None = None) -> tuple[Client, Data, tuple[str, int], str]:
    """A client's first STUN check reaches the transceiver; returns the flow's first frame."""
    client = client or Client(relay.address)
    ufrag = transceiver.token(relay.keyring)
    request = client.binding_request(ufrag, keyring=relay.keyring)
    client.send(request)
    frame, tunnel = transceiver.recv_data()
    assert frame.payload == request
    assert (socket.inet_ntoa(frame.ip), frame.port) == client.address
    return client, frame, tunnel, ufrag


def test_traffic_flows_both_ways_through_two_workers(relay: RelayProcess, transceiver: FakeTransceiver) -> None:
    clients = []
    for _ in range(12):  # enough sources that the reuseport hash spreads them over both workers
        client, first, tunnel, _ufrag = connect(relay, transceiver)
        clients.append((client, first, tunnel))
    tunnels = {tunnel for _c, _f, tunnel in clients}
    for client, first, tunnel in clients:
        for seq in range(5):
            assert_both_ways(client, first, tunnel, transceiver, relay, seq, dtls_like() if seq == 0 else None)
    transceiver.heartbeat(tunnels.pop()) if len(tunnels) == 1 else [transceiver.heartbeat(t) for t in tunnels]
    relay.wait_flushed(lambda rows: sum(r["client_packets"] for r in rows) >= 72 and sum(r["transceiver_packets"] for r in rows) >= 60)
    flows = relay.table_flows()
    assert len(flows) == 12
    assert {f.partition for f in flows} == {0, 1}, "both workers should own flows"
    # each worker sent to the one transceiver over a connected link (relay/tunnel_links.py),
    # and its answers came back through it
    assert [r["tunnel_links"] for r in relay.rows()] == [1, 1]
    wait_for(lambda: all(f.pkts_in == 6 and f.pkts_out == 5 for f in relay.table_flows()), 5, "per-flow counters flushed to shm")
    status, metrics = relay.http("/metrics")
    assert status == 200 and 'rtcrelay_packets_total{worker="0",direction="to_transceiver"}' in metrics
    # every worker's housekeeping steps, as Prometheus parses a histogram
    assert prom.families(metrics)["rtcrelay_housekeeping_step_seconds"] == "histogram"
    for worker in ("0", "1"):
        steps = prom.sample(metrics, "rtcrelay_housekeeping_step_seconds_count", worker=worker)
        assert steps > 0 and prom.sample(metrics, "rtcrelay_housekeeping_step_seconds_bucket", worker=worker,
                                         le="+Inf") == steps
        assert 0 < prom.sample(metrics, "rtcrelay_housekeeping_step_seconds_sum", worker=worker) < steps * 0.01
    # The hit path (whichever serves: the log says) sends every known flow's datagram: the
    # worker sent only the 12 STUN checks it served as misses (they opened the links).
    rows = relay.rows()
    assert sum(r["hit_path_packets"] for r in rows) == sum(r["client_packets"] for r in rows) - 12
    assert ("hit path: C (relay._hitpath)" if relay.hit_path == "c" else 'hit path: Python (hit_path = "python")') in relay.log()
    for client, *_ in clients:
        client.close()


def test_unauthenticated_input_creates_no_flow(relay: RelayProcess, transceiver: FakeTransceiver) -> None:
    client = Client(relay.address)
    ufrag = transceiver.token(relay.keyring)
    other_keyring_ufrag = transceiver.token(type(relay.keyring)({1: b"x" * 32}, 1))
    client.send(client.binding_request(other_keyring_ufrag, password="p" * 22))  # forged token
    client.send(client.binding_request(ufrag, password="wrong-password-xxxxxxx"))  # wrong integrity
    client.send(client.binding_request(transceiver.token(relay.keyring, now=time.time() - 3600), keyring=relay.keyring))  # expired
    client.send(client.binding_request(transceiver.token(type(relay.keyring)({9: b"k" * 32}, 9)), password="p" * 22))  # unknown key id
    client.send(rtp_like(1))  # non-STUN from an unknown address
    client.send(b"\xff" * 50)
    assert transceiver.drain(0.5) == []
    relay.wait_flushed(lambda rows: sum(r["drop_token_bad_mac"] + r["drop_stun_bad_integrity"] + r["drop_token_expired"]
                                        + r["drop_token_unknown_key"] + r["drop_unknown_flow"] + r["drop_not_webrtc"] for r in rows) == 6,
                       what="six drops counted by reason")
    rows = relay.rows()
    for reason in ("token_bad_mac", "stun_bad_integrity", "token_expired", "token_unknown_key", "unknown_flow", "not_webrtc"):
        assert sum(r["drop_" + reason] for r in rows) == 1, reason
    assert relay.table_flows() == []
    assert client.nothing_arrives()


def test_return_frames_for_unknown_or_foreign_flows_send_nothing(relay: RelayProcess, transceiver: FakeTransceiver) -> None:
    client_a, frame_a, tunnel_a, _ = connect(relay, transceiver)
    client_b = Client(relay.address)
    intruder = FakeTransceiver()
    try:
        # Unknown handle.
        transceiver.reply(tunnel_a, Data(frame_a.handle ^ 0x5555, frame_a.ip, frame_a.port, b""), b"\x80" * 20)
        # Known handle, but steering it at another client (reflection attempt).
        forged = Data(frame_a.handle, socket.inet_aton(client_b.address[0]), client_b.address[1], b"")
        transceiver.reply(tunnel_a, forged, b"\x80" * 20)
        # Known handle and client, but from a transceiver that does not own the flow.
        intruder.reply(tunnel_a, frame_a, b"\x80" * 20)
        # An edge relay's HopData, from the owner, naming the flow's handle and client: a
        # transceiver never sends one, and a tunnel socket is no hop address.
        transceiver.send(tunnel_a, HopData(frame_a.handle, frame_a.ip, frame_a.port, 1, b"\x80" * 20))
        assert client_a.nothing_arrives() and client_b.nothing_arrives()
        relay.wait_flushed(lambda rows: sum(r["drop_tunnel_unknown_flow"] + r["drop_tunnel_foreign_flow"] for r in rows) == 3
                           and sum(r["drop_tunnel_unexpected_frame"] for r in rows) == 1, what="return-path drops counted")
        # The owner still gets through.
        transceiver.reply(tunnel_a, frame_a, b"\x80ok")
        assert client_a.recv()[0] == b"\x80ok"
    finally:
        intruder.close()
        client_a.close()
        client_b.close()


def test_killed_worker_is_restarted_on_the_same_socket_without_losing_flows(relay: RelayProcess, transceiver: FakeTransceiver) -> None:
    conns = [connect(relay, transceiver) for _ in range(8)]
    for client, *_ in conns:  # known flows: the workers open their links to the transceiver
        client.send(rtp_like(1))
        transceiver.recv_data()
    relay.wait_flushed(lambda rows: sum(r["flows"] for r in rows) == 8 and all(r["tunnel_links"] == 1 for r in rows if r["flows"]), what="flows and links published")
    victim_index = max(range(relay.workers), key=lambda i: relay.rows()[i]["flows"])
    victim = relay.worker_pids()[victim_index]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: relay.rows()[victim_index]["pid"] not in (0, victim) and relay.rows()[victim_index]["ready"] == 1, 10, "worker restart")
    assert len(relay.table_flows()) == 8
    # The dead worker's connected tunnel link died with it: a frame the transceiver sends
    # before any client speaks again reaches the shared tunnel socket, kept by the supervisor.
    owner = {f.client_port: f.partition for f in relay.table_flows()}
    victim_conns = [c for c in conns if owner[c[0].address[1]] == victim_index]
    assert victim_conns
    for client, first, tunnel, _ in victim_conns:
        transceiver.reply(tunnel, first, b"\x80early")
        assert client.recv()[0] == b"\x80early"
    for client, first, tunnel, _ in conns:
        payload = rtp_like(99)
        client.send(payload)  # no new STUN: the restarted worker reloaded its flows
        frame, source = transceiver.recv_data()
        assert frame.payload == payload and frame.handle == first.handle and source == tunnel
        transceiver.reply(tunnel, frame, b"\x80back")
        assert client.recv()[0] == b"\x80back"
    assert "exited with -9" in relay.log()
    for client, *_ in conns:
        client.close()


def test_session_closed_removes_all_flows_of_the_ufrag(relay: RelayProcess, transceiver: FakeTransceiver) -> None:
    client, _frame, tunnel, ufrag = connect(relay, transceiver)
    rebound = Client(relay.address)  # the same session from a second address (NAT rebinding)
    rebound.send(rebound.binding_request(ufrag, keyring=relay.keyring))
    _frame2, tunnel2 = transceiver.recv_data()
    bystander, *_ = connect(relay, transceiver)  # another session: must survive
    wait_for(lambda: len(relay.table_flows()) == 3, 5, "three flows")
    # Each worker that delivered a flow of the session hears the close, as the transceiver does it.
    for t in {tunnel, tunnel2}:
        transceiver.close_session(t, ufrag)
    wait_for(lambda: [f.ufrag for f in relay.table_flows()] not in ([], None) and len(relay.table_flows()) == 1, 5,
             "flows of the closed session removed")
    assert relay.table_flows()[0].ufrag.decode() != ufrag
    client.send(rtp_like(5))
    rebound.send(rtp_like(5))
    assert transceiver.drain(0.3) == []
    relay.wait_flushed(lambda rows: sum(r["flows_closed"] for r in rows) == 2, what="closed flows counted")
    for c in (client, rebound, bystander):
        c.close()


def test_idle_flows_expire(tmp_path: Path, transceiver: FakeTransceiver) -> None:
    relay = start_relay(tmp_path, workers=1, config={"idle_timeout": 1.0, "heartbeat_timeout": 30.0})
    try:
        client, *_ = connect(relay, transceiver)
        wait_for(lambda: len(relay.table_flows()) == 1, 5, "flow learned")
        wait_for(lambda: relay.table_flows() == [], 6, "idle flow expired")
        assert relay.total("flows_expired") >= 1 or wait_for(lambda: relay.total("flows_expired") >= 1, 3, "expiry counted")
        client.send(rtp_like(1))
        assert transceiver.drain(0.3) == []
        client.close()
    finally:
        cleanup_relay(relay)


def test_silent_transceiver_loses_its_flows(tmp_path: Path, transceiver: FakeTransceiver) -> None:
    relay = start_relay(tmp_path, workers=1, config={"heartbeat_timeout": 1.5})
    try:
        alive = FakeTransceiver()
        client_dead, *_ = connect(relay, transceiver)
        client_alive, _, tunnel, _ = connect(relay, alive)
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:  # one transceiver keeps heartbeating, the other is silent
            alive.heartbeat(tunnel)
            time.sleep(0.3)
        flows = relay.table_flows()
        assert [f.target_port for f in flows] == [alive.address[1]]
        assert relay.total("flows_closed") == 1
        alive.close()
        client_dead.close()
        client_alive.close()
    finally:
        cleanup_relay(relay)


def test_sighup_rotates_keys_without_dropping_flows(tmp_path: Path, transceiver: FakeTransceiver) -> None:
    old = secrets.token_bytes(32)
    new = secrets.token_bytes(32)
    relay = start_relay(tmp_path, workers=2, keyring_secrets={1: old}, active=1, config={"heartbeat_timeout": 30.0})
    try:
        client_old, frame_old, _tunnel_old, _ = connect(relay, transceiver)
        from wire.route_token import RouteKeyring

        rotated = RouteKeyring({1: old, 2: new}, 2)
        write_keys(relay.keys_path, {1: old, 2: new}, 2)
        relay.proc.send_signal(signal.SIGHUP)
        client_new = Client(relay.address)

        def new_key_accepted() -> bool:
            client_new.send(client_new.binding_request(transceiver.token(rotated), keyring=rotated))
            return any(isinstance(f, Data) and f.port == client_new.address[1] for f in transceiver.drain(0.2))

        wait_for(new_key_accepted, 5, "a token signed with the new key accepted")
        # Retire the old key: new sessions signed with it are refused, the live flow stays.
        write_keys(relay.keys_path, {2: new}, 2)
        relay.proc.send_signal(signal.SIGHUP)
        old_only = RouteKeyring({1: old}, 1)

        def old_key_refused() -> bool:
            late = Client(relay.address)  # a fresh source each try: a probe that raced the reload made a flow
            try:
                late.send(late.binding_request(transceiver.token(old_only), keyring=old_only))
                return not any(isinstance(f, Data) and f.port == late.address[1] for f in transceiver.drain(0.2))
            finally:
                late.close()

        wait_for(old_key_refused, 5, "the retired key refused")
        client_old.send(rtp_like(3))  # the live flow signed with the retired key keeps forwarding
        frame, _ = transceiver.recv_data()
        assert frame.handle == frame_old.handle
        relay.wait_flushed(lambda rows: sum(r["drop_token_unknown_key"] for r in rows) >= 1, what="unknown key counted")
        for c in (client_old, client_new):
            c.close()
    finally:
        cleanup_relay(relay)


def test_socket_activation_and_sd_notify(tmp_path: Path, transceiver: FakeTransceiver) -> None:
    public = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    public.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    public.bind(("127.0.0.1", 0))
    port = public.getsockname()[1]
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(10)
    fd = public.fileno()
    try:
        # As systemd does it: the socket at fd 3, LISTEN_PID naming the service's own pid.
        relay = start_relay(
            tmp_path, workers=1, port=port,
            prefix=["bash", "-c", f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ exec "$@"', "bash"],
            env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "public", "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"},
            pass_fds=(fd,), wait=False,
        )
        try:
            messages: list[str] = []
            wait_for(lambda: messages.append(notify.recv(4096).decode()) or any("READY=1" in m for m in messages), 20, "READY=1")
            wait_for(lambda: messages.append(notify.recv(4096).decode()) or any("WATCHDOG=1" in m for m in messages), 10, "WATCHDOG=1")
            assert any(m.startswith("FDSTORE=1") for m in messages), messages
            public.close()
            # The relay serves on the socket it was handed.
            client, *_ = connect(relay, transceiver)
            client.close()
            relay.stop()
            wait_for(lambda: messages.append(notify.recv(4096).decode()) or any("STOPPING=1" in m for m in messages), 10, "STOPPING=1")
            assert relay.proc.returncode == 0
        finally:
            cleanup_relay(relay)
    finally:
        notify.close()
        public.close()


def test_socket_activation_with_too_few_sockets_is_refused_clearly(tmp_path: Path) -> None:
    public = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    public.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    public.bind(("127.0.0.1", 0))
    fd = public.fileno()
    try:
        relay = start_relay(
            tmp_path, workers=2, port=public.getsockname()[1],
            prefix=["bash", "-c", f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ exec "$@"', "bash"],
            env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "public"}, pass_fds=(fd,), wait=False,
        )
        try:
            assert relay.proc.wait(30) == 1
            assert "passed 1 sockets for 127.0.0.1" in relay.log() and "one ListenDatagram= line per worker" in relay.log()
            assert "Traceback" not in relay.log()
        finally:
            cleanup_relay(relay)
    finally:
        public.close()


def test_a_table_that_does_not_fit_in_shm_is_refused_at_start(tmp_path: Path) -> None:
    # A 2 MiB tmpfs in a private mount namespace stands in for a container's small /dev/shm.
    keys = tmp_path / "keys.toml"
    write_keys(keys, {1: secrets.token_bytes(32)}, 1)
    small = tmp_path / "small-shm"
    small.mkdir()
    script = (f"mount -t tmpfs -o size=2m tmpfs {small} && exec \"$@\"")
    result = subprocess.run(
        ["unshare", "--mount", "bash", "-c", script, "bash", *RTCRELAY, "relay", "--route-keys", str(keys),
         "--listen", "127.0.0.1:0", "--admin", "", "--workers", "1"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "RTCRELAY_RELAY_TABLE_DIR": str(small)},
    )
    assert result.returncode == 1, result.stderr
    assert "no room for the flow table" in result.stderr and "--shm-size" in result.stderr
    assert "Traceback" not in result.stderr


def test_standby_takes_over_and_a_new_standby_follows(relay: RelayProcess, transceiver: FakeTransceiver) -> None:
    import json

    client, first, _tunnel, _ = connect(relay, transceiver)
    wait_for(lambda: json.loads(relay.http("/healthz")[1])["standbys_ready"] == 2, 30, "two ready standbys")
    index = next(i for i, row in enumerate(relay.rows()) if row["flows"] == 1)
    victim = relay.rows()[index]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: relay.rows()[index]["pid"] not in (0, victim) and relay.rows()[index]["ready"] == 1, 10, "takeover")
    client.send(rtp_like(7))
    frame, _ = transceiver.recv_data()
    assert frame.handle == first.handle
    assert "its standby took over" in relay.log()
    # The slot gets a new spare, so a second crash is covered too.
    wait_for(lambda: json.loads(relay.http("/healthz")[1])["standbys_ready"] == 2, 30, "a new standby")
    client.close()
    assert relay.stop() == 0
    assert "Traceback" not in relay.log()


def test_new_flows_arriving_in_a_batch_with_known_ones_lose_nothing(tmp_path: Path, transceiver: FakeTransceiver) -> None:
    # One worker, so every datagram lands in the same receive batches: first checks of new
    # clients interleaved with media of known ones (a bug once dropped such mixed batches).
    relay = start_relay(tmp_path, workers=1, config={"heartbeat_timeout": 60.0})
    try:
        known = [connect(relay, transceiver)[0] for _ in range(4)]
        newcomers = [Client(relay.address) for _ in range(24)]
        requests = [c.binding_request(transceiver.token(relay.keyring), keyring=relay.keyring) for c in newcomers]
        relay.proc.send_signal(signal.SIGSTOP)  # hold the worker's supervisor; the worker keeps going
        for worker in relay.worker_pids():
            os.kill(worker, signal.SIGSTOP)  # everything below queues, then arrives as one batch
        try:
            for i, (client, request) in enumerate(zip(newcomers, requests)):
                known[i % 4].send(rtp_like(i))
                client.send(request)
        finally:
            for worker in relay.worker_pids():
                os.kill(worker, signal.SIGCONT)
            relay.proc.send_signal(signal.SIGCONT)
        frames = []
        while len(frames) < 48:
            frames.append(transceiver.recv_data(timeout=3)[0])
        assert {f.port for f in frames if f.payload[:1] == b"\x00"} == {c.address[1] for c in newcomers}
        assert sum(1 for f in frames if f.payload[:1] == b"\x80") == 24
        relay.wait_flushed(lambda rows: rows[0]["flows_learned"] == 28, what="all flows learned")
        assert relay.rows()[0]["internal_errors"] == 0
        for c in known + newcomers:
            c.close()
    finally:
        cleanup_relay(relay)
