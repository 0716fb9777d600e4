"""The kernel fast path's map layouts (relay/ebpf/fastpath.bpf.c), packed and unpacked. Pure:
addresses in, bytes out. Addresses and ports are in network order (as in the packet), the
other integers in the host's (little-endian: x86 and arm64 alike)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

KIND_PUBLIC = 1
KIND_TUNNEL = 2
PREFIX_LEN = 22  # the Data header up to the payload length (DATA_HEADER_LEN_V4 - 2)

_LISTENER_KEY = struct.Struct("=4s2s2x")  # struct listener_key
_LISTENER = struct.Struct("=I")
_FLOW_KEY = struct.Struct("=4s4s2s2s")  # struct flow_key
_FLOW = struct.Struct("=4s4s2s2sIII24s")  # struct flow
_RETURN_KEY = struct.Struct("=8s4s2s2x")  # struct return_key
_RETURN = struct.Struct("=4s4s4s2s2s2s2xII24s")  # struct return_flow
_COUNTERS = struct.Struct("=QQQQ")  # struct flow_counters
_SETTINGS = struct.Struct("=I")  # struct settings
_PATH = struct.Struct("=II4s")  # struct path
#: the program's `stats` slots, in the order of its enum stat
STATS = ("to_transceiver", "to_client", "no_route", "mismatch", "adjust_failed", "checksummed",
         "no_local_socket")

#: each struct of the program by name (tests/test_kernel_path.py checks them against its BTF)
LAYOUTS = {"listener_key": _LISTENER_KEY, "listener": _LISTENER, "flow_key": _FLOW_KEY, "flow": _FLOW,
           "return_key": _RETURN_KEY, "return_flow": _RETURN, "flow_counters": _COUNTERS, "settings": _SETTINGS,
           "path": _PATH}
LISTENER_KEY_SIZE, LISTENER_SIZE = _LISTENER_KEY.size, _LISTENER.size
FLOW_KEY_SIZE, FLOW_SIZE = _FLOW_KEY.size, _FLOW.size
RETURN_KEY_SIZE, RETURN_SIZE = _RETURN_KEY.size, _RETURN.size
COUNTERS_SIZE = _COUNTERS.size
SETTINGS_SIZE = _SETTINGS.size
PATH_SIZE = _PATH.size
NO_PATH = bytes(PATH_SIZE)  # neither side seen yet
SLOT_SIZE = 4


def _port(port: int) -> bytes:
    return port.to_bytes(2, "big")


def listener_key(ip: bytes, port: int) -> bytes:
    return _LISTENER_KEY.pack(ip, _port(port))


def settings(loopback_egress: bool) -> bytes:
    return _SETTINGS.pack(loopback_egress)


def listener(kind: int) -> bytes:
    return _LISTENER.pack(kind)


class Address(NamedTuple):
    ip: bytes  # 4 bytes
    port: int


def flow_key(client: Address, public: Address) -> bytes:
    return _FLOW_KEY.pack(client.ip, public.ip, _port(client.port), _port(public.port))


def flow(tunnel: Address, target: Address, slot: int, local: bool, client_local: bool, prefix: bytes) -> bytes:
    return _FLOW.pack(tunnel.ip, target.ip, _port(tunnel.port), _port(target.port), slot, local, client_local, prefix)


def return_key(handle: int, tunnel: Address) -> bytes:
    return _RETURN_KEY.pack(handle.to_bytes(8, "big"), tunnel.ip, _port(tunnel.port))


def return_flow(target: Address, client: Address, public: Address, slot: int, local: bool, prefix: bytes) -> bytes:
    return _RETURN.pack(target.ip, client.ip, public.ip, _port(target.port), _port(client.port),
                        _port(public.port), slot, local, prefix)


def flow_slot(value: bytes) -> int:
    """The counter slot of a `flows` value."""
    return _FLOW.unpack(value)[4]


def return_slot(value: bytes) -> int:
    return _RETURN.unpack(value)[6]


def slot_key(slot: int) -> bytes:
    return slot.to_bytes(SLOT_SIZE, "little")


def counters_reader(cpus: int) -> Callable[[bytes], tuple[int, int, int, int]]:
    """A flow's per-CPU counters value -> (packets in, bytes in, packets out, bytes out) summed
    over CPUs: one unpack for all of them (the worker folds a flow a second at the least: a
    loop over CPUs and fields cost more than the map read)."""
    every = struct.Struct(f"={4 * cpus}Q")  # (flow_counters is 32 bytes: no padding between CPUs)

    def read(value: bytes) -> tuple[int, int, int, int]:
        v = every.unpack(value)
        return sum(v[0::4]), sum(v[1::4]), sum(v[2::4]), sum(v[3::4])

    return read


def counters_size(cpus: int) -> int:
    return ((COUNTERS_SIZE + 7) & ~7) * cpus


def sum_stat(value: bytes, cpus: int) -> int:
    """A per-CPU u64 (the program's `stats` slots) summed over CPUs."""
    return sum(struct.unpack(f"={cpus}Q", value))
