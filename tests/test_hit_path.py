"""The hit path (relay/hit_path.py): its C implementation (relay/_hitpath.c) and its Python one
on real loopback sockets, through the one interface the worker calls. Both must forward
exactly the frame wire/tunnel_frame.py defines, hand the worker everything else unchanged in
its slot, and count the same; C must keep relay.batchio's error rules. The worker-level tests run
both (tests/test_relay_service.py). And the renamed config key (hot_path → hit_path)."""

from __future__ import annotations

import errno
import logging
import select
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from loopback import FAMILIES

from daemon.config_file import ConfigError
from relay import batchio
from relay._hitpath import CHitPath, FlowIndex  # built by the set-up (scripts/bootstrap.sh)
from relay.config import load_relay_config
from relay.flows import FlowEntry
from relay.hit_path import FlowSender, HitPath, HitPathError, PythonHitPath, c_hit_path_type, describe, open_hit_path
from relay.tunnel_links import TunnelLinks
from wire.tunnel_frame import Data, data_header_struct, decode_frame

BUFSIZE = 256
HEADROOM = 64
IMPLEMENTATIONS = ["c", "python"]


@dataclass
class Flows:
    """What the hit path reads of relay.flows.LocalFlows: two dicts, and the C one's copy."""

    by_key: dict[bytes, Any] = field(default_factory=dict)
    by_address: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    c_indexes: Any = None  # open_hit_path sets it for C

    def put(self, key: bytes, entry: Any) -> None:
        self.by_key[key] = entry
        if self.c_indexes is not None:
            self.c_indexes.by_key.set(key, entry)


@dataclass
class Rig:
    """A public socket with its receiver and hit path, a client, a transceiver, the worker's
    tunnel socket and its links (relay/tunnel_links.py)."""

    impl: str
    public: socket.socket
    rx: batchio.BatchReceiver
    hit: HitPath
    client: socket.socket
    transceiver: socket.socket
    tunnel: socket.socket
    links: TunnelLinks
    flows: Flows
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
              transceiver: socket.socket | None = None) -> FlowEntry:
        key = self.key(client or self.client)
        dest = self.key(transceiver or self.transceiver)
        entry = FlowEntry(key, batchio.decode_sockaddr(key), 0, handle, dest, batchio.decode_sockaddr(dest), "ufrag")
        self.flows.put(key, entry)
        self.flows.by_address[entry.client_address] = entry
        if link:
            assert self.links.open(dest) is not None
        return entry

    def udp(self) -> socket.socket:
        """Another socket on the loopback address (closed with the rig's)."""
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        sock.bind((self.host, 0))
        sock.settimeout(2.0)
        self.extra.append(sock)
        return sock

    def send(self, payload: bytes) -> None:
        self.client.sendto(payload, self.public.getsockname())
        wait_readable(self.public)

    def forward(self) -> int | None:
        return self.hit.forward_one()


def wait_readable(sock: socket.socket, timeout: float = 2.0) -> None:
    assert select.select([sock], [], [], timeout)[0], "nothing arrived"


def make_rig(impl: str, family: int, host: str) -> Rig:
    socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(4)]
    public, client, transceiver, tunnel = socks
    tunnel.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # the links bind beside it
    for s in socks:
        s.bind((host, 0))
    transceiver.settimeout(2.0)
    client.settimeout(2.0)
    rx = batchio.BatchReceiver(public, batch=4, bufsize=BUFSIZE, headroom=HEADROOM)
    links = TunnelLinks(tunnel, limit=8, batch=4, buffer_size=1 << 20, on_open=lambda s: None, on_close=lambda s: None)
    sender = FlowSender(data_header_struct(socket.inet_pton(family, host)), links, batchio.BatchSender(tunnel, batch=4))
    flows = Flows()
    hit = open_hit_path(impl, rx, sender, flows, links.fds)  # type: ignore[arg-type]
    assert type(hit) is (CHitPath if impl == "c" else PythonHitPath)
    return Rig(impl, public, rx, hit, client, transceiver, tunnel, links, flows, host, family, [])


@pytest.fixture(params=FAMILIES)
def family_host(request: pytest.FixtureRequest) -> tuple[int, str]:
    return request.param  # type: ignore[no-any-return]


