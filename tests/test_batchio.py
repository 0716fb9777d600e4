"""relay/batchio on real loopback sockets: both implementations (recvmmsg/sendmmsg through
ctypes, and the recvfrom_into/sendto fallback) must pass the same tests."""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Iterator

import pytest
from icmp_forge import forge_unreachable
from loopback import FAMILIES, has_ipv6

from relay import batchio
from relay.batchio.errors import SendAction, send_action

IMPLS = [
    pytest.param(
        (batchio.MmsgReceiver, batchio.MmsgSender),
        id="mmsg",
        marks=pytest.mark.skipif(not batchio.HAVE_MMSG, reason="no recvmmsg/sendmmsg in libc"),
    ),
    pytest.param((batchio.FallbackReceiver, batchio.FallbackSender), id="fallback"),
]


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> tuple[type, type]:
    return request.param


@pytest.fixture(params=FAMILIES)
def fam(request: pytest.FixtureRequest) -> tuple[int, str]:
    return request.param


@pytest.fixture
def udp() -> Iterator:
    made: list[socket.socket] = []

    def make(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((host, 0))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def key_of(sock: socket.socket) -> bytes:
    """The sockaddr bytes a receiver reports for datagrams from ``sock``."""
    addr = sock.getsockname()
    return batchio.sockaddr_for(socket.inet_pton(sock.family, addr[0]), addr[1], sock.family)


def recv_until(rx, want: int, timeout: float = 3.0) -> list[tuple[bytes, bytes]]:
    """(key, payload) of ``want`` datagrams, receiving in batches; bounded in time."""
    got: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        n = rx.recv()
        if not n:
            select.select([rx.sock], [], [], 0.05)
            continue
        assert n <= rx.batch and n == rx.count == len(rx.lengths)
        keys = rx.keys()
        for i in range(n):
            assert rx.key(i) == keys[i]
            assert rx.length(i) == rx.lengths[i] == len(rx.payload(i))
            got.append((keys[i], bytes(rx.payload(i))))
    return got


def drain(sock: socket.socket, want: int, timeout: float = 3.0) -> list[tuple[bytes, tuple]]:
    sock.settimeout(0.2)
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        try:
            out.append(sock.recvfrom(65536))
        except TimeoutError:
            pass
    return out


def payload(k: int) -> bytes:
    return struct.pack("!I", k) + bytes([k % 251]) * (k % 97)


# --- receive ---------------------------------------------------------------------------------


def test_batch_receive_payloads_lengths_sources(impl, fam, udp) -> None:
    rx_cls, _ = impl
    family, host = fam
    server = udp(family, host)
    clients = [udp(family, host) for _ in range(3)]
    rx = rx_cls(server, batch=64)
    total = 200
    for k in range(total):
        clients[k % 3].sendto(payload(k), server.getsockname())
    got = recv_until(rx, total)
    assert len(got) == total
    assert rx.received == total
    assert [p for _, p in got] == [payload(k) for k in range(total)]
    assert [key for key, _ in got] == [key_of(clients[k % 3]) for k in range(total)]
    # decoded source address, on demand
    n_keys = {key_of(c): c for c in clients}
    for key in n_keys:
        ip, port = batchio.decode_sockaddr(key)
        c = n_keys[key]
        assert (ip, port) == (socket.inet_pton(family, c.getsockname()[0]), c.getsockname()[1])
        assert len(ip) == (4 if family == socket.AF_INET else 16)
    assert len(got[0][0]) == (8 if family == socket.AF_INET else 28)


def test_address_accessor_and_batches_of_batch_size(impl, udp) -> None:
    rx_cls, _ = impl
    server, client = udp(), udp()
    rx = rx_cls(server, batch=8)
    for k in range(20):
        client.sendto(payload(k), server.getsockname())
    time.sleep(0.05)  # loopback delivers in the sender's call, but softirqs may be deferred
    sizes = []
    deadline = time.monotonic() + 3
    while sum(sizes) < 20 and time.monotonic() < deadline:
        n = rx.recv()
        if n:
            sizes.append(n)
            ip, port = rx.address(0)
            assert (socket.inet_ntoa(ip), port) == client.getsockname()
            assert not any(rx.truncated(i) for i in range(n))
    assert sizes == [8, 8, 4]


def test_empty_socket_returns_zero(impl, fam, udp) -> None:
    rx_cls, _ = impl
    rx = rx_cls(udp(*fam))
    assert rx.recv() == 0
    assert rx.count == 0 and rx.lengths == () and rx.truncated_count == 0
    assert rx.errors == {}
    assert rx.sock.getblocking() is False


def test_use_socket_moves_one_set_of_buffers_to_another_socket(impl, udp) -> None:
    rx_cls, _ = impl
    first, second, client = udp(), udp(), udp()
    rx = rx_cls(first)
    client.sendto(b"to the second", second.getsockname())
    client.sendto(b"to the first", first.getsockname())
    assert recv_until(rx, 1) == [(key_of(client), b"to the first")]
    rx.use_socket(second)
    assert rx.fd == second.fileno() and second.getblocking() is False
    assert recv_until(rx, 1) == [(key_of(client), b"to the second")]
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        with pytest.raises(ValueError, match="family"):
            rx.use_socket(v6)
    finally:
        v6.close()
    assert rx.fd == second.fileno()


def test_truncated_datagram_is_reported(impl, fam, udp) -> None:
    rx_cls, _ = impl
    server, client = udp(*fam), udp(*fam)
    rx = rx_cls(server, batch=8, bufsize=100)
    sizes = [50, 100, 101, 150, 10]
    for k, size in enumerate(sizes):
        client.sendto(bytes([k]) * size, server.getsockname())
    deadline = time.monotonic() + 3
    seen: list[tuple[int, bool, int]] = []
    truncated_total = 0
    while len(seen) < len(sizes) and time.monotonic() < deadline:
        n = rx.recv()
        truncated_total += rx.truncated_count
        for i in range(n):
            seen.append((rx.lengths[i], rx.truncated(i), rx.flags(i) & batchio.MSG_TRUNC))
            assert bytes(rx.payload(i)) == bytes([len(seen) - 1]) * rx.lengths[i]
    assert [(ln, t) for ln, t, _ in seen] == [(50, False), (100, False), (100, True), (100, True), (10, False)]
    assert [bool(f) for _, _, f in seen] == [False, False, True, True, False]
    assert truncated_total == 2


def test_recv_one_takes_one_datagram_and_looks_like_a_batch_of_one(impl, fam, udp) -> None:
    """recv_one: one datagram into slot 0, its source as recvfrom gives it, and the batch
    accessors (key worked out on demand, lengths, truncation) as for a batch of one."""
    rx_cls, _ = impl
    server, client = udp(*fam), udp(*fam)
    rx = rx_cls(server, batch=8, bufsize=100)
    assert rx.recv_one() is None and rx.errors == {}  # nothing waiting: no exception, no count
    for size in (60, 101, 7):
        client.sendto(bytes([size]) * size, server.getsockname())
    time.sleep(0.05)
    generation = rx.generation
    address = rx.recv_one()
    assert address == client.getsockname()
    assert batchio.address_tuple(key_of(client)) == address  # the flows' by_address key
    assert (rx.count, rx.lengths, rx.truncated_count, rx.generation) == (1, (60,), 0, generation + 1)
    assert rx.keys() == (key_of(client),) and rx.key(0) == key_of(client)
    assert bytes(rx.payload(0)) == bytes([60]) * 60 and not rx.truncated(0)
    assert rx.recv_one() == address  # 101 bytes into a 100-byte slot: truncated
    assert (rx.lengths, rx.truncated_count, rx.truncated(0)) == ((100,), 1, True)
    assert rx.flags(0) & batchio.MSG_TRUNC
    # a batch receive after it sees its own sources again, not recv_one's
    other = udp(*fam)
    other.sendto(b"from the other", server.getsockname())
    got = recv_until(rx, 2)
    assert got == [(key_of(client), bytes([7]) * 7), (key_of(other), b"from the other")]
    assert rx.received == 4


def test_address_tuple_is_what_recvfrom_reports(fam, udp) -> None:
    server, client = udp(*fam), udp(*fam)
    client.sendto(b"x", server.getsockname())
    _, source = server.recvfrom(16)
    assert batchio.address_tuple(key_of(client)) == source


def test_async_icmp_error_on_receive_is_transient(impl, udp) -> None:
    """A connected socket gets ECONNREFUSED once after sending to a closed port: not fatal."""
    rx_cls, _ = impl
    server, peer = udp(), udp()
    peer_addr = peer.getsockname()
    server.connect(peer_addr)
    peer.sendto(b"queued-before", server.getsockname())
    time.sleep(0.02)
    peer.close()
    server.send(b"to-a-closed-port")  # ICMP port unreachable → pending ECONNREFUSED
    time.sleep(0.05)
    rx = rx_cls(server)
    got = recv_until(rx, 1)
    assert [p for _, p in got] == [b"queued-before"]
    assert rx.errors.get(errno.ECONNREFUSED) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="forging ICMP needs a raw socket (root)")
