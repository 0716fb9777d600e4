"""relay/kernel_flows.py against dict-backed maps: which flows enter the kernel, what is written
for them, and that every way a flow leaves (removal, a new handle, a dead predecessor's keys)
leaves the maps right. The real maps and program: tests/test_kernel_path.py."""
from __future__ import annotations

import socket

import pytest

from relay import kernel_flows, kernel_maps
from relay.batchio import sockaddr_for
from relay.flows import FlowEntry
from relay.kernel_flows import KernelFlows
from relay.kernel_maps import Address
from relay.kernel_path import KernelMapFds

CPUS = 2
PUBLIC = (socket.inet_aton("127.0.0.1"), 3478)
TUNNEL = (socket.inet_aton("127.0.0.1"), 4000)


class DictMap:
    """A map: key bytes -> value bytes (what relay.bpf_sys.MapIO does on a real fd)."""

    def __init__(self, fd: int, key_size: int, value_size: int) -> None:
        self.items: dict[bytes, bytes] = {}
        self.key_size, self.value_size = key_size, value_size

    def update(self, key: bytes, value: bytes) -> None:
        assert len(key) == self.key_size and len(value) == self.value_size
        self.items[key] = value

    def lookup(self, key: bytes) -> bytes | None:
        return self.items.get(key)

    def delete(self, key: bytes) -> bool:
        return self.items.pop(key, None) is not None

    def all_keys(self) -> list[bytes]:
        return list(self.items)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> KernelFlows:
    monkeypatch.setattr(kernel_flows, "MapIO", DictMap)
    flows = KernelFlows(KernelMapFds(3, 4, 5, 6, cpus=CPUS, slot_base=100, slots=4), TUNNEL, [PUBLIC])
    flows._local = {socket.inet_aton("127.0.0.1"): True, socket.inet_aton("10.9.9.9"): False,
                    socket.inet_aton("192.0.2.7"): False}
    return flows


def entry(client_ip: str = "192.0.2.7", port: int = 5000, handle: int = 7, target_ip: str = "127.0.0.1",
          hops: int | None = None) -> FlowEntry:
    client = (socket.inet_aton(client_ip), port)
    key = sockaddr_for(client[0], port, socket.AF_INET)
    return FlowEntry(key, client, 0, handle, b"dest", (socket.inet_aton(target_ip), 6000), "ufrag", hops)


def counters(packets_in: int, bytes_in: int, packets_out: int, bytes_out: int) -> bytes:
    """Per-CPU counters: everything on CPU 1, CPU 0 empty."""
    return bytes(32) + (packets_in.to_bytes(8, "little") + bytes_in.to_bytes(8, "little")
                        + packets_out.to_bytes(8, "little") + bytes_out.to_bytes(8, "little"))


def test_a_flow_is_written_both_ways_with_its_own_counter_slot(kernel: KernelFlows) -> None:
    e = entry()
    assert kernel.add(e)
    slot = e.kernel.slot
    assert slot in range(100, 104)
    client, public = Address(*e.client), Address(*PUBLIC)
    assert kernel.flows.items == {kernel_maps.flow_key(client, public): kernel_maps.flow(
        Address(*TUNNEL), Address(*e.target), slot, True, False, e.prefix)}
    assert kernel.returns.items == {kernel_maps.return_key(7, Address(*TUNNEL)): kernel_maps.return_flow(
        Address(*e.target), client, public, slot, False, e.match)}
    assert kernel.counters.items[kernel_maps.slot_key(slot)] == bytes(32 * CPUS)
    assert kernel.paths.items[kernel_maps.slot_key(slot)] == kernel_maps.NO_PATH
    assert kernel.flow_count == 1


def test_flows_the_kernel_does_not_take(kernel: KernelFlows) -> None:
    assert not kernel.add(entry(hops=3))  # a hop to another cluster
    assert not kernel.add(entry(client_ip="127.0.0.1", target_ip="10.9.9.9"))  # local client, remote transceiver
    v6 = entry()
    v6.client = (bytes(16), 5000)
    assert not kernel.add(v6)
    assert kernel.flows.items == {} and kernel.flow_count == 0


def test_removal_folds_the_last_counters_and_frees_the_slot(kernel: KernelFlows) -> None:
    e = entry()
    kernel.add(e)
    slot = e.kernel.slot
    kernel.counters.items[kernel_maps.slot_key(slot)] = counters(10, 1400, 4, 400)
    assert kernel.fold(e) and (e.packets_in, e.bytes_in, e.packets_out, e.bytes_out) == (10, 1400, 4, 400)
    kernel.counters.items[kernel_maps.slot_key(slot)] = counters(15, 2100, 4, 400)
    assert not kernel.fold(entry())  # not in the kernel: nothing to fold
    kernel.remove(e)
    assert (e.packets_in, e.bytes_in) == (15, 2100) and e.kernel is None
    assert kernel.flows.items == {} and kernel.returns.items == {}
    assert kernel.take_totals() == [15, 2100, 4, 400] and kernel.take_totals() == [0, 0, 0, 0]
    again = entry(port=5001)
    kernel.add(again)
    assert kernel.counters.items[kernel_maps.slot_key(again.kernel.slot)] == bytes(32 * CPUS)  # zeroed for reuse


def test_a_new_handle_replaces_the_return_key(kernel: KernelFlows) -> None:
    e = entry(handle=7)
    kernel.add(e)
    e.rehandle(9)
    kernel.rehandle(e)
    assert list(kernel.returns.items) == [kernel_maps.return_key(9, Address(*TUNNEL))]
    value = next(iter(kernel.flows.items.values()))
    assert value.endswith(e.prefix + b"\0\0")  # the new prefix, padded to 24 bytes


def test_a_predecessors_leftovers_in_its_slot_range_go_and_others_stay(kernel: KernelFlows) -> None:
    live = entry()
    kernel.add(live)
    target, tunnel = Address(*live.target), Address(*TUNNEL)
    stale_key = kernel_maps.flow_key(Address(socket.inet_aton("192.0.2.8"), 1), Address(*PUBLIC))
    kernel.flows.items[stale_key] = kernel_maps.flow(tunnel, target, 101, True, False, bytes(22))
    other_worker = kernel_maps.flow_key(Address(socket.inet_aton("192.0.2.9"), 1), Address(*PUBLIC))
    kernel.flows.items[other_worker] = kernel_maps.flow(tunnel, target, 7, True, False, bytes(22))
    stale_return = kernel_maps.return_key(99, tunnel)
    kernel.returns.items[stale_return] = kernel_maps.return_flow(target, target, target, 102, True, bytes(22))
    assert kernel.forget_others([live]) == 2
    assert stale_key not in kernel.flows.items and stale_return not in kernel.returns.items
    assert other_worker in kernel.flows.items and len(kernel.flows.items) == 2


def test_per_cpu_values_are_summed() -> None:
    value = (1).to_bytes(8, "little") * 4 + (2).to_bytes(8, "little") * 4
    assert kernel_maps.counters_reader(2)(value) == (3, 3, 3, 3)
    assert kernel_maps.sum_stat((5).to_bytes(8, "little") + (6).to_bytes(8, "little"), 2) == 11
