"""What both implementations of batched UDP I/O share: the receivers' buffer layout and
per-message accessors, the senders' queue, single-datagram send and counters.

``rx.buffer`` holds ``batch`` slots of ``stride`` bytes, each ``headroom`` free bytes then up to
``bufsize`` bytes of payload (and one byte more: a datagram that fills it was larger); payload
``i`` is ``rx.buffer[rx.offsets[i] : rx.offsets[i] + rx.lengths[i]]``. relay/_hitpath.c
receives into the same slots (buffer, offsets, stride): this layout is its interface too.
"""

from __future__ import annotations

import ctypes
import errno
import socket
from collections.abc import Sequence
from typing import Any

from relay.batchio.errors import TRANSIENT_RECV, ErrorCounts, SendAction, send_action
from relay.batchio.sockaddr import AF_INET, AF_INET6, address_tuple, decode_sockaddr, sockaddr_for

Buffer = bytes | bytearray | memoryview

MSG_TRUNC = int(getattr(socket, "MSG_TRUNC", 0x20))  # (an int: an IntFlag's & costs ~1 µs)


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def address_of(buf: bytearray) -> tuple[int, Any]:
    """Address of a bytearray's data, and the ctypes view that pins it (no resize while alive)."""
    pin = (ctypes.c_char * len(buf)).from_buffer(buf)
    return ctypes.addressof(pin), pin


def _socket_family(sock: socket.socket) -> int:
    fam = sock.family
    if fam not in (AF_INET, AF_INET6):
        raise ValueError(f"only AF_INET/AF_INET6 UDP sockets, not {fam!r}")
    return int(fam)


def adopt_udp(sock: socket.socket, what: str, family: int | None = None) -> int:
    """Check that ``sock`` is a UDP socket (of ``family``, if given), make it non-blocking;
    its family."""
    if sock.type != socket.SOCK_DGRAM:
        raise ValueError(f"{what} needs a SOCK_DGRAM socket")
    fam = _socket_family(sock)
    if family is not None and fam != family:
        raise ValueError(f"{what} needs a socket of the receiver's family ({family}), not {fam}")
    if sock.gettimeout() != 0.0:
        sock.setblocking(False)
    return fam