def _rig(impl: str, family_host: tuple[int, str]) -> Iterator[Rig]:
    rig = make_rig(impl, *family_host)
    yield rig
    rig.links.close_all()
    for s in (rig.public, rig.client, rig.transceiver, rig.tunnel, *rig.extra):
        s.close()


@pytest.fixture(params=IMPLEMENTATIONS)
def rig(request: pytest.FixtureRequest, family_host: tuple[int, str]) -> Iterator[Rig]:
    """Either implementation: what they must do alike."""
    yield from _rig(request.param, family_host)


@pytest.fixture
def c_rig(family_host: tuple[int, str]) -> Iterator[Rig]:
    """The C implementation: its own rules (attribute protocol, errors, references)."""
    yield from _rig("c", family_host)


def test_a_hit_goes_to_its_transceiver_framed_as_the_tunnel_frame_defines(rig: Rig) -> None:
    entry = rig.learn(handle=0x1234)
    payloads = [b"\x80" + bytes([i]) * (20 + i) for i in range(5)]
    for payload in payloads:
        rig.send(payload)
        assert rig.forward() == len(payload)
        frame, source = rig.transceiver.recvfrom(4096)
        assert source == rig.tunnel.getsockname()  # the link is bound to the tunnel's address
        assert frame == entry.prefix + len(payload).to_bytes(2, "big") + payload
        decoded = decode_frame(frame)
        assert isinstance(decoded, Data) and decoded.handle == 0x1234 and decoded.payload == payload
        assert (decoded.ip, decoded.port) == entry.client
    assert entry.packets_in == 5 and entry.bytes_in == sum(map(len, payloads))
    assert rig.hit.forwarded == 5
    assert rig.forward() is None  # nothing waiting: no blocking, no error


def test_a_miss_is_left_in_slot_0_for_the_worker_with_the_receivers_key(rig: Rig) -> None:
    payload = b"\x00\x01 a STUN-ish first datagram"
    rig.send(payload)
    assert rig.forward() == -1
    assert rig.hit.last_key == rig.client_key()
    assert rig.hit.last_length == len(payload) and rig.hit.last_truncated is False
    rig.rx.take_one(rig.hit.last_length, rig.hit.last_key, rig.hit.last_truncated)
    assert bytes(rig.rx.payload(0)) == payload and rig.rx.keys() == (rig.client_key(),)
    assert rig.rx.address(0) == batchio.decode_sockaddr(rig.client_key()) and not rig.rx.truncated(0)
    # The key is the one recvmmsg gives for the same source: the dicts agree on it.
    rig.send(b"again")
    assert rig.rx.recv() == 1 and rig.rx.keys() == (rig.hit.last_key,)
    assert rig.hit.forwarded == 0


def test_a_truncated_datagram_is_left_to_the_worker_uncounted(rig: Rig) -> None:
    entry = rig.learn()
    rig.send(b"y" * (BUFSIZE + 10))
    assert rig.forward() == -1
    assert rig.hit.last_truncated is True and rig.hit.last_length == BUFSIZE
    rig.rx.take_one(rig.hit.last_length, rig.hit.last_key, rig.hit.last_truncated)
    assert rig.rx.truncated(0) and rig.rx.truncated_count == 1
    assert entry.packets_in == 0 and rig.hit.forwarded == 0
    with pytest.raises(TimeoutError):
        rig.transceiver.settimeout(0.2)
        rig.transceiver.recvfrom(4096)


def test_a_flow_without_a_link_is_left_by_c_and_linked_by_python(rig: Rig) -> None:
    """C opens no sockets: such a hit goes to the worker (which sends it with FlowSender and
    so opens the link). Python opens the link itself."""
    entry = rig.learn(link=False)
    rig.send(b"\x80" * 40)
    if rig.impl == "c":
        assert rig.forward() == -1 and rig.hit.last_length == 40 and entry.packets_in == 0
        assert rig.transceiver_key() not in rig.links.fds
    else:
        assert rig.forward() == 40 and entry.packets_in == 1
        assert rig.transceiver_key() in rig.links.fds
        assert rig.transceiver.recv(4096) == entry.prefix + (40).to_bytes(2, "big") + b"\x80" * 40


