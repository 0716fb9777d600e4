"""relay/_fastpath.c (the C hit path, single datagrams and batches) on real loopback sockets: it must
forward exactly what the Python line does, hand Python everything else unchanged, and keep
relay.batchio's error rules. The worker-level tests run both paths (tests/test_relay_service.py)."""

from __future__ import annotations

import errno
import select
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from loopback import FAMILIES
from relay import batchio
from relay.flows import FlowEntry
from relay.hot_path import HotPathError, describe, fast_path_type
from wire.tunnel_frame import Data, decode_frame

# The suite's set-up (scripts/bootstrap.sh) builds the extension: its absence is a failure here.
from relay._fastpath import PublicFastPath  # noqa: E402

BUFSIZE = 256
HEADROOM = 64


@dataclass
class Rig:
    """A public socket with its receiver and fast path, a client, a transceiver and its link."""

    public: socket.socket
    rx: batchio.BatchReceiver
    fast: PublicFastPath
    client: socket.socket
    transceiver: socket.socket
    link: socket.socket
    by_key: dict[bytes, FlowEntry]
    link_fds: dict[bytes, int]
    host: str
    family: int
    extra: list[socket.socket]

    def key(self, sock: socket.socket) -> bytes:
        ip, port = sock.getsockname()[:2]
        return batchio.sockaddr_for(socket.inet_pton(self.family, ip), port, self.family)

    def client_key(self) -> bytes:
        return self.key(self.client)

    def transceiver_key(self) -> bytes:
        return self.key(self.transceiver)

    def learn(self, handle: int = 7, link: bool = True, client: socket.socket | None = None,
              transceiver: socket.socket | None = None, link_sock: socket.socket | None = None) -> FlowEntry:
        key = self.key(client or self.client)
        dest = self.key(transceiver or self.transceiver)
        entry = FlowEntry(key, batchio.decode_sockaddr(key), 0, handle, dest, batchio.decode_sockaddr(dest), "ufrag")
        self.by_key[key] = entry
        if link:
            self.link_fds[dest] = (link_sock or self.link).fileno()
        return entry

    def udp(self, connect_to: socket.socket | None = None) -> socket.socket:
        """Another socket on the loopback address (closed with the rig's)."""
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        sock.bind((self.host, 0))
        sock.settimeout(2.0)
        if connect_to is not None:
            sock.connect(connect_to.getsockname())
        self.extra.append(sock)
        return sock

    def send(self, payload: bytes) -> None:
        self.client.sendto(payload, self.public.getsockname())
        wait_readable(self.public)

    def forward(self) -> int | None:
        return self.fast.forward_one()


def wait_readable(sock: socket.socket, timeout: float = 2.0) -> None:
    assert select.select([sock], [], [], timeout)[0], "nothing arrived"


@pytest.fixture(params=FAMILIES)
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    family, host = request.param
    socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(4)]
    public, client, transceiver, link = socks
    for s in socks[:3]:
        s.bind((host, 0))
    link.bind((host, 0))
    link.connect(transceiver.getsockname())
    transceiver.settimeout(2.0)
    client.settimeout(2.0)
    rx = batchio.BatchReceiver(public, batch=4, bufsize=BUFSIZE, headroom=HEADROOM)
    by_key: dict[bytes, FlowEntry] = {}
    link_fds: dict[bytes, int] = {}
    fast = PublicFastPath(public.fileno(), rx.buffer, rx.offsets[0], rx.stride, rx.batch, HEADROOM, BUFSIZE, by_key, link_fds)
    rig = Rig(public, rx, fast, client, transceiver, link, by_key, link_fds, host, family, [])
    yield rig
    for s in socks + rig.extra:
        s.close()


def test_a_hit_goes_to_the_link_as_the_python_path_frames_it(rig: Rig) -> None:
    entry = rig.learn(handle=0x1234)
    payloads = [b"\x80" + bytes([i]) * (20 + i) for i in range(5)]
    for payload in payloads:
        rig.send(payload)
        assert rig.forward() == len(payload)
        frame, source = rig.transceiver.recvfrom(4096)
        assert source == rig.link.getsockname()
        # byte for byte the Python line's frame: the flow's prefix, the length, the payload
        assert frame == entry.prefix + len(payload).to_bytes(2, "big") + payload
        decoded = decode_frame(frame)
        assert isinstance(decoded, Data) and decoded.handle == 0x1234 and decoded.payload == payload
        assert (decoded.ip, decoded.port) == entry.client
    assert entry.packets_in == 5 and entry.bytes_in == sum(map(len, payloads))
    assert (rig.fast.sent, rig.fast.dropped_eagain, rig.fast.failed) == (5, 0, 0)
    assert rig.forward() is None  # nothing waiting: no blocking, no error