def test_protocol_unreachable_on_receive_is_transient(impl, udp) -> None:
    """ICMP protocol unreachable (code 2) reaches a connected socket as ENOPROTOOPT on its next
    call: counted, the datagram queued behind it still received."""
    rx_cls, _ = impl
    server, peer = udp(), udp()
    server.connect(peer.getsockname())
    forge_unreachable(server.getsockname(), peer.getsockname(), 2)
    time.sleep(0.05)
    peer.sendto(b"after", server.getsockname())
    time.sleep(0.02)
    rx = rx_cls(server)
    got = recv_until(rx, 1)
    assert [p for _, p in got] == [b"after"] and rx.errors == {errno.ENOPROTOOPT: 1}
    assert send_action(errno.ENOPROTOOPT, False) is SendAction.RETRY_ASYNC  # (a send that reports it sent nothing)


def test_async_icmp_error_on_recv_one_is_counted_not_raised(impl, udp) -> None:
    rx_cls, _ = impl
    server, peer = udp(), udp()
    server.connect(peer.getsockname())
    peer.close()
    server.send(b"to-a-closed-port")  # ICMP port unreachable → pending ECONNREFUSED
    time.sleep(0.05)
    rx = rx_cls(server)
    assert rx.recv_one() is None
    assert rx.errors == {errno.ECONNREFUSED: 1}
    assert rx.recv_one() is None and rx.errors == {errno.ECONNREFUSED: 1}  # reported once: now EAGAIN
    rx.sock.close()
    with pytest.raises(OSError) as raised:
        rx.recv_one()  # a closed descriptor is no transient error
    assert raised.value.errno == errno.EBADF


