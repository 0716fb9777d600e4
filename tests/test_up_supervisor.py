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
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import aioice.ice
import psutil
import pytest
from relay_calls import run
from relayproc import wait_for
from webrtc_peer import Client
from webrtc_peer import wait_for as await_for

from cli.call_client import ReconnectingCall

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def loopback_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # aioice skips 127.0.0.1 when gathering; the clients must stay on the loopback.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    log_path: Path

    @property
    def front(self) -> str:
        return f"http://127.0.0.1:{self.ports['--signalling-port']}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def service_pid(self, marker: str) -> int:
        for child in psutil.Process(self.proc.pid).children():
            if marker in " ".join(child.cmdline()):
                return child.pid
        raise AssertionError(f"no child with {marker!r}")

    def transceiver_with_tunnel_port(self, port: int) -> int:
        for child in psutil.Process(self.proc.pid).children():
            if any(c.laddr.port == port for c in child.net_connections(kind="udp")):
                return child.pid
        raise AssertionError(f"no transceiver on tunnel port {port}")


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    """`rtcrelay up --transceivers 2` on free ports; Ctrl-C at the end must exit 0."""
    ports = {"--relay-port": free_port(socket.SOCK_DGRAM), "--http-port": free_port(socket.SOCK_STREAM),
             "--signalling-port": free_port(socket.SOCK_STREAM), "--admin-port": free_port(socket.SOCK_STREAM)}
    log_path = tmp_path / "up.log"
    args = [arg for flag, port in ports.items() for arg in (flag, str(port))]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "up", *args, "--transceivers", "2",
                                 "--name", f"up{os.getpid()}"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
    handle = Up(proc, ports, log_path)
    try:
        wait_for(lambda: proc.poll() is None and "rtcrelay demo is up" in handle.log(), 45, "the banner")
        yield handle
        assert proc.poll() is None, handle.log()[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    assert proc.returncode == 0, handle.log()[-3000:]


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
            assert call.pc is not None
            ufrag = next(line.split(":", 1)[1] for line in call.pc.remoteDescription.sdp.splitlines()
                         if line.startswith("a=ice-ufrag:"))
            decoded = json.loads(subprocess.run([sys.executable, "-m", "cli.main", "ufrag", "decode", ufrag, "--json"],
                                                capture_output=True, text=True, cwd=ROOT, timeout=30).stdout)
            victim = up.transceiver_with_tunnel_port(int(decoded["target"].rpartition(":")[2]))
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
