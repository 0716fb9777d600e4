"""A cluster relay's hop sockets: sessions that edge relays forward (HopData), and the way back.

An edge relay that authenticated a client's check for a session of this relay's cluster
forwards the client's datagrams here as HopData frames (wire/tunnel_frame.py): the client's
address, the edge's handle for the way back, the hops left. To this relay each (client
address, edge) pair is a client of its own, keyed by a *virtual* sockaddr key: the client's
sockaddr bytes followed by the edge's (no real key is that long, and ``decode_sockaddr`` of it
is the client's address). Its first check is authenticated exactly as a direct client's, the
flow is learned in this worker's table, and its datagrams go to the transceiver with the
client's real address: the transceiver cannot tell a hop from a direct client.

The way back is what a transceiver sends an edge: a Data frame with the edge's handle, from
the hop socket (an edge accepts frames only from the address it sends to). The edge must
hear that this relay is alive: every edge with flows here gets a Heartbeat each second; a
session that ends here (SessionClosed, SessionRenamed from the transceiver) ends at the edges.

Indexes: hop socket ``j`` is two of the worker's per-socket indexes, ``base + 2j`` for IPv4
clients and ``base + 2j + 1`` for IPv6 ones, so the worker's per-index lists (Data header of
the client's family, sender, flow sender, table view) serve hop flows unchanged; the sender
of a hop index is a :class:`HopReturn`, which frames the payload for the edge.
"""

from __future__ import annotations

import collections
import socket
import struct
import time
from collections.abc import Callable, Iterable

from daemon.networks import AllowedNetworks
from relay.batchio import BatchReceiver, BatchSender, decode_sockaddr
from relay.batchio.sockaddr import KEY_LEN_V4, SOCKADDR_IN6_LEN
from wire.repeats import Repeats
from wire.tunnel_frame import (
    HOP_HEADER_LEN_V4,
    HOP_HEADER_LEN_V6,
    HOP_TAG,
    PROBE,
    FrameError,
    Heartbeat,
    HopData,
    SessionClosed,
    SessionRenamed,
    data_prefix,
    decode_frame,
    encode_frame,
)

__all__ = ["HopIngress", "HopReturn", "virtual_key", "edge_of"]

_FAM4 = struct.pack("=H", socket.AF_INET)  # a sockaddr key's first bytes (relay/batchio/sockaddr.py)
_FAM6 = struct.pack("=H", socket.AF_INET6)
_NO_FLOWINFO = bytes(4)
_NO_SCOPE = struct.pack("=I", 0)
# version, fixarray(6), tag, 0xCF, handle, 0xC4, ip length: then ip, 0xCD, port, hops, 0xC5, length
_HOP_FIXED_V4 = struct.Struct("!4sQBB4sBHBBH")
_HOP_FIXED_V6 = struct.Struct("!4sQBB16sBHBBH")
_IP_LEN_AT = 13  # offset of the bin8 length byte (4 or 16)
ROUTES_MAX = 1 << 18  # remembered ways back (virtual key -> edge): bounded, oldest out
EDGE_IDLE_S = 60.0  # an edge with no datagram this long gets no more heartbeats


def virtual_key(ip: bytes, port: int, edge_key: bytes) -> bytes:
    """The flow key of a client behind an edge: its own sockaddr bytes, then the edge's (the
    bytes sockaddr_for makes; built here per datagram, without its checks)."""
    if len(ip) == 4:
        return _FAM4 + port.to_bytes(2, "big") + ip + edge_key
    return _FAM6 + port.to_bytes(2, "big") + _NO_FLOWINFO + ip + _NO_SCOPE + edge_key


def edge_of(vkey: bytes) -> bytes:
    """The edge's sockaddr key in a virtual key."""
    return vkey[KEY_LEN_V4 if vkey[:2] == _FAM4 else SOCKADDR_IN6_LEN:]


FixedHop = tuple[int, bytes, int, int, int]  # handle, ip, port, hops, header length


