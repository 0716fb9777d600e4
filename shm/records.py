"""What the flow table hands out: its errors, lookup and insert results, and record types."""
from __future__ import annotations

import enum
from typing import NamedTuple

import msgspec

# -- errors -------------------------------------------------------------------------------------


class ShmError(Exception):
    """Base of the flow table's errors."""


class LayoutMismatch(ShmError):
    """The file is not a flow table of this layout version, or not of the layout asked for."""


class PartitionBusy(ShmError):
    """Another live process owns the partition (holds its lock)."""

    def __init__(self, partition: int, lock_path: str) -> None:
        super().__init__(f"partition {partition} is owned by another process (lock {lock_path} is held)")
        self.partition = partition
        self.lock_path = lock_path


class NoSpace(ShmError):
    """The filesystem (tmpfs) cannot hold a table of the asked size."""


class StaleTable(ShmError):
    """The file at the table's path was replaced since this process attached: reopen it."""


class WriterClosed(ShmError):
    """The partition writer was closed: it no longer owns its partition."""


# -- results ------------------------------------------------------------------------------------


class Lookup(enum.Enum):
    """A lookup that found no flow: MISS (certainly absent) or UNKNOWN (could not tell)."""

    MISS = "miss"
    UNKNOWN = "unknown"

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return self.name


MISS = Lookup.MISS
UNKNOWN = Lookup.UNKNOWN


class InsertStatus(enum.IntEnum):
    """OK: a new flow; EXISTS: the 5-tuple had one. The others are refusals (handle 0),
    each counted in the partition header."""

    OK = 0
    EXISTS = 1
    TABLE_FULL = 2
    SESSION_TABLE_FULL = 3
    SESSION_FLOW_LIMIT = 4
    UFRAG_TOO_LONG = 5


class InsertResult(NamedTuple):
    status: InsertStatus
    handle: int = 0  # the flow's handle for OK and EXISTS, 0 for a refusal

    @property
    def ok(self) -> bool:
        """A new flow was inserted."""
        return self.status is InsertStatus.OK

    @property
    def has_flow(self) -> bool:
        """The 5-tuple has a flow in this partition now (OK or EXISTS)."""
        return self.status <= InsertStatus.EXISTS


# -- records ------------------------------------------------------------------------------------


class Flow(msgspec.Struct, frozen=True, gc=False):
    """A copy of one flow slot (immutable; a msgspec Struct: cheap to build and to encode).

    IP addresses are 16 bytes (IPv6, or IPv4-mapped: `shm.layout.ip16()` converts, `ip_str()`
    prints); times are int milliseconds. The handle is generation (32 bits) << 31 | partition
    (8 bits) << 23 | slot (23 bits): it fits in 63 bits and is validated without hashing.
    """

    handle: int
    partition: int
    client_ip: bytes  # 16 bytes
    local_ip: bytes  # 16 bytes: the relay's address the client sent to
    client_port: int
    local_port: int
    target_port: int
    worker: int  # the worker (partition) that owns it
    origin: int  # the partition where it was first learned (differs after adopt)
    target_ip: bytes  # 16 bytes: the transceiver's tunnel address
    created: int  # ms
    last_seen: int  # ms
    pkts_in: int  # client -> transceiver
    bytes_in: int
    pkts_out: int  # transceiver -> client
    bytes_out: int
    session_ref: int
    ufrag: bytes | None  # None only if its session entry vanished during the read (a race)


class Session(msgspec.Struct, frozen=True, gc=False):
    """A session entry of one partition, or the aggregate of every partition's entries."""

    ufrag: bytes
    target_ip: bytes
    target_port: int
    flows: int  # flows of this ufrag (summed over partitions in aggregated views)
    created: int
    last_seen: int
    partition: int  # the entry's partition; aggregated: the partition of the earliest entry
    partitions: tuple[int, ...]  # partitions holding flows of this session
    session_ref: int


def aggregate_sessions(entries: list[Session]) -> Session:
    """One session from the entries of several partitions (see "Sessions across partitions")."""
    if len(entries) == 1:
        return entries[0]
    home = min(entries, key=lambda s: (s.created, s.partition))
    return Session(
        home.ufrag,
        home.target_ip,
        home.target_port,
        sum(s.flows for s in entries),
        home.created,
        max(s.last_seen for s in entries),
        home.partition,
        tuple(sorted(s.partition for s in entries)),
        home.session_ref,
    )


class TakeoverReport(NamedTuple):
    """What takeover() found and repaired in a partition (invariant 10)."""

    partition: int
    interrupted: bool  # the previous owner died inside a structural change
    journal_restored: int  # slots put back from the undo journal (0 or 1)
    odd_slots_repaired: int  # odd slots the journal did not explain (should stay 0)
    duplicates_removed: int
    orphan_flows_removed: int
    orphan_sessions_removed: int
    session_counts_fixed: int
    flows: int
    sessions: int


class Layout(NamedTuple):
    """A table file's layout, as its header states it (validated by shm.tablefile)."""

    partitions: int
    flow_capacity: int
    session_capacity: int
    max_flows_per_session: int
    seed: int
    stride: int
    size: int
