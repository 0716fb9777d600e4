"""Batched UDP receive/send for the relay worker's hot path: ``recvmmsg``/``sendmmsg`` via ctypes.

One ctypes call per batch, never per packet (a ctypes call costs far more than a C-API call).
All buffers are allocated once. Per batch, lengths and flags come out of the kernel's
``mmsghdr`` array with one precompiled ``struct`` unpack, the source addresses with another,
and :meth:`MmsgSender.send_rx` sends a whole batch with no per-packet work in the sender.
A batch of one (every datagram, at low rates) is sent with the socket's own ``send``/``sendto``
instead, which costs ~2.5 µs less than a ctypes ``sendmmsg`` of one message.

The hot loop (see bench/mmsg.py, which measures it)::

    rx = BatchReceiver(sock)                   # batch=64, bufsize=2048, headroom=64
    tx = BatchSender(tunnel_sock)
    n = rx.recv()                              # one recvmmsg(MSG_DONTWAIT); 0 when empty
    dests, skip = [], []
    for i, (key, length, off) in enumerate(zip(rx.keys(), rx.lengths, rx.offsets)):
        flow = flows.get(key)                  # key: raw sockaddr bytes (cheap dict key)
        if flow is None:                       # miss: rx.address(i), rx.payload(i)...
            skip.append(i); dests.append(b""); continue
        HEADER.pack_into(rx.buffer, off - 24, flow.prefix, length)   # header in the headroom
        dests.append(flow.dest)                # sockaddr bytes, built once per flow
    if rx.truncated_count: ...                 # rx.truncated(i): larger than bufsize: skip it
    tx.send_rx(rx, dests, 24, skip)            # header + payload from rx's slots, no copy

Per message there are also ``add_rx(dest, rx, i, header_len, strip)`` (zero-copy, mixes
receivers and destinations freely, ``strip`` drops a received tunnel header; then ``flush()``),
``add(dest, data)``, ``frame_view(i, header_len)``,
``payload(i)``, ``key(i)``, ``address(i)``, ``length(i)``, ``truncated(i)``.

``rx.buffer`` holds ``batch`` slots, each ``headroom`` free bytes then up to ``bufsize`` bytes
of payload; payload ``i`` is ``rx.buffer[rx.offsets[i] : rx.offsets[i] + rx.lengths[i]]``.

Addresses ("sockaddr bytes") are the raw ``sockaddr`` the kernel wrote, in a compact form
that is both a cheap dict key and a send destination:

- IPv4 (``AF_INET`` socket): 8 bytes ``family (native u16) | port (BE) | addr (4)``;
- IPv6 (``AF_INET6`` socket): the whole 28-byte ``sockaddr_in6`` (family, port, flowinfo,
  addr, scope id). flowinfo is 0 unless the socket enables ``IPV6_FLOWINFO``; a dual-stack
  socket receives IPv4 clients as v4-mapped ``::ffff:a.b.c.d`` (16-byte ``ip_packed``).

:func:`sockaddr_for` builds that form from ``(ip_packed, port)`` (build it once per flow and
keep it in the flow entry); :func:`decode_sockaddr` goes back (miss path only).

Lifetime rules (not checked per packet):

- A receiver's slots are overwritten by its next ``recv()``: flush a sender holding
  ``add_rx`` entries of that receiver first (``flush`` raises RuntimeError otherwise).
  ``send_rx`` sends at once.
- ``add(dest, data)``: a ``bytes`` object is sent in place (referenced until ``flush``), any
  other buffer is copied at ``add`` time.

Errors. Receive: EAGAIN → 0. Transient errors are counted in ``errors`` (by errno) and the call
is retried a bounded number of times, then 0 is returned: EINTR, ENOMEM/ENOBUFS, and the
asynchronous ICMP errors a connected (or IP_RECVERR) socket reports once on its next call
(ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, ...) — that call returns no data even when data is
queued, the retry gets it. Anything else (EBADF, ENOTSOCK, EFAULT, EINVAL) is a bug: OSError.
Send: EAGAIN/ENOBUFS drop the rest of the batch (``dropped_eagain``) — a send never blocks; an
asynchronous ICMP error is retried once (it belongs to an earlier datagram, and the call that
reports it sends nothing); any other error of one message (EINVAL for port 0, EMSGSIZE,
EAFNOSUPPORT, EACCES, EPERM, ...) skips that message (``failed``, ``errors``) and the rest of
the batch still goes (sendmmsg stops at the failing message: the loop resumes after it);
EBADF/ENOTSOCK/EFAULT raise OSError.

When libc has no ``recvmmsg``/``sendmmsg`` (not Linux), :data:`BatchReceiver` and
:data:`BatchSender` are :class:`FallbackReceiver`/:class:`FallbackSender`: the same interface
over ``recvfrom_into``/``sendto`` loops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any, Union

Buffer = Union[bytes, bytearray, memoryview]

__all__ = [
    "HAVE_MMSG",
    "MSG_TRUNC",
    "BatchReceiver",
    "BatchSender",
    "FallbackReceiver",
    "FallbackSender",
    "MmsgReceiver",
    "MmsgSender",
    "address_tuple",
    "decode_sockaddr",
    "sockaddr_for",
]

MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0x20)
MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

# --- sockaddr bytes --------------------------------------------------------------------------

KEY_LEN_V4 = 8  # family, port, addr: sin_zero is always zero and not part of the key
SOCKADDR_IN_LEN = 16
SOCKADDR_IN6_LEN = 28
_FAM4 = struct.pack("=H", AF_INET)
_FAM6 = struct.pack("=H", AF_INET6)
_V4MAPPED = b"\x00" * 10 + b"\xff\xff"
_SA4 = struct.Struct("=H")  # family only; port and address are packed big-endian below
_SA6_TAIL = struct.Struct("=I")  # sin6_scope_id is host order; sin6_flowinfo is network order


def sockaddr_for(ip_packed: bytes, port: int, family: int | None = None, scope_id: int = 0) -> bytes:
    """The sockaddr bytes for ``(ip_packed, port)``, as :meth:`MmsgReceiver.key` returns them.

    ``family`` is the family of the socket that will use it (default: by the address length).
    An IPv4 address for an ``AF_INET6`` socket becomes v4-mapped; a v4-mapped IPv6 address for
    an ``AF_INET`` socket becomes plain IPv4.
    """
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    n = len(ip_packed)
    if n not in (4, 16):
        raise ValueError(f"ip_packed must be 4 or 16 bytes, not {n}")
    if family is None:
        family = AF_INET if n == 4 else AF_INET6
    port_be = port.to_bytes(2, "big")
    if family == AF_INET:
        if n == 16:
            if ip_packed[:12] != _V4MAPPED:
                raise ValueError("an IPv6 address needs an AF_INET6 socket")
            ip_packed = ip_packed[12:]
        return _FAM4 + port_be + bytes(ip_packed)
    if family == AF_INET6:
        if n == 4:
            ip_packed = _V4MAPPED + bytes(ip_packed)
        return _FAM6 + port_be + b"\x00\x00\x00\x00" + bytes(ip_packed) + _SA6_TAIL.pack(scope_id)
    raise ValueError(f"unsupported address family {family}")


def decode_sockaddr(raw: bytes) -> tuple[bytes, int]:
    """``(ip_packed, port)`` of sockaddr bytes (8/16-byte IPv4 or 28-byte IPv6 form)."""
    if len(raw) < KEY_LEN_V4:
        raise ValueError("sockaddr too short")
    fam = _SA4.unpack_from(raw)[0]
    port = int.from_bytes(raw[2:4], "big")
    if fam == AF_INET:
        return bytes(raw[4:8]), port
    if fam == AF_INET6 and len(raw) >= 24:
        return bytes(raw[8:24]), port
    raise ValueError(f"not an AF_INET/AF_INET6 sockaddr (family {fam}, {len(raw)} bytes)")


def address_tuple(raw: bytes) -> tuple[Any, ...]:
    """The Python socket-module address tuple of sockaddr bytes: what ``recvfrom`` returns for
    that source (``recv_one``'s address; the fallback path)."""
    ip, port = decode_sockaddr(raw)
    if len(ip) == 4:
        return (socket.inet_ntop(AF_INET, ip), port)
    flowinfo = int.from_bytes(raw[4:8], "big")
    scope_id = _SA6_TAIL.unpack_from(raw, 24)[0] if len(raw) >= 28 else 0
    return (socket.inet_ntop(AF_INET6, ip), port, flowinfo, scope_id)


def _key_of_tuple(family: int, addr: tuple[Any, ...]) -> bytes:
    """sockaddr bytes of a Python socket-module address tuple (fallback path)."""
    if family == AF_INET:
        return _FAM4 + addr[1].to_bytes(2, "big") + socket.inet_pton(AF_INET, addr[0])
    host = addr[0].split("%", 1)[0]
    return (
        _FAM6
        + addr[1].to_bytes(2, "big")
        + (addr[2] if len(addr) > 2 else 0).to_bytes(4, "big")
        + socket.inet_pton(AF_INET6, host)
        + _SA6_TAIL.pack(addr[3] if len(addr) > 3 else 0)
    )


# --- libc ----------------------------------------------------------------------------------


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


_PTR = struct.Struct("=Q" if ctypes.sizeof(ctypes.c_void_p) == 8 else "=I")
_SIZE = struct.Struct("=Q" if ctypes.sizeof(ctypes.c_size_t) == 8 else "=I")
_U32 = struct.Struct("=I")
_MMSG = ctypes.sizeof(_MMsgHdr)
_IOV = ctypes.sizeof(_IOVec)
_OFF_NAME = _MsgHdr.msg_name.offset
_OFF_NAMELEN = _MsgHdr.msg_namelen.offset
_OFF_IOV = _MsgHdr.msg_iov.offset
_OFF_IOVLEN = _MsgHdr.msg_iovlen.offset
_OFF_FLAGS = _MsgHdr.msg_flags.offset
_OFF_LEN = _MMsgHdr.msg_len.offset


def _load_libc() -> tuple[Any, Any]:
    if not sys.platform.startswith("linux"):
        return None, None
    try:
        # CDLL releases the GIL around the call; keeping it (PyDLL) measured no faster.
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None, None
    recvmmsg.restype = ctypes.c_int
    sendmmsg.restype = ctypes.c_int
    # No argtypes: fd/vlen/flags go as C ints; pointers are passed as prebuilt c_void_p
    # objects (an argtypes conversion per call would cost more).
    return recvmmsg, sendmmsg


_recvmmsg, _sendmmsg = _load_libc()
HAVE_MMSG = _recvmmsg is not None


def _bytes_data_offset() -> int | None:
    """Offset of a bytes object's data from its id() (CPython), checked; None if unsure."""
    if sys.implementation.name != "cpython":
        return None
    probe = b"rtcrelay-probe-bytes"
    addr = ctypes.cast(ctypes.c_char_p(probe), ctypes.c_void_p).value
    off = (addr or 0) - id(probe)
    if not 0 < off < 256 or ctypes.string_at(id(probe) + off, len(probe)) != probe:
        return None
    return off


_BYTES_OFF = _bytes_data_offset()

_TRANSIENT_RECV = frozenset(
    {
        errno.EINTR,
        errno.ENOMEM,
        errno.ENOBUFS,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.EPROTO,
        errno.ETIMEDOUT,
        getattr(errno, "ENONET", errno.ENETDOWN),
    }
)
# Reported once by the call after an ICMP error (connected or IP_RECVERR socket); that call
# sent nothing, so the message it was about is retried once.
_ASYNC_SEND = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.EPROTO,
        getattr(errno, "ENONET", errno.ENETDOWN),
    }
)
_DROP_SEND = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
_FATAL = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EFAULT})
_RECV_RETRIES = 3