def parse_hop(buffer: memoryview | bytearray | bytes, off: int, length: int) -> HopData | FixedHop | None:
    """A HopData at ``buffer[off : off + length]``: the fixed-width header as (handle, ip,
    port, hops, header length) with the payload left in place; a compact encoding decoded
    whole (HopData); None for anything else (FrameError for bytes that are no frame)."""
    if length >= HOP_HEADER_LEN_V4:
        v6 = buffer[off + _IP_LEN_AT] == 16
        header_len = HOP_HEADER_LEN_V6 if v6 else HOP_HEADER_LEN_V4
        if length >= header_len:
            tag, handle, bin8, _n, ip, cd, port, hops, c5, payload_len = (
                _HOP_FIXED_V6 if v6 else _HOP_FIXED_V4).unpack_from(buffer, off)
            if (tag == HOP_TAG and bin8 == 0xC4 and cd == 0xCD and c5 == 0xC5 and hops <= 0x7F
                    and payload_len == length - header_len):
                return handle, ip, port, hops, header_len
    frame = decode_frame(bytes(buffer[off : off + length]))
    return frame if isinstance(frame, HopData) else None


class HopReturn:
    """The sender of a hop index: ``add(vkey, payload)`` sends the payload to the client's edge
    as a Data frame with the edge's handle. The way back of each virtual key is remembered
    from the edge's own frames (:meth:`remember`)."""

    def __init__(self, tx: BatchSender) -> None:
        self.tx = tx
        self.routes: collections.OrderedDict[bytes, tuple[int, bytes]] = collections.OrderedDict()
        self.unroutable = 0  # datagrams for a client whose edge is not known (any more)

    def remember(self, vkey: bytes, handle: int, ip: bytes, port: int) -> None:
        route = self.routes.get(vkey)
        if route is None or route[0] != handle:  # new, or the edge learned the client again
            self.routes[vkey] = (handle, data_prefix(handle, ip, port))
            if len(self.routes) > ROUTES_MAX:
                self.routes.popitem(last=False)

    def add(self, vkey: bytes, payload: bytes | memoryview) -> None:
        route = self.routes.get(vkey)
        if route is None:
            self.unroutable += 1
            return
        self.tx.add(edge_of(vkey), b"".join((route[1], len(payload).to_bytes(2, "big"), payload)))

    def send_frame(self, edge_key: bytes, frame: Heartbeat | SessionClosed | SessionRenamed) -> None:
        self.tx.add(edge_key, encode_frame(frame))

    def flush(self) -> int:
        return self.tx.flush()