class ReceiverBase(ErrorCounts):
    """Buffers and per-message accessors shared by both receive implementations."""

    sock: socket.socket
    fd: int
    family: int
    batch: int
    bufsize: int
    headroom: int
    stride: int
    #: payload offset of message i in :attr:`buffer` (constant).
    offsets: list[int]
    #: lengths of the last batch's messages (a truncated one reports ``bufsize``).
    lengths: tuple[int, ...]
    #: how many messages of the last batch were truncated (larger than ``bufsize``).
    truncated_count: int
    #: the last batch's size.
    count: int
    #: bumped by every ``recv()`` that returned messages: a sender's ``add_rx`` entries must
    #: be flushed before it changes.
    generation: int
    received: int

    def __init__(self, sock: socket.socket, batch: int = 64, bufsize: int = 2048, headroom: int = 64) -> None:
        self.family = adopt_udp(sock, "BatchReceiver")
        if batch < 1 or bufsize < 1 or headroom < 0:
            raise ValueError("batch and bufsize must be >= 1, headroom >= 0")
        self.sock = sock
        self.fd = sock.fileno()
        self.batch = batch
        self.bufsize = bufsize
        self.headroom = headroom
        # one extra byte per slot: the fallback reads bufsize+1 bytes to detect oversize
        self.stride = _round_up(headroom + bufsize + 1, 64)
        self._buf = bytearray(self.stride * batch)
        self._base, self._pin = address_of(self._buf)
        self.buffer = memoryview(self._buf)
        self.offsets = [i * self.stride + headroom for i in range(batch)]
        #: address of payload i in memory (for BatchSender.add_rx)
        self.addresses = [self._base + off for off in self.offsets]
        self.lengths = ()
        self.truncated_count = 0
        self.count = 0
        self.generation = 0
        self.received = 0
        self.errors = {}
        self._keys: tuple[bytes, ...] = ()
        # slot 0 and the extra byte after it: a datagram that fills it is larger than bufsize
        self._view_one = self.buffer[self.offsets[0] : self.offsets[0] + bufsize + 1]
        self._recvfrom_into = sock.recvfrom_into  # recv_one's call (and the fallback's recv)

    def recv(self) -> int:
        """Receive up to ``batch`` datagrams without blocking; how many (0: none)."""
        raise NotImplementedError

    def recv_one(self) -> tuple[Any, ...] | None:
        """Receive one datagram into slot 0 with the socket's own ``recvfrom_into``, without
        blocking: its source's address tuple (as :func:`address_tuple` gives it), None if none
        was waiting. The batch accessors then see a batch of one (its key worked out only if
        asked for). For the wakeup that brings one datagram: ~0.6 µs less than ``recv()`` and
        ``keys()`` in a loop, ~1 µs less p50 latency in the worker (bench/relay.py), but it
        cannot tell whether more are waiting.
        """
        try:
            nbytes, addr = self._recvfrom_into(self._view_one, self.bufsize + 1)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno in TRANSIENT_RECV:
                self._count_error(exc.errno)
                return None
            raise
        truncated = nbytes > self.bufsize  # it filled bufsize + 1 bytes: it was larger
        self.lengths = (self.bufsize,) if truncated else (nbytes,)
        self.truncated_count = 1 if truncated else 0
        self.count = 1
        self.generation += 1
        self.received += 1
        self._one_received(addr, truncated)
        return addr

    def _one_received(self, addr: tuple[Any, ...], truncated: bool) -> None:
        raise NotImplementedError

    def take_one(self, length: int, key: bytes, truncated: bool) -> None:
        """A datagram that another reader of this receiver's socket put into slot 0 (the C hot
        path, relay/_hitpath.c): the accessors now see it as a batch of one."""
        self.take_batch((length,), (key,), (truncated,))

    def take_batch(self, lengths: tuple[int, ...], keys: tuple[bytes, ...], truncated: tuple[bool, ...]) -> None:
        """A batch that another reader put into the slots (its lengths, source keys and
        truncation flags, slot by slot): the accessors now see it as the last batch."""
        self.lengths = lengths
        self.truncated_count = truncated.count(True)
        self.count = len(lengths)
        self.generation += 1
        self.received += len(lengths)
        self._taken(keys, truncated)

    def _taken(self, keys: tuple[bytes, ...], truncated: tuple[bool, ...]) -> None:
        raise NotImplementedError

    def use_socket(self, sock: socket.socket) -> None:
        """Receive from ``sock`` from now on: one set of buffers for sockets read one after
        another (a worker's tunnel socket and its connected links). Same family only."""
        if sock is self.sock:
            return
        adopt_udp(sock, "use_socket", self.family)
        self.sock = sock
        self.fd = sock.fileno()
        self._recvfrom_into = sock.recvfrom_into

    # accessors for message i of the last batch (i < count)
    def length(self, i: int) -> int:
        return self.lengths[i]

    def payload(self, i: int) -> memoryview:
        off = self.offsets[i]
        return self.buffer[off : off + self.lengths[i]]

    def frame_view(self, i: int, header_len: int) -> memoryview:
        """``[header_len bytes of headroom | payload i]``: pack a header into its first bytes."""
        if not 0 <= header_len <= self.headroom:
            raise ValueError(f"header_len {header_len} exceeds headroom {self.headroom}")
        off = self.offsets[i]
        return self.buffer[off - header_len : off + self.lengths[i]]

    def key(self, i: int) -> bytes:
        return self.keys()[i]

    def keys(self) -> tuple[bytes, ...]:
        raise NotImplementedError

    def address(self, i: int) -> tuple[bytes, int]:
        """``(ip_packed, port)`` of message i's source (4 or 16 bytes IP; miss path)."""
        return decode_sockaddr(self.keys()[i])

    def truncated(self, i: int) -> bool:
        """Message i was larger than ``bufsize`` (only ``bufsize`` bytes kept): drop it."""
        raise NotImplementedError

    def flags(self, i: int) -> int:
        """``msg_flags`` of message i (MSG_TRUNC)."""
        raise NotImplementedError


def check_header_len(rx: ReceiverBase, header_len: int) -> None:
    """A sender may send at most the receiver's headroom in front of a payload."""
    if not 0 <= header_len <= rx.headroom:
        raise ValueError(f"header_len {header_len} exceeds the receiver's headroom {rx.headroom}")


def check_strip(rx: ReceiverBase, i: int, header_len: int, strip: int) -> None:
    if not 0 <= strip <= header_len + rx.lengths[i]:
        raise ValueError(f"strip {strip} is outside the {header_len + rx.lengths[i]}-byte frame")


