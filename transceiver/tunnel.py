"""The transceiver's one tunnel socket: Data frames from relays in, to sessions; and back out.

One UDP socket per transceiver process, shared by every session (its address is inside every
route token this process issues). The demux, like pion's ``udp_mux``:

- A Data frame whose client address (ip, port) is a known flow goes to that flow's session:
  one dict lookup. If it came from another relay address or with another handle (a relay
  worker adopted the flow after a restart or a reuseport rehash), the flow moves there at
  once, so replies follow without waiting for the client's next consent check (~5 s).
- A STUN Binding Request is routed by the server ufrag in its USERNAME (``server:client``),
  always, even from a known flow: it (re)binds the client address to that session.
- Anything else is dropped and counted by reason. So are datagrams from outside the allowed
  relay networks and frames that do not decode. Relays in the allowed networks are trusted
  to say where a client is; they authenticate the client's first Binding Request.

A session sends through its :class:`SessionLink`: the payload goes in a Data frame (same
handle and client address) to the relay that delivered that flow. Flows belong to their
session and all go when it closes (with a ``SessionClosed`` to the relays), so nothing leaks
when a session ends early. Every relay heard from recently, and every configured relay tunnel
address, gets a ``Heartbeat`` each second; ``Drain`` when the process drains.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence

from daemon.networks import AllowedNetworks
from wire.repeats import Repeats
from wire.stun import StunError, looks_like_binding_request, parse
from wire.tunnel_frame import (
    MAX_PAYLOAD,
    Data,
    Drain,
    FrameError,
    Heartbeat,
    Probe,
    SessionClosed,
    SessionRenamed,
    data_frame,
    data_prefix,
    decode_frame,
    encode_frame,
)

__all__ = ["TUNNEL_DROP_REASONS", "SessionLink", "TunnelEndpoint", "TunnelCounters", "open_tunnel"]

log = logging.getLogger("rtcrelay.transceiver.tunnel")

Addr = tuple[str, int]
ReceiveFn = Callable[[bytes, Addr], object]

MAX_FLOWS_PER_SESSION = 16  # candidate pairs x NAT rebindings; bounded so a relay cannot grow it
MAX_RELAYS = 256  # relay tunnel addresses remembered for heartbeats
RELAY_FORGET_S = 30.0  # stop heartbeating a relay not heard from (and not configured) for this long
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024

TUNNEL_DROP_REASONS = frozenset(
    {
        "not_allowed",  # source outside the allowed relay networks
        "frame_empty",
        "frame_bad_version",
        "frame_malformed",
        "unexpected_frame",  # a control frame sent to a transceiver
        "unknown_flow",  # not STUN, and no flow for (relay, client address)
        "stun_malformed",  # first byte says STUN, but it does not parse
        "unknown_ufrag",  # a Binding Request for a session this process does not have
        "session_not_ready",  # the session has not attached its ICE yet
        "no_candidate_family",  # client family has no relay public address
        "flow_limit",  # the session has MAX_FLOWS_PER_SESSION flows already
        "no_flow_out",  # a session sent to an address no relay delivered
        "payload_too_large",
        "send_error",
    }
)


class TunnelCounters:
    """Plain ints, read by /metrics."""

    def __init__(self) -> None:
        self.datagrams_in = 0
        self.frames_in = 0  # Data frames handed to a session
        self.frames_out = 0  # Data frames sent
        self.bytes_in = 0
        self.bytes_out = 0
        self.control_out = 0  # Heartbeat, SessionClosed, Drain frames sent
        self.flows_moved = 0  # a flow now reached through another relay address or handle
        self.drops: collections.Counter[str] = collections.Counter(dict.fromkeys(TUNNEL_DROP_REASONS, 0))

    def drop(self, reason: str) -> None:
        self.drops[reason] += 1


class _Flow:
    __slots__ = ("link", "relay", "handle", "ip", "port", "prefix", "peer", "relay_ufrag")

    def __init__(self, link: SessionLink, relay: Addr, handle: int, ip: bytes, port: int, peer: Addr,
                 relay_ufrag: str) -> None:
        self.link = link
        self.relay_ufrag = relay_ufrag  # the ufrag the relay learned this flow under
        self.relay = relay
        self.handle = handle
        self.ip = ip
        self.port = port
        self.peer = peer  # client address as aioice sees it: (text ip, port)
        self.prefix = data_prefix(handle, ip, port)  # Data header minus payload length


class SessionLink:
    """One session's view of the tunnel: its flows, and ``sendto`` towards its client."""

    def __init__(self, tunnel: TunnelEndpoint, ufrag: str, receive: ReceiveFn | None) -> None:
        self.tunnel = tunnel
        # Every server ufrag the session answers to: one, or two for a while after an ICE
        # restart (the old one until no flow in use was learned under it); the last is current.
        self.ufrags = [ufrag]
        self.checked: set[str] = set()  # ufrags a client's check came with (an ICE restart: the new one)
        self.receive = receive  # set before the answer goes out; datagrams before that are dropped
        self.flows: dict[Addr, _Flow] = {}  # by client address (text ip, port)
        self.closed = False

    @property
    def ufrag(self) -> str:
        return self.ufrags[-1]

    def relay_ufrag(self, addr: Addr) -> str | None:
        """The ufrag the relay learned the flow to ``addr`` under (None: no such flow)."""
        flow = self.flows.get(addr)
        return flow.relay_ufrag if flow is not None else None

    def sendto(self, data: bytes, addr: Addr) -> None:
        self.tunnel._send_data(self, data, addr)

    def close(self) -> None:
        """Forget every flow of this session and tell the relays (idempotent)."""
        self.tunnel._unregister(self)


