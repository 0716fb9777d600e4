"""transceiver/tunnel.py: the demux/mux, with plain bytes and a recording transport (no sockets)."""

from __future__ import annotations

import asyncio
import ipaddress
import os

import pytest

from transceiver.tunnel import MAX_FLOWS_PER_SESSION, TunnelEndpoint
from wire.repeats import MAX_REPEATING
from wire.stun import build_binding_request
from wire.tunnel_frame import (
    CLOSE_REPEATS,
    Data,
    Drain,
    Heartbeat,
    Probe,
    SessionClosed,
    SessionRenamed,
    decode_frame,
    encode_frame,
)

RELAY = ("127.0.0.1", 40000)
RELAY2 = ("127.0.0.2", 40001)
CLIENT = ("127.0.0.1", 50000)
UFRAG = "A" * 38


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 9999) if name == "sockname" else default

    def frames(self) -> list[tuple[object, tuple[str, int]]]:
        return [(decode_frame(data), addr) for data, addr in self.sent]


def request(ufrag: str = UFRAG) -> bytes:
    return build_binding_request(os.urandom(12), f"{ufrag}:clnt", b"p" * 22, 1, controlling=True, tie_breaker=7)


def data_frame(payload: bytes, client: tuple[str, int] = CLIENT, handle: int = 5) -> bytes:
    return encode_frame(Data(handle, ipaddress.ip_address(client[0]).packed, client[1], payload))


def run(coro_fn):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        endpoint = TunnelEndpoint(relay_addresses=[("127.0.0.9", 41000)], heartbeat=lambda: Heartbeat(3, 10, False))
        transport = RecordingTransport()
        endpoint.connection_made(transport)  # type: ignore[arg-type]
        try:
            await coro_fn(endpoint, transport)
        finally:
            endpoint.connection_lost(None)

    asyncio.run(asyncio.wait_for(main(), 10))


def test_binding_request_binds_a_flow_and_later_datagrams_follow_it() -> None:
    async def body(endpoint: TunnelEndpoint, transport: RecordingTransport) -> None:
        got: list[tuple[bytes, tuple[str, int]]] = []
        link = endpoint.register(UFRAG, lambda data, addr: got.append((data, addr)))
        stun = request()
        endpoint.datagram_received(data_frame(b"\x17dtls-before-stun"), RELAY)  # no flow yet
        endpoint.datagram_received(data_frame(stun), RELAY)
        endpoint.datagram_received(data_frame(b"\x17dtls"), RELAY)
        endpoint.datagram_received(data_frame(b"\x17other-client", client=("127.0.0.1", 50001)), RELAY)
        assert got == [(stun, CLIENT), (b"\x17dtls", CLIENT)]
        assert endpoint.counters.drops["unknown_flow"] == 2
        assert endpoint.counters.frames_in == 2
        assert endpoint.counters.flows_moved == 0

        transport.sent.clear()
        link.sendto(b"\x17answer", CLIENT)
        (frame, addr), = transport.frames()
        assert addr == RELAY
        assert frame == Data(5, b"\x7f\x00\x00\x01", CLIENT[1], b"\x17answer")
        link.sendto(b"x", ("127.0.0.1", 1))  # nobody delivered that address
        assert endpoint.counters.drops["no_flow_out"] == 1
        assert endpoint.counters.frames_out == 1

    run(body)


def test_stun_is_routed_by_ufrag_even_from_a_known_flow() -> None:
    async def body(endpoint: TunnelEndpoint, transport: RecordingTransport) -> None:
        first: list[bytes] = []
        second: list[bytes] = []
        endpoint.register(UFRAG, lambda data, addr: first.append(data))
        other = "B" * 38
        endpoint.register(other, lambda data, addr: second.append(data))
        endpoint.datagram_received(data_frame(request()), RELAY)
        endpoint.datagram_received(data_frame(request(other), handle=6), RELAY)  # address reused by another session
        endpoint.datagram_received(data_frame(b"\x80rtp", handle=6), RELAY)
        assert len(first) == 1 and len(second) == 2
        endpoint.datagram_received(data_frame(request("C" * 38)), RELAY)
        assert endpoint.counters.drops["unknown_ufrag"] == 1

    run(body)


@pytest.mark.parametrize("via_stun", [True, False])
def test_flow_follows_a_new_relay_address_or_handle(via_stun: bool) -> None:
    # A relay worker that adopts a flow (restart, reuseport rehash) sends from its own tunnel
    # socket with a new handle; replies must follow at once, not at the next consent check.
    async def body(endpoint: TunnelEndpoint, transport: RecordingTransport) -> None:
        got: list[bytes] = []
        link = endpoint.register(UFRAG, lambda data, addr: got.append(data))
        endpoint.datagram_received(data_frame(request(), handle=5), RELAY)
        moved = request() if via_stun else b"\x17dtls"
        endpoint.datagram_received(data_frame(moved, handle=9), RELAY2)
        assert got[-1] == moved and endpoint.counters.flows_moved == 1
        transport.sent.clear()
        link.sendto(b"\x17x", CLIENT)
        (frame, addr), = transport.frames()
        assert addr == RELAY2 and isinstance(frame, Data) and frame.handle == 9
        assert len(link.flows) == 1
        endpoint.datagram_received(data_frame(b"\x17y", handle=9), RELAY2)
        assert endpoint.counters.flows_moved == 1  # a hit costs no move

    run(body)


