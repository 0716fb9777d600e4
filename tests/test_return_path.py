"""relay._hitpath.CReturnPath (relay/_returnpath.h), the C return path of a worker's tunnel
links, on real sockets: what it sends to clients, what it hands back to the worker (and so to
relay/return_path.py, which the relay service and call tests run it under), and its errors.
The frames come from wire/tunnel_frame.py, so the C side's tag and layout are held to it."""
from __future__ import annotations

import errno
import select
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from loopback import FAMILIES

from relay import batchio
from relay._hitpath import CReturnPath  # built by the set-up (scripts/bootstrap.sh)
from relay.flow_entry import FlowEntry
from relay.flow_indexes import CFlowIndexes
from wire.tunnel_frame import Data, Heartbeat, data_header_struct, encode_frame

BUFSIZE = 1500


@dataclass
class Rig:
    family: int
    host: str
    public: socket.socket  # the relay's public socket (unconnected)
    transceiver: socket.socket
    link: socket.socket  # the worker's link, connected to the transceiver
    clients: list[socket.socket]
    indexes: CFlowIndexes
    path: CReturnPath
    extra: list[socket.socket] = field(default_factory=list)

    def key(self, sock: socket.socket) -> bytes:
        ip, port = sock.getsockname()[:2]
        return batchio.sockaddr_for(socket.inet_pton(self.family, ip), port, self.family)

    @property
    def dest(self) -> bytes:
        return self.key(self.transceiver)

    def learn(self, client: socket.socket, handle: int, public_index: int = 0) -> FlowEntry:
        key = self.key(client)
        entry = FlowEntry(key, batchio.decode_sockaddr(key), public_index, handle, self.dest,
                          batchio.decode_sockaddr(self.dest), "ufrag")
        self.indexes.add(entry)
        return entry

    def data(self, entry: FlowEntry, payload: bytes) -> bytes:
        """The frame a transceiver sends for this flow (the relay's own header layout)."""
        header = data_header_struct(entry.client[0])
        return header.pack(entry.match, len(payload)) + payload

    def send(self, *frames: bytes) -> None:
        for frame in frames:
            self.transceiver.send(frame)
        assert select.select([self.link], [], [], 2.0)[0], "nothing reached the link"
        time.sleep(0.01)  # (all of them queued)

    def forward(self, dest: bytes | None = None) -> tuple[int, int, list[bytes], int, int]:
        return self.path.forward(self.link.fileno(), self.dest if dest is None else dest, 8)  # type: ignore[no-any-return]

    def received(self, client: socket.socket) -> list[bytes]:
        got = []
        while select.select([client], [], [], 0.2)[0]:
            data, source = client.recvfrom(4096)
            assert source[:2] == self.public.getsockname()[:2]  # from the relay's public address
            got.append(data)
        return got


@pytest.fixture(params=FAMILIES)
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    family, host = request.param
    socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(5)]
    public, transceiver, link, *clients = socks
    for s in socks:
        s.bind((host, 0))
    transceiver.connect(link.getsockname()[:2])
    link.connect(transceiver.getsockname()[:2])
    link.setblocking(False)
    indexes = CFlowIndexes([])
    header_len = data_header_struct(socket.inet_pton(family, host)).size
    path = CReturnPath(indexes.by_handle, (public.fileno(),), (header_len,), 4, BUFSIZE)
    r = Rig(family, host, public, transceiver, link, clients, indexes, path)
    yield r
    for s in socks + r.extra:
        s.close()


