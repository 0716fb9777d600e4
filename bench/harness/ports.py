"""Free ports for the processes a bench starts."""
from __future__ import annotations

import random
import socket
from pathlib import Path

from bench.harness.errors import BenchError


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_DGRAM, avoid: tuple[int, ...] = ()) -> int:
    """A free port (UDP, or TCP with kind=SOCK_STREAM) outside the kernel's ephemeral range:
    the port is bound later, by another process (and a sink re-binds its port for every
    measurement), and in between any process binding port 0 could take an ephemeral one."""
    lo, hi = _ephemeral_range()
    candidates = range(20000, lo) if lo > 21000 else range(hi + 1, 65536)
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(candidates)
        if port in avoid:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise BenchError(f"no free port found on {host} outside the ephemeral range {lo}-{hi}")