class PlainEntry:
    """A flow entry without __slots__: the C path takes the attribute protocol for it."""

    def __init__(self, entry: FlowEntry) -> None:
        self.prefix, self.tunnel_dest, self.packets_in, self.bytes_in = entry.prefix, entry.tunnel_dest, 0, 0


def test_an_entry_of_another_type_is_served_through_its_attributes(rig: Rig) -> None:
    """The C path reads FlowEntry's slots by offset (learned from the first entry); an entry of
    any other type, even after FlowEntries were served, is read through getattr/setattr."""
    slotted = rig.learn(handle=1)
    rig.send(b"\x80slots")
    assert rig.forward() == 6 and slotted.packets_in == 1 and slotted.bytes_in == 6
    other = rig.udp()
    plain = PlainEntry(rig.learn(handle=2, client=other))
    rig.by_key[rig.key(other)] = plain  # type: ignore[assignment]
    other.sendto(b"\x80plain!", rig.public.getsockname())
    wait_readable(rig.public)
    assert rig.forward() == 7
    assert rig.transceiver.recvfrom(4096)[0] == slotted.prefix + (6).to_bytes(2, "big") + b"\x80slots"
    frame = rig.transceiver.recvfrom(4096)[0]
    assert frame == plain.prefix + (7).to_bytes(2, "big") + b"\x80plain!"
    assert (plain.packets_in, plain.bytes_in) == (1, 7)
    assert (slotted.packets_in, slotted.bytes_in) == (1, 6)


def test_a_miss_is_left_in_slot_0_for_python_with_the_receivers_key(rig: Rig) -> None:
    payload = b"\x00\x01 a STUN-ish first datagram"
    rig.send(payload)
    assert rig.forward() == -1
    assert rig.fast.last_key == rig.client_key()
    assert rig.fast.last_length == len(payload) and rig.fast.last_truncated is False
    rig.rx.take_one(rig.fast.last_length, rig.fast.last_key, rig.fast.last_truncated)
    assert bytes(rig.rx.payload(0)) == payload and rig.rx.keys() == (rig.client_key(),)
    assert rig.rx.address(0) == batchio.decode_sockaddr(rig.client_key()) and not rig.rx.truncated(0)
    # The key is the one recvmmsg gives for the same source: the dicts agree on it.
    rig.send(b"again")
    assert rig.rx.recv() == 1 and rig.rx.keys() == (rig.fast.last_key,)
    assert rig.fast.sent == 0


def test_a_truncated_datagram_or_a_flow_without_link_goes_to_python(rig: Rig) -> None:
    entry = rig.learn(link=False)
    rig.send(b"x" * 40)
    assert rig.forward() == -1 and rig.fast.last_length == 40  # known flow, no link yet
    rig.link_fds[rig.transceiver_key()] = rig.link.fileno()
    rig.send(b"y" * (BUFSIZE + 10))
    assert rig.forward() == -1
    assert rig.fast.last_truncated is True and rig.fast.last_length == BUFSIZE
    rig.rx.take_one(rig.fast.last_length, rig.fast.last_key, rig.fast.last_truncated)
    assert rig.rx.truncated(0) and rig.rx.truncated_count == 1
    assert entry.packets_in == 0 and rig.fast.sent == 0  # Python decides about both
    with pytest.raises(TimeoutError):
        rig.transceiver.settimeout(0.2)
        rig.transceiver.recvfrom(4096)


def test_an_async_icmp_error_on_the_link_is_retried_once_and_counted(rig: Rig) -> None:
    entry = rig.learn()
    port = rig.transceiver.getsockname()[1]
    rig.transceiver.close()  # the link's peer is gone: the kernel answers port unreachable
    rig.send(b"first")
    assert rig.forward() == 5  # sent; the ICMP error comes back afterwards
    time.sleep(0.05)
    rig.send(b"second")
    assert rig.forward() == 6  # the next send reports it, sent nothing, and is retried
    assert rig.fast.errors.get(errno.ECONNREFUSED) == 1
    assert rig.fast.sent == 2 and rig.fast.failed == 0
    assert entry.packets_in == 2 and port > 0


def test_a_closed_link_raises(rig: Rig) -> None:
    rig.learn()
    rig.link_fds[rig.transceiver_key()] = 1_000_000  # no such descriptor
    rig.send(b"payload")
    with pytest.raises(OSError) as failure:
        rig.forward()
    assert failure.value.errno == errno.EBADF and rig.fast.failed == 1


