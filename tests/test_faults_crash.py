"""Faults under live calls: relay workers killed, the whole relay restarted.

20 aiortc echo calls run through the real relay; the test kills things and checks that no
call drops, no flow is lost, and measures the longest audio gap a caller heard.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aioice.ice
import pytest
from fdstore import FdStore
from relay_calls import Call, run
from relayproc import cleanup_relay, spawn_relay, start_relay
from webrtc_peer import Client, wait_for

CALLS = 20
CONFIG = {"heartbeat_timeout": 5.0}


@pytest.fixture(autouse=True)
def loopback_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


def five_tuples(call: Call) -> set[tuple[bytes, int, bytes, int]]:
    return {(f.client_ip, f.client_port, f.target_ip, f.target_port) for f in call.relay_flows()}


async def start_calls(call: Call) -> list[Client]:
    clients = []
    for _ in range(CALLS // 5):  # in waves: 20 DTLS handshakes at once starve this 2-core machine
        wave = await asyncio.gather(*(call.dial() for _ in range(5)))
        await asyncio.gather(*(call.connected(c, timeout=40) for c in wave))
        clients += wave
    await asyncio.gather(*(c.hears_echo(timeout=30) for c in clients))
    return clients


async def all_calls_alive(clients: list[Client], since: float) -> None:
    """Every call is connected, echoes a message, and hears audio again after ``since``."""
    assert [c.pc.connectionState for c in clients] == ["connected"] * len(clients)
    replies = await asyncio.gather(*(c.roundtrip(f"after {i}", timeout=15) for i, c in enumerate(clients)))
    assert replies == [f"after {i}" for i in range(len(clients))]
    await wait_for(lambda: all(any(t > since + 1.0 for t in c.arrivals) for c in clients), 15, "audio on every call again")


def report(label: str, gaps: list[float]) -> None:
    gaps_ms = sorted(g * 1000 for g in gaps)
    print(f"\n[{label}] longest audio gap per call: median {gaps_ms[len(gaps_ms) // 2]:.0f} ms, max {gaps_ms[-1]:.0f} ms")


def test_worker_kill_9_under_20_calls_drops_nothing(tmp_path: Path) -> None:
    relay = start_relay(tmp_path, workers=2, config=CONFIG)

    async def main() -> None:
        async with Call(relay) as call:
            clients = await start_calls(call)
            before = five_tuples(call)
            assert len(before) == CALLS
            for round_ in range(2):  # kill one worker, then the other
                # The supervisor keeps a warm standby per worker; kill once they are ready.
                await wait_for(lambda: json.loads(relay.http("/healthz")[1])["standbys_ready"] == relay.workers, 30, "ready standbys")
                rows = relay.rows()
                victim_index = round_ % relay.workers
                victim = rows[victim_index]["pid"]
                killed_at = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                await wait_for(lambda victim=victim, victim_index=victim_index: relay.rows()[victim_index]["pid"] not in (0, victim)
                               and relay.rows()[victim_index]["ready"] == 1,
                               15, "the worker to be restarted")
                await asyncio.sleep(2.0)
                await all_calls_alive(clients, killed_at)
                gaps = [c.longest_gap(killed_at - 0.5, time.monotonic()) for c in clients]
                report(f"worker {victim_index} kill -9", gaps)
                assert max(gaps) < 3.0, "audio must resume within a few hundred ms of the restart"
            assert five_tuples(call) == before  # 0 flows lost, none re-created elsewhere
            assert relay.log().count("exited with -9") == 2
            assert relay.log().count("its standby took over") == 2

    try:
        run(main, timeout=240)
    finally:
        cleanup_relay(relay)


def test_whole_relay_restart_with_stored_sockets_drops_nothing(tmp_path: Path) -> None:
    store = FdStore(tmp_path)
    relay = start_relay(tmp_path, workers=2, config=CONFIG, popen=store.popen)
    store.wait("READY=1", 20)

    async def main() -> None:
        async with Call(relay) as call:
            clients = await start_calls(call)
            before = five_tuples(call)
            assert len(before) == CALLS
            assert len(store.fds) == relay.workers * 2  # each worker's public and tunnel socket
            stopped_at = time.monotonic()
            relay.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(relay.proc.wait, 15)
            assert relay.proc.returncode == 0
            store.clear()
            relay.proc = spawn_relay(relay, popen=store.popen)
            await wait_for(lambda: store.seen("READY=1"), 20, "the restarted relay to be ready")
            restarted_in = time.monotonic() - stopped_at
            await asyncio.sleep(2.0)
            await all_calls_alive(clients, stopped_at)
            gaps = [c.longest_gap(stopped_at - 0.5, time.monotonic()) for c in clients]
            report(f"relay restart ({restarted_in * 1000:.0f} ms stop→ready)", gaps)
            assert five_tuples(call) == before
            assert "reopened flow table" in relay.log()

    try:
        run(main, timeout=240)
    finally:
        cleanup_relay(relay)
        store.close()