def test_v4_mapped_on_dual_stack_socket(impl, udp) -> None:
    if not has_ipv6():
        pytest.skip("no IPv6")
    rx_cls, tx_cls = impl
    server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind(("::ffff:127.0.0.1", 0))
        client = udp()
        client.sendto(b"hello", ("127.0.0.1", server.getsockname()[1]))
        rx = rx_cls(server)
        got = recv_until(rx, 1)
        cport = client.getsockname()[1]
        mapped = b"\x00" * 10 + b"\xff\xff" + socket.inet_aton("127.0.0.1")
        assert got == [(batchio.sockaddr_for(mapped, cport), b"hello")]
        assert rx.address(0) == (mapped, cport)
        # a reply to the key, and to the sender's sockaddr_for of the plain IPv4 address
        tx = tx_cls(server)
        assert tx.sockaddr_for(socket.inet_aton("127.0.0.1"), cport) == got[0][0]
        tx.add(got[0][0], b"reply-1")
        tx.add(tx.sockaddr_for(socket.inet_aton("127.0.0.1"), cport), b"reply-2")
        assert tx.flush() == 2
        assert [d for d, _ in drain(client, 2)] == [b"reply-1", b"reply-2"]
    finally:
        server.close()


# --- send ------------------------------------------------------------------------------------


