"""A standby's copy of its partition's flows, kept while it waits, so that taking over builds
only the entries that changed since.

Taking over built an entry for every flow of the partition, ~20-60 µs each: 1-3 s at 50,000
flows per worker, while that worker's datagrams waited in its sockets (README, process model).
A standby (relay/worker.py) reads the partition it will own, without its lock, while the
worker writes on, and builds the entries then, a bounded number per refresh. Each slot's
identity words (tag with its generation, session ref, key, ports, target) say whether it still
holds the flow an entry was built from; a slot read mid-write (its seqlock) is read again at
the next refresh. The copy is only a guess: take_over() refreshes it once more, exactly, from
the partition it then owns, and sets every entry's counters and timers from there.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from shm.layout import M32

if TYPE_CHECKING:
    from relay.flows import FlowEntry, LocalFlows

#: changed slots built per refresh (~0.1 s of the standby's CPU): a 50,000-flow partition is
#: copied over ~12 refreshes, never in one burst beside the workers
REFRESH_SLOTS = 4096


class WarmCopy:
    def __init__(self, flows: LocalFlows) -> None:
        self.flows = flows
        #: the identity words the copy's entries were built from (zeros: nothing built)
        self.identity: Any = None
        self.by_slot: dict[int, FlowEntry] = {}

    def refresh(self, now: float, limit: int | None = REFRESH_SLOTS) -> int:
        """Bring the copy up to the partition, at most ``limit`` changed slots (None: all).
        Returns the slots looked at."""
        flows = self.flows
        table, p = flows.table, flows.index
        current = table.flow_identities(p)
        if self.identity is None:
            self.identity = np.zeros_like(current)
        slots = np.flatnonzero((current != self.identity).any(axis=1))[:limit].tolist()
        # (the kernel's maps are the owner's: a copy's entries enter them at take_over)
        kernel, flows.kernel = flows.kernel, None
        try:
            # every entry that left first: a deletion's backward shift moves a flow between
            # two changed slots, and its new entry must not be removed as the old one
            for i in slots:
                old = self.by_slot.pop(i, None)
                if old is not None:
                    flows.remove_entry(old)
            for i in slots:
                if not current[i, 0] & M32:  # empty now
                    self.identity[i] = current[i]
                    continue
                flow = table.flow_at(p, i)
                if flow is None:  # its writer was busy: next time
                    self.identity[i] = 0
                    continue
                entry = flows.load(flow, now)
                if entry is not None:
                    self.by_slot[i] = entry
                self.identity[i] = current[i]
        finally:
            flows.kernel = kernel
        return len(slots)

    def reset(self) -> None:
        """Drop the copy: a standby's dicts hold nothing else."""
        flows = self.flows
        for entry in list(flows.entries):
            flows.remove_entry(entry)
        flows.transceivers.clear()
        self.identity, self.by_slot = None, {}

    def settle(self, now: float) -> None:
        """After the exact refresh of a takeover: every entry's counters as the partition has
        them, and a whole idle timeout (and heartbeat timeout) from now, as a fresh load gives."""
        flows = self.flows
        counters = flows.table.flow_counters(flows.index)
        for i, entry in self.by_slot.items():
            entry.packets_in, entry.bytes_in, entry.packets_out, entry.bytes_out = counters[i].tolist()
            entry.flushed_activity = entry.packets_in + entry.packets_out
        for dest in [d for d in flows.transceivers if d not in flows.by_transceiver]:
            del flows.transceivers[dest]  # (its flows all went while the copy was kept)
        flows.restart_timers(now)
