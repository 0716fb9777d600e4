"""The processes bench/transceiver.py measures, one `Stack` per variant: the echo server
(bench/echo_calls.py serve rtcrelay|stock) and, for rtcrelay, the real relay in front of it,
all pinned to SERVER_CPU; the callers run in the benchmark's own process on CALLER_CPU."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import processes
from bench.harness.errors import BenchError
from bench.harness.ports import free_port
from bench.harness.procinfo import child_pids
from bench.harness.relay_files import write_relay_config, write_route_keys

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HOST = "127.0.0.1"
SERVER_CPU = 1
CALLER_CPU = 0
SERVER_ENV: dict[str, str] = {}  # experiment knobs for the server processes (see --server-switch-interval)
STOP_GRACE = 8.0  # a server's SIGTERM -> SIGKILL


def _spawn_server(argv: list[str], log: Path) -> subprocess.Popen:
    """A server process (own process group) on SERVER_CPU, from the repository root; stderr to log."""
    return processes.spawn(argv, cpus={SERVER_CPU}, log=log, env={**os.environ, **SERVER_ENV}, cwd=ROOT)


def _read_ready(server: subprocess.Popen) -> dict[str, int]:
    """The server's `READY http=PORT control=PORT pid=PID` line."""
    return {k: int(v) for k, v in processes.read_fields(server, "READY", timeout=30.0).items()}


@dataclass
class Stack:
    """One variant's running processes: what the calls go to, and whose CPU counts."""

    variant: str
    base_url: str
    control_url: str
    server: subprocess.Popen
    relay: subprocess.Popen | None = None
    cleanup_dirs: list[Path] = field(default_factory=list)
    relay_admin: str = ""

    def _relay_metrics(self, wanted: str) -> dict[str, float]:
        """The relay's /metrics samples whose line holds ``wanted`` (empty without a relay)."""
        if not self.relay_admin:
            return {}
        try:
            with urllib.request.urlopen(self.relay_admin + "/metrics", timeout=3) as r:
                text = r.read().decode(errors="replace")
        except OSError:
            return {}
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or wanted not in line:
                continue
            name, _, value = line.rpartition(" ")
            try:
                samples[name] = samples.get(name, 0.0) + float(value)
            except ValueError:
                continue
        return samples

    def relay_drops(self) -> dict[str, float]:
        """Non-zero drop counters from the relay's /metrics (empty without a relay)."""
        return {name: v for name, v in self._relay_metrics("drop").items() if v}

    def relay_packets(self) -> int:
        """Datagrams the relay forwarded, both ways, its kernel path's included (0 without a
        relay). With the kernel path its workers may take no measurable CPU at all: this is
        what says the relay carried the calls."""
        return int(sum(self._relay_metrics("rtcrelay_packets_total{").values()))

    def server_pids(self) -> list[int]:
        return [self.server.pid]

    def relay_pids(self) -> list[int]:
        """The relay's supervisor and its workers."""
        if self.relay is None:
            return []
        return [self.relay.pid, *child_pids(self.relay.pid)]

    def check_alive(self) -> None:
        for name, p in (("server", self.server), ("relay", self.relay)):
            if p is not None and p.poll() is not None:
                raise BenchError(f"{self.variant}: the {name} exited with {p.returncode}")

    def close(self) -> None:
        processes.stop(self.server, STOP_GRACE)
        if self.relay is not None:
            processes.stop(self.relay, STOP_GRACE)
        for d in self.cleanup_dirs:
            shutil.rmtree(d, ignore_errors=True)


def start_rtcrelay(workdir: Path, server_args: tuple[str, ...] = ()) -> Stack:
    """The relay and the echo transceiver behind it; ``server_args``: more `echo_calls.py serve` flags."""
    name = "bench" + secrets.token_hex(5)
    table_dir = Path("/dev/shm") / f"rtcrelay-{name}"
    table_dir.mkdir()
    keys = write_route_keys(workdir / "route-keys.toml")
    port, admin = free_port(HOST), free_port(HOST, socket.SOCK_STREAM)
    settings = {"name": name, "listen": [f"{HOST}:{port}"], "workers": 1, "table_dir": str(table_dir),
                "route_keys_file": str(keys), "admin_listen": f"{HOST}:{admin}", "flow_capacity": 4096,
                "session_capacity": 4096}
    config = write_relay_config(workdir / "relay.toml", settings)
    relay = _spawn_server([sys.executable, "-c", "from cli.main import app; app()", "relay", "--config", str(config)],
                          workdir / "relay.log")
    stack_dirs = [table_dir]
    try:
        deadline = time.monotonic() + 30
        while True:
            if relay.poll() is not None:
                raise BenchError(f"relay exited ({relay.returncode})\n{processes.stderr_tail(relay)}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{admin}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"relay not ready within 30 s\n{processes.stderr_tail(relay)}")
            time.sleep(0.1)
        server = _spawn_server([sys.executable, str(BENCH / "echo_calls.py"), "serve", "rtcrelay",
                                "--relay-public", f"{HOST}:{port}", "--route-keys", str(keys), *server_args],
                               workdir / "transceiver.log")
        ready = _read_ready(server)
    except BaseException:
        processes.stop(relay, STOP_GRACE)
        shutil.rmtree(table_dir, ignore_errors=True)
        raise
    return Stack("rtcrelay", f"http://{HOST}:{ready['http']}", f"http://{HOST}:{ready['control']}", server, relay,
                 stack_dirs, relay_admin=f"http://{HOST}:{admin}")


def start_stock(workdir: Path) -> Stack:
    server = _spawn_server([sys.executable, str(BENCH / "echo_calls.py"), "serve", "stock"], workdir / "stock.log")
    ready = _read_ready(server)
    return Stack("stock", f"http://{HOST}:{ready['http']}", f"http://{HOST}:{ready['control']}", server)