def _oserror(err: int, what: str) -> OSError:
    return OSError(err, f"{what}: {errno.errorcode.get(err, err)} ({os.strerror(err)})")


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _addr_of(buf: bytearray) -> tuple[int, Any]:
    """Address of a bytearray's data, and the ctypes view that pins it (no resize while alive)."""
    pin = (ctypes.c_char * len(buf)).from_buffer(buf)
    return ctypes.addressof(pin), pin


def _socket_family(sock: socket.socket) -> int:
    fam = sock.family
    if fam not in (AF_INET, AF_INET6):
        raise ValueError(f"only AF_INET/AF_INET6 UDP sockets, not {fam!r}")
    return int(fam)


def _adopt_udp(sock: socket.socket, what: str, family: int | None = None) -> int:
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


# --- receivers -----------------------------------------------------------------------------


class _ReceiverBase:
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
    errors: dict[int, int]

    def __init__(self, sock: socket.socket, batch: int = 64, bufsize: int = 2048, headroom: int = 64) -> None:
        self.family = _adopt_udp(sock, "BatchReceiver")
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
        self._base, self._pin = _addr_of(self._buf)
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
            if exc.errno in _TRANSIENT_RECV:
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
        path, relay/_fastpath.c): the accessors now see it as a batch of one."""
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
        _adopt_udp(sock, "use_socket", self.family)
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

    def _count_error(self, err: int) -> None:
        self.errors[err] = self.errors.get(err, 0) + 1


class MmsgReceiver(_ReceiverBase):
    """Receives up to ``batch`` datagrams per ``recvmmsg`` call into preallocated slots."""

    def __init__(self, sock: socket.socket, batch: int = 64, bufsize: int = 2048, headroom: int = 64) -> None:
        if not HAVE_MMSG:
            raise OSError(errno.ENOSYS, "recvmmsg is not available in this libc")
        super().__init__(sock, batch, bufsize, headroom)
        self._recvmmsg = _recvmmsg
        if self.family == AF_INET:
            self._namelen, self._name_stride, key_fmt = SOCKADDR_IN_LEN, SOCKADDR_IN_LEN, "8s8x"
        else:
            self._namelen, self._name_stride, key_fmt = SOCKADDR_IN6_LEN, SOCKADDR_IN6_LEN, "28s"
        self._hdrs = bytearray(_MMSG * batch)
        self._names = bytearray(self._name_stride * batch)
        self._iovs = bytearray(_IOV * batch)
        hdr_base, self._hdr_pin = _addr_of(self._hdrs)
        name_base, self._name_pin = _addr_of(self._names)
        iov_base, self._iov_pin = _addr_of(self._iovs)
        for i in range(batch):
            _PTR.pack_into(self._iovs, i * _IOV, self.addresses[i])
            _SIZE.pack_into(self._iovs, i * _IOV + _PTR.size, bufsize)
            h = i * _MMSG
            _PTR.pack_into(self._hdrs, h + _OFF_NAME, name_base + i * self._name_stride)
            _U32.pack_into(self._hdrs, h + _OFF_NAMELEN, self._namelen)
            _PTR.pack_into(self._hdrs, h + _OFF_IOV, iov_base + i * _IOV)
            _SIZE.pack_into(self._hdrs, h + _OFF_IOVLEN, 1)
        self._hdr_ptr = ctypes.c_void_p(hdr_base)
        # per batch size n: one unpack gives (flags, len) pairs, one gives the n keys
        pad1 = _OFF_FLAGS
        pad2 = _OFF_LEN - _OFF_FLAGS - 4
        pad3 = _MMSG - _OFF_LEN - 4
        one = f"{pad1}xI{pad2}xI{pad3}x"
        self._meta = [struct.Struct("=" + one * n) for n in range(batch + 1)]
        self._key_structs = [struct.Struct("=" + key_fmt * n) for n in range(batch + 1)]
        self._flags: tuple[int, ...] = ()
        self._keys_gen = -1
        self._one_addr: tuple[Any, ...] = ()
        self._one_gen = -1  # the generation recv_one() received (its key is not in _names)

    def recv(self) -> int:
        """One ``recvmmsg(MSG_DONTWAIT)``; the number of datagrams now in the slots (0: none)."""
        n = self._recvmmsg(self.fd, self._hdr_ptr, self.batch, MSG_DONTWAIT, None)
        if n <= 0:
            n = self._recv_again(n)
            if not n:
                self.count = 0
                self.lengths = ()
                self.truncated_count = 0
                self._keys, self._keys_gen = (), self.generation  # (the slots are untouched)
                return 0
        meta = self._meta[n].unpack_from(self._hdrs)
        self.lengths = meta[1::2]
        self._flags = flags = meta[0::2]
        self.truncated_count = 0 if flags.count(0) == n else self._count_truncated(flags)
        self.count = n
        self.generation += 1
        self.received += n
        return n

    def _recv_again(self, n: int) -> int:
        """After a recvmmsg that returned ``n`` ≤ 0: 0 when nothing is waiting; a transient
        error is counted and the call retried (a few times); any other error raises."""
        for _ in range(_RECV_RETRIES):
            if n >= 0:
                return n
            err = ctypes.get_errno()  # only read on failure: it costs ~200 ns
            if err == errno.EAGAIN or err == errno.EWOULDBLOCK:
                return 0
            if err not in _TRANSIENT_RECV:
                raise _oserror(err, "recvmmsg")
            self._count_error(err)
            n = self._recvmmsg(self.fd, self._hdr_ptr, self.batch, MSG_DONTWAIT, None)
        return max(n, 0)

    @staticmethod
    def _count_truncated(flags: tuple[int, ...]) -> int:
        return sum(1 for f in flags if f & MSG_TRUNC)

    def _one_received(self, addr: tuple[Any, ...], truncated: bool) -> None:
        self._flags = (MSG_TRUNC,) if truncated else (0,)
        self._one_addr = addr
        self._one_gen = self.generation

    def _taken(self, keys: tuple[bytes, ...], truncated: tuple[bool, ...]) -> None:
        self._flags = tuple(MSG_TRUNC if t else 0 for t in truncated)
        self._keys, self._keys_gen = keys, self.generation

    def keys(self) -> tuple[bytes, ...]:
        """The sockaddr bytes of the last batch's sources (one ``struct`` call per batch)."""
        if self._keys_gen != self.generation:
            if self._one_gen == self.generation:  # recv_one's datagram: its address is a tuple
                self._keys = (_key_of_tuple(self.family, self._one_addr),)
            else:
                self._keys = self._key_structs[self.count].unpack_from(self._names)
            self._keys_gen = self.generation
        return self._keys

    def key(self, i: int) -> bytes:
        if self._keys_gen == self.generation or self._one_gen == self.generation:
            return self.keys()[i]
        s = i * self._name_stride
        return bytes(self._names[s : s + (KEY_LEN_V4 if self.family == AF_INET else SOCKADDR_IN6_LEN)])

    def truncated(self, i: int) -> bool:
        return bool(self._flags[i] & MSG_TRUNC)

    def flags(self, i: int) -> int:
        """The kernel's ``msg_flags`` of message i (MSG_TRUNC, ...)."""
        return self._flags[i]


