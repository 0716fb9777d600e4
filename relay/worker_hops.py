"""A worker's part in the global relay (#19): the cluster routes of an edge relay (their DNS
names re-resolved on a timer) and the hop sockets of a cluster relay (relay/hop_ingress.py),
wired into the worker's per-socket lists so that the packet paths serve hop flows unchanged.

Per-socket indexes: the public sockets first, then two per hop socket (IPv4 clients, IPv6
clients): see relay/hop_ingress.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay.batchio import BatchSender
from relay.cluster_routes import ClusterRoutes, HopTarget
from relay.config import RelayConfig
from relay.hop_ingress import HopIngress, HopReturn
from relay.worker_spec import PublicSocket
from wire.tunnel_frame import DATA_HEADER_V4, DATA_HEADER_V6, SessionClosed, SessionRenamed

if TYPE_CHECKING:
    from relay.flows import LocalFlows

log = logging.getLogger("rtcrelay.relay")

HEARTBEAT_TICKS = 10  # housekeeping ticks (0.1 s) between heartbeats to the edges
HOPS_PENDING_MAX = 4096  # queued hop misses' hops left (the miss queue holds at most 1024)


def edge_routes(config: RelayConfig) -> ClusterRoutes | None:
    """An edge relay's routes to other clusters (None: not an edge)."""
    return ClusterRoutes(config.routes) if config.cluster_routes else None


def hop_locals(hop: list[PublicSocket]) -> list[tuple[bytes, int]]:
    """The local address of each hop index (two per hop socket), for the flow table's views."""
    return [(ipaddress.ip_address(h.host).packed, h.port) for h in hop for _ in (0, 1)]


class WorkerHops:
    """The hop sockets (if any) and the routes (if any) of one worker."""

    def __init__(self, config: RelayConfig, hop: list[PublicSocket], base: int, batch: int, bufsize: int,
                 deliver: Callable[..., None], drop: Callable[[str], None]) -> None:
        self.config = config
        self.routes = edge_routes(config)
        self.sockets = [socket.socket(fileno=h.fd) for h in hop]
        # deliver: the worker's (index, key, buffer, off, length, hops) -> a hit, or a queued miss
        self.ingress = HopIngress(self.sockets, base, batch, bufsize, config.peer_networks, deliver, drop,
                                  self.flush)
        #: the tunnel senders (links) holding hop datagrams of the batch being served
        self.queued: set[BatchSender] = set()
        self.pending_hops: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._resolver: asyncio.Task[None] | None = None
        self._ticks = 0

    # -- the worker's per-index lists ---------------------------------------------------------

    def headers(self) -> list[object]:
        return [DATA_HEADER_V4 if ip_len == 4 else DATA_HEADER_V6 for _, ip_len in self.ingress.indexes()]

    def senders(self) -> list[HopReturn]:
        return self.ingress.senders()

    # -- packets ------------------------------------------------------------------------------

    def flush(self) -> None:
        for sender in self.queued:
            sender.flush()
        self.queued.clear()

    def note_miss(self, key: bytes, hops: int) -> None:
        """A hop datagram queued as a miss: its hops left, for the decision (popped there)."""
        pending = self.pending_hops
        pending[key] = hops
        if len(pending) > HOPS_PENDING_MAX:
            pending.popitem(last=False)

    def hops_left(self, key: bytes) -> int | None:
        """A queued miss's hops left (None: a client's own datagram)."""
        return self.pending_hops.pop(key, None) if self.pending_hops else None

    def session_ended(self, frame: SessionClosed | SessionRenamed, flows: LocalFlows) -> None:
        """The transceiver ended (or renamed) a session: its edges hear it too."""
        if not self.sockets:
            return
        ufrag = frame.ufrag if isinstance(frame, SessionClosed) else frame.old
        base = self.ingress.base
        vkeys = [k for k in flows.by_ufrag.get(ufrag, ()) if flows.by_key[k].public_index >= base]
        if vkeys:
            self.ingress.session_ended(frame, vkeys)

    def tick(self, now: float, flows: LocalFlows) -> None:
        """Each housekeeping tick: heartbeats to the edges once a second."""
        self._ticks += 1
        if self.sockets and self._ticks % HEARTBEAT_TICKS == 0:
            # (an edge reads a heartbeat as "alive"; its count is the worker's flows, known at
            # once: counting the hop flows walked every flow in one housekeeping step)
            self.ingress.heartbeat(now, len(flows.entries))

    # -- the event loop -----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """The DNS refresh of the routes' names (the worker reads the hop sockets: their
        callback is ``ingress.on_readable`` with the socket's index)."""
        if self.routes is not None and self.routes.names():
            self._resolver = loop.create_task(self._resolve_forever(loop))

    def stop(self) -> None:
        if self._resolver is not None:
            self._resolver.cancel()

    async def _resolve_forever(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.routes is not None
        while True:
            answers: dict[HopTarget, list[str]] = {}
            for target in self.routes.names():
                with contextlib.suppress(OSError, UnicodeError):
                    infos = await asyncio.wait_for(
                        loop.getaddrinfo(target.host, target.port, type=socket.SOCK_DGRAM), 5.0)
                    answers[target] = [str(info[4][0]) for info in infos]
                if target not in answers:
                    log.warning("cluster route %s:%d does not resolve (its last answer stays)",
                                target.host, target.port)
            self.routes.update(answers)
            await asyncio.sleep(self.config.cluster_dns_interval)
