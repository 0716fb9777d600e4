"""Test helpers: run the real relay as a subprocess, talk to it as a client and as a transceiver.

Everything is on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from daemon.config_file import toml_text
from shm import Flow, FlowTable
from shm.counters import CounterBlock
from transceiver.tunnel import without_udp_checksum
from wire.route_token import RouteKeyring, derive_password, issue_token
from wire.stun import build_binding_request
from wire.tunnel_frame import Data, Frame, FrameError, Heartbeat, SessionClosed, data_header, decode_frame, encode_frame

LOCALHOST = "127.0.0.1"
RTCRELAY = [sys.executable, "-c", "from cli.main import app; app()"]


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def metric_sum(text: str, name: str) -> float:
    """The sum of a Prometheus text's samples of metric ``name`` (every label set)."""
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0].split("{")[0] == name)


def write_keys(path: Path, secrets_by_id: dict[int, bytes], active: int) -> None:
    lines = [f"active = {active}", "[keys]"]
    lines += [f'{k} = "{base64.b64encode(v).decode()}"' for k, v in secrets_by_id.items()]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class RelayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    name: str
    table_dir: Path
    keys_path: Path
    keyring: RouteKeyring
    log_path: Path
    workers: int
    config_path: Path
    hit_path: str = "auto"  # relay/hit_path.py: "c" makes the relay refuse to start without it

    @property
    def address(self) -> tuple[str, int]:
        return (LOCALHOST, self.port)

    @property
    def stats_path(self) -> str:
        return str(self.table_dir / f"rtcrelay-{self.name}.stats")

    @property
    def table_path(self) -> str:
        return str(self.table_dir / f"rtcrelay-{self.name}.table")

    def rows(self) -> list[dict[str, int]]:
        block = CounterBlock.attach(self.stats_path)
        try:
            return [block.load_row(i) for i in range(block.rows)]
        finally:
            block.close()

    def total(self, name: str) -> int:
        return sum(row[name] for row in self.rows())

    def table_flows(self) -> list[Flow]:
        """Every flow in the relay's shm table, read as the CLI reads it."""
        view = FlowTable.attach_readonly(self.table_path)
        try:
            return list(view.flows())
        finally:
            view.close()

    def table_totals(self) -> dict[str, int]:
        view = FlowTable.attach_readonly(self.table_path)
        try:
            return view.totals()
        finally:
            view.close()

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{LOCALHOST}:{self.admin_port}{path}", timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def ready(self) -> bool:
        try:
            return self.http("/readyz")[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 20.0) -> None:
        def check() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited with {self.proc.returncode}:\n{self.log()}")
            return self.ready()

        wait_for(check, timeout, "relay readiness")

    def kernel_path_serves(self) -> bool:
        """The start-up log says the in-kernel fast path serves (relay/kernel_path.py)."""
        return "kernel path: eBPF" in self.log()

    def worker_pids(self) -> list[int]:
        return [row["pid"] for row in self.rows()]

    def wait_flushed(self, condition: Callable[[list[dict[str, int]]], bool], timeout: float = 5.0, what: str = "counters") -> None:
        wait_for(lambda: condition(self.rows()), timeout, what)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


def start_relay(tmp_path: Path, *, workers: int = 2, config: dict | None = None, keyring_secrets: dict[int, bytes] | None = None,
                active: int = 1, env: dict[str, str] | None = None, prefix: list[str] | None = None,
                pass_fds: tuple[int, ...] = (), wait: bool = True, port: int | None = None,
                popen: Callable[..., subprocess.Popen[bytes]] | None = None) -> RelayProcess:
    """Start `rtcrelay relay` with a fresh name, table dir and keys; ``popen`` may replace
    subprocess.Popen (e.g. FdStore.popen, to pass stored sockets)."""
    name = "t" + uuid.uuid4().hex[:10]
    table_dir = Path("/dev/shm") / f"rtcrelay-test-{name}"
    table_dir.mkdir()
    keys_path = tmp_path / f"{name}-keys.toml"
    secrets_by_id = keyring_secrets or {1: secrets.token_bytes(32)}
    write_keys(keys_path, secrets_by_id, active)
    port = port or free_port()
    admin_port = free_port(socket.SOCK_STREAM)
    settings = {
        "name": name,
        "listen": [f"{LOCALHOST}:{port}"],
        "workers": workers,
        "table_dir": str(table_dir),
        "route_keys_file": str(keys_path),
        "admin_listen": f"{LOCALHOST}:{admin_port}",
        "flow_capacity": 1024,
        "session_capacity": 1024,
    }
    settings.update(config or {})
    config_path = tmp_path / f"{name}.toml"
    config_path.write_text(toml_text(settings))
    log_path = tmp_path / f"{name}.log"
    relay = RelayProcess(None, port, admin_port, name, table_dir, keys_path, RouteKeyring(secrets_by_id, active),  # type: ignore[arg-type]
                         log_path, workers, config_path, settings.get("hit_path", "auto"))
    relay.proc = spawn_relay(relay, env=env, prefix=prefix, pass_fds=pass_fds, popen=popen)
    if wait:
        relay.wait_ready()
    return relay


