"""aiortc clients → the real multi-process relay → a transceiver: whole calls on loopback.

The relay runs as `rtcrelay relay` (supervisor + 2 SO_REUSEPORT workers + shm table); the
transceiver and the clients share this test's event loop.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aioice.ice
import pytest
from icmp_forge import forge_unreachable, link_to
from relay_calls import Call, run
from relayproc import RelayProcess, cleanup_relay, start_relay
from webrtc_peer import wait_for

from relay.link_refusals import PROBE_WAIT_S


@pytest.fixture(autouse=True)
def loopback_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # aioice skips 127.0.0.1 when gathering; the clients must stay on the loopback.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@pytest.fixture
def relay(tmp_path: Path):
    proc = start_relay(tmp_path, workers=2, config={"heartbeat_timeout": 3.0})
    yield proc
    cleanup_relay(proc)


def test_a_call_through_the_real_relay(relay: RelayProcess) -> None:
    async def main() -> None:
        async with Call(relay) as call:
            client = await call.dial()
            await call.connected(client)
            assert await client.roundtrip("hello through the relay") == "hello through the relay"
            assert await client.hears_echo() > 1000  # the echoed tone, not silence
            assert client.selected_remote() == relay.address
            flows = call.relay_flows()
            assert len(flows) == 1
            assert flows[0].target_port == call.tunnel_port and flows[0].ufrag.decode() == client.server_ufrag
            # Hang up with DELETE: the transceiver tells the relay, which forgets the flow at once.
            async with call.http.delete(f"{call.base}{client.location}") as response:
                assert response.status == 204
            await wait_for(lambda: call.relay_flows() == [], 5, "the relay to drop the closed session's flow")

    run(main)


def test_ten_concurrent_calls_through_the_real_relay(relay: RelayProcess) -> None:
    async def main() -> None:
        async with Call(relay) as call:
            clients = await asyncio.gather(*(call.dial() for _ in range(10)))
            await asyncio.gather(*(call.connected(c, timeout=30) for c in clients))
            echoes = await asyncio.gather(*(c.roundtrip(f"call {i}", timeout=15) for i, c in enumerate(clients)))
            assert echoes == [f"call {i}" for i in range(10)]
            levels = await asyncio.gather(*(c.hears_echo(timeout=20) for c in clients))
            assert all(level > 1000 for level in levels)
            flows = call.relay_flows()
            assert len(flows) == 10 and {f.ufrag.decode() for f in flows} == {c.server_ufrag for c in clients}
            # Both workers carry calls (the kernel's reuseport hash spreads the client ports).
            assert len({f.worker for f in flows}) == 2

    run(main, timeout=150)


def test_stopped_transceiver_loses_its_flows_and_new_calls_go_elsewhere(relay: RelayProcess) -> None:
    async def main() -> None:
        async with Call(relay) as first:
            client = await first.dial()
            await first.connected(client)
            assert len(first.relay_flows()) == 1
            # The transceiver vanishes without a word (no SessionClosed: its tunnel closes).
            assert first.tx.tunnel is not None
            first.tx.tunnel.close()
            await wait_for(lambda: first.relay_flows() == [], 8, "the relay to drop a silent transceiver's flows")
            async with Call(relay) as second:
                other = await second.dial()
                await second.connected(other)
                assert await other.roundtrip("still serving") == "still serving"
                assert [f.target_port for f in second.relay_flows()] == [second.tunnel_port]

    run(main, timeout=120)


@pytest.mark.skipif(os.geteuid() != 0, reason="forging ICMP needs a raw socket (root)")
def test_a_forged_port_unreachable_leaves_a_real_call_up(relay: RelayProcess) -> None:
    """A stranger's ICMP port unreachable about the relay's link to a live transceiver: the
    relay probes, the transceiver (transceiver/tunnel.py) answers with a heartbeat, and the
    call goes on, its flow kept (one refusal used to drop every flow of the transceiver)."""
    async def main() -> None:
        async with Call(relay) as call:
            client = await call.dial()
            await call.connected(client)
            assert await client.roundtrip("before") == "before"
            forge_unreachable(link_to(("127.0.0.1", call.tunnel_port)), ("127.0.0.1", call.tunnel_port), 3)
            await asyncio.sleep(PROBE_WAIT_S + 1.0)  # past the probe's wait: a silent one would be gone now
            assert len(call.relay_flows()) == 1
            assert await client.roundtrip("after") == "after"
            assert await client.hears_echo() > 1000
            relay.wait_flushed(lambda rows: sum(r["transceiver_refusals"] for r in rows) == 1, what="the refusal")
            assert sum(r["flows_closed"] for r in relay.rows()) == 0

    run(main)
