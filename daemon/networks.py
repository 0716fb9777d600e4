"""Which peers may speak the tunnel: relays to a transceiver, transceivers to a relay.

The tunnel carries no authentication of its own (DESIGN: the internal network is trusted), so
both ends drop datagrams from outside a configured list of networks. One class for both, so
the two ends agree on the corner cases: an IPv4 peer seen by a dual-stack socket as
``::ffff:a.b.c.d`` is judged as IPv4, and an IPv6 scope id (``fe80::1%eth0``) is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

VERDICT_CACHE_MAX = 4096  # junk sources must not grow the cache without bound


def parse_networks(texts: Iterable[str], key: str) -> list[IPNetwork]:
    """CIDR texts from the config key ``key``; a bad one names the key and the text."""
    networks: list[IPNetwork] = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"`{key}`: {text!r} is not a network (CIDR)") from None
    return networks


class AllowedNetworks:
    """A list of networks and a bounded cache of verdicts keyed by the caller's address form."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = list(networks)
        # Read directly by hot loops (``verdicts.get(key)``) before they call :meth:`verdict`.
        self.verdicts: dict[Hashable, bool] = {}

    @classmethod
    def parse(cls, texts: Iterable[str], key: str) -> AllowedNetworks:
        return cls(parse_networks(texts, key))

    def allows(self, host: str | bytes) -> bool:
        """``host``: an address text or its packed form (4 or 16 bytes, as sockaddrs carry it)."""
        ip = ipaddress.ip_address(host.partition("%")[0] if isinstance(host, str) else host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def verdict(self, key: Hashable, host: str | bytes) -> bool:
        """:meth:`allows` for ``host``, remembered under ``key``."""
        allowed = self.verdicts.get(key)
        if allowed is None:
            allowed = self.allows(host)
            if len(self.verdicts) >= VERDICT_CACHE_MAX:
                self.verdicts.clear()
            self.verdicts[key] = allowed
        return allowed