def test_a_flows_data_frames_go_to_its_client_and_are_counted(rig: Rig) -> None:
    a, b = rig.clients
    fa, fb = rig.learn(a, 11), rig.learn(b, 12)
    frames = [rig.data(fa, b"\x80a1"), rig.data(fb, b"\x80b1"), rig.data(fa, b"\x80a2-longer")]
    rig.send(*frames)
    packets, nbytes, others, oversized, error = rig.forward()
    assert (packets, nbytes, others, oversized, error) == (3, 3 + 3 + 10, [], 0, 0)
    assert rig.received(a) == [b"\x80a1", b"\x80a2-longer"]
    assert rig.received(b) == [b"\x80b1"]
    assert (fa.packets_out, fa.bytes_out, fb.packets_out, fb.bytes_out) == (2, 13, 1, 3)
    assert rig.path.forwarded == 3 and rig.path.sent == 3


def test_more_frames_than_a_batch_take_several_batches_in_order(rig: Rig) -> None:
    client = rig.clients[0]
    entry = rig.learn(client, 5)
    payloads = [b"\x80%02d" % n for n in range(11)]
    rig.send(*(rig.data(entry, p) for p in payloads))
    assert rig.forward()[:3] == (11, 33, [])
    assert rig.received(client) == payloads


def test_what_is_not_a_flows_data_frame_is_handed_back_whole(rig: Rig) -> None:
    """Control frames, unknown handles, a header or length that does not match the flow's, a
    flow of another transceiver, a hop socket's flow: the worker's (relay/return_path.py),
    as the bytes that arrived; none is sent and no flow counts it."""
    a, b = rig.clients
    flow = rig.learn(a, 21)
    hop = rig.learn(b, 22, public_index=1)  # index 1: beyond the public sockets (a hop socket's)
    good = rig.data(flow, b"\x80ok")
    header_len = len(good) - 3
    odd = [
        encode_frame(Heartbeat(sessions=1, capacity=10)),
        rig.data(FlowEntry(flow.client_key, flow.client, 0, 99, rig.dest, flow.target, "u"), b"\x80x"),  # unknown handle
        good[: header_len - 2] + (7).to_bytes(2, "big") + b"\x80ok",  # length field 7, payload 3
        good[:14] + bytes([good[14] ^ 1]) + good[15:],  # the client address in the header is not the flow's
        rig.data(hop, b"\x80hop"),
        b"\x01",  # shorter than a tag
    ]
    for frame in odd:
        rig.send(frame)
        packets, _nbytes, others, _oversized, error = rig.forward()
        assert (packets, others, error) == (0, [frame], 0), frame
    # a Data frame of this flow from another transceiver's link
    rig.send(good)
    other_dest = rig.key(rig.clients[1])
    assert rig.forward(dest=other_dest)[:3] == (0, 0, [good])
    assert rig.received(a) == [] and rig.received(b) == []
    assert (flow.packets_out, hop.packets_out) == (0, 0)


def test_a_batch_with_a_frame_for_the_worker_ends_the_call_after_its_hits(rig: Rig) -> None:
    """The worker sees a control frame right after the hits that came before it (and the
    ones beside it in its batch); the rest wait for the next call."""
    client = rig.clients[0]
    entry = rig.learn(client, 3)
    heartbeat = encode_frame(Heartbeat(sessions=1, capacity=10))
    rig.send(rig.data(entry, b"\x801"), heartbeat, *(rig.data(entry, b"\x80%d" % n) for n in range(2, 8)))
    packets, _nbytes, others, _oversized, _error = rig.forward()
    assert others == [heartbeat] and packets == 3  # its batch of 4: three hits and the heartbeat
    assert rig.forward()[:3] == (4, 8, [])
    assert rig.received(client) == [b"\x80%d" % n for n in range(1, 8)]


def test_a_moved_flow_is_found_by_its_new_handle_only(rig: Rig) -> None:
    client = rig.clients[0]
    entry = rig.learn(client, 40)
    old_frame = rig.data(entry, b"\x80old")
    entry.rehandle(41)
    rig.indexes.moved(entry, 40)
    rig.send(old_frame)
    assert rig.forward()[:3] == (0, 0, [old_frame])  # an alias: the Python path's (tunnel_control)
    rig.send(rig.data(entry, b"\x80new"))
    assert rig.forward()[:3] == (1, 4, [])
    assert rig.received(client) == [b"\x80new"]
    rig.indexes.remove(entry)
    frame = rig.data(entry, b"\x80gone")
    rig.send(frame)
    assert rig.forward()[:3] == (0, 0, [frame])


