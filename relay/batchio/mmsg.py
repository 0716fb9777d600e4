"""Batched UDP I/O through ``recvmmsg``/``sendmmsg`` via ctypes: the Linux implementation.

One ctypes call per batch, never per packet (a ctypes call costs far more than a C-API call).
All buffers are allocated once. Per batch, lengths and flags come out of the kernel's
``mmsghdr`` array with one precompiled ``struct`` unpack, the source addresses with another,
and :meth:`MmsgSender.send_rx` sends a whole batch with no per-packet work in the sender
(:class:`_Mirror`: send-side headers that point into a receiver's slots). A batch of one
(every datagram, at low rates) is sent with the socket's own ``send``/``sendto`` instead, which
costs ~2.5 µs less than a ctypes ``sendmmsg`` of one message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any

from relay.batchio.base import MSG_TRUNC, Buffer, ReceiverBase, SenderBase, address_of, check_header_len, check_strip
from relay.batchio.errors import RECV_RETRIES, SEND_EINTR_RETRIES, TRANSIENT_RECV, SendAction, oserror, send_action
from relay.batchio.sockaddr import AF_INET, KEY_LEN_V4, SOCKADDR_IN6_LEN, SOCKADDR_IN_LEN, sockaddr_of_tuple

MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)

# --- libc ------------------------------------------------------------------------------------


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


def _name_layout(family: int) -> tuple[int, str]:
    """Bytes of a name slot (the ``msg_namelen`` given to the kernel) and the ``struct`` format
    of one slot as sockaddr bytes (an IPv4 key leaves out ``sin_zero``)."""
    if family == AF_INET:
        return SOCKADDR_IN_LEN, "8s8x"
    return SOCKADDR_IN6_LEN, "28s"


def _point_headers(hdrs: bytearray, name_base: int | None, namelen: int, iov_base: int, iovlen: int) -> None:
    """Point mmsghdr i at name slot i (``name_base`` None: no names, a connected socket) and at
    its ``iovlen`` iovecs, for every mmsghdr of ``hdrs``."""
    for i in range(len(hdrs) // _MMSG):
        h = i * _MMSG
        if name_base is not None:
            _PTR.pack_into(hdrs, h + _OFF_NAME, name_base + i * namelen)
            _U32.pack_into(hdrs, h + _OFF_NAMELEN, namelen)
        _PTR.pack_into(hdrs, h + _OFF_IOV, iov_base + i * iovlen * _IOV)
        _SIZE.pack_into(hdrs, h + _OFF_IOVLEN, iovlen)


# --- receiver ----------------------------------------------------------------------------------


class MmsgReceiver(ReceiverBase):
    """Receives up to ``batch`` datagrams per ``recvmmsg`` call into preallocated slots."""

    def __init__(self, sock: socket.socket, batch: int = 64, bufsize: int = 2048, headroom: int = 64) -> None:
        if not HAVE_MMSG:
            raise OSError(errno.ENOSYS, "recvmmsg is not available in this libc")
        super().__init__(sock, batch, bufsize, headroom)
        self._recvmmsg = _recvmmsg
        self._name_stride, key_fmt = _name_layout(self.family)
        self._hdrs = bytearray(_MMSG * batch)
        self._names = bytearray(self._name_stride * batch)
        self._iovs = bytearray(_IOV * batch)
        hdr_base, self._hdr_pin = address_of(self._hdrs)
        name_base, self._name_pin = address_of(self._names)
        iov_base, self._iov_pin = address_of(self._iovs)
        for i in range(batch):
            _PTR.pack_into(self._iovs, i * _IOV, self.addresses[i])
            _SIZE.pack_into(self._iovs, i * _IOV + _PTR.size, bufsize)
        _point_headers(self._hdrs, name_base, self._name_stride, iov_base, 1)
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
        for _ in range(RECV_RETRIES):
            if n >= 0:
                return n
            err = ctypes.get_errno()  # only read on failure: it costs ~200 ns
            if err == errno.EAGAIN or err == errno.EWOULDBLOCK:
                return 0
            if err not in TRANSIENT_RECV:
                raise oserror(err, "recvmmsg")
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
                self._keys = (sockaddr_of_tuple(self.family, self._one_addr),)
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


# --- sender ------------------------------------------------------------------------------------


class MmsgSender(SenderBase):
    """Accumulates up to ``batch`` datagrams and sends them with ``sendmmsg``.

    ``add(dest, data)``: ``dest`` is sockaddr bytes (:func:`sockaddr_for`, or a receiver's key),
    ignored when ``connected``; ``data`` a ``bytes`` (sent in place) or any buffer (copied into
    a slot of ``slot_size`` bytes; a larger one is copied to a new ``bytes``).
    ``add_rx(dest, rx, i, header_len)``: header + payload i of a receiver, without a copy.
    A full batch flushes itself. ``send_rx(rx, dests, header_len, skip)``: a receiver's whole
    batch at once, the fast path (no per-packet work in the sender).
    """

    def __init__(self, sock: socket.socket, batch: int = 64, slot_size: int = 2048 + 64,
                 connected: bool = False) -> None:
        if not HAVE_MMSG:
            raise OSError(errno.ENOSYS, "sendmmsg is not available in this libc")
        super().__init__(sock, batch, slot_size, connected)
        self._sendmmsg = _sendmmsg
        namelen, name_fmt = _name_layout(self.family)
        self._hdrs = bytearray(_MMSG * batch)
        self._names = bytearray(namelen * batch)
        self._iovs = bytearray(_IOV * batch)
        self._slots = bytearray(slot_size * batch)
        hdr_base, self._hdr_pin = address_of(self._hdrs)
        name_base, self._name_pin = address_of(self._names)
        iov_base, self._iov_pin = address_of(self._iovs)
        self._slot_base, self._slot_pin = address_of(self._slots)
        self._slot_view = memoryview(self._slots)
        _point_headers(self._hdrs, None if connected else name_base, namelen, iov_base, 1)
        self._hdr_ptrs = [ctypes.c_void_p(hdr_base + i * _MMSG) for i in range(batch)]
        iov_fmt = ("Q" if _PTR.size == 8 else "I") + ("Q" if _SIZE.size == 8 else "I")
        self._iov_structs = [struct.Struct("=" + iov_fmt * n) for n in range(batch + 1)]
        self._name_structs = [struct.Struct("=" + name_fmt * n) for n in range(batch + 1)]
        self._namelen, self._name_fmt = namelen, name_fmt
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

    def add_rx(self, dest: bytes | None, rx: ReceiverBase, i: int, header_len: int = 0, strip: int = 0) -> None:
        if len(self._dests) >= self.batch:
            self.flush()
        if header_len > rx.headroom or rx is not self._last_rx:
            self._note_rx(rx, header_len)
        if strip:
            check_strip(rx, i, header_len, strip)
            header_len -= strip
        length = rx.lengths[i]
        self._iov_vals += (rx.addresses[i] - header_len, length + header_len)
        if not self._dests:
            off = rx.offsets[i]
            self._first = rx.buffer[off - header_len : off + length]
        self._dests.append(dest)

    def send_rx(
        self,
        rx: ReceiverBase,
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
            check_header_len(rx, hl)
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

    def _mirror(self, rx: ReceiverBase, header_len: int) -> _Mirror | bool:
        check_header_len(rx, header_len)
        ok = isinstance(rx, MmsgReceiver) and sys.byteorder == "little" and _OFF_LEN % 4 == 0
        m: _Mirror | bool = _Mirror(rx, header_len, self.connected, self._namelen, self._name_fmt) if ok else False
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
                action = send_action(err, retried_at == start, SEND_EINTR_RETRIES - intr)
                if action is SendAction.DROP_REST:
                    self.dropped_eagain += end - start
                    break
                if action is SendAction.RETRY_INTERRUPTED:
                    intr += 1
                    continue
                if action is SendAction.RETRY_ASYNC:
                    retried_at = start
                    continue
                if action is SendAction.RAISE:
                    self.failed += end - start
                    raise oserror(err, "sendmmsg")
                self.failed += 1  # this message's own error: skip it, send the rest
                start += 1
        finally:
            self.sent += sent
        return sent


class _Mirror:
    """Send-side mmsghdrs mirroring a receiver's slots: message i = [slot i - header | payload i]."""

    def __init__(self, rx: MmsgReceiver, header_len: int, connected: bool, namelen: int, name_fmt: str) -> None:
        self.rx = rx  # keeps id(rx) valid as the cache key
        batch = rx.batch
        self.hdrs = bytearray(_MMSG * batch)
        self.iovs = bytearray(2 * _IOV * batch)
        self.names = bytearray(namelen * batch)
        hdr_base, self._hdr_pin = address_of(self.hdrs)
        iov_base, self._iov_pin = address_of(self.iovs)
        name_base, self._name_pin = address_of(self.names)
        _point_headers(self.hdrs, None if connected else name_base, namelen, iov_base, 2)
        for i in range(batch):
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