def test_header_in_place_then_add_rx_arrives_intact(impl, fam, udp) -> None:
    rx_cls, tx_cls = impl
    server, client, out, sink = udp(*fam), udp(*fam), udp(*fam), udp(*fam)
    rx = rx_cls(server, batch=16, headroom=64)
    tx = tx_cls(out, batch=16)
    dest = key_of(sink)
    for k in range(40):
        client.sendto(payload(k), server.getsockname())
    expected = []
    deadline = time.monotonic() + 3
    while len(expected) < 40 and time.monotonic() < deadline:
        n = rx.recv()
        for i in range(n):
            hl = 24 if i % 2 else 36  # per-packet header lengths (IPv4 / IPv6 tunnel frames)
            fv = rx.frame_view(i, hl)
            assert len(fv) == hl + rx.lengths[i]
            fv[:hl] = bytes([0xA0 + i % 16]) * hl
            expected.append(bytes(fv))
            tx.add_rx(dest, rx, i, hl)
        assert tx.flush() == n
    assert tx.sent == 40 and tx.failed == 0 and tx.dropped_eagain == 0
    got = drain(sink, 40)
    assert [d for d, _ in got] == expected
    assert all(a[1] == out.getsockname()[1] for _, a in got)


def test_add_rx_strip_sends_the_payload_without_its_tunnel_header(impl, fam, udp) -> None:
    """The return path: a frame arrives with a header; the client gets what follows it."""
    rx_cls, tx_cls = impl
    tunnel, transceiver, public, client = udp(*fam), udp(*fam), udp(*fam), udp(*fam)
    rx, tx = rx_cls(tunnel, headroom=0), tx_cls(public)
    frames = [b"H" * 24 + payload(k) for k in range(5)] + [b"H" * 24]  # the last: empty payload
    for f in frames:
        transceiver.sendto(f, tunnel.getsockname())
    time.sleep(0.05)
    got = recv_until(rx, 6)
    assert len(got) == 6 and rx.count == 6
    for i in range(rx.count):
        tx.add_rx(key_of(client), rx, i, 0, strip=24)
    with pytest.raises(ValueError):
        tx.add_rx(key_of(client), rx, 5, 0, strip=25)
    assert tx.flush() == 6
    assert [d for d, _ in drain(client, 6)] == [f[24:] for f in frames]


def test_send_rx_whole_batch_with_skips(impl, fam, udp) -> None:
    rx_cls, tx_cls = impl
    server, client, out = udp(*fam), udp(*fam), udp(*fam)
    sinks = [udp(*fam), udp(*fam)]
    rx = rx_cls(server, batch=32, headroom=32)
    tx = tx_cls(out, batch=32)
    dests = [key_of(s) for s in sinks]
    for k in range(30):
        client.sendto(payload(k), server.getsockname())
    expected: list[list[bytes]] = [[], []]
    done = 0
    deadline = time.monotonic() + 3
    while done < 30 and time.monotonic() < deadline:
        n = rx.recv()
        if not n:
            continue
        per: list[bytes] = []
        skip = []
        for i in range(n):
            k = done + i
            if k % 5 == 0:
                skip.append(i)
                per.append(b"")
                continue
            struct.pack_into("!4sI", rx.buffer, rx.offsets[i] - 8, b"HDR!", k)
            per.append(dests[k % 2])
            expected[k % 2].append(b"HDR!" + struct.pack("!I", k) + payload(k))
        assert tx.send_rx(rx, per, 8, skip) == n - len(skip)
        done += n
    assert done == 30
    assert tx.sent == 24
    for s, exp in zip(sinks, expected):
        assert [d for d, _ in drain(s, len(exp))] == exp


def test_send_rx_per_message_header_lengths(impl, udp) -> None:
    rx_cls, tx_cls = impl
    server, client, out, sink = udp(), udp(), udp(), udp()
    rx, tx = rx_cls(server, batch=16), tx_cls(out)
    calls: list[int] = []
    if isinstance(tx, batchio.MmsgSender):
        real = tx._sendmmsg

        def counting(fd, ptr, n, flags):
            calls.append(n)
            return real(fd, ptr, n, flags)

        tx._sendmmsg = counting
    expected = []
    for rnd in range(2):  # the second round checks the mirror was restored
        for k in range(10):
            client.sendto(payload(k), server.getsockname())
        time.sleep(0.05)
        n = rx.recv()
        assert n == 10
        hls = [24 if k % 3 else 36 for k in range(n)] if rnd == 0 else [24] * n
        for i in range(n):
            rx.frame_view(i, hls[i])[: hls[i]] = bytes([i]) * hls[i]
            if i != 4:
                expected.append(bytes(rx.frame_view(i, hls[i])))
        assert tx.send_rx(rx, [key_of(sink)] * n, hls if rnd == 0 else 24, skip=[4]) == 9
    assert [d for d, _ in drain(sink, 18)] == expected
    if isinstance(tx, batchio.MmsgSender):
        assert calls == [4, 5, 4, 5]  # one sendmmsg per run between skipped messages


