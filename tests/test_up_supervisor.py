"""`rtcrelay up` supervises: a transceiver killed with -9 is started again after its back-off,
nothing else stops for it, and the signalling front sends new calls to a live transceiver
meanwhile. Real processes (the relay with its workers, two transceivers), aiortc clients on
the loopback."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import aioice.ice
import psutil
import pytest
from relay_calls import run
from relayproc import wait_for
from webrtc_peer import Client
from webrtc_peer import wait_for as await_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def loopback_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # aioice skips 127.0.0.1 when gathering; the clients must stay on the loopback.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_dead_transceiver_is_restarted_and_takes_nothing_else_down(tmp_path: Path) -> None:
    ports = {"--relay-port": free_port(socket.SOCK_DGRAM), "--http-port": free_port(socket.SOCK_STREAM),
             "--signalling-port": free_port(socket.SOCK_STREAM), "--admin-port": free_port(socket.SOCK_STREAM)}
    log_path = tmp_path / "up.log"
    args = [arg for flag, port in ports.items() for arg in (flag, str(port))]
    with open(log_path, "wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "cli.main", "up", *args, "--transceivers", "2",
                               "--name", f"up{os.getpid()}"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                              start_new_session=True)
    front = f"http://127.0.0.1:{ports['--signalling-port']}"
    try:
        wait_for(lambda: up.poll() is None and "rtcrelay demo is up" in log_path.read_text(), 45, "the banner")
        backends = re.findall(r"http://127\.0\.0\.1:(\d+)", log_path.read_text().split("front for")[1].splitlines()[0])
        assert len(backends) == 2

        def service_pid(marker: str) -> int:
            for child in psutil.Process(up.pid).children():
                if marker in " ".join(child.cmdline()):
                    return child.pid
            raise AssertionError(f"no child with {marker!r}")

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
        assert up.poll() is None, log_path.read_text()[-3000:]
        assert service_pid(" relay ") == relay_pid  # the same relay process throughout
        assert service_pid("transceiver-0.toml") != victim
        assert "transceiver 0 exited with -9" in log_path.read_text()
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait(5)
    assert up.returncode == 0, log_path.read_text()[-3000:]