def test_drops_by_reason() -> None:
    async def body(endpoint: TunnelEndpoint, transport: RecordingTransport) -> None:
        endpoint.register(UFRAG, lambda data, addr: None)
        endpoint.datagram_received(data_frame(request()), ("10.0.0.1", 40000))
        endpoint.datagram_received(data_frame(request()), ("::ffff:10.0.0.1", 40000, 0, 0))
        endpoint.datagram_received(b"", RELAY)
        endpoint.datagram_received(b"\x09junk", RELAY)
        endpoint.datagram_received(b"\x01\xff\xff", RELAY)
        endpoint.datagram_received(encode_frame(Heartbeat(1, 2)), RELAY)
        stun_like = b"\x00\x01\x00\x08\x21\x12\xa4\x42" + b"\x00" * 12  # length says 8, has 0
        endpoint.datagram_received(data_frame(stun_like), RELAY)
        drops = endpoint.counters.drops
        assert drops["not_allowed"] == 2
        assert drops["frame_empty"] == 1 and drops["frame_bad_version"] == 1 and drops["frame_malformed"] == 1
        assert drops["unexpected_frame"] == 1 and drops["stun_malformed"] == 1
        assert endpoint.counters.frames_in == 0
        # IPv4-mapped relay addresses of a dual-stack socket are checked as IPv4.
        endpoint.datagram_received(data_frame(request()), ("::ffff:127.0.0.1", 40000, 0, 0))
        assert endpoint.counters.frames_in == 1

    run(body)


def test_flows_per_session_are_bounded_and_released_on_close() -> None:
    async def body(endpoint: TunnelEndpoint, transport: RecordingTransport) -> None:
        link = endpoint.register(UFRAG, lambda data, addr: None)
        for port in range(MAX_FLOWS_PER_SESSION + 3):
            endpoint.datagram_received(data_frame(request(), client=("127.0.0.1", 50000 + port), handle=port + 1), RELAY)
        assert len(link.flows) == MAX_FLOWS_PER_SESSION
        assert endpoint.counters.drops["flow_limit"] == 3
        transport.sent.clear()
        link.close()
        link.close()  # idempotent
        assert not endpoint._flows and not link.flows and endpoint.session_count == 0
        closed = [(frame, addr) for frame, addr in transport.frames() if isinstance(frame, SessionClosed)]
        # To the configured relay and to the relay that delivered the flows, once each.
        assert sorted(addr for _, addr in closed) == sorted([("127.0.0.9", 41000), RELAY])
        assert all(frame == SessionClosed(UFRAG) for frame, _ in closed)
        endpoint.datagram_received(data_frame(b"\x17late"), RELAY)
        assert endpoint.counters.drops["unknown_flow"] == 1

    run(body)


def test_ipv6_client_addresses() -> None:
    async def body(endpoint: TunnelEndpoint, transport: RecordingTransport) -> None:
        got: list[tuple[str, int]] = []
        link = endpoint.register(UFRAG, lambda data, addr: got.append(addr))
        client = ("2001:db8::1", 5000)
        endpoint.datagram_received(data_frame(request(), client=client), RELAY)
        assert got == [client]
        transport.sent.clear()
        link.sendto(b"\x17x", client)
        (frame, _), = transport.frames()
        assert isinstance(frame, Data) and frame.ip == ipaddress.ip_address(client[0]).packed

    run(body)


def test_heartbeats_go_to_configured_and_heard_relays_and_drain_too() -> None:
    async def body(endpoint: TunnelEndpoint, transport: RecordingTransport) -> None:
        endpoint.register(UFRAG, lambda data, addr: None)
        endpoint.datagram_received(data_frame(request()), RELAY)
        transport.sent.clear()
        endpoint.send_heartbeat()
        endpoint.send_drain(12.5)
        frames = transport.frames()
        assert sorted(addr for f, addr in frames if isinstance(f, Heartbeat)) == sorted([("127.0.0.9", 41000), RELAY])
        assert all(f == Heartbeat(3, 10, False) for f, _ in frames if isinstance(f, Heartbeat))
        assert [f for f, _ in frames if isinstance(f, Drain)] == [Drain(12.5), Drain(12.5)]

    run(body)


