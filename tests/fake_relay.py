"""A minimal asyncio relay, for the transceiver tests only (the real one is relay/).

Same contract as the real relay, none of its machinery: a public UDP socket for clients and
a tunnel socket for transceivers. A client's authenticated STUN Binding Request (route token
valid, MESSAGE-INTEGRITY checked with the derived password) creates a flow to the transceiver
the token names; then every datagram of that client address goes there as a Data frame.
Data frames from a transceiver are sent to the client only if they name a flow of that
transceiver (no reflector). Control frames are recorded for the tests to inspect.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
import time
from dataclasses import dataclass, field

from wire.route_token import RouteKeyring, TokenError, decode_token, derive_password
from wire.stun import StunError, parse_binding_request
from wire.tunnel_frame import Data, Drain, FrameError, Heartbeat, SessionClosed, decode_frame, encode_frame

Addr = tuple[str, int]


@dataclass
class Flow:
    handle: int
    client: Addr
    transceiver: Addr
    ufrag: str


@dataclass
class FakeRelay:
    keyring: RouteKeyring
    public_host: str = "127.0.0.1"
    tunnel_host: str = "127.0.0.1"
    flows: dict[Addr, Flow] = field(default_factory=dict)
    by_handle: dict[int, Flow] = field(default_factory=dict)
    heartbeats: list[tuple[Addr, Heartbeat]] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)  # ufrags of SessionClosed frames
    drains: list[Drain] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._handles = itertools.count(1)
        self.public: asyncio.DatagramTransport | None = None
        self.tunnel: asyncio.DatagramTransport | None = None

    @property
    def public_address(self) -> Addr:
        assert self.public is not None
        name = self.public.get_extra_info("sockname")
        return name[0], name[1]

    @property
    def tunnel_address(self) -> Addr:
        assert self.tunnel is not None
        name = self.tunnel.get_extra_info("sockname")
        return name[0], name[1]

    async def start(self) -> FakeRelay:
        loop = asyncio.get_running_loop()
        self.public, _ = await loop.create_datagram_endpoint(
            lambda: _Callback(self._from_client), local_addr=(self.public_host, 0), family=_family(self.public_host)
        )
        self.tunnel, _ = await loop.create_datagram_endpoint(
            lambda: _Callback(self._from_transceiver), local_addr=(self.tunnel_host, 0), family=_family(self.tunnel_host)
        )
        return self

    def close(self) -> None:
        for transport in (self.public, self.tunnel):
            if transport is not None:
                transport.close()

    def _from_client(self, data: bytes, addr: Addr) -> None:
        client = (addr[0], addr[1])
        flow = self.flows.get(client)
        if flow is None:
            flow = self._learn(data, client)
            if flow is None:
                return
        ip = ipaddress.ip_address(client[0]).packed
        assert self.tunnel is not None
        self.tunnel.sendto(encode_frame(Data(flow.handle, ip, client[1], data)), flow.transceiver)

    def _learn(self, data: bytes, client: Addr) -> Flow | None:
        try:
            request = parse_binding_request(data)
            ufrag = (request.username or "").partition(":")[0]
            token = decode_token(self.keyring, ufrag, time.time())
        except (StunError, TokenError) as exc:
            self.drops.append(getattr(exc, "reason", "bad_stun"))
            return None
        if not request.verify_integrity(derive_password(self.keyring, ufrag).encode()):
            self.drops.append("stun_bad_integrity")
            return None
        flow = Flow(next(self._handles), client, (token.target_host, token.target_port), ufrag)
        self.flows[client] = flow
        self.by_handle[flow.handle] = flow
        return flow

    def _from_transceiver(self, data: bytes, addr: Addr) -> None:
        try:
            frame = decode_frame(data)
        except FrameError as exc:
            self.drops.append(exc.reason)
            return
        if isinstance(frame, Data):
            flow = self.by_handle.get(frame.handle)
            client = (str(ipaddress.ip_address(frame.ip)), frame.port)
            if flow is None or flow.client != client or flow.transceiver != (addr[0], addr[1]):
                self.drops.append("no_flow")
                return
            assert self.public is not None
            self.public.sendto(frame.payload, client)
        elif isinstance(frame, Heartbeat):
            self.heartbeats.append(((addr[0], addr[1]), frame))
        elif isinstance(frame, SessionClosed):
            self.closed.append(frame.ufrag)
            for flow in [f for f in self.flows.values() if f.ufrag == frame.ufrag]:
                del self.flows[flow.client]
                del self.by_handle[flow.handle]
        elif isinstance(frame, Drain):
            self.drains.append(frame)


class _Callback(asyncio.DatagramProtocol):
    def __init__(self, callback) -> None:  # type: ignore[no-untyped-def]
        self.callback = callback

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        self.callback(data, addr)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