def test_a_batch_of_hits_goes_out_in_order_per_transceiver(rig: Rig) -> None:
    """Flows to two transceivers in one batch: C sends one sendmmsg per link, Python one on
    the shared tunnel socket; each transceiver sees its frames in slot order."""
    other = rig.udp()
    clients = [rig.udp() for _ in range(3)]
    entries = [rig.learn(handle=10 + i, client=c, transceiver=other if i == 1 else None) for i, c in enumerate(clients)]
    sent = []
    for round_ in range(4):  # 12 datagrams: three batches of 4
        for i, c in enumerate(clients):
            payload = bytes([0x80, round_, i]) * 10
            c.sendto(payload, rig.public.getsockname())
            sent.append((i, payload))
    time.sleep(0.05)
    packets, nbytes, batches, last_count, leftover = rig.hit.forward_batches(16)
    assert (packets, nbytes, batches, last_count, leftover) == (12, 12 * 30, 3, 0, None)  # 0: a fourth call found none
    for sock, wanted in ((rig.transceiver, [0, 2]), (other, [1])):
        for i, payload in [(i, p) for i, p in sent if i in wanted]:
            frame = sock.recv(4096)
            assert frame == entries[i].prefix + len(payload).to_bytes(2, "big") + payload
    assert [e.packets_in for e in entries] == [4, 4, 4] and rig.hit.forwarded == 12
    assert rig.hit.forward_batches(16) == (0, 0, 0, 0, None)  # empty: nothing, no error


def test_a_batch_for_one_transceiver_goes_out_on_its_link(rig: Rig) -> None:
    entry = rig.learn()
    for i in range(3):
        rig.client.sendto(b"\x80" + bytes([i]) * 9, rig.public.getsockname())
    time.sleep(0.05)
    assert rig.hit.forward_batches(16) == (3, 30, 1, 3, None)
    for _ in range(3):
        assert rig.transceiver.recvfrom(4096)[1] == rig.tunnel.getsockname()
    assert entry.packets_in == 3


def test_a_batch_hands_its_misses_to_the_worker_in_their_slots(rig: Rig) -> None:
    entry = rig.learn()
    stranger = rig.udp()
    datagrams = [(rig.client, b"\x80hit-1"), (stranger, b"\x00\x01stun"), (rig.client, b"y" * (BUFSIZE + 5)), (rig.client, b"\x80hit-2")]
    for sock, payload in datagrams:
        sock.sendto(payload, rig.public.getsockname())
    time.sleep(0.05)
    packets, nbytes, batches, last_count, leftover = rig.hit.forward_batches(16)
    assert (packets, nbytes, batches, last_count) == (2, 12, 1, 4)
    assert leftover is not None
    misses, lengths, keys, truncated = leftover
    assert misses == [1, 2] and lengths == (6, 6, BUFSIZE, 6) and truncated == (False, False, True, False)
    assert keys == (rig.client_key(), rig.key(stranger), rig.client_key(), rig.client_key())
    rig.rx.take_batch(lengths, keys, truncated)
    assert bytes(rig.rx.payload(1)) == b"\x00\x01stun" and rig.rx.address(1) == batchio.decode_sockaddr(rig.key(stranger))
    assert rig.rx.truncated(2) and not rig.rx.truncated(1) and rig.rx.truncated_count == 1
    assert [rig.transceiver.recv(4096)[-6:] for _ in range(2)] == [b"\x80hit-1", b"\x80hit-2"]
    assert entry.packets_in == 2 and entry.bytes_in == 12 and rig.hit.forwarded == 2


def test_the_batch_budget_leaves_the_rest_in_the_socket(rig: Rig) -> None:
    rig.learn()
    for i in range(10):
        rig.client.sendto(b"\x80" + bytes([i]) * 9, rig.public.getsockname())
    time.sleep(0.05)
    assert rig.hit.forward_batches(2)[:4] == (8, 80, 2, 4)
    assert rig.hit.forward_batches(2)[:4] == (2, 20, 1, 2)