class TunnelEndpoint(asyncio.DatagramProtocol):
    """The demux and mux over the tunnel socket. Build with :func:`open_tunnel`."""

    def __init__(
        self,
        *,
        allowed_networks: Iterable[str] = ("127.0.0.0/8", "::1/128"),
        relay_addresses: Sequence[Addr] = (),
        heartbeat: Callable[[], Heartbeat] = lambda: Heartbeat(0, 0, False),
        heartbeat_interval: float = 1.0,
    ) -> None:
        self.counters = TunnelCounters()
        self.transport: asyncio.DatagramTransport | None = None
        self.local_address: Addr | None = None
        self._allowed = AllowedNetworks.parse(allowed_networks, "relay_networks")
        self._configured_relays = list(relay_addresses)
        self._heard: dict[Addr, float] = {}  # relay tunnel address -> monotonic time last heard
        self._sessions: dict[str, SessionLink] = {}
        self._flows: dict[tuple[bytes, int], _Flow] = {}  # by client (packed ip, port)
        self.heartbeat_source = heartbeat  # set by the session manager once it exists
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._family = socket.AF_INET
        # A SessionClosed or SessionRenamed is said again with the next heartbeats: one lost on
        # the way left the session's flows at a relay until idle_timeout, and a closed session
        # open to its client's next check (wire/repeats.py).
        self._repeating: Repeats[SessionClosed | SessionRenamed] = Repeats()

    # -- asyncio protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._family = sock.family
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
                except OSError:  # pragma: no cover - a capped rmem_max only limits the buffer
                    pass
        name = transport.get_extra_info("sockname")
        if name is not None:
            self.local_address = (name[0], name[1])
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors of earlier sends (e.g. a relay that went away) surface here.
        self.counters.drop("send_error")

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        counters = self.counters
        counters.datagrams_in += 1
        relay = (addr[0], addr[1])
        if not self._is_allowed(relay[0]):
            counters.drop("not_allowed")
            return
        try:
            frame = decode_frame(data)
        except FrameError as exc:
            counters.drop(exc.reason)
            return
        if type(frame) is not Data:
            if type(frame) is Probe:  # a relay's link to us was refused: say we are alive
                self._send_control(self.heartbeat_source(), [relay])
                return
            counters.drop("unexpected_frame")
            return
        self._heard[relay] = time.monotonic()
        payload = frame.payload
        if looks_like_binding_request(payload):
            flow = self._bind_by_ufrag(relay, frame)
            if flow is None:
                return
        else:
            flow = self._flows.get((frame.ip, frame.port))
            if flow is None:
                counters.drop("unknown_flow")
                return
            if flow.handle != frame.handle or flow.relay != relay:
                self._move(flow, relay, frame.handle)
        receive = flow.link.receive
        if receive is None:
            counters.drop("session_not_ready")
            return
        counters.frames_in += 1
        counters.bytes_in += len(payload)
        if receive(payload, flow.peer) is False:
            counters.drop("no_candidate_family")

    # -- sessions -----------------------------------------------------------------------

    def register(self, ufrag: str, receive: ReceiveFn | None = None) -> SessionLink:
        """Start routing Binding Requests for ``ufrag`` to a new session link."""
        if ufrag in self._sessions:
            raise ValueError(f"ufrag {ufrag} is already registered")
        link = SessionLink(self, ufrag, receive)
        self._sessions[ufrag] = link
        return link

    def add_ufrag(self, link: SessionLink, ufrag: str) -> None:
        """An ICE restart: Binding Requests for ``ufrag`` go to ``link`` too (now its current)."""
        if ufrag in self._sessions:
            raise ValueError(f"ufrag {ufrag} is already registered")
        self._sessions[ufrag] = link
        link.ufrags.append(ufrag)

    def retire_ufrag(self, link: SessionLink, ufrag: str) -> None:
        """The session no longer answers to ``ufrag`` (not its current one): the relays learn
        its flows again under the current ufrag (a client that restarted ICE on the same
        5-tuple keeps its flow) and refuse ``ufrag`` from now on."""
        if ufrag not in link.ufrags or ufrag == link.ufrag:
            return
        link.ufrags.remove(ufrag)
        if self._sessions.get(ufrag) is link:
            del self._sessions[ufrag]
        for flow in link.flows.values():
            if flow.relay_ufrag == ufrag:
                flow.relay_ufrag = link.ufrag  # (its handle changes: _move follows it)
        self._tell_relays(SessionRenamed(ufrag, link.ufrag))

    @property
    def session_count(self) -> int:
        return len({id(link) for link in self._sessions.values()})

    def _bind_by_ufrag(self, relay: Addr, frame: Data) -> _Flow | None:
        try:
            username = parse(frame.payload).username
        except StunError:
            self.counters.drop("stun_malformed")
            return None
        ufrag = username.partition(":")[0] if username else ""
        link = self._sessions.get(ufrag)
        if link is None:
            self.counters.drop("unknown_ufrag")
            return None
        link.checked.add(ufrag)
        flow = self._flows.get((frame.ip, frame.port))
        if flow is not None and flow.link is link:
            if flow.handle != frame.handle or flow.relay != relay:
                self._move(flow, relay, frame.handle)
                flow.relay_ufrag = ufrag  # a new handle: the relay learned it again, from this check
            return flow
        if flow is not None:  # the client address now belongs to another session
            self._remove_flow(flow)
        if len(link.flows) >= MAX_FLOWS_PER_SESSION:
            self.counters.drop("flow_limit")
            return None
        peer = (str(ipaddress.ip_address(frame.ip)), frame.port)
        flow = _Flow(link, relay, frame.handle, frame.ip, frame.port, peer, ufrag)
        self._flows[(frame.ip, frame.port)] = flow
        link.flows[peer] = flow
        return flow

    def _move(self, flow: _Flow, relay: Addr, handle: int) -> None:
        flow.relay = relay
        flow.handle = handle
        flow.prefix = data_prefix(handle, flow.ip, flow.port)
        self.counters.flows_moved += 1

    def _remove_flow(self, flow: _Flow) -> None:
        if self._flows.get((flow.ip, flow.port)) is flow:
            del self._flows[(flow.ip, flow.port)]
        if flow.link.flows.get(flow.peer) is flow:
            del flow.link.flows[flow.peer]

    def _unregister(self, link: SessionLink) -> None:
        if link.closed:
            return
        link.closed = True
        link.receive = None
        for flow in list(link.flows.values()):
            self._remove_flow(flow)
        for ufrag in link.ufrags:
            if self._sessions.get(ufrag) is link:
                del self._sessions[ufrag]
            self._tell_relays(SessionClosed(ufrag))

    def _send_data(self, link: SessionLink, data: bytes, addr: Addr) -> None:
        flow = link.flows.get(addr)
        if flow is None or self.transport is None:
            self.counters.drop("no_flow_out")
            return
        if len(data) > MAX_PAYLOAD:
            self.counters.drop("payload_too_large")
            return
        self.transport.sendto(data_frame(flow.prefix, data), flow.relay)
        self.counters.frames_out += 1
        self.counters.bytes_out += len(data)

    # -- control ------------------------------------------------------------------------

    def relays(self) -> list[Addr]:
        """Relays to tell about this process: configured ones, and those heard from recently."""
        now = time.monotonic()
        for addr, seen in list(self._heard.items()):
            if now - seen > RELAY_FORGET_S:
                del self._heard[addr]
        while len(self._heard) > MAX_RELAYS:  # first heard goes first (dict insertion order)
            del self._heard[next(iter(self._heard))]
        return list(dict.fromkeys([*self._configured_relays, *self._heard]))

    def _send_control(self, frame: Heartbeat | SessionClosed | SessionRenamed | Drain,
                      relays: list[Addr] | None = None) -> None:
        """``frame`` to ``relays`` (default: every relay to tell, :meth:`relays`)."""
        if self.transport is None or self.transport.is_closing():
            return
        buf = encode_frame(frame)
        for relay in self.relays() if relays is None else relays:
            self.transport.sendto(buf, self._sendable(relay))
            self.counters.control_out += 1

    def send_drain(self, deadline_s: float) -> None:
        self._send_control(Drain(deadline_s=max(0.0, deadline_s)))

    def send_heartbeat(self) -> None:
        self._send_control(self.heartbeat_source())
        for frame in self._repeating.due():
            self._send_control(frame)

    def _tell_relays(self, frame: SessionClosed | SessionRenamed) -> None:
        """Now, and again with the next CLOSE_REPEATS heartbeats."""
        self._send_control(frame)
        self._repeating.add(frame)

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                self.send_heartbeat()
            except Exception:  # a bad heartbeat source must not end the loop
                log.exception("heartbeat failed")
            await asyncio.sleep(self._heartbeat_interval)

    def close(self) -> None:
        for link in list(self._sessions.values()):
            link.close()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        if self.transport is not None:
            self.transport.close()

    # -- addresses ----------------------------------------------------------------------

    def _is_allowed(self, host: str) -> bool:
        return self._allowed.verdict(host, host)

    def _sendable(self, addr: Addr) -> Addr:
        # A configured IPv4 relay address, sent from an IPv6 (dual-stack) socket.
        if self._family == socket.AF_INET6 and ":" not in addr[0]:
            return (f"::ffff:{addr[0]}", addr[1])
        return addr


async def open_tunnel(host: str, port: int, **kwargs: object) -> TunnelEndpoint:
    """Bind the tunnel socket (``port`` 0: any free port; see ``local_address``)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    _, endpoint = await loop.create_datagram_endpoint(
        lambda: TunnelEndpoint(**kwargs),  # type: ignore[arg-type]
        local_addr=(host, port),
        family=family,
    )
    if family == socket.AF_INET and endpoint.transport is not None:
        without_udp_checksum(endpoint.transport.get_extra_info("socket"))
    return endpoint


SO_NO_CHECK = 11  # <asm-generic/socket.h>; not in Python's socket module


def without_udp_checksum(sock: socket.socket) -> None:
    """Send IPv4 frames without a UDP checksum (zero: legal for IPv4). The relay's kernel path
    forwards the frames of a transceiver on its own host to a client elsewhere only then
    (relay/ebpf/fastpath.bpf.c, from_transceiver): a local sender's checksum is completed at
    transmission at an offset that the frame's shrink leaves wrong. Nothing is lost: the tunnel
    is a host or cluster link, and what it carries (DTLS, SRTP, STUN with FINGERPRINT) checks
    its own integrity."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
