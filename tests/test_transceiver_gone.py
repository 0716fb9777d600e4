"""A transceiver that dies: the relay forgets it and tells its clients (issue #18).

The relay (real, 2 workers) learns a session's flow for a transceiver (relayproc's fake: a
UDP socket speaking tunnel frames), which then closes its socket, as a crashed process does.
The relay's connected tunnel link gets ICMP port unreachable at the client's next datagram:
the transceiver is gone at once (heartbeat_timeout is 30 s here, so nothing else can explain
it), its flows are removed, and the client's next check is answered by the relay itself with
a Binding error (403) signed with the session's password, so the client's ICE gives up now.
"""
from __future__ import annotations

import time
from pathlib import Path

from relayproc import Client, FakeTransceiver, cleanup_relay, rtp_like, start_relay, wait_for

from wire.route_token import derive_password
from wire.stun import BINDING_ERROR, parse


def test_a_dead_transceiver_is_known_at_once_and_its_clients_are_told(tmp_path: Path) -> None:
    relay = start_relay(tmp_path, workers=2, config={"heartbeat_timeout": 30.0})
    transceiver = FakeTransceiver()
    client = Client(relay.address)
    try:
        ufrag = transceiver.token(relay.keyring)
        client.send(client.binding_request(ufrag, keyring=relay.keyring))
        _, tunnel = transceiver.recv_data()
        transceiver.heartbeat(tunnel)
        client.send(rtp_like(1))
        transceiver.recv_data()  # on the worker's connected link to this transceiver
        assert len(relay.table_flows()) == 1

        tunnel_port = transceiver.address[1]
        transceiver.close()  # a crash: the port refuses from now on
        died = time.monotonic()
        for seq in range(2, 12):  # the client's media: the relay's sends get ICMP back
            client.send(rtp_like(seq))
            time.sleep(0.02)
        wait_for(lambda: relay.table_flows() == [], 5, "the dead transceiver's flow removed")
        forgotten_s = time.monotonic() - died
        assert forgotten_s < 3.0  # < heartbeat_timeout (30 s): the refusal, not the silence

        request = client.binding_request(ufrag, keyring=relay.keyring)
        client.send(request)
        answer, sender = client.recv()
        assert sender == relay.address
        msg = parse(answer)
        assert msg.msg_type == BINDING_ERROR and msg.transaction_id == parse(request).transaction_id
        assert msg.verify_integrity(derive_password(relay.keyring, ufrag).encode())  # signed: browsers act on it
        assert msg.verify_fingerprint()
        assert msg.get(0x0009)[2:4] == bytes([4, 3])  # ERROR-CODE 403
        relay.wait_flushed(lambda rows: sum(r["drop_transceiver_gone"] for r in rows) == 1, what="counted")
        assert relay.table_flows() == []  # nothing learned for it
        # A forged check for the same session gets nothing back.
        client.send(client.binding_request(ufrag, password="x" * 22))
        assert client.nothing_arrives(0.3)
        print(f"\nFIGURES transceiver_gone: forgotten {forgotten_s:.2f} s after the crash")

        # A new transceiver process at the same address (a fixed tunnel port): its sessions are
        # learned (their tokens are newer than the crash), and so it is heard again.
        time.sleep(1.1 - time.time() % 1.0)  # tokens carry whole seconds: one issued after the crash
        restarted = FakeTransceiver(port=tunnel_port)
        try:
            fresh = restarted.token(relay.keyring)
            again = Client(relay.address)
            again.send(again.binding_request(fresh, keyring=relay.keyring))
            frame, _ = restarted.recv_data()
            assert frame.port == again.address[1]
            again.close()
        finally:
            restarted.close()
    finally:
        client.close()
        cleanup_relay(relay)