def test_the_flow_sender_frames_a_copied_datagram_and_uses_the_shared_socket_without_a_link(rig: Rig) -> None:
    """The worker's own sends (a served miss, a hit C left): the same frame, the same counters;
    where no link may be opened, the shared tunnel socket."""
    rig.links.enabled = False
    entry = rig.learn(link=False)
    sender = FlowSender(data_header_struct(entry.client[0]), rig.links, batchio.BatchSender(rig.tunnel, batch=4))
    datagram = b"\x00\x01 a first datagram"
    sender.send(entry, bytearray(HEADROOM) + datagram, HEADROOM, len(datagram))
    frame, source = rig.transceiver.recvfrom(4096)
    assert frame == entry.prefix + len(datagram).to_bytes(2, "big") + datagram and source == rig.tunnel.getsockname()
    assert (entry.packets_in, entry.bytes_in) == (1, len(datagram)) and not rig.links.fds


# --------------------------------------------------------------------------- C only

class PlainEntry:
    """A flow entry without __slots__: the C path takes the attribute protocol for it."""

    def __init__(self, entry: FlowEntry) -> None:
        self.prefix, self.tunnel_dest, self.packets_in, self.bytes_in = entry.prefix, entry.tunnel_dest, 0, 0


def test_an_entry_of_another_type_is_served_through_its_attributes(c_rig: Rig) -> None:
    """C reads FlowEntry's slots by offset (learned from the first entry); an entry of any
    other type, even after FlowEntries were served, is read through getattr/setattr."""
    rig = c_rig
    slotted = rig.learn(handle=1)
    rig.send(b"\x80slots")
    assert rig.forward() == 6 and slotted.packets_in == 1 and slotted.bytes_in == 6
    other = rig.udp()
    plain = PlainEntry(rig.learn(handle=2, client=other))
    rig.flows.put(rig.key(other), plain)
    other.sendto(b"\x80plain!", rig.public.getsockname())
    wait_readable(rig.public)
    assert rig.forward() == 7
    assert rig.transceiver.recvfrom(4096)[0] == slotted.prefix + (6).to_bytes(2, "big") + b"\x80slots"
    frame = rig.transceiver.recvfrom(4096)[0]
    assert frame == plain.prefix + (7).to_bytes(2, "big") + b"\x80plain!"
    assert (plain.packets_in, plain.bytes_in) == (1, 7)
    assert (slotted.packets_in, slotted.bytes_in) == (1, 6)


def test_an_async_icmp_error_on_the_link_is_retried_once_and_counted(c_rig: Rig) -> None:
    rig = c_rig
    entry = rig.learn()
    c_hit: Any = rig.hit
    rig.transceiver.close()  # the link's peer is gone: the kernel answers port unreachable
    rig.send(b"first")
    assert rig.forward() == 5  # sent; the ICMP error comes back afterwards
    time.sleep(0.05)
    rig.send(b"second")
    assert rig.forward() == 6  # the next send reports it, sent nothing, and is retried
    assert c_hit.errors.get(errno.ECONNREFUSED) == 1
    assert c_hit.sent == 2 and c_hit.failed == 0 and rig.hit.forwarded == 2
    assert entry.packets_in == 2


def test_a_closed_link_raises(c_rig: Rig) -> None:
    rig = c_rig
    rig.learn()
    rig.links.fds[rig.transceiver_key()] = 1_000_000  # no such descriptor
    rig.send(b"payload")
    with pytest.raises(OSError) as failure:
        rig.forward()
    c_hit: Any = rig.hit
    assert failure.value.errno == errno.EBADF and c_hit.failed == 1


def test_no_references_leak_per_datagram(c_rig: Rig) -> None:
    rig = c_rig
    entry = rig.learn()
    before = (sys.getrefcount(entry), sys.getrefcount(entry.prefix), sys.getrefcount(entry.tunnel_dest))
    for _ in range(200):
        rig.send(b"z" * 30)
        assert rig.forward() == 30
        rig.transceiver.recvfrom(4096)
    after = (sys.getrefcount(entry), sys.getrefcount(entry.prefix), sys.getrefcount(entry.tunnel_dest))
    # the index's slot keeps the prefix it copied (an IPv4 client's fits), once
    assert after == (before[0], before[1] + (rig.family == socket.AF_INET), before[2])


