"""The kernel fast path, worker side: this worker's flows in the program's maps.

A flow goes into the kernel when the worker learns or adopts it (after shm and the dicts: the
kernel forwards only what the worker would) and leaves the moment it ends (closed, expired,
its transceiver gone), its last counters folded first. Counters are per CPU in the kernel; the
worker folds them into the flow's own (and so into expiry, shm's last-seen time and /metrics)
during its counter flush. Flows the kernel path does not take stay on the workers'
hit path: IPv6 clients, hops to another cluster, clients of a hop socket.
"""

from __future__ import annotations

import socket

from relay import kernel_maps
from relay.bpf_sys import MapIO
from relay.kernel_maps import Address
from relay.kernel_path import KernelMapFds

_IN_PACKETS, _IN_BYTES, _OUT_PACKETS, _OUT_BYTES = range(4)


class KernelFlow:
    """What the kernel holds for one FlowEntry: its keys, counter slot and the counters folded."""

    __slots__ = ("slot", "flow_key", "return_key", "folded")

    def __init__(self, slot: int, flow_key: bytes, return_key: bytes) -> None:
        self.slot = slot
        self.flow_key = flow_key
        self.return_key = return_key
        self.folded: tuple[int, ...] = (0, 0, 0, 0)


class KernelFlows:
    def __init__(self, fds: KernelMapFds, tunnel: tuple[bytes, int], publics: list[tuple[bytes, int]]) -> None:
        self.flows = MapIO(fds.flows, kernel_maps.FLOW_KEY_SIZE, kernel_maps.FLOW_SIZE)
        self.returns = MapIO(fds.returns, kernel_maps.RETURN_KEY_SIZE, kernel_maps.RETURN_SIZE)
        self.counters = MapIO(fds.counters, kernel_maps.SLOT_SIZE, kernel_maps.counters_size(fds.cpus))
        self.paths = MapIO(fds.paths, kernel_maps.SLOT_SIZE, kernel_maps.PATH_SIZE)
        self._read_counters = kernel_maps.counters_reader(fds.cpus)
        self.slot_range = range(fds.slot_base, fds.slot_base + fds.slots)
        self._free = list(reversed(self.slot_range))
        self._zero = bytes(kernel_maps.counters_size(fds.cpus))
        self.tunnel = Address(*tunnel) if len(tunnel[0]) == 4 else None
        self.publics = [Address(ip, port) for ip, port in publics]
        self._local: dict[bytes, bool] = {}
        #: kernel-forwarded traffic folded since the worker last took it: packets/bytes in, out
        self.totals = [0, 0, 0, 0]
        self.flow_count = 0

    # -- which flows, and where they go --------------------------------------------------------

    def eligible(self, entry) -> bool:  # entry: relay.flows.FlowEntry
        """IPv4 both sides, not a hop; and not a client on this host whose transceiver is
        elsewhere: a local sender's datagram leaves its UDP checksum to be completed at
        transmission, at an offset the kernel path's grow makes wrong (fastpath.bpf.c)."""
        if not (self.tunnel is not None and entry.hops is None and entry.public_index < len(self.publics)
                and len(entry.client[0]) == 4 and len(entry.target[0]) == 4
                and len(self.publics[entry.public_index].ip) == 4):
            return False
        return self.is_local(entry.target[0]) or not self.is_local(entry.client[0])

    def is_local(self, ip: bytes) -> bool:
        """Is ``ip`` this host's (network namespace's) address: the kernel delivers to it here
        rather than routing it out. Bind test, cached per address."""
        local = self._local.get(ip)
        if local is None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind((socket.inet_ntoa(ip), 0))
                    local = True
                except OSError:
                    local = False
            if len(self._local) > 65536:
                self._local.clear()
            self._local[ip] = local
        return local

    # -- changes ------------------------------------------------------------------------------

    def add(self, entry) -> bool:
        """Put a flow in the kernel (False: not one it takes, or no slot left)."""
        if not self.eligible(entry) or not self._free:
            return False
        assert self.tunnel is not None
        slot = self._free.pop()
        self.counters.update(kernel_maps.slot_key(slot), self._zero)
        self.paths.update(kernel_maps.slot_key(slot), kernel_maps.NO_PATH)
        client = Address(*entry.client)
        state = KernelFlow(slot, kernel_maps.flow_key(client, self.publics[entry.public_index]),
                           kernel_maps.return_key(entry.handle, self.tunnel))
        self._write(entry, state)
        entry.kernel = state
        self.flow_count += 1
        return True

    def _write(self, entry, state: KernelFlow) -> None:
        """The flow's two values (each way) under its keys."""
        assert self.tunnel is not None
        client, target = Address(*entry.client), Address(*entry.target)
        client_local = self.is_local(client.ip)
        self.flows.update(state.flow_key, kernel_maps.flow(self.tunnel, target, state.slot, self.is_local(target.ip),
                                                           client_local, entry.prefix))
        self.returns.update(state.return_key, kernel_maps.return_flow(
            target, client, self.publics[entry.public_index], state.slot, client_local, entry.match))

    def remove(self, entry) -> None:
        """Take a flow out of the kernel at once, its last counters folded."""
        state: KernelFlow | None = entry.kernel
        if state is None:
            return
        self.flows.delete(state.flow_key)
        self.returns.delete(state.return_key)
        self.fold(entry)
        entry.kernel = None
        self._free.append(state.slot)
        self.flow_count -= 1

    def rehandle(self, entry) -> None:
        """The flow's handle changed (a backward shift in shm): frames now name the new one."""
        state: KernelFlow | None = entry.kernel
        if state is None or self.tunnel is None:
            return
        self.returns.delete(state.return_key)
        state.return_key = kernel_maps.return_key(entry.handle, self.tunnel)
        self._write(entry, state)

    def fold(self, entry) -> bool:
        """The kernel's counters of this flow into the entry's (True: they moved)."""
        state: KernelFlow | None = entry.kernel
        if state is None:
            return False
        value = self.counters.lookup(kernel_maps.slot_key(state.slot))
        if value is None:
            return False
        now = self._read_counters(value)
        folded = state.folded
        if now == folded:
            return False
        d = [now[i] - folded[i] for i in range(4)]
        state.folded = now
        entry.packets_in += d[_IN_PACKETS]
        entry.bytes_in += d[_IN_BYTES]
        entry.packets_out += d[_OUT_PACKETS]
        entry.bytes_out += d[_OUT_BYTES]
        totals = self.totals
        for i in range(4):
            totals[i] += d[i]
        return True

    def take_totals(self) -> list[int]:
        totals, self.totals = self.totals, [0, 0, 0, 0]
        return totals

    def forget_others(self, entries) -> int:
        """After a restart: delete the keys in this worker's slot range that none of its live
        ``entries`` holds (a predecessor that died between a shm delete and its kernel delete).
        Returns how many."""
        states = [entry.kernel for entry in entries if entry.kernel is not None]
        removed = 0
        for io, slot_of, live in (
            (self.flows, kernel_maps.flow_slot, {s.flow_key for s in states}),
            (self.returns, kernel_maps.return_slot, {s.return_key for s in states}),
        ):
            for key in io.all_keys():
                if key in live:
                    continue
                value = io.lookup(key)
                if value is not None and slot_of(value) in self.slot_range:
                    removed += io.delete(key)
        return removed
