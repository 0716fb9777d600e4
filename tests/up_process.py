"""`rtcrelay up` as a test runs it: on free loopback ports, stopped with Ctrl-C (exit 0 expected)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from relayproc import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]


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
            try:
                if child.status() != psutil.STATUS_ZOMBIE and marker in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:  # exited meanwhile
                continue
        raise AssertionError(f"no child with {marker!r}")

    def transceiver_with_tunnel_port(self, port: int) -> int:
        for child in psutil.Process(self.proc.pid).children():
            if any(c.laddr.port == port for c in child.net_connections(kind="udp")):
                return child.pid
        raise AssertionError(f"no transceiver on tunnel port {port}")


def run_up(tmp_path: Path, env: dict[str, str] | None = None, transceivers: int = 2) -> Iterator[Up]:
    """`rtcrelay up --transceivers N` on free ports; Ctrl-C at the end must exit 0."""
    ports = {"--relay-port": free_port(socket.SOCK_DGRAM), "--http-port": free_port(socket.SOCK_STREAM),
             "--signalling-port": free_port(socket.SOCK_STREAM), "--admin-port": free_port(socket.SOCK_STREAM)}
    log_path = tmp_path / "up.log"
    args = [arg for flag, port in ports.items() for arg in (flag, str(port))]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "up", *args, "--transceivers", str(transceivers),
                                 "--name", f"up{os.getpid()}"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True, env={**os.environ, **(env or {})})
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