def test_a_probe_is_answered_with_a_heartbeat_to_its_sender_only() -> None:
    """A relay whose link to us was refused (ICMP) probes: a live transceiver says so at once,
    to that relay alone; a probe from outside the relays' networks gets nothing."""
    async def body(endpoint: TunnelEndpoint, transport: RecordingTransport) -> None:
        prober = ("127.0.0.9", 41001)
        endpoint.datagram_received(encode_frame(Probe()), prober)
        assert transport.frames() == [(Heartbeat(3, 10, False), prober)]
        transport.sent.clear()
        endpoint.datagram_received(encode_frame(Probe()), ("192.0.2.1", 41001))
        assert transport.frames() == [] and endpoint.counters.drops["not_allowed"] == 1

    run(body)


def test_heartbeat_loop_runs_every_interval() -> None:
    async def main() -> None:
        endpoint = TunnelEndpoint(relay_addresses=[RELAY], heartbeat_interval=0.05)
        transport = RecordingTransport()
        endpoint.connection_made(transport)  # type: ignore[arg-type]
        await asyncio.sleep(0.22)
        endpoint.close()
        count = len(transport.sent)
        await asyncio.sleep(0.1)
        assert 3 <= count <= 6 and len(transport.sent) == count

    asyncio.run(asyncio.wait_for(main(), 5))


def test_a_session_not_ready_yet_drops() -> None:
    async def body(endpoint: TunnelEndpoint, transport: RecordingTransport) -> None:
        endpoint.register(UFRAG)  # receive is set once ICE is attached
        endpoint.datagram_received(data_frame(request()), RELAY)
        assert endpoint.counters.drops["session_not_ready"] == 1
        with pytest.raises(ValueError):
            endpoint.register(UFRAG)

    run(body)


def test_an_ice_restart_adds_a_ufrag_and_retires_the_old_one() -> None:
    new = "B" * 38

    async def body(endpoint: TunnelEndpoint, transport: RecordingTransport) -> None:
        link = endpoint.register(UFRAG, lambda data, addr: None)
        old_path, new_path = ("127.0.0.1", 50000), ("127.0.0.1", 50001)
        endpoint.datagram_received(data_frame(request(), client=old_path, handle=1), RELAY)
        endpoint.add_ufrag(link, new)
        assert link.ufrag == new and endpoint.session_count == 1
        endpoint.datagram_received(data_frame(request(new), client=new_path, handle=2), RELAY)
        # a check with the new ufrag on the old 5-tuple: the relay's flow keeps its old label
        endpoint.datagram_received(data_frame(request(new), client=old_path, handle=1), RELAY)
        assert (link.relay_ufrag(old_path), link.relay_ufrag(new_path)) == (UFRAG, new)
        transport.sent.clear()
        endpoint.retire_ufrag(link, new)  # the current one: never
        assert transport.frames() == []
        endpoint.retire_ufrag(link, UFRAG)
        renamed = [frame for frame, _ in transport.frames()]
        assert renamed and set(renamed) == {SessionRenamed(UFRAG, new)}
        # the relays learn the old ufrag's flows again under the new one: so do we
        assert set(link.flows) == {old_path, new_path} and link.relay_ufrag(old_path) == new
        endpoint.datagram_received(data_frame(request(), client=("127.0.0.1", 50002), handle=3), RELAY)
        assert endpoint.counters.drops["unknown_ufrag"] == 1  # the old ufrag routes nowhere now
        transport.sent.clear()
        link.close()
        assert [frame for frame, _ in transport.frames()] and {f for f, _ in transport.frames()} == {SessionClosed(new)}

    run(body)


def test_closes_and_renames_are_said_again_with_the_next_heartbeats() -> None:
    """One lost SessionClosed left the session's flows at a relay until idle_timeout: each is
    sent again with the next CLOSE_REPEATS heartbeats (and a SessionRenamed too), then no more; the
    frames waiting for repeats are bounded."""
    async def body(endpoint: TunnelEndpoint, transport: RecordingTransport) -> None:
        link = endpoint.register(UFRAG, lambda data, addr: None)
        endpoint.add_ufrag(link, "B" * 38)
        endpoint.retire_ufrag(link, UFRAG)
        link.close()
        relays = 1  # the configured relay (none heard from)
        per_heartbeat = []
        for _ in range(CLOSE_REPEATS + 2):
            transport.sent.clear()
            endpoint.send_heartbeat()
            per_heartbeat.append([f for f, _ in transport.frames() if not isinstance(f, Heartbeat)])
        said_again = [SessionRenamed(UFRAG, "B" * 38), SessionClosed("B" * 38)] * relays
        assert per_heartbeat == [said_again] * CLOSE_REPEATS + [[], []]
        for n in range(MAX_REPEATING + 10):
            endpoint._tell_relays(SessionClosed(f"u{n}"))
        transport.sent.clear()
        endpoint.send_heartbeat()
        repeated = [f for f, _ in transport.frames() if isinstance(f, SessionClosed)]
        assert len(repeated) == MAX_REPEATING and repeated[0] == SessionClosed("u10")  # the oldest went unrepeated

    run(body)