class SenderBase(ErrorCounts):
    """The queue, single-datagram send and counters shared by both send implementations."""

    sock: socket.socket
    fd: int
    family: int
    batch: int
    connected: bool
    #: datagrams the kernel accepted
    sent: int
    #: datagrams that failed for their own reason (bad destination, too large, ...)
    failed: int
    #: datagrams dropped because the socket would have blocked (EAGAIN/ENOBUFS)
    dropped_eagain: int

    def __init__(self, sock: socket.socket, batch: int = 64, slot_size: int = 2048 + 64,
                 connected: bool = False) -> None:
        self.family = adopt_udp(sock, "BatchSender")
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.sock = sock
        self.fd = sock.fileno()
        self.batch = batch
        self.slot_size = slot_size
        self.connected = connected
        self.sent = 0
        self.failed = 0
        self.dropped_eagain = 0
        self.errors = {}
        self._dests: list[bytes | None] = []
        self._rx_gens: dict[int, tuple[ReceiverBase, int]] = {}
        self._last_rx: ReceiverBase | None = None
        self._addr_cache: dict[bytes, tuple[Any, ...]] = {}
        self._send_connected = sock.send  # one datagram at a time (see _send_one)
        self._sendto = sock.sendto

    def sockaddr_for(self, ip_packed: bytes, port: int) -> bytes:
        """Destination bytes for this socket's family (cache it in the flow entry)."""
        return sockaddr_for(ip_packed, port, self.family)

    @property
    def pending(self) -> int:
        """Datagrams queued by ``add``/``add_rx`` and not flushed yet."""
        return len(self._dests)

    def _addr(self, dest: bytes) -> tuple[Any, ...]:
        """``sendto``'s address tuple for sockaddr bytes (cached: the conversion costs ~1 µs)."""
        addr = self._addr_cache.get(dest)
        if addr is None:
            try:
                ip, port = decode_sockaddr(dest)
                if self.family == AF_INET6 and len(ip) == 4:  # an AF_INET dest on a v6 socket
                    dest6 = sockaddr_for(ip, port, AF_INET6)
                    addr = address_tuple(dest6)
                elif self.family == AF_INET and len(ip) == 16:  # as the kernel: only v4-mapped
                    addr = address_tuple(sockaddr_for(ip, port, AF_INET))
                else:
                    addr = address_tuple(dest)
            except ValueError:
                raise OSError(errno.EAFNOSUPPORT, f"not a destination for this socket: {bytes(dest)!r}") from None
            if len(self._addr_cache) >= 4096:
                self._addr_cache.clear()
            self._addr_cache[dest] = addr
        return addr

    def _send_one(self, data: Buffer, dest: bytes | None, rest: int = 1) -> int:
        """One datagram through the socket's own ``send``/``sendto``, with sendmmsg's error rules.

        ``rest``: the datagrams that go with it if the socket would block (itself and those
        queued after it). Returns 1 when sent, 0 when this datagram failed on its own, -1 when
        the socket would block (``rest`` counted in ``dropped_eagain``).
        """
        for attempt in (0, 1):
            try:
                if self.connected:
                    self._send_connected(data)
                else:
                    self._sendto(data, self._addr(dest))  # type: ignore[arg-type]
            except OSError as exc:
                err = exc.errno if exc.errno is not None else errno.EIO
                self._count_error(err)
                action = SendAction.DROP_REST if isinstance(exc, BlockingIOError) else send_action(err, attempt > 0)
                if action is SendAction.DROP_REST:
                    self.dropped_eagain += rest
                    return -1
                if action is SendAction.RETRY_ASYNC:
                    continue  # an earlier datagram's ICMP error: this one was not sent, retry once
                if action is SendAction.RAISE:
                    self.failed += rest
                    raise
                self.failed += 1
                return 0
            self.sent += 1
            return 1
        return 0  # pragma: no cover - the loop always returns

    def send_one(self, data: Buffer, dest: bytes | None) -> int:
        """Send one datagram now, after anything queued; 1 if the kernel took it, else 0
        (counted as for a batch). The packet path's call for a wakeup with one datagram."""
        if self._dests:
            self.flush()
        return 1 if self._send_one(data, dest) == 1 else 0

    def _note_rx(self, rx: ReceiverBase, header_len: int) -> None:
        check_header_len(rx, header_len)
        if id(rx) not in self._rx_gens:
            self._rx_gens[id(rx)] = (rx, rx.generation)
        self._last_rx = rx

    def add(self, dest: bytes | None, data: Buffer) -> None:
        raise NotImplementedError

    def add_rx(self, dest: bytes | None, rx: ReceiverBase, i: int, header_len: int = 0, strip: int = 0) -> None:
        """Queue ``rx.frame_view(i, header_len)`` without its first ``strip`` bytes, without a copy.

        ``header_len``: headroom bytes in front of payload i that go too (a header written in
        place); ``strip``: bytes dropped from the front (a tunnel header to remove, the
        return path). The entry points into ``rx``'s slot: flush before ``rx.recv()``.
        """
        raise NotImplementedError

    def flush(self) -> int:
        raise NotImplementedError

    def send_rx(
        self,
        rx: ReceiverBase,
        dests: Sequence[bytes | None] | None,
        header_len: int | Sequence[int] = 0,
        skip: Sequence[int] = (),
    ) -> int:
        """``add_rx`` every message of ``rx``'s last batch but the ``skip`` ones, then flush."""
        return self._send_rx_generic(rx, dests, header_len, skip)

    def _send_rx_generic(
        self,
        rx: ReceiverBase,
        dests: Sequence[bytes | None] | None,
        header_len: int | Sequence[int],
        skip: Sequence[int],
    ) -> int:
        if self._dests:
            self.flush()
        before = self.sent
        skipped = set(skip)
        for i in range(rx.count):
            if i not in skipped:
                hl = header_len if type(header_len) is int else header_len[i]  # type: ignore[index]
                self.add_rx(None if dests is None else dests[i], rx, i, hl)  # flushes when full
        self.flush()
        return self.sent - before

    def _check_rx(self) -> None:
        for rx, gen in self._rx_gens.values():
            if rx.generation != gen:
                self._clear()
                raise RuntimeError("a receiver's recv() ran before flush(): its slots were overwritten")

    def _clear(self) -> None:
        raise NotImplementedError
