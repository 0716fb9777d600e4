"""Hostile input for the relay: the C junk generator (tests/c/junkgen.c: what it sends and
which drop reason each kind should meet), built with gcc at test time, its seeds and its runs.

The generator mutates seeds: signed Binding Requests (``stun_seeds``, valid as they are, plus
wrong-key, expired and other-cluster ones) and tunnel Data frames (``frame_seeds``), written
with ``write_seeds``. ``run_junkgen`` runs it to completion and returns what it sent and what
came back to its sockets (``JunkResult``).
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from wire.route_token import RouteKeyring, derive_password, issue_token
from wire.stun import build_binding_request
from wire.tunnel_frame import Data, data_header, encode_frame

JUNKGEN_SOURCE = Path(__file__).resolve().parent / "c" / "junkgen.c"

# The loopback source addresses junk comes from (all of 127.0.0.0/8 is the loopback).
JUNK_SOURCES = ("127.0.0.1", "127.0.0.11", "127.0.0.12", "127.0.0.13")


def build_junkgen(directory: Path) -> Path:
    """Compile the generator (gcc -O2) into ``directory``; returns the binary's path."""
    binary = directory / "junkgen"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(JUNKGEN_SOURCE)], check=True, capture_output=True,
                   timeout=60)
    return binary


def write_seeds(path: Path, seeds: list[bytes], has_fingerprint: bool) -> Path:
    """The generator's seed file: per record a flags byte (bit 0: ends in FINGERPRINT), u16 length, bytes."""
    with open(path, "wb") as f:
        f.writelines(struct.pack("!BH", int(has_fingerprint), len(seed)) + seed for seed in seeds)
    return path


def binding_request(ufrag: str, password: str, client_ufrag: str = "cli", *, use_candidate: bool = True,
                    controlling: bool = True, fingerprint: bool = True) -> bytes:
    """A Binding Request for USERNAME ufrag:client_ufrag, signed with password."""
    return build_binding_request(os.urandom(12), f"{ufrag}:{client_ufrag}", password.encode(), priority=1 << 24,
                                 controlling=controlling, tie_breaker=int.from_bytes(os.urandom(8), "big"),
                                 use_candidate=use_candidate, fingerprint=fingerprint)


def stun_seeds(keyring: RouteKeyring, target: tuple[str, int], now: float | None = None, n: int = 24) -> list[bytes]:
    """Signed Binding Requests (valid as they are!) for the generator to mutate, plus wrong-key,
    expired and other-cluster ones. All end in FINGERPRINT."""
    now = time.time() if now is None else now
    ip = socket.inet_aton(target[0])
    other = RouteKeyring({1: b"not-the-relays-secret-0123456789"}, 1)
    seeds = []
    for i in range(n):
        ring, when, cluster = [(keyring, now, None), (other, now, None), (keyring, now - 7200, None), (keyring, now, 4242)][i % 4]
        ufrag = issue_token(ring, ip, target[1], when, cluster=cluster)
        pwd = derive_password(ring, ufrag)
        seeds.append(binding_request(ufrag, pwd, f"c{i:03d}", use_candidate=bool(i & 1), controlling=bool(i & 2)))
    return seeds


def frame_seeds() -> list[bytes]:
    """Tunnel Data frames (fixed-width header, as the relay and transceiver write them) for the
    generator to mutate; handles name no flow."""
    seeds = []
    for i in range(16):
        ip = socket.inet_aton(f"127.0.0.{i + 1}") if i % 4 else socket.inet_pton(socket.AF_INET6, "::1")
        payload = bytes([0x80, 111]) + os.urandom(20 + 8 * i)
        seeds.append(data_header(int.from_bytes(os.urandom(7), "big"), ip, 40000 + i, len(payload)) + payload)
    seeds.append(encode_frame(Data(123456789, socket.inet_aton("127.0.0.9"), 5555, b"\x16\xfe\xfd" + b"x" * 40)))
    return seeds


@dataclass
class JunkResult:
    """The generator's JSON summary (reflected: [source ip, port, datagrams received] per source)."""
    sent: int
    send_errors: int
    received: int
    reflected: list[list]
    sources: int
    to_public: int
    to_tunnel: int
    avoided: int
    elapsed: float
    by_kind: dict[str, int]
    bytes: int

    @property
    def pps(self) -> float:
        return self.sent / self.elapsed if self.elapsed else 0.0


def run_junkgen(binary: Path, *, public: tuple[str, int], tunnels: list[tuple[str, int]], count: int, pps: float,
                stun_seed_file: Path, frame_seed_file: Path, seed: int = 1, sources: tuple[str, ...] = JUNK_SOURCES,
                per_source: int = 128, settle_ms: int = 1000, tunnel_share: int = 300) -> JunkResult:
    """Run the generator to completion (bounded: count / pps + settle, plus a margin)."""
    args = [str(binary), f"public={public[0]}:{public[1]}", f"tunnels={','.join(f'{h}:{p}' for h, p in tunnels)}",
            f"sources={','.join(sources)}", f"per_source={per_source}", f"count={count}", f"pps={pps}", f"seed={seed}",
            f"stun_seeds={stun_seed_file}", f"frame_seeds={frame_seed_file}", f"settle_ms={settle_ms}",
            f"tunnel_share={tunnel_share}"]
    timeout = count / pps * 3 + settle_ms / 1000 + 30
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout)
    return JunkResult(**json.loads(out.stdout))