class HopIngress:
    """The hop sockets of one worker. ``deliver(index, vkey, buffer, off, length, hops)`` is the
    worker's: a client datagram of a virtual client on per-socket ``index`` (payload at
    ``buffer[off : off + length]``, free bytes in front of it)."""

    def __init__(self, sockets: Iterable[object], base: int, batch: int, bufsize: int, peer_networks: list[str],
                 deliver: Callable[[int, bytes, memoryview | bytearray, int, int, int], None],
                 drop: Callable[[str], None], flush: Callable[[], None] = lambda: None) -> None:
        socks = list(sockets)
        self.base = base
        self.rx = [BatchReceiver(s, batch=batch, bufsize=bufsize + HOP_HEADER_LEN_V6, headroom=0) for s in socks]  # type: ignore[arg-type]
        self.returns = [HopReturn(BatchSender(s, batch=batch)) for s in socks]  # type: ignore[arg-type]
        self.allowed = AllowedNetworks.parse(peer_networks, "peer_networks")
        self.deliver = deliver
        self.drop = drop
        self.flush = flush  # after each batch: what deliver queued goes out
        self.edges: dict[bytes, tuple[int, float]] = {}  # edge key -> (its hop socket, last heard)
        #: (edge, SessionClosed/SessionRenamed) told, said again with the heartbeats (wire/repeats.py)
        self.repeating: Repeats[tuple[bytes, SessionClosed | SessionRenamed]] = Repeats()
        self.sessions = 0  # what the last heartbeat said (a probe's answer says it again)

    def indexes(self) -> list[tuple[int, int]]:
        """(per-socket index, client family's IP length) of every hop index, in order."""
        return [(self.base + 2 * j + v6, 16 if v6 else 4) for j in range(len(self.rx)) for v6 in (0, 1)]

    def senders(self) -> list[HopReturn]:
        """The sender of each hop index, in :meth:`indexes` order."""
        return [ret for ret in self.returns for _ in (0, 1)]

    def on_readable(self, j: int, max_batches: int = 16) -> None:
        rx = self.rx[j]
        ret = self.returns[j]
        verdicts = self.allowed.verdicts
        now = time.monotonic()
        for _ in range(max_batches):
            n = rx.recv()
            if not n:
                return
            keys = rx.keys()
            for i in range(n):
                key = keys[i]
                allowed = verdicts.get(key)
                if allowed is None:
                    allowed = self.allowed.verdict(key, decode_sockaddr(key)[0])
                if not allowed:
                    self.drop("hop_source_not_allowed")
                    continue
                if rx.truncated_count and rx.truncated(i):  # (truncated() is costly: only when some were)
                    self.drop("oversized")
                    continue
                self._one(j, ret, key, rx.buffer, rx.offsets[i], rx.lengths[i], now)
            self.flush()  # what deliver queued: one sendmmsg per link and batch
            ret.flush()
            if n < rx.batch:
                return

    def _one(self, j: int, ret: HopReturn, key: bytes, buffer: memoryview | bytearray, off: int, length: int,
             now: float) -> None:
        try:
            hop = parse_hop(buffer, off, length)
        except FrameError as exc:
            self.drop(exc.reason)
            return
        if hop is None:
            if buffer[off : off + length] == PROBE:  # an edge's link here was refused (ICMP): we live
                ret.send_frame(key, Heartbeat(sessions=self.sessions, capacity=0))
                ret.flush()
                return
            self.drop("hop_unexpected_frame")
            return
        if isinstance(hop, HopData):  # a compact encoding: its payload in a buffer of its own
            handle, ip, port, hops, payload = hop.handle, hop.ip, hop.port, hop.hops, hop.payload
            buffer, off, length = bytearray(HOP_HEADER_LEN_V6) + payload, HOP_HEADER_LEN_V6, len(payload)
        else:
            handle, ip, port, hops, header_len = hop
            off += header_len
            length -= header_len
        vkey = virtual_key(ip, port, key)
        ret.remember(vkey, handle, ip, port)
        edge = self.edges.get(key)
        if edge is None or edge[1] < now - 1.0:
            self.edges[key] = (j, now)
        self.deliver(self.base + 2 * j + (len(ip) == 16), vkey, buffer, off, length, hops)

    # -- housekeeping: edges hear that this relay is alive, and which sessions ended ----------

    def heartbeat(self, now: float, sessions: int) -> None:
        self.sessions = sessions
        for edge, (j, heard) in list(self.edges.items()):
            if heard < now - EDGE_IDLE_S:
                del self.edges[edge]
                continue
            self.returns[j].send_frame(edge, Heartbeat(sessions=sessions, capacity=0))
        for edge, frame in self.repeating.due():
            known = self.edges.get(edge)
            if known is not None:
                self.returns[known[0]].send_frame(edge, frame)
        for ret in self.returns:
            ret.flush()

    def session_ended(self, frame: SessionClosed | SessionRenamed, vkeys: Iterable[bytes]) -> None:
        """Tell the edges of these virtual clients that their session ended (or was renamed),
        now and with the next CLOSE_REPEATS heartbeats (the transceiver's own repeats find the
        flows gone here, so this is the one place that can repeat it to the edges)."""
        told: set[bytes] = set()
        for vkey in vkeys:
            edge = edge_of(vkey)
            known = self.edges.get(edge)
            if known is None or edge in told:
                continue
            told.add(edge)
            self.returns[known[0]].send_frame(edge, frame)
            self.repeating.add((edge, frame))
        for ret in self.returns:
            ret.flush()
