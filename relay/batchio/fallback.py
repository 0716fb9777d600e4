"""Batched UDP I/O without ``recvmmsg``/``sendmmsg`` in libc (not Linux): the same interface
over ``recvfrom_into``/``sendto`` loops."""

from __future__ import annotations

import socket
from typing import Any

from relay.batchio.base import MSG_TRUNC, Buffer, ReceiverBase, SenderBase, check_strip
from relay.batchio.errors import RECV_RETRIES, TRANSIENT_RECV
from relay.batchio.sockaddr import sockaddr_of_tuple


class FallbackReceiver(ReceiverBase):
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
        errors_left = RECV_RETRIES
        n = 0
        while n < self.batch:
            try:
                nbytes, addr = recv_into(views[n], limit + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in TRANSIENT_RECV and errors_left > 0:
                    errors_left -= 1
                    self._count_error(exc.errno)
                    continue
                if exc.errno in TRANSIENT_RECV:
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
            key = self._key_cache[addr] = sockaddr_of_tuple(self.family, addr)
        return key

    def keys(self) -> tuple[bytes, ...]:
        return self._keys

    def key(self, i: int) -> bytes:
        return self._keys[i]

    def truncated(self, i: int) -> bool:
        return self._trunc[i]

    def flags(self, i: int) -> int:
        return MSG_TRUNC if self._trunc[i] else 0


class FallbackSender(SenderBase):
    """The same interface over a ``sendto`` loop (no ``sendmmsg`` in libc)."""

    def __init__(self, sock: socket.socket, batch: int = 64, slot_size: int = 2048 + 64,
                 connected: bool = False) -> None:
        super().__init__(sock, batch, slot_size, connected)
        self._data: list[Buffer] = []

    def add(self, dest: bytes | None, data: Buffer) -> None:
        if len(self._dests) >= self.batch:
            self.flush()
        self._dests.append(dest)
        self._data.append(data if type(data) is bytes else bytes(data))  # as MmsgSender: a copy

    def add_rx(self, dest: bytes | None, rx: ReceiverBase, i: int, header_len: int = 0, strip: int = 0) -> None:
        if len(self._dests) >= self.batch:
            self.flush()
        if header_len > rx.headroom or rx is not self._last_rx:
            self._note_rx(rx, header_len)
        if strip:
            check_strip(rx, i, header_len, strip)
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
