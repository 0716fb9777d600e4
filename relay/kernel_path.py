"""The kernel fast path, supervisor side: load relay/ebpf/fastpath.bpf.o, size and fill its
maps, attach it to the clsact ingress hook of every interface that holds a public or tunnel
address, hand the map fds to the workers, detach at stop.

``hit_path = "ebpf"`` requires it (the relay does not start without it, saying why);
``"auto"`` uses it where it loads and otherwise serves with the workers' hit path, the start-up
log saying which and why (:func:`open_kernel_path`). What it needs: the object built at install
(clang), libbpf, CAP_BPF + CAP_NET_ADMIN (or root), IPv4 listen and tunnel addresses that name
one address (not 0.0.0.0), on Ethernet or loopback interfaces.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psutil

from daemon.config_file import ConfigError
from relay import kernel_maps
from relay.bpf_sys import BpfError, BpfObject, MapIO, libbpf, possible_cpus, tc_attach, tc_detach

log = logging.getLogger("rtcrelay.relay")

OBJECT_PATH = Path(__file__).with_name("ebpf") / "fastpath.bpf.o"
PROGRAM = "rtcrelay_ingress"
TC_PRIORITY = 0x7272  # ours among an interface's filters; the handle tells relays apart
_LINK_TYPES = {"1": "ethernet", "772": "loopback"}  # ARPHRD_ETHER, ARPHRD_LOOPBACK


class KernelPathUnavailable(Exception):
    """Why the kernel fast path cannot serve here, worded for an operator."""


class KernelPathError(ConfigError):
    """``hit_path = "ebpf"`` where the kernel path cannot serve: the relay does not start."""


class KernelMapFds(msgspec.Struct, array_like=True):
    """What a worker needs to put its flows in the kernel: the map fds (inherited) and its
    range of counter slots."""
    flows: int
    returns: int
    counters: int
    paths: int
    cpus: int
    slot_base: int
    slots: int

    def fds(self) -> list[int]:
        return [self.flows, self.returns, self.counters, self.paths]


def interface_of(ip: str) -> tuple[str, int]:
    """(name, ifindex) of the interface that holds ``ip`` (127.0.0.0/8 is loopback's)."""
    address = ipaddress.ip_address(ip)
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family != socket.AF_INET or not a.netmask:
                continue
            if address == ipaddress.ip_address(a.address) or (
                    address.is_loopback and ipaddress.ip_address(a.address).is_loopback
                    and address in ipaddress.ip_network(f"{a.address}/{a.netmask}", strict=False)):
                return name, socket.if_nametoindex(name)
    raise KernelPathUnavailable(f"no interface holds {ip}")


def _check_addresses(publics: list[tuple[str, int]], tunnels: list[tuple[str, int]]) -> None:
    for host, port in publics + tunnels:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise KernelPathUnavailable(f"{host} is not an IP address") from None
        if address.version != 4:
            raise KernelPathUnavailable(f"{host}:{port}: the kernel path is IPv4 only")
        if address.is_unspecified and (host, port) in tunnels:
            raise KernelPathUnavailable(f"tunnel address {host}:{port}: the kernel path needs a tunnel_host "
                                        "that names one address, not a wildcard")


def _interfaces(addresses: list[tuple[str, int]]) -> dict[int, str]:
    """ifindex -> name of the interfaces holding these addresses (each Ethernet or loopback);
    for a wildcard (0.0.0.0), every Ethernet and loopback interface that is up now."""
    interfaces: dict[int, str] = {}
    if any(ipaddress.ip_address(host).is_unspecified for host, _port in addresses):
        for name, stats in psutil.net_if_stats().items():
            if stats.isup and Path(f"/sys/class/net/{name}/type").read_text().strip() in _LINK_TYPES:
                interfaces[socket.if_nametoindex(name)] = name
    for host, _port in addresses:
        if ipaddress.ip_address(host).is_unspecified:
            continue
        name, ifindex = interface_of(host)
        kind = Path(f"/sys/class/net/{name}/type").read_text().strip()
        if kind not in _LINK_TYPES:
            raise KernelPathUnavailable(f"{host} is on {name}, link type {kind}: the kernel path runs on "
                                        "Ethernet and loopback interfaces")
        interfaces[ifindex] = name
    return interfaces


def filter_handle(publics: list[tuple[str, int]]) -> int:
    """This relay's filter handle: from its first public address, so a restarted relay replaces
    its predecessor's filter and two relays on one interface keep theirs apart."""
    host, port = publics[0]
    return (zlib.crc32(f"{host}:{port}".encode()) & 0x7FFFFFFF) or 1


@dataclass
class KernelPath:
    obj: BpfObject
    handle: int
    interfaces: dict[int, str]  # ifindex -> name, where the program is attached
    maps: list[KernelMapFds] = field(default_factory=list)  # per worker
    stats_map: MapIO | None = None
    cpus: int = 1

    def describe(self) -> str:
        names = ", ".join(sorted(self.interfaces.values()))
        return f"eBPF (TC ingress on {names}; established IPv4 flows forwarded in the kernel)"

    def stats(self) -> dict[str, int]:
        """The program's outcome counters, summed over CPUs."""
        if self.stats_map is None:
            return {}
        out = {}
        for i, name in enumerate(kernel_maps.STATS):
            value = self.stats_map.lookup(kernel_maps.slot_key(i))
            out[name] = kernel_maps.sum_stat(value, self.cpus) if value is not None else 0
        return out

    def close(self) -> None:
        for ifindex in self.interfaces:
            tc_detach(ifindex, self.handle, TC_PRIORITY)
        self.interfaces.clear()
        self.obj.close()


def load_kernel_path(publics: list[tuple[str, int]], tunnels: list[tuple[str, int]], workers: int,
                     flow_capacity: int, loopback_egress: bool = False) -> KernelPath:
    """Load, fill the listeners, attach. KernelPathUnavailable says why not."""
    if not OBJECT_PATH.exists():
        raise KernelPathUnavailable(f"{OBJECT_PATH.name} was not built at install (clang and libbpf-dev "
                                    "were missing; scripts/bootstrap.sh installs them)")
    _check_addresses(publics, tunnels)
    try:
        libbpf()
    except BpfError as exc:
        raise KernelPathUnavailable(str(exc)) from None
    entries = workers * flow_capacity
    try:
        obj = BpfObject(str(OBJECT_PATH), {"flows": entries, "returns": entries, "counters": entries,
                                               "paths": entries})
    except BpfError as exc:
        hint = " (needs CAP_BPF and CAP_NET_ADMIN, or root)" if exc.errno in (1, 13) else ""
        raise KernelPathUnavailable(f"the kernel refused the program: {exc}{hint}") from None
    path = KernelPath(obj, filter_handle(publics), {})
    try:
        interfaces = _interfaces(publics + tunnels)
    except (KernelPathUnavailable, OSError) as exc:
        obj.close()
        raise KernelPathUnavailable(f"{exc}") from None
    try:
        cpus = possible_cpus()
        path.cpus = cpus
        listeners = MapIO(obj.map_fd("listeners"), kernel_maps.LISTENER_KEY_SIZE, kernel_maps.LISTENER_SIZE)
        for kind, addresses in ((kernel_maps.KIND_PUBLIC, publics), (kernel_maps.KIND_TUNNEL, tunnels)):
            for host, port in addresses:
                listeners.update(kernel_maps.listener_key(socket.inet_aton(host), port), kernel_maps.listener(kind))
        settings = MapIO(obj.map_fd("settings"), kernel_maps.SLOT_SIZE, kernel_maps.SETTINGS_SIZE)
        settings.update(kernel_maps.slot_key(0), kernel_maps.settings(loopback_egress))
        path.stats_map = MapIO(obj.map_fd("stats"), kernel_maps.SLOT_SIZE, 8 * cpus)
        fds = (obj.map_fd("flows"), obj.map_fd("returns"), obj.map_fd("counters"), obj.map_fd("paths"))
        path.maps = [KernelMapFds(*fds, cpus=cpus, slot_base=w * flow_capacity, slots=flow_capacity)
                     for w in range(workers)]
        prog = obj.program_fd(PROGRAM)
        for ifindex, name in interfaces.items():
            tc_attach(ifindex, prog, path.handle, TC_PRIORITY)
            path.interfaces[ifindex] = name
    except BpfError as exc:
        path.close()
        hint = " (needs CAP_NET_ADMIN, or root)" if exc.errno in (1, 13) else ""
        raise KernelPathUnavailable(f"attaching the program failed: {exc}{hint}") from None
    return path


def open_kernel_path(choice: str, publics: list[tuple[str, int]], tunnels: list[tuple[str, int]], workers: int,
                     flow_capacity: int, loopback_egress: bool = False) -> KernelPath | None:
    """The kernel path for ``hit_path`` = ``choice``: loaded for "ebpf" (or KernelPathUnavailable),
    tried for "auto" (None, logged with the reason, where it cannot serve), None otherwise."""
    if choice not in ("ebpf", "auto"):
        return None
    try:
        path = load_kernel_path(publics, tunnels, workers, flow_capacity, loopback_egress)
    except KernelPathUnavailable as exc:
        if choice == "ebpf":
            raise KernelPathError(f'`hit_path` = "ebpf", but the kernel path cannot serve here: {exc} '
                                  '(hit_path = "auto" serves with the workers instead)') from None
        log.info("kernel path: not used (%s): the workers forward every datagram", exc)
        return None
    log.info("kernel path: %s", path.describe())
    return path
