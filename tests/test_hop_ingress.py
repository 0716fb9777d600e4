"""The cluster relay's side of a hop (relay/hop_ingress.py) on real sockets, without a worker:
HopData in, each client behind an edge a virtual client, the way back framed for the edge."""
from __future__ import annotations

import contextlib
import socket
import time

import pytest

from relay.batchio import decode_sockaddr, sockaddr_for
from relay.hop_ingress import HopIngress, edge_of, parse_hop, virtual_key
from wire.tunnel_frame import (
    CLOSE_REPEATS,
    HOP_HEADER_LEN_V4,
    PROBE,
    Data,
    Heartbeat,
    HopData,
    SessionClosed,
    decode_frame,
    encode_frame,
    hop_prefix,
)

CLIENT4 = socket.inet_aton("198.51.100.7")
CLIENT6 = socket.inet_pton(socket.AF_INET6, "2001:db8::7")


def udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    return sock


def test_virtual_keys_decode_to_the_client_and_carry_the_edge() -> None:
    edge = sockaddr_for(socket.inet_aton("127.0.0.5"), 4000)
    for ip in (CLIENT4, CLIENT6):
        vkey = virtual_key(ip, 5000, edge)
        assert decode_sockaddr(vkey) == (ip, 5000)
        assert edge_of(vkey) == edge
        assert len(vkey) not in (8, 28)  # never a real source's key


def test_parse_the_fixed_header_and_the_compact_encoding() -> None:
    payload = b"\x00\x01stun"
    raw = hop_prefix(77, CLIENT4, 5000, 1) + len(payload).to_bytes(2, "big") + payload
    assert parse_hop(raw, 0, len(raw)) == (77, CLIENT4, 5000, 1, HOP_HEADER_LEN_V4)
    compact = encode_frame(HopData(77, CLIENT6, 5000, 1, payload))
    assert parse_hop(compact, 0, len(compact)) == HopData(77, CLIENT6, 5000, 1, payload)
    assert parse_hop(encode_frame(Data(1, CLIENT4, 1, b"")), 0, 20) is None


class Harness:
    def __init__(self, peer_networks: list[str] | None = None) -> None:
        self.hop = udp()
        self.edge = udp()
        self.delivered: list[tuple[int, bytes, bytes, int]] = []
        self.drops: list[str] = []
        self.ingress = HopIngress([self.hop], base=1, batch=8, bufsize=2048,
                                  peer_networks=peer_networks or ["127.0.0.0/8"],
                                  deliver=self.deliver, drop=self.drops.append)

    def deliver(self, index: int, vkey: bytes, buffer, off: int, length: int, hops: int) -> None:
        self.delivered.append((index, vkey, bytes(buffer[off : off + length]), hops))

    def send(self, raw: bytes) -> None:
        self.edge.sendto(raw, self.hop.getsockname())
        deadline = time.monotonic() + 2
        before = len(self.delivered) + len(self.drops)
        while len(self.delivered) + len(self.drops) == before and time.monotonic() < deadline:
            self.ingress.on_readable(0)
            time.sleep(0.005)

    def close(self) -> None:
        self.hop.close()
        self.edge.close()


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def test_hop_frames_are_delivered_as_virtual_clients_and_answered_through_the_edge(harness: Harness) -> None:
    payload = b"\x80\x00 rtp"
    harness.send(hop_prefix(42, CLIENT4, 5000, 0) + len(payload).to_bytes(2, "big") + payload)
    harness.send(encode_frame(HopData(43, CLIENT6, 6000, 1, b"\x00\x01 v6")))
    (i4, vkey4, got4, hops4), (i6, vkey6, got6, hops6) = harness.delivered
    edge_key = sockaddr_for(socket.inet_aton("127.0.0.1"), harness.edge.getsockname()[1])
    assert (i4, got4, hops4) == (1, payload, 0) and edge_of(vkey4) == edge_key
    assert (i6, got6, hops6) == (2, b"\x00\x01 v6", 1) and decode_sockaddr(vkey6) == (CLIENT6, 6000)
    # The way back: a Data frame with the edge's handle, to the edge, from the hop socket.
    ret = harness.ingress.senders()[0]
    ret.add(vkey4, b"\x80 back")
    ret.flush()
    raw, source = harness.edge.recvfrom(2048)
    assert source == harness.hop.getsockname()
    assert decode_frame(raw) == Data(42, CLIENT4, 5000, b"\x80 back")
    # Heartbeats to the edges with flows here; a session's end is told to its edges.
    harness.ingress.heartbeat(time.monotonic(), sessions=2)
    assert decode_frame(harness.edge.recv(2048)) == Heartbeat(2, 0)
    harness.ingress.session_ended(SessionClosed("u"), [vkey4, vkey6])  # one edge: told once
    assert decode_frame(harness.edge.recv(2048)) == SessionClosed("u")
    # An edge whose link here was refused (ICMP) probes: answered at once with a Heartbeat.
    harness.edge.sendto(PROBE, harness.hop.getsockname())
    time.sleep(0.02)
    harness.ingress.on_readable(0)
    assert decode_frame(harness.edge.recv(2048)) == Heartbeat(2, 0) and not harness.drops
    harness.edge.settimeout(0.2)
    with pytest.raises(TimeoutError):
        harness.edge.recv(2048)


def test_junk_and_strangers_are_dropped_and_named() -> None:
    h = Harness(peer_networks=["10.0.0.0/8"])
    try:
        h.send(hop_prefix(1, CLIENT4, 1, 0) + b"\x00\x01x")
        assert h.drops == ["hop_source_not_allowed"] and not h.delivered
    finally:
        h.close()
    h = Harness()
    try:
        h.send(b"\x00\x01 not a frame")
        h.send(encode_frame(Heartbeat(1, 1)))
        h.send(hop_prefix(1, CLIENT4, 1, 0) + b"\x00\x05abc")  # length says 5, 3 came
        assert h.drops == ["frame_bad_version", "hop_unexpected_frame", "frame_malformed"] and not h.delivered
        ret = h.ingress.senders()[0]
        ret.add(virtual_key(CLIENT4, 9, b"\x02\x00\x00\x01\x7f\x00\x00\x01"), b"x")  # never heard of
        assert ret.unroutable == 1
    finally:
        h.close()


def test_an_end_told_to_an_edge_is_told_again_with_the_next_heartbeats(harness: Harness) -> None:
    """A cluster relay tells an edge of a session's end once when it happens (its flows go with
    it, so the transceiver's repeats cannot reach the edge through them): it says it again with
    its next CLOSE_REPEATS heartbeats to that edge, then no more."""
    payload = b"\x80 rtp"
    harness.send(hop_prefix(42, CLIENT4, 5000, 0) + len(payload).to_bytes(2, "big") + payload)
    ((_i, vkey, _got, _hops),) = harness.delivered
    harness.ingress.session_ended(SessionClosed("u"), [vkey])
    assert decode_frame(harness.edge.recv(2048)) == SessionClosed("u")
    harness.edge.settimeout(0.2)
    for beat in range(CLOSE_REPEATS + 2):
        harness.ingress.heartbeat(time.monotonic(), sessions=1)
        frames = [decode_frame(harness.edge.recv(2048))]
        with contextlib.suppress(TimeoutError):
            while True:
                frames.append(decode_frame(harness.edge.recv(2048)))
        expected = [Heartbeat(1, 0)] + ([SessionClosed("u")] if beat < CLOSE_REPEATS else [])
        assert frames == expected, beat
    assert len(harness.ingress.repeating) == 0