def test_send_rx_receiver_batch_larger_than_sender_batch(impl, udp) -> None:
    rx_cls, tx_cls = impl
    server, client, out, sink = udp(), udp(), udp(), udp()
    rx, tx = rx_cls(server, batch=32), tx_cls(out, batch=4)
    for k in range(20):
        client.sendto(payload(k), server.getsockname())
    time.sleep(0.05)
    n = rx.recv()
    assert n == 20
    assert tx.send_rx(rx, [key_of(sink)] * n, 0) == 20
    assert [d for d, _ in drain(sink, 20)] == [payload(k) for k in range(20)]


def test_wrong_family_destination_fails_that_message(impl, udp) -> None:
    _, tx_cls = impl
    out, sink = udp(), udp()
    tx = tx_cls(out)
    tx.add(batchio.sockaddr_for(socket.inet_pton(socket.AF_INET6, "2001:db8::1"), 9), b"nope")
    tx.add(key_of(sink), b"yes")
    assert tx.flush() == 1
    assert tx.failed == 1 and tx.errors == {errno.EAFNOSUPPORT: 1}
    assert [d for d, _ in drain(sink, 1)] == [b"yes"]


def test_send_rx_connected(impl, udp) -> None:
    rx_cls, tx_cls = impl
    server, client, out, sink = udp(), udp(), udp(), udp()
    out.connect(sink.getsockname())
    rx = rx_cls(server)
    tx = tx_cls(out, connected=True)
    for k in range(10):
        client.sendto(payload(k), server.getsockname())
    got = 0
    deadline = time.monotonic() + 3
    while got < 10 and time.monotonic() < deadline:
        n = rx.recv()
        if n:
            for i in range(n):
                rx.frame_view(i, 2)[:2] = b"C:"
            assert tx.send_rx(rx, None, 2) == n
            got += n
    tx.add(None, b"tail")
    assert tx.flush() == 1
    assert [d for d, _ in drain(sink, 11)] == [b"C:" + payload(k) for k in range(10)] + [b"tail"]


def test_a_batch_of_one_goes_through_a_single_send(fam, udp) -> None:
    """MmsgSender sends a batch of one with the socket's own send/sendto (cheaper than a
    ctypes sendmmsg): every way of queueing it, connected or not, arrives byte for byte."""
    if not batchio.HAVE_MMSG:
        pytest.skip("no sendmmsg in libc")
    server, client, out, conn_out, sink = udp(*fam), udp(*fam), udp(*fam), udp(*fam), udp(*fam)
    conn_out.connect(sink.getsockname())
    rx = batchio.MmsgReceiver(server, headroom=8)
    tx = batchio.MmsgSender(out, slot_size=64)
    txc = batchio.MmsgSender(conn_out, connected=True)
    batches: list[int] = []

    def no_sendmmsg(fd, ptr, n, flags):
        batches.append(n)
        return batchio.mmsg._sendmmsg(fd, ptr, n, flags)

    tx._sendmmsg = txc._sendmmsg = no_sendmmsg
    dest = key_of(sink)
    big = bytearray(b"B" * 100)  # larger than a slot: copied to a bytes
    for item in (b"bytes", bytearray(b"bytearray"), big):
        tx.add(dest, item)
        if isinstance(item, bytearray):
            item[:1] = b"X"  # changed after add: what was added goes
        assert tx.flush() == 1
    client.sendto(b"payload", server.getsockname())
    assert recv_until(rx, 1)
    rx.frame_view(0, 3)[:3] = b"HDR"
    tx.add_rx(dest, rx, 0, 3)
    assert tx.flush() == 1
    tx.add_rx(dest, rx, 0, 3, strip=3)
    assert tx.flush() == 1
    assert tx.send_rx(rx, [dest], 3) == 1
    assert tx.send_rx(rx, [dest], 3, skip=[0]) == 0
    assert txc.send_rx(rx, None, 3) == 1
    with pytest.raises(ValueError):
        tx.send_rx(rx, [dest], 9)  # beyond the headroom
    assert tx.sent == 6 and txc.sent == 1 and tx.failed == tx.dropped_eagain == 0
    got = [(d, a[1]) for d, a in drain(sink, 7)]
    mine, connected = out.getsockname()[1], conn_out.getsockname()[1]
    assert got == [(b"bytes", mine), (b"bytearray", mine), (b"B" * 100, mine), (b"HDRpayload", mine),
                   (b"payload", mine), (b"HDRpayload", mine), (b"HDRpayload", connected)]
    assert batches == []  # not one sendmmsg


