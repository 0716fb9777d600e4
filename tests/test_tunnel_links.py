"""relay/tunnel_links.py on real loopback sockets: a link shares the tunnel address, takes its
peer's frames, and leaves everyone else's to the shared socket."""
from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from relay.batchio import sockaddr_for
from relay.sockets import open_udp
from relay.tunnel_links import TunnelLinks


def udp(reuseport: bool = True) -> socket.socket:
    return open_udp("127.0.0.1", 0, reuseport=reuseport, buffer_size=1 << 20)


def dest_of(sock: socket.socket) -> bytes:
    host, port = sock.getsockname()
    return sockaddr_for(socket.inet_aton(host), port, socket.AF_INET)


def recv(sock: socket.socket, timeout: float = 2.0) -> tuple[bytes, tuple[str, int]]:
    sock.settimeout(timeout)
    try:
        return sock.recvfrom(2048)
    finally:
        sock.setblocking(False)


def nothing_on(sock: socket.socket) -> bool:
    try:
        sock.recvfrom(2048)
    except BlockingIOError:
        return True
    return False


class Links:
    def __init__(self, tunnel: socket.socket, limit: int = 8) -> None:
        self.opened: list[socket.socket] = []
        self.closed: list[socket.socket] = []
        self.links = TunnelLinks(tunnel, limit=limit, batch=8, buffer_size=1 << 20,
                                 on_open=self.opened.append, on_close=self.closed.append)


@pytest.fixture
def tunnel() -> Iterator[socket.socket]:
    sock = udp()
    yield sock
    sock.close()


@pytest.fixture
def peers() -> Iterator[list[socket.socket]]:
    socks = [udp(reuseport=False) for _ in range(3)]
    yield socks
    for s in socks:
        s.close()


def test_a_link_sends_from_the_tunnel_address_and_takes_only_its_peers_frames(tunnel: socket.socket, peers: list[socket.socket]) -> None:
    setup = Links(tunnel)
    transceiver, other, _ = peers
    sender = setup.links.open(dest_of(transceiver))
    assert sender is not None and sender.connected and len(setup.links) == 1
    link = setup.opened[0]
    assert link.getsockname() == tunnel.getsockname()
    sender.add(None, b"to the transceiver")
    assert sender.flush() == 1
    data, source = recv(transceiver)
    assert data == b"to the transceiver" and source == tunnel.getsockname()
    # The transceiver answers the address it heard from: its frame lands on the link...
    transceiver.sendto(b"reply", source)
    assert recv(link)[0] == b"reply"
    assert nothing_on(tunnel)
    # ...and anyone else's frames to that address still reach the shared socket.
    other.sendto(b"heartbeat", tunnel.getsockname())
    assert recv(tunnel)[0] == b"heartbeat"
    assert nothing_on(link)
    assert setup.links.open(dest_of(transceiver)) is sender  # one link per transceiver


def test_after_a_link_closes_its_peers_frames_reach_the_shared_socket(tunnel: socket.socket, peers: list[socket.socket]) -> None:
    setup = Links(tunnel)
    transceiver = peers[0]
    assert setup.links.open(dest_of(transceiver)) is not None
    setup.links.retain(set())  # that transceiver is gone
    assert len(setup.links) == 0 and setup.closed == setup.opened
    assert setup.opened[0].fileno() == -1
    transceiver.sendto(b"late frame", tunnel.getsockname())
    assert recv(tunnel)[0] == b"late frame"


def test_retain_keeps_the_links_of_live_transceivers(tunnel: socket.socket, peers: list[socket.socket]) -> None:
    setup = Links(tunnel)
    a, b = dest_of(peers[0]), dest_of(peers[1])
    setup.links.open(a)
    setup.links.open(b)
    setup.links.retain({a})
    assert set(setup.links.senders) == {a} and len(setup.closed) == 1
    setup.links.close_all()
    assert len(setup.links) == 0 and len(setup.closed) == 2


def test_links_are_bounded_and_the_rest_use_the_shared_socket(tunnel: socket.socket, peers: list[socket.socket]) -> None:
    setup = Links(tunnel, limit=2)
    assert setup.links.open(dest_of(peers[0])) is not None
    assert setup.links.open(dest_of(peers[1])) is not None
    assert setup.links.open(dest_of(peers[2])) is None
    assert len(setup.links) == 2 and len(setup.opened) == 2


def test_no_links_when_the_tunnel_socket_is_not_reuseport(peers: list[socket.socket]) -> None:
    old = udp(reuseport=False)  # e.g. inherited from an older relay through the fd store
    try:
        setup = Links(old)
        assert setup.links.open(dest_of(peers[0])) is None
        assert setup.links.enabled is False and setup.opened == []
        assert setup.links.open(dest_of(peers[1])) is None  # not retried
    finally:
        old.close()


def test_an_unconnectable_destination_is_remembered_not_retried(tunnel: socket.socket) -> None:
    setup = Links(tunnel)
    v6 = sockaddr_for(socket.inet_pton(socket.AF_INET6, "2001:db8::1"), 9, socket.AF_INET6)
    assert setup.links.open(v6) is None  # an IPv6 transceiver for an IPv4 tunnel socket
    assert setup.links.enabled is True and setup.opened == []
    assert v6 in setup.links._failed


def test_limit_zero_disables_links(tunnel: socket.socket, peers: list[socket.socket]) -> None:
    setup = Links(tunnel, limit=0)
    assert setup.links.enabled is False
    assert setup.links.open(dest_of(peers[0])) is None
