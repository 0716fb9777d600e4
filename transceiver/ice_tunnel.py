"""The aiortc/aioice integration: one session's ICE runs over the relay tunnel, not over sockets.

This is the only module that touches aioice internals, so it is pinned to the versions it was
written against (aiortc 1.16.x, aioice 0.13.x) and refuses to import with any other.

What :func:`attach` does, between ``pc.setRemoteDescription(offer)`` and
``pc.setLocalDescription(answer)``:

1. Finds the one ICE transport left after BUNDLE (aiortc creates one per m-line and merges
   them when it applies a BUNDLE group); more than one means the offer was not bundled.
2. Replaces the connection's local credentials with the route token (ufrag) and its derived
   password. aioice's ``Connection`` takes them only at construction, and aiortc builds it
   before the ufrag exists, so the private fields are set (after aioice's own validation).
3. Marks gathering as done with one ``StunProtocol`` per relay public address, each with a
   host candidate for that address and a :class:`TunnelDatagramTransport` whose ``sendto``
   goes out through the tunnel. aiortc's ``gather()`` then calls ``gather_candidates()``,
   which sees gathering already started and returns: no socket, no STUN/TURN server, no
   interface enumeration. (The offer's candidates are stripped beforehand, so no mDNS
   resolver is opened either: see transceiver/sdp.py.)

A protocol has exactly one local candidate, so an IPv4 and an IPv6 relay address make two
protocols; incoming datagrams go to the one of the client's address family.

On the way in, :class:`TunnelIce` screens STUN before aioice sees it (transceiver/stun_screen.py)
and follows a client whose address changed (transceiver/path_moves.py): a move replaces the
nominated pair, which is what aioice sends media and consent checks to (aioice may nominate
the new address itself, on a USE-CANDIDATE check or its triggered check's answer: a move too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import aioice
import aiortc

if not (aiortc.__version__.startswith("1.16.") and aioice.__version__.startswith("0.13.")):
    raise ImportError(
        "transceiver.ice_tunnel patches aioice internals and supports aiortc 1.16.x with aioice 0.13.x; "
        f"installed: aiortc {aiortc.__version__}, aioice {aioice.__version__}. Re-check "
        "aioice.ice.Connection (credentials, _protocols, _local_candidates*) before changing the pin."
    )

from aioice.candidate import Candidate, candidate_foundation, candidate_priority
from aioice.ice import CandidatePair, Connection, StunProtocol, validate_password, validate_username
from aiortc import RTCPeerConnection
from aiortc.rtcicetransport import RTCIceTransport

from transceiver.metrics import IceCounters
from transceiver.path_moves import PathTracker
from transceiver.sdp import NotBundledError
from transceiver.stun_screen import screen

__all__ = ["IceTunnelError", "TunnelDatagramTransport", "TunnelIce", "attach", "ice_transports"]

Addr = tuple[str, int]
SendFn = Callable[[bytes, Addr], None]

log = logging.getLogger("rtcrelay.transceiver")


class IceTunnelError(Exception):
    """The peer connection is not in a state the tunnel integration can patch."""


class TunnelDatagramTransport(asyncio.DatagramTransport):
    """What a ``StunProtocol`` believes is its UDP socket: ``sendto`` hands bytes to the tunnel."""

    def __init__(self, send: SendFn, local_addr: Addr) -> None:
        super().__init__()
        self._send = send
        self._local_addr = local_addr
        self._protocol: asyncio.BaseProtocol | None = None
        self._closing = False

    def _attach(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        protocol.connection_made(self)

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if not self._closing:
            self._send(bytes(data), (addr[0], addr[1]))

    def get_extra_info(self, name: str, default: Any = None) -> Any:  # aioice reads "sockname"; no "socket"
        return self._local_addr if name == "sockname" else default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        # StunProtocol.close() awaits connection_lost, as it would with a real socket.
        if not self._closing:
            self._closing = True
            if self._protocol is not None:
                asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:  # (nothing is buffered: the tunnel sends at once)
        return 0


class TunnelIce:
    """The patched ICE connection of one session; feed it the session's tunnel datagrams."""

    def __init__(self, connection: Connection, protocols: dict[int, StunProtocol],
                 counters: IceCounters | None = None) -> None:
        self.connection = connection
        self.protocols = protocols  # by IP version of the local (relay) candidate
        self.counters = counters if counters is not None else IceCounters()
        self.paths = PathTracker()
        self._ufrag: str = connection.local_username
        self._password = connection.local_password.encode()

    def datagram_received(self, data: bytes, addr: Addr) -> bool:
        """Deliver a datagram from ``addr``; False when no local candidate has its family."""
        protocol = self.protocols.get(6 if ":" in addr[0] else 4)
        if protocol is None:
            return False
        if protocol.transport.is_closing():  # the session is going: drop quietly
            return True
        now = time.monotonic()
        paths = self.paths
        paths.heard(addr, now)
        if data and data[0] < 4:  # STUN (RFC 7983)
            verdict = screen(data, self._ufrag, self._password)
            if isinstance(verdict, str):
                self.counters.drops[verdict] += 1
                return True
            before = self.selected_remote
            self._deliver(protocol, data, addr)
            decision = paths.on_request(addr, verdict.message.transaction_id, before, now) if verdict.request else ""
            if decision == "move":
                self._move_to(protocol, addr)
            elif decision == "replay":
                self.counters.replayed_checks += 1
            elif before is not None and self.selected_remote not in (None, before):  # aioice nominated it
                self.counters.path_moves += 1  # (on a USE-CANDIDATE check, or its triggered check's answer)
            return True
        self._deliver(protocol, data, addr)
        if paths.on_datagram(addr, self.selected_remote, now):
            self._move_to(protocol, addr)
        return True

    def restart(self, ufrag: str, password: str, remote_ufrag: str, remote_password: str) -> None:
        """An ICE restart (RFC 8445 section 9) on the live connection: new credentials both
        ways, the nominated pair kept, so media, DTLS and SRTP go on while the client checks
        its new pairs (aioice has no restart of its own)."""
        validate_username(ufrag)
        validate_password(password)
        conn = self.connection
        conn._local_username = ufrag
        conn._local_password = password
        conn.remote_username = remote_ufrag
        conn.remote_password = remote_password
        self._ufrag = ufrag
        self._password = password.encode()

    def _deliver(self, protocol: StunProtocol, data: bytes, addr: Addr) -> None:
        try:
            protocol.datagram_received(data, addr)
        except Exception:  # aioice's own bug or a case the screen missed: one count, no traceback
            self.counters.drops["aioice_error"] += 1

    def _move_to(self, protocol: StunProtocol, addr: Addr) -> None:
        """Media to ``addr``: the pair aioice made for it when it answered the client's check."""
        pair: CandidatePair | None = next(
            (p for p in self.connection._check_list if p.protocol is protocol and p.remote_addr == addr), None
        )
        old = self.connection._nominated.get(1)
        if pair is None or old is None:
            return
        pair.nominated = True
        self.connection._nominated[1] = pair
        self.counters.path_moves += 1
        log.info("session %s: client moved %s -> %s", self._ufrag[:12], old.remote_addr, addr)

    @property
    def selected_remote(self) -> Addr | None:
        """The client address of the nominated pair, once ICE completed."""
        pair = self.connection._nominated.get(1)
        return pair.remote_addr if pair is not None else None


