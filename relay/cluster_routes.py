"""Where an edge relay sends a session that lives in another cluster. Sans-IO.

A route token may name a cluster (wire/route_token.py). A relay whose ``cluster_id`` differs
forwards such a session to a relay of that cluster, if its configuration has a route:

    [cluster_routes]
    7 = ["10.20.0.5:3479", "relays.cluster-7.svc.cluster.local:3479"]

Each entry is a cluster relay's hop address, a literal ``ip:port`` or a DNS name that the I/O
shell re-resolves on a timer (a Kubernetes Service name keeps working as pods come and go).
:meth:`ClusterRoutes.choose` picks one relay per session by rendezvous hashing on the server
ufrag: every edge relay picks the same cluster relay for a session (a client that moves
between edges lands on the same one), and when a cluster relay goes away only its own sessions
move (to the next one in their order). A relay never forwards to a cluster it has no route for.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from daemon.config_file import parse_host_port

__all__ = ["HopTarget", "ClusterRoutes", "parse_cluster_routes"]

Address = tuple[str, int]  # (ip literal, port)


@dataclass(frozen=True, slots=True)
class HopTarget:
    """One configured entry: a literal address, or a name to resolve (``resolved`` is False)."""

    host: str
    port: int

    @property
    def literal(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parse_cluster_routes(raw: Mapping[str, list[str]], key: str = "cluster_routes") -> dict[int, list[HopTarget]]:
    """The config table as {cluster id: targets}; ValueError names the entry."""
    routes: dict[int, list[HopTarget]] = {}
    for cluster_text, targets in raw.items():
        if not str(cluster_text).isdigit() or not 0 <= int(cluster_text) < 65536:
            raise ValueError(f"`{key}.{cluster_text}`: a cluster id is 0 to 65535")
        if not targets:
            raise ValueError(f"`{key}.{cluster_text}`: at least one relay address")
        parsed = []
        for index, text in enumerate(targets):
            host, port = _host_port(text, f"{key}.{cluster_text}[{index}]")
            parsed.append(HopTarget(host, port))
        routes[int(cluster_text)] = parsed
    return routes


def _host_port(text: str, where: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if host and not host.startswith("[") and not _is_ip(host):  # a DNS name
        if not port.isdigit() or not 0 < int(port) < 65536 or not all(part for part in host.split(".")):
            raise ValueError(f"`{where}`: {text!r} is not host:port")
        return host, int(port)
    return parse_host_port(text, where)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class ClusterRoutes:
    """The cluster relays this relay knows, by cluster, as last resolved."""

    def __init__(self, routes: Mapping[int, list[HopTarget]]) -> None:
        self.targets = dict(routes)
        self._answers: dict[HopTarget, list[str]] = {}  # a name's last non-empty DNS answer
        self._addresses: dict[int, list[Address]] = {}
        self._rebuild()

    def names(self) -> list[HopTarget]:
        """The entries a resolver must look up (DNS names)."""
        return [t for targets in self.targets.values() for t in targets if not t.literal]

    def update(self, answers: Mapping[HopTarget, Iterable[str]]) -> None:
        """New DNS answers (name -> IP literals). A name that did not resolve keeps its last
        answer: trouble with DNS must not cut a cluster off."""
        for target, answer in answers.items():
            ips = sorted(set(answer))
            if ips:
                self._answers[target] = ips
        self._rebuild()

    def _rebuild(self) -> None:
        self._addresses = {
            cluster: sorted({(t.host, t.port) if t.literal else (ip, t.port)
                             for t in targets for ip in ([t.host] if t.literal else self._answers.get(t, []))})
            for cluster, targets in self.targets.items()
        }

    def addresses(self, cluster: int) -> list[Address]:
        return list(self._addresses.get(cluster, ()))

    def is_hop(self, ip: bytes, port: int) -> bool:
        """Is (packed IP, port) a cluster relay of some route (as last resolved)?"""
        address = (str(ipaddress.ip_address(ip)), port)
        return any(address in addresses for addresses in self._addresses.values())

    def choose(self, cluster: int, ufrag: str, unavailable: frozenset[Address] = frozenset()) -> Address | None:
        """The cluster relay for this session (rendezvous hashing), skipping ``unavailable``;
        None when the cluster has no route or no relay left."""
        best: tuple[bytes, Address] | None = None
        for address in self._addresses.get(cluster, ()):
            if address in unavailable:
                continue
            score = hashlib.blake2b(f"{address[0]}|{address[1]}|{ufrag}".encode(), digest_size=8).digest()
            if best is None or score > best[0]:
                best = (score, address)
        return None if best is None else best[1]