def test_a_batch_of_one_retries_an_async_icmp_error_and_counts_eagain(udp) -> None:
    if not batchio.HAVE_MMSG:
        pytest.skip("no sendmmsg in libc")
    out, closed, sink = udp(), udp(), udp()
    out.connect(closed.getsockname())
    closed.close()
    out.send(b"x")  # → ICMP port unreachable → pending ECONNREFUSED on `out`
    time.sleep(0.05)
    tx = batchio.MmsgSender(out)
    tx.add(key_of(sink), b"after the error")
    assert tx.flush() == 1
    assert tx.failed == 0 and tx.errors == {errno.ECONNREFUSED: 1}
    assert [d for d, _ in drain(sink, 1)] == [b"after the error"]
    _fake_send(tx, [("err", errno.EAGAIN)])
    tx.add(key_of(sink), b"would block")
    assert tx.flush() == 0 and tx.dropped_eagain == 1 and tx.pending == 0


def test_add_bytes_bytearray_memoryview_and_large(impl, fam, udp) -> None:
    _, tx_cls = impl
    out, sink = udp(*fam), udp(*fam)
    tx = tx_cls(out, batch=8, slot_size=64)
    dest = tx.sockaddr_for(socket.inet_pton(fam[0], fam[1]), sink.getsockname()[1])
    assert dest == key_of(sink)
    big = bytearray(range(256)) * 8  # 2048 B: larger than a slot
    items = [b"bytes", bytearray(b"bytearray"), memoryview(b"xxmemoryviewxx")[2:-2], big, b""]
    for it in items:
        tx.add(dest, it)
    original = bytes(big)
    big[0:4] = b"LATE"  # a buffer that is not bytes was copied by add()
    assert tx.flush() == len(items)
    got = [d for d, _ in drain(sink, len(items))]
    assert got == [b"bytes", b"bytearray", b"memoryview", original, b""]


def test_full_batch_flushes_itself(impl, udp) -> None:
    _, tx_cls = impl
    out, sink = udp(), udp()
    tx = tx_cls(out, batch=4)
    dest = key_of(sink)
    for k in range(10):
        tx.add(dest, payload(k))
    assert tx.pending == 2 and tx.sent == 8
    assert tx.flush() == 2 and tx.pending == 0
    assert tx.flush() == 0
    assert [d for d, _ in drain(sink, 10)] == [payload(k) for k in range(10)]


def test_partial_send_skips_the_bad_message(impl, udp) -> None:
    """sendmmsg stops at a message that fails (port 0 → EINVAL); the rest still goes."""
    _, tx_cls = impl
    out, sink = udp(), udp()
    tx = tx_cls(out)
    good, bad = key_of(sink), batchio.sockaddr_for(socket.inet_aton("127.0.0.1"), 0)
    for k, d in enumerate([good, good, bad, good, bad, bad, good]):
        tx.add(d, payload(k))
    assert tx.flush() == 4
    assert tx.sent == 4 and tx.failed == 3 and tx.dropped_eagain == 0
    assert tx.errors == {errno.EINVAL: 3}
    assert [d for d, _ in drain(sink, 4)] == [payload(k) for k in (0, 1, 3, 6)]