def test_a_rehandled_flow_is_framed_with_its_new_handle(c_rig: Rig) -> None:
    """The index slot writes its copy of the entry's prefix while the entry keeps that prefix
    object; a rehandle (a backward-shift delete moved the flow's shm slot) gives it a new one,
    and the next hit must carry the new handle, even once the old object's memory is reused."""
    rig = c_rig
    entry = rig.learn(handle=7)
    for handle in (8, 9, 10):
        rig.send(b"\x80old")
        assert rig.forward() == 4
        old = rig.transceiver.recvfrom(4096)[0]
        assert old == entry.prefix + (4).to_bytes(2, "big") + b"\x80old"
        old_prefix = entry.prefix
        entry.rehandle(handle)
        rig.send(b"\x80new")
        assert rig.forward() == 4
        frame = rig.transceiver.recvfrom(4096)[0]
        assert frame == entry.prefix + (4).to_bytes(2, "big") + b"\x80new" and frame[:-6] != old[:-6]
        assert decode_frame(frame).handle == handle  # type: ignore[union-attr]
        assert sys.getrefcount(old_prefix) == 2  # this test's (and getrefcount's): the slot let it go


def test_constructors_check_the_slot() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(ValueError, match="do not fit"):
            CHitPath(sock.fileno(), bytearray(4096), 64, 2048, 2, 64, 2048, FlowIndex(), {})
        with pytest.raises(ValueError, match="headroom"):
            CHitPath(sock.fileno(), bytearray(4096), 10, 2048, 1, 64, 2048, FlowIndex(), {})
        with pytest.raises(BufferError):
            CHitPath(sock.fileno(), b"\x00" * 4096, 64, 2048, 1, 64, 2048, FlowIndex(), {})
        with pytest.raises(TypeError):
            CHitPath(sock.fileno(), bytearray(4096), 64, 2048, 1, 64, 2048, {}, {})  # the by_key dict is not a FlowIndex
        rx = batchio.BatchReceiver(sock, batch=1, bufsize=256, headroom=16)
        sender = FlowSender(data_header_struct(b"\x7f\x00\x00\x01"), None, None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="headroom"):
            PythonHitPath(rx, sender, {}, {})


# --------------------------------------------------------------------------- the choice

def test_hit_path_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert c_hit_path_type("auto") is CHitPath and c_hit_path_type("c") is CHitPath
    assert c_hit_path_type("python") is None
    assert describe("auto") == "C (relay._hitpath)" and describe("python").startswith("Python")
    monkeypatch.setitem(sys.modules, "relay._hitpath", None)  # as if it was never built
    assert c_hit_path_type("auto") is None
    assert describe("auto") == "Python (relay._hitpath is not built)"
    with pytest.raises(HitPathError, match="hit_path"):
        c_hit_path_type("c")
    with pytest.raises(HitPathError, match="hit_path"):
        describe("c")


def test_the_old_key_hot_path_is_read_as_hit_path_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    for name in ("RTCRELAY_RELAY_HIT_PATH", "RTCRELAY_RELAY_HOT_PATH"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "relay.toml"
    config.write_text('hot_path = "python"\n')
    with caplog.at_level(logging.WARNING, logger="rtcrelay.config"):
        assert load_relay_config(str(config)).hit_path == "python"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "`hot_path`" in warnings[0] and "`hit_path`" in warnings[0]
    # in the environment as well, and a later source still wins
    monkeypatch.setenv("RTCRELAY_RELAY_HOT_PATH", "c")
    caplog.clear()
    assert load_relay_config(str(config)).hit_path == "c"
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # once, for both sources
    monkeypatch.delenv("RTCRELAY_RELAY_HOT_PATH")
    # the new key alone: no warning; both with the same value: fine
    for text in ('hit_path = "python"\n', 'hit_path = "python"\nhot_path = "python"\n'):
        config.write_text(text)
        caplog.clear()
        assert load_relay_config(str(config)).hit_path == "python"
        assert bool(caplog.records) == ("hot_path" in text)
    # both with different values: an error that names both
    config.write_text('hit_path = "c"\nhot_path = "python"\n')
    with pytest.raises(ConfigError, match=r"`hot_path`.*`hit_path`"):
        load_relay_config(str(config))
    # the old key's values are checked as the new key's
    config.write_text('hot_path = "fast"\n')
    with pytest.raises(ConfigError, match="hit_path"):
        load_relay_config(str(config))