def ice_transports(pc: RTCPeerConnection) -> set[RTCIceTransport]:
    """The distinct ICE transports of a peer connection (one per BUNDLE group)."""
    found = {t.receiver.transport.transport for t in pc.getTransceivers()}
    if pc.sctp is not None:
        found.add(pc.sctp.transport.transport)
    return found


def attach(
    pc: RTCPeerConnection,
    *,
    ufrag: str,
    password: str,
    local_addresses: Sequence[Addr],
    send: SendFn,
    counters: IceCounters | None = None,
) -> TunnelIce:
    """Route ``pc``'s ICE through the tunnel with the given credentials (see the module doc)."""
    transports = ice_transports(pc)
    if len(transports) != 1:
        raise NotBundledError(f"{len(transports)} ICE transports after the offer; exactly one (BUNDLE) is supported")
    ice_transport = transports.pop()
    connection: Connection = ice_transport._connection
    if ice_transport.iceGatherer.state != "new" or connection._local_candidates_start:
        raise IceTunnelError("candidates were already gathered: attach before setLocalDescription")
    if connection.stun_server is not None or connection.turn_server is not None:
        raise IceTunnelError("the peer connection has STUN/TURN servers: use RTCConfiguration(iceServers=[])")
    if not local_addresses:
        raise IceTunnelError("no relay public address to advertise")
    validate_username(ufrag)
    validate_password(password)

    protocols: dict[int, StunProtocol] = {}
    for host, port in local_addresses:
        version = 6 if ":" in host else 4
        if version in protocols:
            raise IceTunnelError(f"two relay public addresses of IPv{version}; one per family is supported")
        protocol = StunProtocol(connection)
        TunnelDatagramTransport(send, (host, port))._attach(protocol)
        protocol.local_candidate = Candidate(
            foundation=candidate_foundation("host", "udp", host),
            component=1,
            transport="udp",
            # IPv6 first when both exist (RFC 8421 local preference), like a dual-stack host.
            priority=candidate_priority(1, "host", local_pref=65535 if version == 6 else 65534),
            host=host,
            port=port,
            type="host",
        )
        protocols[version] = protocol

    connection._local_username = ufrag
    connection._local_password = password
    connection._protocols = list(protocols.values())
    connection._local_candidates = [p.local_candidate for p in connection._protocols]
    # gather_candidates() returns at once when gathering "started"; connect() needs "ended".
    connection._local_candidates_start = True
    connection._local_candidates_end = True
    return TunnelIce(connection, protocols, counters)