def test_async_icmp_error_on_send_is_retried(impl, udp) -> None:
    """The error of an earlier datagram, reported by the next call, loses no datagram."""
    _, tx_cls = impl
    out, closed, sink = udp(), udp(), udp()
    out.connect(closed.getsockname())
    closed.close()
    out.send(b"x")  # → ICMP port unreachable → pending ECONNREFUSED on `out`
    time.sleep(0.05)
    tx = tx_cls(out)
    for k in range(3):
        tx.add(key_of(sink), payload(k))
    assert tx.flush() == 3
    assert tx.failed == 0 and tx.errors == {errno.ECONNREFUSED: 1}
    assert [d for d, _ in drain(sink, 3)] == [payload(k) for k in range(3)]


def _fake_send(tx, script: list[int | tuple[str, int]]) -> list[int]:
    """Replace the sender's syscalls: each step sends that many messages or fails with an errno.

    sendmmsg calls are logged as their message count, single sends (send/sendto: the fallback,
    and MmsgSender's batches of one) as -1."""
    calls: list[int] = []
    steps = iter(script)

    if isinstance(tx, batchio.MmsgSender):

        def fake(fd, ptr, n, flags):
            calls.append(n)
            step = next(steps)
            if isinstance(step, tuple):
                ctypes.set_errno(step[1])
                return -1
            return min(step, n)

        tx._sendmmsg = fake
    state = {"left": 0}

    def fake_sendto(data, addr=None):
        if state["left"] == 0:
            step = next(steps)
            calls.append(-1)
            if isinstance(step, tuple):
                raise OSError(step[1], errno.errorcode[step[1]]) if step[1] != errno.EAGAIN else BlockingIOError(
                    errno.EAGAIN, "EAGAIN"
                )
            state["left"] = step
        state["left"] -= 1
        return len(data)

    tx._sendto = tx._send_connected = fake_sendto
    return calls


def test_eagain_drops_the_rest_and_never_blocks(impl, udp) -> None:
    _, tx_cls = impl
    out, sink = udp(), udp()
    tx = tx_cls(out, batch=16)
    _fake_send(tx, [3, ("err", errno.EAGAIN)])
    for k in range(10):
        tx.add(key_of(sink), payload(k))
    assert tx.flush() == 3
    assert tx.sent == 3 and tx.dropped_eagain == 7 and tx.failed == 0
    assert tx.errors == {errno.EAGAIN: 1}
    assert tx.pending == 0  # dropped, not kept for later
    _fake_send(tx, [("err", errno.ENOBUFS)])
    tx.add(key_of(sink), b"x")
    assert tx.flush() == 0 and tx.dropped_eagain == 8


def test_partial_sends_are_continued(impl, udp) -> None:
    _, tx_cls = impl
    out, sink = udp(), udp()
    tx = tx_cls(out, batch=16)
    calls = _fake_send(tx, [4, 1, ("err", errno.EMSGSIZE), 10])
    for k in range(12):
        tx.add(key_of(sink), payload(k))
    assert tx.flush() == 11
    assert tx.sent == 11 and tx.failed == 1 and tx.dropped_eagain == 0
    if isinstance(tx, batchio.MmsgSender):
        assert calls == [12, 8, 7, 6]  # one call per remainder: never one per packet


def test_fatal_send_error_raises(impl, udp) -> None:
    _, tx_cls = impl
    out, sink = udp(), udp()
    tx = tx_cls(out)
    _fake_send(tx, [("err", errno.EBADF)])
    tx.add(key_of(sink), b"x")
    with pytest.raises(OSError) as info:
        tx.flush()
    assert info.value.errno == errno.EBADF
    assert tx.pending == 0 and tx.failed == 1


def test_flush_after_next_recv_is_refused(impl, udp) -> None:
    rx_cls, tx_cls = impl
    server, client, out, sink = udp(), udp(), udp(), udp()
    rx, tx = rx_cls(server), tx_cls(out)
    client.sendto(b"one", server.getsockname())
    assert recv_until(rx, 1)
    tx.add_rx(key_of(sink), rx, 0, 0)
    client.sendto(b"two", server.getsockname())
    assert recv_until(rx, 1)  # overwrites slot 0
    with pytest.raises(RuntimeError):
        tx.flush()
    assert tx.pending == 0