def test_an_oversized_frame_is_dropped_and_counted(rig: Rig) -> None:
    client = rig.clients[0]
    entry = rig.learn(client, 8)
    rig.send(rig.data(entry, b"\x80" + b"x" * BUFSIZE), rig.data(entry, b"\x80fits"))
    packets, _nbytes, others, oversized, error = rig.forward()
    assert (packets, others, oversized, error) == (1, [], 1, 0)
    assert rig.received(client) == [b"\x80fits"]


def test_a_refused_link_reports_its_errno(rig: Rig) -> None:
    """An ICMP port unreachable for the link (its transceiver's port closed) comes back as the
    receive's errno: the worker counts it, arms the link's reader again and probes the
    transceiver (relay/link_refusals.py)."""
    dest = rig.dest
    rig.transceiver.close()
    rig.link.send(b"anyone?")  # the kernel answers port unreachable
    time.sleep(0.05)
    assert rig.forward(dest) == (0, 0, [], 0, errno.ECONNREFUSED)
    assert rig.forward(dest) == (0, 0, [], 0, 0)  # (the error is reported once)


def test_a_send_error_costs_that_datagram_only(rig: Rig) -> None:
    """A client address the kernel refuses to send to (port 0: EINVAL) fails that send,
    counted as the batch senders count it; the other flows' frames still go."""
    a = rig.clients[0]
    good = rig.learn(a, 31)
    bad_key = batchio.sockaddr_for(socket.inet_pton(rig.family, rig.host), 0, rig.family)
    bad = FlowEntry(bad_key, batchio.decode_sockaddr(bad_key), 0, 32, rig.dest, batchio.decode_sockaddr(rig.dest), "u")
    rig.indexes.add(bad)
    rig.send(rig.data(good, b"\x80g1"), rig.data(bad, b"\x80bad"), rig.data(good, b"\x80g2"))
    packets, _nbytes, others, _oversized, error = rig.forward()
    assert (packets, others, error) == (3, [], 0)
    assert rig.received(a) == [b"\x80g1", b"\x80g2"]
    assert rig.path.sent == 2 and rig.path.failed == 1 and sum(rig.path.errors.values()) >= 1


def test_constructor_checks(rig: Rig) -> None:
    with pytest.raises(TypeError):
        CReturnPath({}, (rig.public.fileno(),), (24,), 4, BUFSIZE)  # a dict is not a FlowIndex
    with pytest.raises(ValueError, match="header length per public fd"):
        CReturnPath(rig.indexes.by_handle, (rig.public.fileno(),), (), 4, BUFSIZE)
    with pytest.raises(ValueError, match="header length"):
        CReturnPath(rig.indexes.by_handle, (rig.public.fileno(),), (BUFSIZE,), 4, BUFSIZE)
    with pytest.raises(TypeError):
        rig.path.forward(rig.link.fileno(), "not bytes", 1)


def test_no_references_leak_per_frame(rig: Rig) -> None:
    client = rig.clients[0]
    entry = rig.learn(client, 77)
    rig.send(rig.data(entry, b"\x80warm"))
    rig.forward()
    rig.received(client)
    before = (sys.getrefcount(entry), sys.getrefcount(entry.match), sys.getrefcount(entry.client_key))
    for _ in range(100):
        rig.send(rig.data(entry, b"\x80z"))
        assert rig.forward()[0] == 1
    assert (sys.getrefcount(entry), sys.getrefcount(entry.match), sys.getrefcount(entry.client_key)) == before
    assert len(rig.received(client)) == 100
    assert Data  # (the frame type the header layout encodes: wire/tunnel_frame.py)
