"""`rtcrelay up` supervises: a transceiver killed with -9 is started again after its back-off,
nothing else stops for it, and the signalling front sends new calls to a live transceiver
meanwhile. Real processes (the relay with its workers, two transceivers), aiortc clients on
the loopback."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import aioice.ice
import pytest
from relay_calls import run
from up_process import Up, run_up
from webrtc_peer import Client
from webrtc_peer import wait_for as await_for

from cli.call_client import ReconnectingCall
from cli.up import http_ok

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def loopback_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # aioice skips 127.0.0.1 when gathering; the clients must stay on the loopback.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    yield from run_up(tmp_path)


@pytest.fixture
def up_without_admission(tmp_path: Path) -> Iterator[Up]:
    """For 20 calls that must all fit on ONE transceiver (the other crashed or drains): about
    0.9 of a core on this machine, past the default admission budget (0.8), which would
    refuse the extra calls (its job, tested in tests/test_admission.py), not move them."""
    yield from run_up(tmp_path, {"RTCRELAY_TRANSCEIVER_ADMISSION_CPU_BUDGET": "0",
                                  "RTCRELAY_TRANSCEIVER_ADMISSION_MAX_LOOP_LAG": "0"})


def test_a_dead_transceiver_is_restarted_and_takes_nothing_else_down(up: Up) -> None:
    front, log_path, ports, service_pid = up.front, up.log_path, up.ports, up.service_pid
    backends = re.findall(r"http://127\.0\.0\.1:(\d+)", up.log().split("front for")[1].splitlines()[0])
    assert len(backends) == 2

    relay_pid = service_pid(" relay ")
    victim = service_pid("transceiver-0.toml")

    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            clients: list[Client] = []

            async def call() -> None:
                client = Client()
                clients.append(client)
                async with http.post(f"{front}/v1/sessions", data=await client.offer(),
                                     headers={"Content-Type": "application/sdp"}) as resp:
                    assert resp.status == 201, await resp.text()
                    answer = await resp.text()
                await client.accept(answer)
                await await_for(lambda: client.pc.connectionState == "connected", 15, "a call to connect")
                assert await client.roundtrip("hello") == "hello"

            try:
                await call()
                os.kill(victim, signal.SIGKILL)
                killed = time.monotonic()
                for _ in range(3):  # while it is down: the front skips it
                    await call()
                calls_done = time.monotonic() - killed
                await await_for(lambda: "restart 1" in log_path.read_text(), 10, "the restart")
                async with http.get(f"{front}/readyz") as resp:
                    status, text = resp.status, await resp.text()
                deadline = time.monotonic() + 15
                while text.strip() != "2 of 2 transceivers ready" and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                    async with http.get(f"{front}/readyz") as resp:
                        status, text = resp.status, await resp.text()
                assert status == 200 and text.strip() == "2 of 2 transceivers ready", text
                async with http.get(f"http://127.0.0.1:{ports['--admin-port']}/readyz") as resp:
                    assert resp.status == 200  # the relay never stopped
                print(f"\nFIGURES up_supervisor: 3 calls through the front in {calls_done:.2f} s after the kill")
            finally:
                for client in clients:
                    await client.close()

    run(main, timeout=120)
    assert service_pid(" relay ") == relay_pid  # the same relay process throughout
    assert service_pid("transceiver-0.toml") != victim
    assert "transceiver 0 exited with -9" in log_path.read_text()


def test_an_aiortc_call_is_back_on_the_other_transceiver_after_a_crash(up: Up) -> None:
    """cli.call_client.ReconnectingCall: its media stops, the session resource says 404 (the
    front cannot reach the dead transceiver), it calls again and the front sends the call to
    the live one."""

    async def main() -> None:
        call = ReconnectingCall(f"{up.front}/v1/sessions")
        try:
            await call.start()
            await await_for(lambda: len(call.arrivals) > 25, 10, "echoed audio")
            victim = up.transceiver_with_tunnel_port(int(_tunnel_target(call).rpartition(":")[2]))
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            await await_for(lambda: call.reconnects == 1 and any(t > killed + 0.1 for t in call.arrivals[-10:]),
                            10, "audio again after the crash")
            back = next(t for t in call.arrivals if t > (call.lost_at or killed)) - killed
            assert call.lost_at is not None and call.lost_at - killed <= 2.0
            assert back <= 3.0
            print(f"\nFIGURES aiortc_transceiver_killed: learned {call.lost_at - killed:.2f} s, "
                  f"audio back {back:.2f} s after the kill")
        finally:
            await call.close()

    run(main, timeout=60)


CALLS = 20


def test_twenty_calls_a_transceiver_crash_and_every_affected_call_is_back(up_without_admission: Up) -> None:
    """Two transceivers, 20 aiortc calls (the front spreads them), kill -9 of one: every
    affected call learns and is back on the other transceiver with echoed audio; 20 of 20
    calls have audio at the end; the relay keeps no flow for the dead one."""
    up = up_without_admission

    async def main() -> None:
        calls: list[ReconnectingCall] = []
        try:
            await _start_calls(up, calls)
            victim_port = int(_tunnel_target(calls[0]).rpartition(":")[2])
            affected = [c for c in calls if _tunnel_target(c).endswith(f":{victim_port}")]
            assert 0 < len(affected) < CALLS
            os.kill(up.transceiver_with_tunnel_port(victim_port), signal.SIGKILL)
            killed = time.monotonic()
            await await_for(lambda: all(c.reconnects == 1 and c.arrivals[-1] > killed + 0.5 for c in affected),
                            25, "every affected call back with audio")
            learned = [c.lost_at - killed for c in affected if c.lost_at is not None]
            back = [next(t for t in c.arrivals if t > (c.lost_at or killed)) - killed for c in affected]
            await asyncio.sleep(1.0)
            now = time.monotonic()
            assert all(now - c.arrivals[-1] < 0.5 for c in calls)  # 20 of 20 have audio now
            assert all(c.reconnects == 0 for c in calls if c not in affected)
            flows = json.loads(subprocess.run([sys.executable, "-m", "cli.main", "flows", "list", "--json", "--name",
                                               f"up{os.getpid()}"], capture_output=True, text=True, cwd=ROOT,
                                              timeout=30).stdout)
            assert not [f for f in flows if f["transceiver"].endswith(f":{victim_port}")], flows
            # Every affected call learns within 2 s. Back with audio: median 0.7-3.6 s, worst up to
            # ~7 s over runs (20 aiortc callers, two transceivers and the relay share this machine's
            # 2 cores, and ten calls renegotiate at once): bounded here, reported in RELIABILITY.md.
            assert len(learned) == len(affected) and max(learned) <= 2.0, learned
            assert sorted(back)[len(back) // 2] <= 6.0 and max(back) <= 15.0, back
            print(f"\nFIGURES twenty_calls_crash: {len(affected)} of {CALLS} calls on the killed transceiver; "
                  f"learned max {max(learned):.2f} s, audio back median {sorted(back)[len(back) // 2]:.2f} s, "
                  f"max {max(back):.2f} s; 20 of 20 calls with audio after")
        finally:
            for call in calls:
                await call.close()

    run(main, timeout=150)


async def _start_calls(up: Up, calls: list[ReconnectingCall]) -> None:
    """CALLS calls through the front (into ``calls``, for the caller to close), all with audio."""
    for _ in range(CALLS):
        calls.append(ReconnectingCall(f"{up.front}/v1/sessions"))
        await calls[-1].start()
    await await_for(lambda: all(len(c.arrivals) > 25 for c in calls), 30, "audio on every call")


def _tunnel_target(call: ReconnectingCall) -> str:
    """The transceiver tunnel address the call's route token names (rtcrelay ufrag decode)."""
    assert call.pc is not None
    ufrag = next(line.split(":", 1)[1] for line in call.pc.remoteDescription.sdp.splitlines()
                 if line.startswith("a=ice-ufrag:"))
    out = subprocess.run([sys.executable, "-m", "cli.main", "ufrag", "decode", ufrag, "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30).stdout
    return json.loads(out)["target"]


def test_a_rolling_restart_moves_every_call_and_drops_none(up_without_admission: Up) -> None:
    """SIGTERM each transceiver in turn under 20 calls: it asks its calls to move (control data
    channel), each caller calls again elsewhere, switches on the new call's first audio and
    hangs up the old one; the drained transceiver exits and `rtcrelay up` starts it again."""
    up = up_without_admission

    async def main() -> None:
        calls: list[ReconnectingCall] = []
        try:
            await _start_calls(up, calls)
            quiet = time.monotonic()
            await asyncio.sleep(3.0)  # the same calls with nothing moving: the reference
            baseline = [_longest_gap(c.arrivals, quiet) for c in calls]
            started = time.monotonic()
            for index in (0, 1):
                old = up.service_pid(f"transceiver-{index}.toml")
                os.kill(old, signal.SIGTERM)
                await await_for(lambda old=old, index=index: _restarted(up, index, old), 40, f"transceiver {index} back")
                await asyncio.sleep(1.0)
            ended = time.monotonic()
            assert all(c.reconnects == 0 for c in calls)  # no call was lost
            assert sum(c.migrations for c in calls) >= CALLS  # every call moved at least once
            assert all(ended - c.arrivals[-1] < 0.5 for c in calls)  # 20 of 20 have audio
            gaps = [_longest_gap(c.arrivals, started) for c in calls]
            print(f"\nFIGURES rolling_restart: {sum(c.migrations for c in calls)} moves of {CALLS} calls, "
                  f"0 dropped; longest audio gap per call median {sorted(gaps)[CALLS // 2] * 1000:.0f} ms, "
                  f"max {max(gaps) * 1000:.0f} ms (the same calls over 3 s with nothing moving: median "
                  f"{sorted(baseline)[CALLS // 2] * 1000:.0f} ms, max {max(baseline) * 1000:.0f} ms)")
            assert max(gaps) < 1.0, gaps
        finally:
            for call in calls:
                await call.close()

    run(main, timeout=200)


def _longest_gap(arrivals: list[float], since: float) -> float:
    times = [t for t in arrivals if t >= since]
    return max((b - a for a, b in zip([since, *times], times)), default=float("inf"))


def _restarted(up: Up, index: int, old_pid: int) -> bool:
    try:
        pid = up.service_pid(f"transceiver-{index}.toml")
    except AssertionError:
        return False
    port = int(re.findall(r"http://127\.0\.0\.1:(\d+)", up.log().split("front for")[1].splitlines()[0])[index])
    return pid != old_pid and http_ok(f"http://127.0.0.1:{port}/readyz")