class FallbackReceiver(_ReceiverBase):
    """The same interface over a ``recvfrom_into`` loop (no ``recvmmsg`` in libc)."""

    def __init__(self, sock: socket.socket, batch: int = 64, bufsize: int = 2048, headroom: int = 64) -> None:
        super().__init__(sock, batch, bufsize, headroom)
        # bufsize + 1 bytes: a datagram that fills them is larger than bufsize (truncated)
        self._views = [self.buffer[off : off + bufsize + 1] for off in self.offsets]
        self._key_cache: dict[Any, bytes] = {}
        self._trunc: list[bool] = []

    def recv(self) -> int:
        recv_into, views, limit, key_of = self._recvfrom_into, self._views, self.bufsize, self._key_of
        lengths: list[int] = []
        keys: list[bytes] = []
        trunc: list[bool] = []
        errors_left = _RECV_RETRIES
        n = 0
        while n < self.batch:
            try:
                nbytes, addr = recv_into(views[n], limit + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _TRANSIENT_RECV and errors_left > 0:
                    errors_left -= 1
                    self._count_error(exc.errno)
                    continue
                if exc.errno in _TRANSIENT_RECV:
                    self._count_error(exc.errno)
                    break
                raise
            keys.append(key_of(addr))
            if nbytes > limit:
                trunc.append(True)
                nbytes = limit
            else:
                trunc.append(False)
            lengths.append(nbytes)
            n += 1
        self.count = n
        self.lengths = tuple(lengths)
        self._keys = tuple(keys)
        self._trunc = trunc
        self.truncated_count = trunc.count(True)
        if n:
            self.generation += 1
            self.received += n
        return n

    def _one_received(self, addr: tuple[Any, ...], truncated: bool) -> None:
        self._taken((self._key_of(addr),), (truncated,))

    def _taken(self, keys: tuple[bytes, ...], truncated: tuple[bool, ...]) -> None:
        self._keys = keys
        self._trunc = list(truncated)

    def _key_of(self, addr: tuple[Any, ...]) -> bytes:
        key = self._key_cache.get(addr)
        if key is None:
            if len(self._key_cache) >= 4096:
                self._key_cache.clear()
            key = self._key_cache[addr] = _key_of_tuple(self.family, addr)
        return key

    def keys(self) -> tuple[bytes, ...]:
        return self._keys

    def key(self, i: int) -> bytes:
        return self._keys[i]

    def truncated(self, i: int) -> bool:
        return self._trunc[i]

    def flags(self, i: int) -> int:
        return MSG_TRUNC if self._trunc[i] else 0


# --- senders -------------------------------------------------------------------------------


def _check_header_len(rx: _ReceiverBase, header_len: int) -> None:
    """A sender may send at most the receiver's headroom in front of a payload."""
    if not 0 <= header_len <= rx.headroom:
        raise ValueError(f"header_len {header_len} exceeds the receiver's headroom {rx.headroom}")


def _check_strip(rx: _ReceiverBase, i: int, header_len: int, strip: int) -> None:
    if not 0 <= strip <= header_len + rx.lengths[i]:
        raise ValueError(f"strip {strip} is outside the {header_len + rx.lengths[i]}-byte frame")


class _SenderBase:
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
    errors: dict[int, int]

    def __init__(self, sock: socket.socket, batch: int = 64, slot_size: int = 2048 + 64, connected: bool = False) -> None:
        self.family = _adopt_udp(sock, "BatchSender")
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
        self._rx_gens: dict[int, tuple[_ReceiverBase, int]] = {}
        self._last_rx: _ReceiverBase | None = None
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

    def _count_error(self, err: int) -> None:
        self.errors[err] = self.errors.get(err, 0) + 1

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
                if isinstance(exc, BlockingIOError) or err in _DROP_SEND:
                    self.dropped_eagain += rest
                    return -1
                if err in _ASYNC_SEND and attempt == 0:
                    continue  # an earlier datagram's ICMP error: this one was not sent, retry once
                if err in _FATAL:
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

    def _note_rx(self, rx: _ReceiverBase, header_len: int) -> None:
        _check_header_len(rx, header_len)
        if id(rx) not in self._rx_gens:
            self._rx_gens[id(rx)] = (rx, rx.generation)
        self._last_rx = rx

    def add(self, dest: bytes | None, data: Buffer) -> None:
        raise NotImplementedError

    def add_rx(self, dest: bytes | None, rx: _ReceiverBase, i: int, header_len: int = 0, strip: int = 0) -> None:
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
        rx: _ReceiverBase,
        dests: Sequence[bytes | None] | None,
        header_len: int | Sequence[int] = 0,
        skip: Sequence[int] = (),
    ) -> int:
        """``add_rx`` every message of ``rx``'s last batch but the ``skip`` ones, then flush."""
        return self._send_rx_generic(rx, dests, header_len, skip)

    def _send_rx_generic(
        self,
        rx: _ReceiverBase,
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


class MmsgSender(_SenderBase):
    """Accumulates up to ``batch`` datagrams and sends them with ``sendmmsg``.

    ``add(dest, data)``: ``dest`` is sockaddr bytes (:func:`sockaddr_for`, or a receiver's key),
    ignored when ``connected``; ``data`` a ``bytes`` (sent in place) or any buffer (copied into
    a slot of ``slot_size`` bytes; a larger one is copied to a new ``bytes``).
    ``add_rx(dest, rx, i, header_len)``: header + payload i of a receiver, without a copy.
    A full batch flushes itself. ``send_rx(rx, dests, header_len, skip)``: a receiver's whole
    batch at once, the fast path (no per-packet work in the sender).
    """

    def __init__(self, sock: socket.socket, batch: int = 64, slot_size: int = 2048 + 64, connected: bool = False) -> None:
        if not HAVE_MMSG:
            raise OSError(errno.ENOSYS, "sendmmsg is not available in this libc")
        super().__init__(sock, batch, slot_size, connected)
        self._sendmmsg = _sendmmsg
        if self.family == AF_INET:
            namelen, name_stride, name_fmt = SOCKADDR_IN_LEN, SOCKADDR_IN_LEN, "8s8x"
        else:
            namelen, name_stride, name_fmt = SOCKADDR_IN6_LEN, SOCKADDR_IN6_LEN, "28s"
        self._hdrs = bytearray(_MMSG * batch)
        self._names = bytearray(name_stride * batch)
        self._iovs = bytearray(_IOV * batch)
        self._slots = bytearray(slot_size * batch)
        hdr_base, self._hdr_pin = _addr_of(self._hdrs)
        name_base, self._name_pin = _addr_of(self._names)
        iov_base, self._iov_pin = _addr_of(self._iovs)
        self._slot_base, self._slot_pin = _addr_of(self._slots)
        self._slot_view = memoryview(self._slots)
        for i in range(batch):
            h = i * _MMSG
            if not connected:
                _PTR.pack_into(self._hdrs, h + _OFF_NAME, name_base + i * name_stride)
                _U32.pack_into(self._hdrs, h + _OFF_NAMELEN, namelen)
            _PTR.pack_into(self._hdrs, h + _OFF_IOV, iov_base + i * _IOV)
            _SIZE.pack_into(self._hdrs, h + _OFF_IOVLEN, 1)
        self._hdr_ptrs = [ctypes.c_void_p(hdr_base + i * _MMSG) for i in range(batch)]
        iov_fmt = ("Q" if _PTR.size == 8 else "I") + ("Q" if _SIZE.size == 8 else "I")
        self._iov_structs = [struct.Struct("=" + iov_fmt * n) for n in range(batch + 1)]
        self._name_structs = [struct.Struct("=" + name_fmt * n) for n in range(batch + 1)]
        self._name_stride, self._namelen, self._name_fmt = name_stride, namelen, name_fmt
        self._mirrors: dict[tuple[int, int], _Mirror | bool] = {}
        self._iov_vals: list[int] = []  # base, len, base, len, ...
        self._keep: list[Any] = []  # bytes objects sent in place, until flush
        self._first: Buffer = b""  # the first queued datagram: a flush of one sends it alone

    def add(self, dest: bytes | None, data: Buffer) -> None:
        n = len(self._dests)
        if n >= self.batch:
            self.flush()
            n = 0
        size = len(data)
        if type(data) is bytes and _BYTES_OFF is not None:
            self._keep.append(data)
            self._iov_vals += (id(data) + _BYTES_OFF, size)
            if not n:
                self._first = data
        elif size <= self.slot_size:
            off = n * self.slot_size
            self._slot_view[off : off + size] = data
            self._iov_vals += (self._slot_base + off, size)
            if not n:
                self._first = self._slot_view[:size]
        else:
            copy = bytes(data)
            self._keep.append(copy)
            self._iov_vals += (ctypes.cast(ctypes.c_char_p(copy), ctypes.c_void_p).value, size)
            if not n:
                self._first = copy
        self._dests.append(dest)

    def add_rx(self, dest: bytes | None, rx: _ReceiverBase, i: int, header_len: int = 0, strip: int = 0) -> None:
        if len(self._dests) >= self.batch:
            self.flush()
        if header_len > rx.headroom or rx is not self._last_rx:
            self._note_rx(rx, header_len)
        if strip:
            _check_strip(rx, i, header_len, strip)
            header_len -= strip
        length = rx.lengths[i]
        self._iov_vals += (rx.addresses[i] - header_len, length + header_len)
        if not self._dests:
            off = rx.offsets[i]
            self._first = rx.buffer[off - header_len : off + length]
        self._dests.append(dest)

    def send_rx(
        self,
        rx: _ReceiverBase,
        dests: Sequence[bytes | None] | None,
        header_len: int | Sequence[int] = 0,
        skip: Sequence[int] = (),
    ) -> int:
        """Send header + payload of every message of ``rx``'s last batch: the batch fast path.

        ``dests[i]`` is message i's destination (any bytes, e.g. ``b""``, for a skipped one;
        ``dests`` may be None when ``connected``); ``skip`` the ascending indices not to send
        (misses, truncated); ``header_len`` the bytes of headroom in front of each payload that
        go too, one for all or one per message (IPv4 and IPv6 clients on a dual-stack socket).
        Nothing is computed per packet: each message goes as two iovecs (header, payload) out
        of the receiver's slot, prepared once; the payload lengths are copied from the
        receiver's ``mmsghdr`` array into the iovecs with one strided memoryview copy; the
        destinations are packed with one ``struct`` call. Only messages whose header length
        differs from the first one's cost Python work. Entries queued with ``add``/``add_rx``
        are flushed first. Returns the number sent.
        """
        n = rx.count
        if self._dests:
            self.flush()
        if not n:
            return 0
        if type(header_len) is int:
            hl, hls = header_len, None
        else:
            hls = header_len  # type: ignore[assignment]
            hl = hls[0]
        if n == 1 and not skip:  # the common case at low rates: one datagram, one plain send
            _check_header_len(rx, hl)
            if not self.connected and not dests:
                raise ValueError("send_rx needs one destination per message")
            off = rx.offsets[0]
            return self.send_one(rx.buffer[off - hl : off + rx.lengths[0]], None if self.connected else dests[0])  # type: ignore[index]
        m = self._mirrors.get((id(rx), hl))
        if m is None:
            m = self._mirror(rx, hl)
        if m is False:  # not a MmsgReceiver, or a big-endian machine: the generic path
            return self._send_rx_generic(rx, dests, header_len, skip)
        m.iov_len[m.dst[n]] = m.rx_len[m.src[n]]  # type: ignore[union-attr]
        if not self.connected:
            if dests is None or len(dests) < n:
                raise ValueError("send_rx needs one destination per message")
            m.name_structs[n].pack_into(m.names, 0, *(dests[:n] if len(dests) > n else dests))  # type: ignore[union-attr]
        patched = m.patch(hls, n) if hls is not None else ()  # type: ignore[union-attr]
        try:
            if not skip:
                return self._send(m.ptrs, 0, n)  # type: ignore[union-attr]
            sent = 0
            start = 0
            for i in skip:
                if i > start:
                    sent += self._send(m.ptrs, start, min(i, n))  # type: ignore[union-attr]
                start = i + 1
            if start < n:
                sent += self._send(m.ptrs, start, n)  # type: ignore[union-attr]
            return sent
        finally:
            if patched:
                m.restore(patched)  # type: ignore[union-attr]

    def _mirror(self, rx: _ReceiverBase, header_len: int) -> _Mirror | bool:
        _check_header_len(rx, header_len)
        ok = isinstance(rx, MmsgReceiver) and sys.byteorder == "little" and _OFF_LEN % 4 == 0
        m: _Mirror | bool = _Mirror(rx, header_len, self.connected, self._name_stride, self._namelen, self._name_fmt) if ok else False
        if len(self._mirrors) >= 16:
            self._mirrors.clear()
        self._mirrors[(id(rx), header_len)] = m
        return m

    def _clear(self) -> None:
        self._dests.clear()
        self._iov_vals.clear()
        self._keep.clear()
        self._rx_gens.clear()
        self._last_rx = None
        self._first = b""

    def flush(self) -> int:
        """Send everything queued (one ``sendmmsg``, more on partial sends); the number sent.

        A single datagram goes through the socket's own send/sendto instead: ~2.5 µs less than
        a ctypes sendmmsg here (bench/mmsg.py), which is most of what a wakeup at low rate costs.
        """
        n = len(self._dests)
        if not n:
            return 0
        try:
            if self._rx_gens:
                self._check_rx()
            if n == 1:
                return max(self._send_one(self._first, self._dests[0]), 0)
            self._iov_structs[n].pack_into(self._iovs, 0, *self._iov_vals)
            if not self.connected:
                self._name_structs[n].pack_into(self._names, 0, *self._dests)
            return self._send(self._hdr_ptrs, 0, n)
        finally:
            self._clear()

    def _send(self, ptrs: list[ctypes.c_void_p], start: int, end: int) -> int:
        """sendmmsg of the prepared headers [start, end): partial sends, errors, counters."""
        fd, send = self.fd, self._sendmmsg
        sent = 0
        retried_at = -1
        intr = 0
        try:
            while start < end:
                r = send(fd, ptrs[start], end - start, MSG_DONTWAIT)
                if r > 0:
                    start += r
                    sent += r
                    continue
                err = ctypes.get_errno() if r < 0 else errno.EAGAIN
                self._count_error(err)
                if err in _DROP_SEND:
                    self.dropped_eagain += end - start
                    break
                if err == errno.EINTR and intr < 8:
                    intr += 1
                    continue
                if err in _ASYNC_SEND and retried_at != start:
                    retried_at = start
                    continue
                if err in _FATAL:
                    self.failed += end - start
                    raise _oserror(err, "sendmmsg")
                self.failed += 1  # this message's own error: skip it, send the rest
                start += 1
        finally:
            self.sent += sent
        return sent


class _Mirror:
    """Send-side mmsghdrs mirroring a receiver's slots: message i = [slot i - header | payload i]."""

    def __init__(self, rx: MmsgReceiver, header_len: int, connected: bool, name_stride: int, namelen: int, name_fmt: str) -> None:
        self.rx = rx  # keeps id(rx) valid as the cache key
        batch = rx.batch
        self.hdrs = bytearray(_MMSG * batch)
        self.iovs = bytearray(2 * _IOV * batch)
        self.names = bytearray(name_stride * batch)
        hdr_base, self._hdr_pin = _addr_of(self.hdrs)
        iov_base, self._iov_pin = _addr_of(self.iovs)
        name_base, self._name_pin = _addr_of(self.names)
        for i in range(batch):
            h = i * _MMSG
            if not connected:
                _PTR.pack_into(self.hdrs, h + _OFF_NAME, name_base + i * name_stride)
                _U32.pack_into(self.hdrs, h + _OFF_NAMELEN, namelen)
            _PTR.pack_into(self.hdrs, h + _OFF_IOV, iov_base + 2 * i * _IOV)
            _SIZE.pack_into(self.hdrs, h + _OFF_IOVLEN, 2)
            v = 2 * i * _IOV
            _PTR.pack_into(self.iovs, v, rx.addresses[i] - header_len)
            _SIZE.pack_into(self.iovs, v + _PTR.size, header_len)
            _PTR.pack_into(self.iovs, v + _IOV, rx.addresses[i])
            # iov[1].iov_len is written per batch (low 32 bits; the high ones stay 0)
        self.ptrs = [ctypes.c_void_p(hdr_base + i * _MMSG) for i in range(batch)]
        self.iov_len = memoryview(self.iovs).cast("I")
        self.rx_len = memoryview(rx._hdrs).cast("I")
        d0, ds = (_IOV + _PTR.size) // 4, 2 * _IOV // 4
        s0, ss = _OFF_LEN // 4, _MMSG // 4
        self.dst = [slice(d0, d0 + ds * n, ds) for n in range(batch + 1)]
        self.src = [slice(s0, s0 + ss * n, ss) for n in range(batch + 1)]
        self.name_structs = [struct.Struct("=" + name_fmt * n) for n in range(batch + 1)]
        self.header_len = header_len

    def patch(self, header_lens: Sequence[int], n: int) -> list[int]:
        """Give the messages whose header length is not the mirror's their own header iovec."""
        hl, rx = self.header_len, self.rx
        patched = [i for i in range(n) if header_lens[i] != hl]
        for i in patched:
            h = header_lens[i]
            if not 0 <= h <= rx.headroom:
                self.restore([j for j in patched if j < i])
                raise ValueError(f"header_len {h} exceeds the receiver's headroom {rx.headroom}")
            v = 2 * i * _IOV
            _PTR.pack_into(self.iovs, v, rx.addresses[i] - h)
            _SIZE.pack_into(self.iovs, v + _PTR.size, h)
        return patched

    def restore(self, patched: list[int]) -> None:
        hl, rx = self.header_len, self.rx
        for i in patched:
            v = 2 * i * _IOV
            _PTR.pack_into(self.iovs, v, rx.addresses[i] - hl)
            _SIZE.pack_into(self.iovs, v + _PTR.size, hl)


class FallbackSender(_SenderBase):
    """The same interface over a ``sendto`` loop (no ``sendmmsg`` in libc)."""

    def __init__(self, sock: socket.socket, batch: int = 64, slot_size: int = 2048 + 64, connected: bool = False) -> None:
        super().__init__(sock, batch, slot_size, connected)
        self._data: list[Buffer] = []

    def add(self, dest: bytes | None, data: Buffer) -> None:
        if len(self._dests) >= self.batch:
            self.flush()
        self._dests.append(dest)
        self._data.append(data if type(data) is bytes else bytes(data))  # as MmsgSender: a copy

    def add_rx(self, dest: bytes | None, rx: _ReceiverBase, i: int, header_len: int = 0, strip: int = 0) -> None:
        if len(self._dests) >= self.batch:
            self.flush()
        if header_len > rx.headroom or rx is not self._last_rx:
            self._note_rx(rx, header_len)
        if strip:
            _check_strip(rx, i, header_len, strip)
        off = rx.offsets[i]
        self._dests.append(dest)
        self._data.append(rx.buffer[off - header_len + strip : off + rx.lengths[i]])

    def _clear(self) -> None:
        self._dests.clear()
        self._data.clear()
        self._rx_gens.clear()
        self._last_rx = None

    def flush(self) -> int:
        n = len(self._dests)
        if not n:
            return 0
        before = self.sent
        try:
            if self._rx_gens:
                self._check_rx()
            for i in range(n):
                if self._send_one(self._data[i], self._dests[i], n - i) < 0:
                    break
        finally:
            self._clear()
        return self.sent - before


BatchReceiver: type[_ReceiverBase] = MmsgReceiver if HAVE_MMSG else FallbackReceiver
BatchSender: type[_SenderBase] = MmsgSender if HAVE_MMSG else FallbackSender
