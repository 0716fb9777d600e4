"""Connected tunnel sockets: one per transceiver a worker sends to, all bound to the worker's
tunnel address (SO_REUSEPORT), so a transceiver still sees one relay address.

Why: on a connected UDP socket the kernel skips the route lookup and the address copy of every
datagram. A batch of client datagrams that all go to one transceiver is sent on that
transceiver's link with no per-message address: +9% packets per second per core measured on
the batch path (bench/relay.py; PERFORMANCE.md saw the same on its C reference). A batch for
several transceivers still goes through the worker's shared, unconnected tunnel socket.

Return traffic: a connected socket outscores the unconnected one of its reuseport group for
its peer's datagrams, so the worker reads every link as well as the shared socket (the frames
are the same). A link dies with its worker: the peer's frames then reach the shared socket
again, which the supervisor keeps across worker restarts, and the address the transceiver
replies to never changes.

A tunnel socket inherited without SO_REUSEPORT (from an older relay, through the fd store)
cannot have links: binding one fails with EADDRINUSE, and the worker carries on without them.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Container

from relay.batchio import BatchSender, decode_sockaddr
from relay.sockets import set_buffers

log = logging.getLogger("rtcrelay.relay")

MAX_FAILED = 4096  # destinations remembered as unconnectable (bounded: forgotten in bulk)


class TunnelLinks:
    """The worker's connected tunnel sockets, by transceiver sockaddr bytes."""

    def __init__(
        self,
        tunnel: socket.socket,
        *,
        limit: int,
        batch: int,
        buffer_size: int,
        on_open: Callable[[socket.socket], None],
        on_close: Callable[[socket.socket], None],
    ) -> None:
        self.local = tunnel.getsockname()
        self.family = tunnel.family
        self.limit = limit
        self.batch = batch
        self.buffer_size = buffer_size
        self.on_open = on_open
        self.on_close = on_close
        #: transceiver sockaddr bytes -> sender on its connected socket (the packet path's dict)
        self.senders: dict[bytes, BatchSender] = {}
        self._closed_failures = 0  # send_failures() of the links closed so far
        #: the same links' file descriptors (the C hit path's dict, relay/_hitpath.c)
        self.fds: dict[bytes, int] = {}
        self._sockets: dict[bytes, socket.socket] = {}
        self._failed: set[bytes] = set()
        self.enabled = limit > 0

    def __len__(self) -> int:
        return len(self.senders)

    def open(self, dest: bytes) -> BatchSender | None:
        """The link to ``dest``, opened now if allowed; None: use the shared tunnel socket."""
        sender = self.senders.get(dest)
        if sender is not None or not self.enabled or dest in self._failed or len(self.senders) >= self.limit:
            return sender
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if self.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            set_buffers(sock, self.buffer_size)
            sock.bind(self.local)
            sock.connect(_address(dest))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:  # the shared socket has no SO_REUSEPORT: no links
                self.enabled = False
                log.warning("tunnel socket %s is not SO_REUSEPORT: no connected tunnel links", self.local)
            else:
                if len(self._failed) >= MAX_FAILED:
                    self._failed.clear()
                self._failed.add(dest)
                log.warning("no connected tunnel link to %s: %s", _address(dest), exc)
            return None
        sender = BatchSender(sock, batch=self.batch, connected=True)
        self.senders[dest] = sender
        self.fds[dest] = sock.fileno()
        self._sockets[dest] = sock
        self.on_open(sock)
        return sender

    def send_failures(self) -> int:
        """Datagrams the kernel refused on the links, closed ones included (never goes down)."""
        return self._closed_failures + sum(s.failed + s.dropped_eagain for s in self.senders.values())

    def close(self, dest: bytes) -> None:
        sender = self.senders.pop(dest, None)
        if sender is not None:
            self._closed_failures += sender.failed + sender.dropped_eagain
        self.fds.pop(dest, None)  # before the close: the fd number may be reused at once
        sock = self._sockets.pop(dest, None)
        if sock is not None:
            self.on_close(sock)
            sock.close()

    def dest_of(self, sock: socket.socket) -> bytes | None:
        """The transceiver a link socket is connected to (None: not a link)."""
        return next((dest for dest, link in self._sockets.items() if link is sock), None)

    def retain(self, alive: Container[bytes]) -> None:
        """Close the links to transceivers no longer in ``alive``."""
        for dest in [d for d in self._sockets if d not in alive]:
            self.close(dest)

    def close_all(self) -> None:
        for dest in list(self._sockets):
            self.close(dest)


def _address(dest: bytes) -> tuple[str, int]:
    ip, port = decode_sockaddr(dest)
    return socket.inet_ntop(socket.AF_INET if len(ip) == 4 else socket.AF_INET6, ip), port
