"""The C packet paths' copies of two of a worker's flow dicts (relay.flows.LocalFlows), kept in
step with them: by client sockaddr for the hit path, by current handle for the return path.

Each is a ``relay._hitpath.FlowIndex`` (relay/_flow_index.h): a lookup there reads one cache
line, where a dict hit at 50,000 flows costs three misses and a key object. The handle index is
keyed by the handle's 8 bytes as a Data frame carries them, and holds current handles only: a
frame with an older handle (an alias after a move) is the Python return path's, as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.flow_entry import FlowEntry
    from relay.flows import LocalFlows


def handle_key(handle: int) -> bytes:
    """A handle as Data frames carry it (wire/tunnel_frame.py DATA_TAG_HANDLE: big-endian u64)."""
    return handle.to_bytes(8, "big")


class CFlowIndexes:
    def __init__(self, entries: Iterable[FlowEntry]) -> None:
        from relay._hitpath import FlowIndex  # (only built with the C extension)

        self.by_key = FlowIndex()
        self.by_handle = FlowIndex()
        for entry in entries:
            self.add(entry)

    def add(self, entry: FlowEntry) -> None:
        self.by_key.set(entry.client_key, entry)
        self.by_handle.set(handle_key(entry.handle), entry)

    def remove(self, entry: FlowEntry) -> None:
        self.by_key.discard(entry.client_key)
        self.by_handle.discard(handle_key(entry.handle))

    def moved(self, entry: FlowEntry, old_handle: int) -> None:
        self.by_handle.discard(handle_key(old_handle))
        self.by_handle.set(handle_key(entry.handle), entry)


def c_indexes_of(flows: LocalFlows) -> CFlowIndexes:
    """The worker's C indexes, made (from its dicts) by the first C path that needs them: one
    copy for all of its public sockets and its return path."""
    if flows.c_indexes is None:
        flows.c_indexes = CFlowIndexes(flows.by_key.values())
    return flows.c_indexes
