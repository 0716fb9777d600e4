"""What the relay's worker processes and their sockets say, seen from outside: RSS, bound UDP
sockets, the kernel's per-socket drops, and the workers' drop counters summed."""
from __future__ import annotations

from pathlib import Path

import psutil


def rss_mib(pids: list[int]) -> list[float]:
    """Each process's resident set size, in MiB."""
    return [round(psutil.Process(pid).memory_info().rss / 2**20, 1) for pid in pids]


def worker_udp_ports(pids: list[int]) -> dict[int, list[tuple[str, int]]]:
    """Each worker's bound UDP sockets (its public socket(s) and its tunnel socket)."""
    out = {}
    for pid in pids:
        out[pid] = sorted({(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="udp")})
    return out


def tunnel_addresses(pids: list[int], public_port: int) -> list[tuple[str, int]]:
    """The workers' tunnel sockets: every bound UDP address but the public port's."""
    return [addr for addrs in worker_udp_ports(pids).values() for addr in addrs if addr[1] != public_port]


def udp_socket_drops(ports: set[int]) -> int:
    """The kernel's per-socket receive drops (/proc/net/udp{,6} 'drops' column) of sockets bound
    to these local ports: datagrams that never reached the relay's code (buffer full)."""
    total = 0
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if port in ports:
                total += int(fields[-1])
    return total


def drop_totals(rows: list[dict[str, int]]) -> dict[str, int]:
    """Drop counters summed over workers, the non-zero ones only."""
    out: dict[str, int] = {}
    for row in rows:
        for name, value in row.items():
            if name.startswith("drop_") and value:
                out[name[5:]] = out.get(name[5:], 0) + value
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
