"""What the miss path's decision (relay/decision.py) reads of the shm table: its FlowView."""
from __future__ import annotations

from collections.abc import Callable

from shm import Flow, FlowTable
from shm.layout import ip16


class AllPartitionsView:
    """The decision function's read-only window on the whole table (all partitions), and on
    the worker's knowledge of which transceivers went silent."""

    __slots__ = ("table", "local", "transceiver_gone", "hops_unavailable")

    def __init__(self, table: FlowTable, local: tuple[bytes, int],
                 transceiver_gone: Callable[[bytes, int, int], bool] = lambda ip, port, issued: False,
                 hops_unavailable: Callable[[], frozenset[tuple[str, int]]] = frozenset) -> None:
        self.table = table
        self.local = (ip16(local[0]), local[1])
        self.transceiver_gone = transceiver_gone
        self.hops_unavailable = hops_unavailable

    def find(self, source: tuple[bytes, int]) -> Flow | None:
        found = self.table.lookup(ip16(source[0]), source[1], *self.local)
        return found if isinstance(found, Flow) else None

    def session_known(self, ufrag: str) -> bool:
        return self.table.session(ufrag.encode()) is not None

    def session_closed(self, ufrag: str, now: float) -> bool:
        return self.table.session_closed(ufrag.encode(), int(now * 1000)) > 0
