"""The client → transceiver hit path of one public socket: a datagram whose source is a known
flow goes to the flow's transceiver, framed in place (the tunnel Data header written into the
headroom in front of the payload: no copy), with the flow's counters.

Two implementations, one interface, chosen by ``hit_path`` (:func:`open_hit_path`): the C one,
``relay._hitpath.CHitPath`` (relay/_hitpath.c, optional at install time), and
:class:`PythonHitPath` here, its reference and fallback. The worker calls only this interface
and never asks which one serves:

- ``forward_one() -> int | None``: one datagram into slot 0, without blocking. None: nothing
  was waiting; n ≥ 0: a hit, forwarded (n payload bytes); negative: it is in slot 0 for the
  worker, described by ``last_length``, ``last_key``, ``last_truncated`` (for ``rx.take_one``).
- ``forward_batches(budget) -> (packets, nbytes, batches, last_count, leftover)``: recvmmsg
  batches, their hits sent, until the socket is empty, a batch is short, ``budget`` batches
  were done, or a batch has datagrams for the worker. packets/nbytes: the hits (payload
  bytes); last_count: the last recvmmsg's count; leftover: None, or (slots, lengths, keys,
  truncated) of that last batch (for ``rx.take_batch``).
- ``forwarded``: hits forwarded so far (the ``hit_path_packets`` counter).

Neither decides anything: what they leave is a miss, a truncated datagram or (C only, which
opens no sockets) a hit whose transceiver has no connected link yet; the worker sends such a
hit with :meth:`FlowSender.send` and queues the rest as misses.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Protocol

from daemon.config_file import ConfigError
from relay.flow_indexes import c_indexes_of

HEADROOM = 64  # bytes in front of each received datagram for its tunnel header (≥ DATA_HEADER_LEN_V6)
DATA_LENGTH_LEN = 2  # a tunnel header's last field: the payload length (wire/tunnel_frame.py)

if TYPE_CHECKING:
    from relay.batchio import BatchReceiver, BatchSender
    from relay.flows import FlowEntry, LocalFlows
    from relay.tunnel_links import TunnelLinks

LEFT = -1  # forward_one: the datagram is in slot 0 for the worker

#: forward_batches' leftover: (slots for the worker, lengths, keys, truncated) of the last batch
Leftover = tuple[list[int], tuple[int, ...], tuple[bytes, ...], tuple[bool, ...]]


class HitPath(Protocol):
    """What the worker calls (see the module docstring); both implementations have it."""

    last_length: int
    last_key: bytes | None
    last_truncated: bool
    forwarded: int

    def forward_one(self) -> int | None: ...

    def forward_batches(self, budget: int, /) -> tuple[int, int, int, int, Leftover | None]: ...


class HitPathError(ConfigError):
    """``hit_path = "c"`` but the extension is not there: worded for an operator."""


class FlowSender:
    """A client datagram of a known flow → its transceiver, in Python: the tunnel Data header
    (:data:`wire.tunnel_frame.DATA_HEADER_V4` / ``_V6``, the public socket's family) written
    just in front of the payload, the flow's counters, the send on the worker's connected link
    to that transceiver (opened on first use) or else on the shared tunnel socket. The one
    copy of that step: :class:`PythonHitPath`, the hits the C path leaves and the misses the
    worker serves all go through it."""

    __slots__ = ("header", "header_len", "prefix_len", "links", "shared")

    def __init__(self, header: struct.Struct, links: TunnelLinks, shared: BatchSender) -> None:
        self.header = header
        self.header_len = header.size
        self.prefix_len = header.size - DATA_LENGTH_LEN
        self.links = links
        self.shared = shared

    def frame(self, entry: FlowEntry, buffer: memoryview | bytearray, header_offset: int, length: int) -> bytes:
        """Write ``entry``'s header at ``header_offset`` (in front of its ``length``-byte
        payload) and count the datagram on the flow; the transceiver's sockaddr bytes. b"" for
        a flow whose header is longer (a hop to another cluster's relay): :meth:`send` it."""
        if len(entry.prefix) != self.prefix_len:
            return b""
        self.header.pack_into(buffer, header_offset, entry.prefix, length)
        entry.packets_in += 1
        entry.bytes_in += length
        return entry.tunnel_dest

    def send(self, entry: FlowEntry, buffer: memoryview | bytearray, off: int, length: int,
             queued: set[BatchSender] | None = None) -> None:
        """Frame the payload at ``buffer[off : off + length]`` (its header's length free in
        front of it) and send it now; or, given ``queued``, add it to its link's batch and the
        link to ``queued`` (the caller flushes them: one sendmmsg per link and batch)."""
        prefix = entry.prefix
        start = off - len(prefix) - DATA_LENGTH_LEN
        if len(prefix) == self.prefix_len:
            dest = self.frame(entry, buffer, start, length)
        else:  # a HopData header (an edge's flow to a cluster relay)
            buffer[start : off - DATA_LENGTH_LEN] = prefix
            buffer[off - DATA_LENGTH_LEN : off] = length.to_bytes(DATA_LENGTH_LEN, "big")
            entry.packets_in += 1
            entry.bytes_in += length
            dest = entry.tunnel_dest
        link = self.links.senders.get(dest)  # the dict first: open() is a call more
        if link is None:
            link = self.links.open(dest)  # (None: no link allowed, the shared socket)
        if queued is not None:
            sender = link if link is not None else self.shared
            sender.add(None if link is not None else dest, buffer[start : off + length])
            queued.add(sender)
        elif link is not None:
            link.send_one(buffer[start : off + length], None)
        else:
            self.shared.send_one(buffer[start : off + length], dest)


class PythonHitPath:
    """The hit path in Python over a BatchReceiver's slots: the reference for relay/_hitpath.c
    and the fallback where it was not built. Unlike C it sends a hit whose transceiver has no
    link yet itself (it opens the link), and it sends a batch of hits for several transceivers
    through the shared tunnel socket (one sendmmsg), a batch for one on that one's link."""

    def __init__(self, rx: BatchReceiver, sender: FlowSender, by_key: dict[bytes, FlowEntry],
                 by_address: dict[tuple[Any, ...], FlowEntry]) -> None:
        if sender.header_len > rx.headroom:
            raise ValueError(f"a {sender.header_len}-byte header does not fit in {rx.headroom} bytes of headroom")
        self.rx = rx
        self.sender = sender
        self.by_key = by_key
        self.by_address = by_address  # recv_one gives an address tuple: no key to work out for a hit
        self.header_offsets = [off - sender.header_len for off in rx.offsets]
        self.last_length = 0
        self.last_key: bytes | None = None
        self.last_truncated = False
        self.forwarded = 0

    def forward_one(self) -> int | None:
        rx = self.rx
        address = rx.recv_one()
        if address is None:
            return None
        length = rx.lengths[0]
        entry = self.by_address.get(address) if not rx.truncated_count else None
        if entry is not None:
            self.sender.send(entry, rx.buffer, rx.offsets[0], length)
            self.forwarded += 1
            return length
        self.last_length = length
        self.last_key = rx.keys()[0]
        self.last_truncated = rx.truncated_count > 0
        return LEFT

    def forward_batches(self, budget: int) -> tuple[int, int, int, int, Leftover | None]:
        rx = self.rx
        packets = nbytes = batches = n = 0
        while batches < budget:
            n = rx.recv()
            if not n:
                break
            batches += 1
            left, hit_bytes = self._forward_batch(n)
            packets += n - len(left)
            nbytes += hit_bytes
            self.forwarded += n - len(left)
            if left:
                truncated = tuple(rx.truncated(i) for i in range(n))
                return packets, nbytes, batches, n, (left, rx.lengths, rx.keys(), truncated)
            if n < rx.batch:
                break
        return packets, nbytes, batches, n, None

    def _forward_batch(self, n: int) -> tuple[list[int], int]:
        """Frame and send the hits of the batch just received: (the slots left, the hits'
        payload bytes)."""
        rx = self.rx
        get = self.by_key.get
        frame = self.sender.frame
        buffer = rx.buffer
        lengths = rx.lengths
        keys = rx.keys()
        if rx.truncated_count:  # never forward nor count a truncated datagram: b"" is no key
            keys = tuple(b"" if rx.truncated(i) else key for i, key in enumerate(keys))
        dests: list[bytes] = []  # b"" for what is left: send_rx wants bytes even where it skips
        add_dest = dests.append
        for key, header_offset, length in zip(keys, self.header_offsets, lengths):
            entry = get(key)
            add_dest(b"" if entry is None else frame(entry, buffer, header_offset, length))
        left = [i for i, dest in enumerate(dests) if not dest] if b"" in dests else []
        header_len = self.sender.header_len
        if not left:
            dest = dests[0]
            # One transceiver for the whole batch: its connected link.
            link = self.sender.links.open(dest) if n == 1 or dests.count(dest) == n else None
            if link is not None:
                link.send_rx(rx, None, header_len)
            else:
                self.sender.shared.send_rx(rx, dests, header_len)
            return left, sum(lengths)
        if len(left) < n:
            self.sender.shared.send_rx(rx, dests, header_len, left)
            return left, sum(lengths) - sum(lengths[i] for i in left)
        return left, 0


def c_hit_path_type(choice: str) -> Any | None:
    """``relay._hitpath.CHitPath`` if ``choice`` wants it and it was built, else None."""
    if choice == "python":
        return None
    try:
        from relay._hitpath import CHitPath
    except ImportError as exc:
        if choice == "c":
            raise HitPathError(
                f'`hit_path` = "c", but the C extension relay._hitpath is not built ({exc}). '
                'Install gcc and the Python headers (Debian: apt-get install gcc python3-dev) and '
                'reinstall rtcrelay, or set hit_path = "auto"'
            ) from None
        return None
    return CHitPath


def describe(choice: str) -> str:
    """For the start-up log line ``hit path: ...``: which implementation serves, and why
    (raises HitPathError as :func:`c_hit_path_type` does)."""
    if c_hit_path_type(choice) is not None:
        return "C (relay._hitpath)"
    return 'Python (hit_path = "python")' if choice == "python" else "Python (relay._hitpath is not built)"


def open_hit_path(choice: str, rx: BatchReceiver, sender: FlowSender, flows: LocalFlows,
                  link_fds: dict[bytes, int]) -> HitPath:
    """The hit path of the public socket ``rx`` reads, in C when ``choice`` allows it and it
    was built. ``link_fds``: the worker's links by transceiver (TunnelLinks.fds), for C."""
    c_type = c_hit_path_type(choice)
    if c_type is None:
        return PythonHitPath(rx, sender, flows.by_key, flows.by_address)
    hit_path: HitPath = c_type(rx.fd, rx.buffer, rx.offsets[0], rx.stride, rx.batch, rx.headroom, rx.bufsize,
                               c_indexes_of(flows).by_key, link_fds)
    return hit_path


def open_return_path(choice: str, flows: LocalFlows, public_fds: list[int], header_lens: list[int], batch: int,
                     bufsize: int) -> Any | None:
    """The C return path of the worker's links (relay/_returnpath.h: ``CReturnPath``) when the
    hit path is C (the same choice, the same extension), else None: relay/return_path.py."""
    if c_hit_path_type(choice) is None:
        return None
    from relay._hitpath import CReturnPath

    return CReturnPath(c_indexes_of(flows).by_handle, tuple(public_fds), tuple(header_lens), batch, bufsize)