def test_a_batch_of_hits_goes_out_per_link_in_order(rig: Rig) -> None:
    """Flows to two transceivers in one batch: one sendmmsg per link, each in slot order."""
    other = rig.udp()
    other_link = rig.udp(connect_to=other)
    clients = [rig.udp() for _ in range(3)]
    entries = [rig.learn(handle=10 + i, client=c, transceiver=other if i == 1 else None, link_sock=other_link if i == 1 else None)
               for i, c in enumerate(clients)]
    sent = []
    for round_ in range(4):  # 12 datagrams: three batches of 4
        for i, c in enumerate(clients):
            payload = bytes([0x80, round_, i]) * 10
            c.sendto(payload, rig.public.getsockname())
            sent.append((i, payload))
    time.sleep(0.05)
    packets, nbytes, batches, last_count, leftover = rig.fast.forward_batches(16)
    assert (packets, nbytes, batches, last_count, leftover) == (12, 12 * 30, 3, 0, None)  # 0: a fourth call found none
    for sock, wanted in ((rig.transceiver, [0, 2]), (other, [1])):
        for i, payload in [(i, p) for i, p in sent if i in wanted]:
            frame = sock.recv(4096)
            assert frame == entries[i].prefix + len(payload).to_bytes(2, "big") + payload
    assert [e.packets_in for e in entries] == [4, 4, 4] and rig.fast.sent == 12
    assert rig.fast.forward_batches(16) == (0, 0, 0, 0, None)  # empty: nothing, no error


def test_a_batch_hands_its_misses_to_python_in_their_slots(rig: Rig) -> None:
    entry = rig.learn()
    stranger = rig.udp()
    datagrams = [(rig.client, b"\x80hit-1"), (stranger, b"\x00\x01stun"), (rig.client, b"y" * (BUFSIZE + 5)), (rig.client, b"\x80hit-2")]
    for sock, payload in datagrams:
        sock.sendto(payload, rig.public.getsockname())
    time.sleep(0.05)
    packets, nbytes, batches, last_count, leftover = rig.fast.forward_batches(16)
    assert (packets, nbytes, batches, last_count) == (2, 12, 1, 4)
    misses, lengths, keys, truncated = leftover
    assert misses == [1, 2] and lengths == (6, 6, BUFSIZE, 6) and truncated == (False, False, True, False)
    assert keys == (rig.client_key(), rig.key(stranger), rig.client_key(), rig.client_key())
    rig.rx.take_batch(lengths, keys, truncated)
    assert bytes(rig.rx.payload(1)) == b"\x00\x01stun" and rig.rx.address(1) == batchio.decode_sockaddr(rig.key(stranger))
    assert rig.rx.truncated(2) and not rig.rx.truncated(1) and rig.rx.truncated_count == 1
    assert [rig.transceiver.recv(4096)[-6:] for _ in range(2)] == [b"\x80hit-1", b"\x80hit-2"]
    assert entry.packets_in == 2


def test_the_batch_budget_leaves_the_rest_in_the_socket(rig: Rig) -> None:
    rig.learn()
    for i in range(10):
        rig.client.sendto(b"\x80" + bytes([i]) * 9, rig.public.getsockname())
    time.sleep(0.05)
    assert rig.fast.forward_batches(2)[:4] == (8, 80, 2, 4)
    assert rig.fast.forward_batches(2)[:4] == (2, 20, 1, 2)


def test_no_references_leak_per_datagram(rig: Rig) -> None:
    entry = rig.learn()
    before = (sys.getrefcount(entry), sys.getrefcount(entry.prefix), sys.getrefcount(entry.tunnel_dest))
    for i in range(200):
        rig.send(b"z" * 30)
        assert rig.forward() == 30
        rig.transceiver.recvfrom(4096)
    assert (sys.getrefcount(entry), sys.getrefcount(entry.prefix), sys.getrefcount(entry.tunnel_dest)) == before


def test_constructor_checks_the_slot() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(ValueError, match="do not fit"):
            PublicFastPath(sock.fileno(), bytearray(4096), 64, 2048, 2, 64, 2048, {}, {})
        with pytest.raises(ValueError, match="headroom"):
            PublicFastPath(sock.fileno(), bytearray(4096), 10, 2048, 1, 64, 2048, {}, {})
        with pytest.raises(BufferError):
            PublicFastPath(sock.fileno(), b"\x00" * 4096, 64, 2048, 1, 64, 2048, {}, {})
        with pytest.raises(TypeError):
            PublicFastPath(sock.fileno(), bytearray(4096), 64, 2048, 1, 64, 2048, [], {})


def test_hot_path_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fast_path_type("auto") is PublicFastPath and fast_path_type("c") is PublicFastPath
    assert fast_path_type("python") is None
    assert describe("auto") == "C (relay._fastpath)" and describe("python").startswith("Python")
    monkeypatch.setitem(sys.modules, "relay._fastpath", None)  # as if it was never built
    assert fast_path_type("auto") is None
    assert describe("auto") == "Python (relay._fastpath is not built)"
    with pytest.raises(HotPathError, match="hot_path"):
        fast_path_type("c")
    with pytest.raises(HotPathError, match="hot_path"):
        describe("c")
