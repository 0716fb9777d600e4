"""Closed sessions stay closed: after a SessionClosed, no Binding Request for that ufrag opens a
flow again, on any worker, across a worker crash and a relay restart (issue #17).

The relay is real (2 workers, shm table); the transceiver is a UDP socket speaking the tunnel
frame (relayproc.FakeTransceiver). The SessionClosed goes to the one worker that held the
session's flow: the other worker refuses the ufrag too, because the closed set is read from
every partition.
"""
from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import Client, FakeTransceiver, RelayProcess, cleanup_relay, spawn_relay, start_relay, wait_for

from wire.tunnel_frame import Data

ATTEMPTS = 16  # fresh sources: both workers get some (SO_REUSEPORT hashes the 4-tuple)


@pytest.fixture
def transceiver() -> Iterator[FakeTransceiver]:
    fake = FakeTransceiver()
    yield fake
    fake.close()


def flows_of(relay: RelayProcess, ufrag: str) -> list:
    return [f for f in relay.table_flows() if f.ufrag.decode() == ufrag]


def retry_closed(relay: RelayProcess, transceiver: FakeTransceiver, ufrag: str) -> list[dict[str, int]]:
    """Fresh signed checks for ``ufrag`` from new sources: every one refused, nothing forwarded."""
    clients = [Client(relay.address) for _ in range(ATTEMPTS)]
    try:
        before = relay.total("drop_session_closed")
        for c in clients:
            c.send(c.binding_request(ufrag, keyring=relay.keyring))
        relay.wait_flushed(lambda rows: sum(r["drop_session_closed"] for r in rows) == before + ATTEMPTS,
                           what="every check refused as session_closed")
        assert flows_of(relay, ufrag) == []
        assert not [f for f in transceiver.drain(0.3) if isinstance(f, Data)]
        assert all(c.nothing_arrives(0.05) for c in clients)
        return relay.rows()
    finally:
        for c in clients:
            c.close()


def test_a_closed_session_stays_closed_on_every_worker_across_a_crash_and_a_restart(
        tmp_path: Path, transceiver: FakeTransceiver) -> None:
    relay = start_relay(tmp_path, workers=2, config={"heartbeat_timeout": 30.0})
    try:
        client = Client(relay.address)
        ufrag = transceiver.token(relay.keyring)
        client.send(client.binding_request(ufrag, keyring=relay.keyring))
        _first, tunnel = transceiver.recv_data()
        assert len(flows_of(relay, ufrag)) == 1

        transceiver.close_session(tunnel, ufrag)  # to the worker with the flow only
        wait_for(lambda: flows_of(relay, ufrag) == [], 5, "the session's flow removed")
        # its own client's next consent check: refused, not a new flow
        client.send(client.binding_request(ufrag, keyring=relay.keyring))
        relay.wait_flushed(lambda rows: sum(r["drop_session_closed"] for r in rows) == 1, what="the refusal")
        rows = retry_closed(relay, transceiver, ufrag)
        assert all(r["drop_session_closed"] > 0 for r in rows), rows  # both workers refuse it

        # A worker crash: its standby takes over the partition, closed set included.
        wait_for(lambda: json.loads(relay.http("/healthz")[1])["standbys_ready"] == relay.workers, 30, "standbys")
        victim = relay.rows()[tunnel_worker(relay, tunnel)]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: all(r["ready"] == 1 and r["pid"] not in (0, victim) for r in relay.rows()), 15,
                 "the standby serving")
        retry_closed(relay, transceiver, ufrag)

        # A relay restart that reopens the table (the default; --ephemeral would remove it).
        assert relay.stop() == 0
        relay.proc = spawn_relay(relay)
        relay.wait_ready()
        assert "reopened flow table" in relay.log()
        retry_closed(relay, transceiver, ufrag)

        # Closing one session closes nothing else: another session of the same transceiver learns.
        other = Client(relay.address)
        other_ufrag = transceiver.token(relay.keyring)
        other.send(other.binding_request(other_ufrag, keyring=relay.keyring))
        frame, _ = transceiver.recv_data()
        assert frame.port == other.address[1] and len(flows_of(relay, other_ufrag)) == 1
        other.close()
        client.close()
    finally:
        cleanup_relay(relay)


def test_only_the_sessions_own_transceiver_can_close_it(tmp_path: Path, transceiver: FakeTransceiver) -> None:
    relay = start_relay(tmp_path, workers=1, config={"heartbeat_timeout": 30.0})
    intruder = FakeTransceiver()
    try:
        client = Client(relay.address)
        ufrag = transceiver.token(relay.keyring)
        client.send(client.binding_request(ufrag, keyring=relay.keyring))
        _, tunnel = transceiver.recv_data()
        intruder.close_session(tunnel, ufrag)  # an allowed network, but not the token's transceiver
        other = Client(relay.address)
        other.send(other.binding_request(ufrag, keyring=relay.keyring))  # NAT rebinding: still learned
        frame, _ = transceiver.recv_data()
        assert frame.port == other.address[1]
        assert relay.total("drop_session_closed") == 0 and len(flows_of(relay, ufrag)) == 2
        other.close()
        client.close()
    finally:
        intruder.close()
        cleanup_relay(relay)


def tunnel_worker(relay: RelayProcess, tunnel: tuple[str, int]) -> int:
    """Index of the worker whose tunnel socket is ``tunnel``."""
    import psutil

    for index, row in enumerate(relay.rows()):
        ports = {c.laddr.port for c in psutil.Process(row["pid"]).net_connections(kind="udp")}
        if tunnel[1] in ports:
            return index
    raise AssertionError(f"no worker has the tunnel socket {tunnel}")


def test_an_ice_restart_on_the_same_5_tuple_renames_its_flow(tmp_path: Path, transceiver: FakeTransceiver) -> None:
    """SessionRenamed(old, new): the flow is learned again under the new ufrag (same 5-tuple,
    new handle), media goes on, the old ufrag is refused from then on; another transceiver's
    rename does nothing."""
    from relayproc import rtp_like

    from wire.tunnel_frame import SessionRenamed

    relay = start_relay(tmp_path, workers=2, config={"heartbeat_timeout": 30.0})
    intruder = FakeTransceiver()
    try:
        client = Client(relay.address)
        old = transceiver.token(relay.keyring)
        client.send(client.binding_request(old, keyring=relay.keyring))
        first, tunnel = transceiver.recv_data()
        new = transceiver.token(relay.keyring)
        intruder.send(tunnel, SessionRenamed(old, new))  # not its session: ignored
        time.sleep(0.2)
        assert [f.ufrag.decode() for f in relay.table_flows()] == [old]

        transceiver.send(tunnel, SessionRenamed(old, new))
        wait_for(lambda: [f.ufrag.decode() for f in relay.table_flows()] == [new], 5, "the flow renamed")
        client.send(rtp_like(1))  # the same 5-tuple: a hit, now under the new handle
        frame, _ = transceiver.recv_data()
        assert frame.port == client.address[1] and frame.handle != first.handle
        transceiver.reply(tunnel, frame, b"\x80back")
        assert client.recv()[0] == b"\x80back"
        other = Client(relay.address)  # the old ufrag from another address: refused
        other.send(other.binding_request(old, keyring=relay.keyring))
        relay.wait_flushed(lambda rows: sum(r["drop_session_closed"] for r in rows) == 1, what="the refusal")
        other.close()
        client.close()
    finally:
        intruder.close()
        cleanup_relay(relay)
