"""A transceiver that dies: the relay forgets it and tells its clients (issue #18); a forged
ICMP error does not make a live one dead.

The relay (real, 2 workers) learns a session's flow for a transceiver (relayproc's fake: a
UDP socket speaking tunnel frames), which then closes its socket, as a crashed process does.
The relay's connected tunnel link gets ICMP port unreachable at the client's next datagram;
the relay probes, nothing answers: within a second the transceiver is gone (heartbeat_timeout
is 30 s here, so nothing else can explain it), its flows are removed, and the client's next
check is answered by the relay itself with a Binding error (403) signed with the session's
password, so the client's ICE gives up now.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from icmp_forge import forge_unreachable, link_to
from relayproc import Client, FakeTransceiver, RelayProcess, cleanup_relay, rtp_like, start_relay, wait_for

from relay.link_refusals import PROBE_WAIT_S, LinkRefusals
from wire.route_token import derive_password
from wire.stun import BINDING_ERROR, parse
from wire.tunnel_frame import Data, Probe


def call_up(relay: RelayProcess, transceiver: FakeTransceiver, client: Client) -> tuple[str, Data, tuple[str, int]]:
    """A session through the relay to ``transceiver``, which heartbeats: its ufrag, the first
    media frame, and where it came from (the worker's connected link to the transceiver)."""
    ufrag = transceiver.token(relay.keyring)
    client.send(client.binding_request(ufrag, keyring=relay.keyring))
    _, tunnel = transceiver.recv_data()
    transceiver.heartbeat(tunnel)
    client.send(rtp_like(1))
    frame, link = transceiver.recv_data()
    return ufrag, frame, link


def test_a_dead_transceiver_is_known_at_once_and_its_clients_are_told(tmp_path: Path) -> None:
    relay = start_relay(tmp_path, workers=2, config={"heartbeat_timeout": 30.0})
    transceiver = FakeTransceiver()
    client = Client(relay.address)
    try:
        ufrag, _, _ = call_up(relay, transceiver, client)
        assert len(relay.table_flows()) == 1

        tunnel_port = transceiver.address[1]
        transceiver.close()  # a crash: the port refuses from now on
        died = time.monotonic()
        for seq in range(2, 12):  # the client's media: the relay's sends get ICMP back
            client.send(rtp_like(seq))
            time.sleep(0.02)
        wait_for(lambda: relay.table_flows() == [], 5, "the dead transceiver's flow removed")
        forgotten_s = time.monotonic() - died
        assert forgotten_s < 3.0  # < heartbeat_timeout (30 s): the refusal and the unanswered probe

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


def test_a_refusal_asks_and_only_an_unanswered_question_is_a_crash() -> None:
    """relay/link_refusals.py, sans-IO: a refusal asks once (a probe) however many follow; a
    heartbeat since the question answers it; silence for PROBE_WAIT_S is the crash."""
    refusals = LinkRefusals()
    heard = {b"alive": 5.0, b"dead": 5.0}
    assert refusals.refused(b"alive", 10.0) and refusals.refused(b"dead", 10.0)
    assert not refusals.refused(b"dead", 10.1)  # asked already: no second probe
    assert refusals.crashed(10.5, heard.get) == []  # waiting
    heard[b"alive"] = 10.01  # its answer
    assert refusals.crashed(10.6, heard.get) == [] and len(refusals) == 1
    assert refusals.crashed(10.0 + PROBE_WAIT_S, heard.get) == [b"dead"] and len(refusals) == 0
    assert refusals.refused(b"alive", 20.0)  # a new refusal: a new question
    assert refusals.crashed(30.0, {}.get) == [] and len(refusals) == 0  # forgotten meanwhile: nothing to do


@pytest.mark.skipif(os.geteuid() != 0, reason="forging ICMP needs a raw socket (root)")
@pytest.mark.parametrize(("code", "hit_path"), [(3, "auto"), (3, "c"), (13, "auto"), (2, "auto")],
                         ids=["port-unreachable", "port-unreachable-c-hit-path", "filtered", "protocol-unreachable"])
def test_a_forged_icmp_error_costs_a_live_transceiver_nothing(tmp_path: Path, code: int, hit_path: str) -> None:
    """ICMP errors, forged, about a live transceiver's link. Port unreachable: the relay asks
    (a Probe), the transceiver answers (a Heartbeat), every flow stays. Communication
    administratively filtered (a firewall's), protocol unreachable: nothing to ask. Either way
    the call goes on both ways (the link is still read: uvloop stops watching a socket that
    reported an error, and the worker watches it again), twice over; and a real crash afterwards is still known within a second or two. As root
    the relay loads its kernel path ("auto"); with the workers' C hit path ("c") their sends on
    the link may take the error before the reader sees it."""
    relay = start_relay(tmp_path, workers=2, config={"heartbeat_timeout": 30.0, "hit_path": hit_path})
    transceiver = FakeTransceiver()
    client = Client(relay.address)
    try:
        _, frame, link = call_up(relay, transceiver, client)
        assert link_to(transceiver.address) == link
        for round_ in range(2):
            forge_unreachable(link, transceiver.address, code)
            if code == 3:
                probe, source = transceiver.recv()
                assert isinstance(probe, Probe) and source == link
                transceiver.heartbeat(link)  # (what transceiver/tunnel.py answers)
                time.sleep(PROBE_WAIT_S + 0.3)  # past the wait: unanswered, the flows would go now
            else:
                assert transceiver.drain(0.2) == []  # (EHOSTUNREACH, ENOPROTOOPT) no question
            media = rtp_like(2 + round_)
            client.send(media)
            assert transceiver.recv_data()[0].payload == media  # still forwarded
            transceiver.reply(link, frame, b"back")
            assert client.recv()[0] == b"back"  # and the link still read
        relay.wait_flushed(lambda rows: sum(r["transceiver_refusals"] for r in rows) == (2 if code == 3 else 0),
                           what="refusals")
        rows = relay.rows()
        assert len(relay.table_flows()) == 1 and sum(r["flows_closed"] for r in rows) == 0
        assert sum(r["internal_errors"] for r in rows) == 0

        transceiver.close()  # now a crash: the probe is refused too
        died = time.monotonic()
        for seq in range(10, 20):
            client.send(rtp_like(seq))
            time.sleep(0.02)
        wait_for(lambda: relay.table_flows() == [], 5, "the dead transceiver's flow removed")
        print(f"\nFIGURES forged_icmp_{code}: 2 forged errors survived; the crash after them known in "
              f"{time.monotonic() - died:.2f} s")
    finally:
        client.close()
        cleanup_relay(relay)