def spawn_relay(relay: RelayProcess, *, env: dict[str, str] | None = None, prefix: list[str] | None = None,
                pass_fds: tuple[int, ...] = (), popen: Callable[..., subprocess.Popen[bytes]] | None = None) -> subprocess.Popen[bytes]:
    """(Re)start the relay process of ``relay`` with its config; its log is appended to."""
    args = (prefix or []) + RTCRELAY + ["relay", "--config", str(relay.config_path)]
    with open(relay.log_path, "ab") as log:
        if popen is not None:
            return popen(args, env or {}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                pass_fds=pass_fds, start_new_session=True)


def cleanup_relay(relay: RelayProcess) -> None:
    relay.stop()
    shutil.rmtree(relay.table_dir, ignore_errors=True)


@dataclass
class FakeTransceiver:
    """A UDP socket that speaks tunnel frames: the transceiver's side, without WebRTC."""

    sock: socket.socket = field(default_factory=lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    port: int = 0  # a fixed tunnel port (a restarted transceiver at the same address); 0: any

    def __post_init__(self) -> None:
        self.sock.bind((LOCALHOST, self.port))
        self.sock.settimeout(2.0)
        without_udp_checksum(self.sock)  # as the real one (transceiver/tunnel.py)

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def token(self, keyring: RouteKeyring, now: float | None = None, cluster: int | None = None) -> str:
        return issue_token(keyring, socket.inet_aton(LOCALHOST), self.address[1], time.time() if now is None else now, cluster=cluster)

    def recv(self, timeout: float = 2.0) -> tuple[Frame, tuple[str, int]]:
        self.sock.settimeout(timeout)
        raw, source = self.sock.recvfrom(65535)
        return decode_frame(raw), source

    def recv_data(self, timeout: float = 2.0) -> tuple[Data, tuple[str, int]]:
        deadline = time.monotonic() + timeout
        while True:
            frame, source = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(frame, Data):
                return frame, source

    def drain(self, timeout: float = 0.3) -> list[Frame]:
        frames = []
        try:
            while True:
                frames.append(self.recv(timeout)[0])
        except (TimeoutError, FrameError):
            return frames

    def reply(self, relay_tunnel: tuple[str, int], frame: Data, payload: bytes) -> None:
        self.sock.sendto(data_header(frame.handle, frame.ip, frame.port, len(payload)) + payload, relay_tunnel)

    def send(self, relay_tunnel: tuple[str, int], frame: Frame) -> None:
        self.sock.sendto(encode_frame(frame), relay_tunnel)

    def heartbeat(self, relay_tunnel: tuple[str, int], sessions: int = 0) -> None:
        self.send(relay_tunnel, Heartbeat(sessions, 100))

    def close_session(self, relay_tunnel: tuple[str, int], ufrag: str) -> None:
        self.send(relay_tunnel, SessionClosed(ufrag))

    def close(self) -> None:
        self.sock.close()


class Client:
    """A WebRTC-ish client: a UDP socket that sends a real ICE check, then DTLS/RTP-like bytes."""

    def __init__(self, relay: tuple[str, int]) -> None:
        self.relay = relay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOCALHOST, 0))
        self.sock.settimeout(2.0)

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def binding_request(self, ufrag: str, password: str | None = None, keyring: RouteKeyring | None = None) -> bytes:
        if password is None:
            assert keyring is not None
            password = derive_password(keyring, ufrag)
        return build_binding_request(os.urandom(12), f"{ufrag}:cli", password.encode(), priority=1 << 24,
                                     controlling=True, tie_breaker=7, use_candidate=True)

    def send(self, payload: bytes) -> None:
        self.sock.sendto(payload, self.relay)

    def recv(self, timeout: float = 2.0) -> tuple[bytes, tuple[str, int]]:
        self.sock.settimeout(timeout)
        return self.sock.recvfrom(65535)

    def nothing_arrives(self, timeout: float = 0.3) -> bool:
        try:
            self.recv(timeout)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def rtp_like(seq: int, size: int = 140) -> bytes:
    return bytes([0x80, 111]) + seq.to_bytes(2, "big") + os.urandom(size - 4)


def dtls_like(size: int = 100) -> bytes:
    return bytes([22, 0xFE, 0xFD]) + os.urandom(size - 3)


def connect(relay: RelayProcess, transceiver: FakeTransceiver, ufrag: str | None = None,
            client: Client | None = None) -> tuple[Client, Data, tuple[str, int], str]:
    """A client's first (valid) STUN check reaches the transceiver; the flow's first frame."""
    client = client or Client(relay.address)
    ufrag = ufrag or transceiver.token(relay.keyring)
    request = client.binding_request(ufrag, keyring=relay.keyring)
    client.send(request)
    frame, tunnel = transceiver.recv_data()
    assert frame.payload == request and frame.port == client.address[1]
    return client, frame, tunnel, ufrag


def assert_both_ways(client: Client, first: Data, tunnel: tuple[str, int], transceiver: FakeTransceiver, relay: RelayProcess,
                     tag: int, payload: bytes | None = None) -> None:
    """One datagram each way through the relay (``payload``, else an RTP-like one), checked byte
    for byte, by the flow's handle, and by source: the tunnel address, the public address."""
    payload = rtp_like(tag) if payload is None else payload
    client.send(payload)
    frame, source = transceiver.recv_data()
    assert frame.payload == payload and frame.handle == first.handle and source == tunnel
    answer = rtp_like(10_000 + tag)
    transceiver.reply(tunnel, frame, answer)
    got, sender = client.recv()
    assert got == answer and sender == relay.address