def test_header_len_beyond_headroom_is_refused(impl, udp) -> None:
    rx_cls, tx_cls = impl
    server, client, out = udp(), udp(), udp()
    rx, tx = rx_cls(server, headroom=16), tx_cls(out)
    client.sendto(b"abc", server.getsockname())
    assert recv_until(rx, 1)
    with pytest.raises(ValueError):
        rx.frame_view(0, 17)
    with pytest.raises(ValueError):
        tx.add_rx(key_of(client), rx, 0, 17)
    with pytest.raises(ValueError):
        tx.send_rx(rx, [key_of(client)], 17)


# --- addresses, selection ----------------------------------------------------------------------


def test_sockaddr_for_and_decode() -> None:
    ip4 = socket.inet_aton("192.0.2.7")
    ip6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    mapped = b"\x00" * 10 + b"\xff\xff" + ip4
    k4 = batchio.sockaddr_for(ip4, 5000)
    assert len(k4) == 8 and batchio.decode_sockaddr(k4) == (ip4, 5000)
    assert batchio.decode_sockaddr(k4 + b"\x00" * 8) == (ip4, 5000)  # a full sockaddr_in too
    k6 = batchio.sockaddr_for(ip6, 443)
    assert len(k6) == 28 and batchio.decode_sockaddr(k6) == (ip6, 443)
    assert batchio.sockaddr_for(ip4, 1, socket.AF_INET6) == batchio.sockaddr_for(mapped, 1)
    assert batchio.sockaddr_for(mapped, 1, socket.AF_INET) == batchio.sockaddr_for(ip4, 1)
    with pytest.raises(ValueError):
        batchio.sockaddr_for(ip6, 1, socket.AF_INET)
    with pytest.raises(ValueError):
        batchio.sockaddr_for(b"\x01\x02\x03", 1)
    with pytest.raises(ValueError):
        batchio.sockaddr_for(ip4, 70000)
    with pytest.raises(ValueError):
        batchio.decode_sockaddr(b"\x00" * 4)


def test_send_error_rules() -> None:
    """What both senders (and relay/_hitpath.c) do about the error of the message at the head."""
    assert send_action(errno.EAGAIN, False) is SendAction.DROP_REST
    assert send_action(errno.ENOBUFS, True, 8) is SendAction.DROP_REST
    assert send_action(errno.EINTR, False, 1) is SendAction.RETRY_INTERRUPTED
    assert send_action(errno.EINTR, False, 0) is SendAction.SKIP  # out of retries
    assert send_action(errno.ECONNREFUSED, False) is SendAction.RETRY_ASYNC
    assert send_action(errno.ECONNREFUSED, True) is SendAction.SKIP  # once per message
    assert send_action(errno.EBADF, False) is SendAction.RAISE
    assert send_action(errno.EMSGSIZE, False) is SendAction.SKIP


def test_rejects_non_udp_sockets() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(ValueError):
            batchio.BatchReceiver(s)
        with pytest.raises(ValueError):
            batchio.BatchSender(s)
    if hasattr(socket, "AF_UNIX"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, pytest.raises(ValueError):
            batchio.BatchReceiver(s)


def test_default_implementation_and_fallback_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    if batchio.HAVE_MMSG:
        assert batchio.BatchReceiver is batchio.MmsgReceiver and batchio.BatchSender is batchio.MmsgSender
    # without recvmmsg in libc (here: "not Linux") the package selects the fallback
    monkeypatch.setattr(sys, "platform", "darwin")
    assert batchio.mmsg._load_libc() == (None, None)
    assert batchio.batch_classes(False) == (batchio.FallbackReceiver, batchio.FallbackSender)
    monkeypatch.setattr(batchio.mmsg, "HAVE_MMSG", False)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with pytest.raises(OSError):
            batchio.MmsgReceiver(s)
        with pytest.raises(OSError):
            batchio.MmsgSender(s)
