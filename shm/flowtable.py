"""The shared-memory flow table: one file in /dev/shm, one partition per relay worker.

Readers never lock and no writer ever waits for another. Each partition has exactly one
writer (the worker holding its flock); any process may read any partition.

Invariants (the stress test, tests/test_shm_stress.py, checks exactly these)
---------------------------------------------------------------------------
1. Single writer. Only the process holding the exclusive flock on `<path>.p<N>.lock` writes
   partition N (its slots and its header words). Read-only views never lock and never write.
2. Seqlock. A slot's `seq` word is odd exactly while its owner writes that slot, and every
   change to the slot happens between an odd and the next even value of `seq`. `seq` and the
   `tag` word are written only as aligned 8-byte stores (memoryview.cast('Q')), never inside a
   struct.pack_into region. So a copy taken between two equal even reads of `seq` is a record
   the table really held: readers never see a torn record.
3. Undo journal. Before a slot's `seq` goes odd, the partition's journal holds that slot's
   offset and its previous image; so at most one slot per partition is odd at a time, and a
   takeover puts that slot back as it was before the interrupted write.
4. Probe chains. Open addressing with linear probing and backward-shift deletion, no
   tombstones: every entry is reachable from its home slot through occupied slots only. A
   flow slot is empty iff the low 32 bits of its tag are 0; a session slot iff its tag is 0.
5. Unique keys. A 5-tuple occupies at most one flow slot of a partition and a ufrag at most
   one session slot, except transiently during a backward-shift move (a copy is written
   before the original is overwritten), and then the structure counter is odd.
6. Structure counter. A partition's `sc` word is odd for the whole of any operation that
   moves or empties a slot (delete, backward shift, takeover repairs); inserts and counter
   flushes never move anything. A reader answers MISS only when it read the same even `sc`
   before and after its probe; otherwise it retries, and after READ_RETRIES attempts answers
   UNKNOWN. No reader ever waits unboundedly, and no key present during a whole lookup is
   ever reported missing.
7. Generations. The high 32 bits of a flow slot's tag are its generation, incremented on
   every insert into, move into and clear of that slot. A handle (generation, partition,
   slot) is valid iff that slot is occupied with that generation; a stale handle never
   names another flow (until the 32-bit generation wraps). (A write that takeover undoes
   also undoes its increment: it never became visible under an even `seq`.)
8. Capacity. A partition never holds more than 3/4 of its flow (resp. session) slots. Inserts
   beyond that are refused with a distinct result and counted in the partition header; a live
   entry is never evicted for a newcomer.
9. Sessions. A session entry exists in partition P iff P holds at least one flow of that
   ufrag; its `flows` field equals the number of such flows in P and never exceeds
   max_flows_per_session; every flow's session ref names a session entry of its own
   partition. The header's flow and session counts equal the numbers of occupied slots.
10. Crash safety. A writer killed at any instruction (kill -9) leaves at most one operation
   partially applied. `takeover()` by the next owner restores the journaled slot, removes
   the duplicates of an interrupted move, recounts (9), and is itself idempotent if it dies
   midway; every writer operation is idempotent (insert of a present key is EXISTS, delete of
   an absent one is a no-op, flushes write absolute values), so re-applying the interrupted
   operation completes it.

Invariants 2, 4 and 6 together are why a pure-Python seqlock works here: x86-64 keeps stores in
order and loads in order (TSO), and aligned 8-byte accesses are atomic. On ARM64 this would need
real acquire/release fences.

Sessions across partitions (design choice)
------------------------------------------
Each partition keeps its own session entries: a flow of ufrag U learned by worker W adds to
U's entry in W's partition (creating it if needed). The bound `max_flows_per_session` applies
per partition. Views (`table.session(ufrag)`, `view.sessions()`) aggregate the entries of all
partitions: `flows` is the sum, `created` the earliest, `last_seen` the latest, `partition`
the partition of the earliest entry (the one that learned the first flow) and `partitions`
every partition holding flows of that session. No writer ever touches another partition.
A flow refers to its session entry by the session ref: the ufrag's BLAKE2b hash keyed with
the table's seed (64 bits). Two different ufrags with the same ref in one partition
(probability 2**-64 per pair) are not both admitted: the second is refused as
SESSION_TABLE_FULL.

Clocks
------
Every time is an int in milliseconds, passed in (`now`, `last_seen`, `idle_timeout`). The
module never reads a clock. All processes of a relay must use the same clock, e.g.
`time.monotonic_ns() // 1_000_000` (system-wide on Linux; /dev/shm does not survive a reboot
either).

Public API
----------
Times are int milliseconds; IP addresses are 16 bytes (IPv6, or IPv4-mapped ::ffff:a.b.c.d:
`shm.layout.ip16()` converts, `ip_str()` prints); ports are ints; a ufrag is 1..64 bytes.

    FlowTable.create(path, *, partitions, flow_capacity, session_capacity,
                     max_flows_per_session=8, seed=None, mode=0o600) -> FlowTable
        Create the file, or atomically replace an existing one (renamed over it: a process
        still mapping the old file keeps reading it unharmed). Capacities are slots per
        partition, powers of two in [4, 2**23]; at most 3/4 of them are ever used. `seed`
        (random by default) keys the hashes and is stored in the header. PartitionBusy when
        a partition of the old file is still owned.
    FlowTable.open(path, *, partitions=None, flow_capacity=None, session_capacity=None,
                   max_flows_per_session=None) -> FlowTable
        Attach read-write to an existing table; each layout argument given must match
        exactly, else LayoutMismatch (also for a foreign, truncated or other-version file;
        FileNotFoundError when there is none). This is how the table survives a relay
        restart.
    FlowTable.attach_readonly(path) -> TableView
        O_RDONLY + PROT_READ; never locks, never writes; for tools such as the CLI.
    table.own(partition, *, on_move=None) -> PartitionWriter
        flock `<path>.p<N>.lock` (PartitionBusy if another process holds it; StaleTable if
        the file was replaced since open) and run takeover(); the report is kept in
        `writer.last_takeover`. on_move(old_handle, new_handle) is called when a deletion
        shifts a flow to another slot (its handle changes); it must not call the writer.

  Reads (FlowTable and TableView alike; lock-free, any process):
    table.lookup(client_ip, client_port, local_ip, local_port) -> Flow | MISS | UNKNOWN
        All partitions: a Flow from any of them wins; UNKNOWN when none had it and some
        partition could not answer within READ_RETRIES (its writer kept restructuring, or
        died mid-deletion and has not been taken over yet).
    table.lookup_in(partition, client_ip, client_port, local_ip, local_port) -> same
    table.get_by_handle(handle) -> Flow | None
        O(1), no hashing; None when the handle is stale (slot emptied, or reused / moved:
        generation changed), or, very rarely, when its slot could not be read consistently.
    table.session(ufrag) -> Session | None      aggregated over partitions (see above)
    table.session_in(partition, ufrag) -> Session | MISS | UNKNOWN
    table.flows(partition=None) -> Iterator[Flow]
    table.sessions(per_partition=False) -> Iterator[Session]
        Seqlock-checked copies; each partition is rescanned (up to SCAN_RETRIES) until a
        pass saw no structural change, so a listing is exact unless deletions never pause.
    table.totals() -> dict[str, int]             sums: flows, sessions, refusals, capacities...
    table.partition_totals() -> list[dict[str, int]]   the same per partition, owner pid
    table.check_invariants(partitions=None) -> list[str]   invariants 2-9 on a table nobody
        writes; [] when they hold
    table.home_slot(client_ip, client_port, local_ip, local_port) -> int   (tests, tools)
    table.is_stale() -> bool; table.close(); table.unlink()  (data and lock files)
    unlink_table(path)                            the same without an attachment

  Writes (the partition's owner only):
    writer.insert(client_ip, client_port, local_ip, local_port, target_ip, target_port,
                  ufrag, now) -> InsertResult
    writer.adopt(flow) -> InsertResult     a copy of a flow found in another partition (same
        key, route, counters, created; origin kept; its session entry created here if needed)
    writer.find(client_ip, client_port, local_ip, local_port) -> Flow | None   own partition
    writer.delete(client_ip, client_port, local_ip, local_port) -> Flow | None
    writer.delete_handle(handle) -> Flow | None
    writer.delete_session(ufrag) -> list[Flow]     its flows here, and its entry here
    writer.delete_target(target_ip, target_port) -> list[Flow]
    writer.flush_counters(handle, pkts_in, bytes_in, pkts_out, bytes_out, last_seen) -> bool
        absolute values; False when the handle is stale or not this partition's (look the
        flow up again: a deletion may have moved it). Moves the session's last_seen by steps
        of SESSION_TOUCH_MS at most.
    writer.sweep(now, idle_timeout, max_slots) -> list[Flow]
        removes flows with now - last_seen > idle_timeout among the next max_slots slots
        from a cursor kept in the partition header (max_slots >= capacity: all of them).
    writer.takeover() -> TakeoverReport      (own() already ran it; idempotent)
    writer.flows() -> Iterator[Flow]; writer.sessions() -> Iterator[Session]
    writer.stats() -> dict[str, int]; writer.close()   (later use raises WriterClosed)

  Results and records:
    InsertResult(status: InsertStatus, handle: int)  .ok (new flow), .has_flow (OK|EXISTS)
    InsertStatus: OK, EXISTS (handle of the present flow), TABLE_FULL, SESSION_TABLE_FULL,
        SESSION_FLOW_LIMIT, UFRAG_TOO_LONG (refusals: handle 0, counted in the header)
    MISS, UNKNOWN: the two members of enum Lookup, both falsy
    Flow (frozen msgspec.Struct): handle, partition, client_ip, local_ip, client_port,
        local_port, target_port, worker, origin, target_ip, created, last_seen, pkts_in,
        bytes_in, pkts_out, bytes_out, session_ref, ufrag
        ("in" is client -> transceiver, "out" transceiver -> client)
    Session (frozen msgspec.Struct): ufrag, target_ip, target_port, flows, created,
        last_seen, partition, partitions, session_ref
    TakeoverReport (NamedTuple): partition, interrupted, journal_restored,
        odd_slots_repaired, duplicates_removed, orphan_flows_removed,
        orphan_sessions_removed, session_counts_fixed, flows, sessions
    Errors (all ShmError): LayoutMismatch, PartitionBusy, StaleTable, WriterClosed

A flow handle is generation (32 bits) << 31 | partition (8 bits) << 23 | slot (23 bits): it
fits in 63 bits and is validated without hashing.
"""
from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import msgspec
import numpy as np

from shm.layout import (
    FLOW_BODY,
    FLOW_COUNTERS,
    FLOW_KEY,
    FLOW_SLOT,
    FLOW_SLOT_STRUCT,
    GOLDEN32,
    HANDLE_GEN_SHIFT,
    HANDLE_PART_MASK,
    HANDLE_SLOT_BITS,
    HANDLE_SLOT_MASK,
    HEADER,
    HEADER_SIZE,
    JOURNAL_OFFSET,
    LAYOUT_VERSION,
    LOAD_DEN,
    LOAD_NUM,
    M32,
    MAGIC,
    MAX_CAPACITY,
    MAX_PARTITIONS,
    MAX_UFRAG,
    MIN_CAPACITY,
    P_ADOPTED,
    P_DELETES,
    P_EXPIRED,
    P_FLOWS,
    P_INSERTS,
    P_JOURNAL,
    P_OWNER_PID,
    P_REFUSED_SESSION_FLOW_LIMIT,
    P_REFUSED_SESSION_TABLE_FULL,
    P_REFUSED_TABLE_FULL,
    P_REFUSED_UFRAG_TOO_LONG,
    P_SC,
    P_SESSIONS,
    P_SWEEP_CURSOR,
    P_TAKEOVERS,
    PART_HEADER_SIZE,
    S_UFRAG_OFF,
    SESSION_BODY,
    SESSION_SLOT,
    SESSION_SLOT_STRUCT,
    SW_INFO,
    SW_LAST_SEEN,
    W_LAST_SEEN,
    W_PORTS,
    W_SREF,
    W_TAG,
    W_TIP_HI,
    W_TIP_LO,
    file_size,
    load_limit,
    make_handle,
    partition_stride,
    session_ref,
)

READ_RETRIES = 32  # probe attempts before a reader answers UNKNOWN
SLOT_SPINS = 64  # reads of an odd seq before an attempt is abandoned
UFRAG_CACHE_MAX = 4096  # session ref -> ufrag entries a table object keeps (small: a dict resize is O(n))
YIELD_AFTER = 4  # attempts after which a reader yields the CPU between attempts
SCAN_RETRIES = 4  # whole-partition scans until one saw no structural change
SESSION_TOUCH_MS = 1000  # a flush moves its session's last_seen only when it gains this much

_ZERO112 = bytes(112)
_KEY_PACK = FLOW_KEY.pack
_crc32 = zlib.crc32
_FLOW_UNPACK = FLOW_SLOT_STRUCT.unpack_from
_tuple_new = tuple.__new__
_COUNTERS_PACK = FLOW_COUNTERS.pack_into


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


class _ClosedWords:
    """Stands in for a closed writer's views of the table: any access raises WriterClosed."""

    def _refuse(self, *_: object) -> Any:
        raise WriterClosed("this partition writer was closed (it no longer owns the partition)")

    __getitem__ = __setitem__ = __len__ = _refuse


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


_R_TABLE_FULL = InsertResult(InsertStatus.TABLE_FULL)
_R_SESSION_TABLE_FULL = InsertResult(InsertStatus.SESSION_TABLE_FULL)
_R_SESSION_FLOW_LIMIT = InsertResult(InsertStatus.SESSION_FLOW_LIMIT)
_R_UFRAG_TOO_LONG = InsertResult(InsertStatus.UFRAG_TOO_LONG)


class Flow(msgspec.Struct, frozen=True, gc=False):
    """A copy of one flow slot (immutable; a msgspec Struct: cheap to build and to encode)."""

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


class TakeoverReport(NamedTuple):
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
    partitions: int
    flow_capacity: int
    session_capacity: int
    max_flows_per_session: int
    seed: int
    stride: int
    size: int


# -- layout -------------------------------------------------------------------------------------


def _check_capacity(name: str, value: int) -> int:
    if not isinstance(value, int) or value < MIN_CAPACITY or value > MAX_CAPACITY or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{MIN_CAPACITY}, {MAX_CAPACITY}], got {value!r}")
    return value


def _read_layout(mm: mmap.mmap, actual_size: int, path: str) -> Layout:
    if actual_size < HEADER_SIZE:
        raise LayoutMismatch(f"{path}: {actual_size} bytes, too short for a flow table header")
    (
        magic,
        version,
        header_size,
        part_header_size,
        flow_slot,
        session_slot,
        partitions,
        fcap,
        scap,
        maxper,
        load_num,
        load_den,
        _r0,
        stride,
        size,
        seed,
        _r1,
    ) = HEADER.unpack_from(mm, 0)
    if magic != MAGIC:
        raise LayoutMismatch(f"{path}: not a flow table (magic {magic!r})")
    found = dict(
        version=version,
        header_size=header_size,
        part_header_size=part_header_size,
        flow_slot=flow_slot,
        session_slot=session_slot,
        load=(load_num, load_den),
    )
    expected = dict(
        version=LAYOUT_VERSION,
        header_size=HEADER_SIZE,
        part_header_size=PART_HEADER_SIZE,
        flow_slot=FLOW_SLOT,
        session_slot=SESSION_SLOT,
        load=(LOAD_NUM, LOAD_DEN),
    )
    diff = [f"{k}={found[k]} (expected {expected[k]})" for k in expected if found[k] != expected[k]]
    if diff:
        raise LayoutMismatch(f"{path}: layout differs: " + ", ".join(diff))
    try:
        _check_capacity("flow_capacity", fcap)
        _check_capacity("session_capacity", scap)
    except ValueError as exc:
        raise LayoutMismatch(f"{path}: {exc}") from None
    if not 1 <= partitions <= MAX_PARTITIONS or maxper < 1:
        raise LayoutMismatch(f"{path}: partitions={partitions}, max_flows_per_session={maxper} out of range")
    if stride != partition_stride(fcap, scap) or size != file_size(partitions, fcap, scap) or size != actual_size:
        raise LayoutMismatch(f"{path}: sizes do not add up (stride {stride}, size {size}, file {actual_size})")
    return Layout(partitions, fcap, scap, maxper, seed, stride, size)


def lock_path(path: str, partition: int) -> str:
    """The lock file whose exclusive flock makes a process the owner of a partition."""
    return f"{path}.p{partition}.lock"


def _try_lock(path: str, partition: int) -> int:
    """Exclusive non-blocking flock on the partition's lock file; returns its fd."""
    lp = lock_path(path, partition)
    fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise PartitionBusy(partition, lp) from None
        raise
    return fd


def _release_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def unlink_table(path: str, partitions: int | None = None) -> None:
    """Remove a table's file and its lock files. Only when no process uses it any more."""
    if partitions is None:
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER.size)
            partitions = HEADER.unpack(head)[6] if len(head) == HEADER.size and head[:8] == MAGIC else 0
        except FileNotFoundError:
            partitions = 0
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    for p in range(max(partitions, 0)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(path, p))


# -- reading (every process) ----------------------------------------------------------------------


class _Reader:
    """Lock-free reads of any partition: seqlock-checked copies, structure-counter misses."""

    def __init__(self, path: str, mm: mmap.mmap, layout: Layout, inode: tuple[int, int]) -> None:
        self.path = path
        self.layout = layout
        self._inode = inode
        self._mm = mm
        self._closed = False
        self._mv = memoryview(mm)
        self._q = self._mv.cast("Q")
        # The low half of every word, as 32-bit loads: a flow slot's tag32 without a mask.
        self._d = self._mv.cast("I")
        self._np: Any = np.frombuffer(mm, dtype=np.uint64)
        self.partitions = layout.partitions
        self.flow_capacity = fcap = layout.flow_capacity
        self.session_capacity = scap = layout.session_capacity
        self.max_flows_per_session = layout.max_flows_per_session
        self.flow_limit = load_limit(fcap)
        self.session_limit = load_limit(scap)
        self._seed = layout.seed
        self._seed32 = layout.seed & M32
        self._fmask = fcap - 1
        self._smask = scap - 1
        self._fshift = 32 - (fcap.bit_length() - 1)
        self._probe_bound = range(fcap)
        self._sshift = 64 - (scap.bit_length() - 1)
        bases = [HEADER_SIZE + p * layout.stride for p in range(layout.partitions)]
        self._hw = [b >> 3 for b in bases]  # partition header, in words
        self._scw = [(b >> 3) + P_SC for b in bases]
        self._fw = [(b + PART_HEADER_SIZE) >> 3 for b in bases]  # flow slot 0, in words
        self._sw = [(b + PART_HEADER_SIZE + fcap * FLOW_SLOT) >> 3 for b in bases]  # session slot 0
        # (sc word, flow slot 0's word, index in _d of its tag32); slot i: + (i << 4), + (i << 5)
        self._part_words = [(scw, fw, fw * 2 + 2) for scw, fw in zip(self._scw, self._fw)]
        self._srefs: dict[bytes, int] = {}  # ufrag -> session ref (a hash: never stale)
        self._ufrags: dict[int, bytes] = {}  # session ref -> ufrag (the same fact backwards)

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Detach. Never changes the table."""
        if self._closed:
            return
        self._closed = True
        self._np = None
        self._d.release()
        self._q.release()
        self._mv.release()
        try:
            self._mm.close()
        except BufferError:
            pass  # a caller still holds a numpy view of it: unmapped when that goes

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def is_stale(self) -> bool:
        """True when the file at `path` is no longer the one mapped (re-created or removed)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._inode

    def _sref(self, ufrag: bytes) -> int:
        sref = self._srefs.get(ufrag)
        if sref is None:
            if len(self._srefs) >= 16384:
                self._srefs.clear()
            sref = self._srefs[ufrag] = session_ref(ufrag, self._seed)
        return sref

    def _flows_rows(self, p: int) -> Any:
        w = self._fw[p]
        return self._np[w : w + self.flow_capacity * 16].reshape(self.flow_capacity, 16)

    def _sessions_rows(self, p: int) -> Any:
        w = self._sw[p]
        return self._np[w : w + self.session_capacity * 16].reshape(self.session_capacity, 16)

    def home_slot(self, client_ip: bytes, client_port: int, local_ip: bytes, local_port: int) -> int:
        """The home slot of a 5-tuple (same in every partition): for tests and tools."""
        t32 = _crc32(_KEY_PACK(client_ip, local_ip, client_port, local_port), self._seed32) | 1
        return ((t32 * GOLDEN32) & M32) >> self._fshift

    # -- slot copies --------------------------------------------------------------------------

    def _copy(self, off: int, slot_struct: struct.Struct) -> tuple | None:
        """Seqlock-checked copy of a slot (flow or session); None if its writer kept it busy."""
        q = self._q
        si = off >> 3
        unpack = slot_struct.unpack_from
        mm = self._mm
        for _ in range(SLOT_SPINS):
            s0 = q[si]
            if s0 & 1:
                continue
            t = unpack(mm, off)
            if q[si] == s0:
                return t
        return None

    def _copy_flow(self, off: int) -> tuple | None:
        return self._copy(off, FLOW_SLOT_STRUCT)

    def _copy_session(self, off: int) -> tuple | None:
        return self._copy(off, SESSION_SLOT_STRUCT)

    def _ufrag_of(self, p: int, sref: int) -> bytes | None:
        """The ufrag of session ref `sref` in partition p (a seqlock-checked read)."""
        q = self._q
        sw = self._sw[p]
        scw = self._scw[p]
        mask = self._smask
        mm = self._mm
        home = sref >> self._sshift
        for _ in range(READ_RETRIES):
            sc = q[scw]
            i = home
            for _ in range(self.session_capacity):
                w = sw + (i << 4)
                t = q[w + 1]
                if t == sref:
                    s0 = q[w]
                    if s0 & 1:
                        break
                    n = q[w + SW_INFO] & 0xFF
                    off = (w << 3) + S_UFRAG_OFF
                    u = mm[off : off + n]
                    if q[w] == s0 and q[w + 1] == sref:
                        return u
                    break
                if not t:
                    if not sc & 1 and q[scw] == sc:
                        return None
                    break
                i = (i + 1) & mask
        return None

    def _flow_record(self, p: int, i: int, t: tuple) -> Flow:
        # t: seq, tag, sref, cip, lip, cport, lport, tport, worker, origin, tip, created, last,
        #    pkts_in, bytes_in, pkts_out, bytes_out
        sref = t[2]
        ufrag = self._ufrags.get(sref)
        if ufrag is None:
            ufrag = self._ufrag_of(p, sref)
            if ufrag is not None:
                if len(self._ufrags) >= UFRAG_CACHE_MAX:
                    self._ufrags.popitem()  # O(1): clearing 64k entries at once took ~1 ms
                self._ufrags[sref] = ufrag
        return Flow(
            (t[1] >> 32) << HANDLE_GEN_SHIFT | p << HANDLE_SLOT_BITS | i,
            p, t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11], t[12], t[13], t[14], t[15], t[16], sref, ufrag,
        )  # fmt: skip

    @staticmethod
    def _session_record(p: int, t: tuple) -> Session:
        # t: seq, tag, ulen, tport, nflows, tip, created, last, ufrag64, reserved
        return Session(t[8][: t[2]], t[5], t[3], t[4], t[6], t[7], p, (p,), t[1])

    # -- lookups ------------------------------------------------------------------------------

    def lookup(self, client_ip: bytes, client_port: int, local_ip: bytes, local_port: int) -> Flow | Lookup:
        """The flow of a 5-tuple in any partition: Flow, MISS (in none) or UNKNOWN."""
        t32 = _crc32(_KEY_PACK(client_ip, local_ip, client_port, local_port), self._seed32) | 1
        home = ((t32 * GOLDEN32) & M32) >> self._fshift
        q = self._q
        d = self._d
        mask = self._fmask
        unknown = False
        for p, (scw, _fw, tw) in enumerate(self._part_words):
            # First pass inline (the common miss ends here); the careful path for the rest.
            s0 = q[scw]
            i = home
            while True:
                lo = d[tw + (i << 5)]
                if not lo or lo == t32:
                    break
                i = (i + 1) & mask
            if not lo and not s0 & 1 and q[scw] == s0:
                continue
            r = self._lookup_p(p, t32, client_ip, client_port, local_ip, local_port)
            if r is MISS:
                continue
            if r is UNKNOWN:
                unknown = True
                continue
            return r
        return UNKNOWN if unknown else MISS

    def lookup_in(
        self, partition: int, client_ip: bytes, client_port: int, local_ip: bytes, local_port: int
    ) -> Flow | Lookup:
        """The flow of a 5-tuple in one partition: Flow, MISS or UNKNOWN."""
        t32 = _crc32(_KEY_PACK(client_ip, local_ip, client_port, local_port), self._seed32) | 1
        # First pass inline, on 32-bit tag loads (the miss path's cost is mostly interpreter
        # steps: bench/shm.py): a miss with `sc` even and unchanged around it ends here, a
        # tag match is checked here. (The load cap keeps a quarter of the slots empty, so this
        # loop always ends.)
        q = self._q
        d = self._d
        scw, fw, tw = self._part_words[partition]
        mask = self._fmask
        s0 = q[scw]
        i = ((t32 * GOLDEN32) & M32) >> self._fshift
        while True:
            lo = d[tw + (i << 5)]
            if not lo:
                if not s0 & 1 and q[scw] == s0:
                    return MISS
                break
            if lo == t32:
                w = fw + (i << 4)
                s1 = q[w]
                c = _FLOW_UNPACK(self._mm, w << 3)
                if (
                    not s1 & 1
                    and q[w] == s1
                    and c[3] == client_ip
                    and c[5] == client_port
                    and c[4] == local_ip
                    and c[6] == local_port
                    and c[1] & M32 == t32
                ):
                    return self._flow_record(partition, i, c)
                break  # a busy slot or a tag collision: the careful path sorts it out
            i = (i + 1) & mask
        return self._lookup_p(partition, t32, client_ip, client_port, local_ip, local_port)

    def _lookup_p(self, p: int, t32: int, cip: bytes, cport: int, lip: bytes, lport: int) -> Flow | Lookup:
        # Invariant 6: MISS only if `sc` was even and unchanged across the whole probe.
        q = self._q
        scw = self._scw[p]
        fw = self._fw[p]
        mask = self._fmask
        home = ((t32 * GOLDEN32) & M32) >> self._fshift
        for attempt in range(READ_RETRIES):
            s0 = q[scw]  # (a hit needs no stable `sc`: its slot's seqlock vouches for it)
            i = home
            for _ in self._probe_bound:
                w = fw + (i << 4)
                lo = q[w + 1] & M32
                if not lo:
                    if not s0 & 1 and q[scw] == s0:
                        return MISS
                    break
                if lo == t32:
                    s1 = q[w]
                    c = _FLOW_UNPACK(self._mm, w << 3)
                    if s1 & 1 or q[w] != s1:
                        c = self._copy_flow(w << 3)
                    if c is None:
                        break  # its writer kept this very slot busy: start over
                    if c[3] == cip and c[5] == cport and c[4] == lip and c[6] == lport and c[1] & M32 == t32:
                        return self._flow_record(p, i, c)
                i = (i + 1) & mask
            if attempt >= YIELD_AFTER:
                os.sched_yield()
        return UNKNOWN

    def get_by_handle(self, handle: int) -> Flow | None:
        """The flow a handle names, in O(1) without hashing; None when the handle is stale."""
        p = (handle >> HANDLE_SLOT_BITS) & HANDLE_PART_MASK
        i = handle & HANDLE_SLOT_MASK
        if p >= self.partitions or i >= self.flow_capacity:
            return None
        w = self._fw[p] + (i << 4)
        q = self._q
        s0 = q[w]
        c = _FLOW_UNPACK(self._mm, w << 3)
        if s0 & 1 or q[w] != s0:
            c = self._copy_flow(w << 3)
            if c is None:
                return None
        t = c[1]
        if t >> 32 != handle >> HANDLE_GEN_SHIFT or not t & M32:
            return None
        return self._flow_record(p, i, c)

    def _session_in(self, p: int, ufrag: bytes, sref: int) -> Session | Lookup:
        q = self._q
        scw = self._scw[p]
        sw = self._sw[p]
        mask = self._smask
        home = sref >> self._sshift
        for attempt in range(READ_RETRIES):
            if attempt >= YIELD_AFTER:
                os.sched_yield()
            s0 = q[scw]
            i = home
            for _ in range(self.session_capacity):
                w = sw + (i << 4)
                t = q[w + 1]
                if not t:
                    if not s0 & 1 and q[scw] == s0:
                        return MISS
                    break
                if t == sref:
                    c = self._copy_session(w << 3)
                    if c is None:
                        break
                    if c[1] == sref and c[8][: c[2]] == ufrag:
                        return self._session_record(p, c)
                i = (i + 1) & mask
        return UNKNOWN

    def session_in(self, partition: int, ufrag: bytes) -> Session | Lookup:
        """The session entry of a ufrag in one partition: Session, MISS or UNKNOWN."""
        return self._session_in(partition, ufrag, self._sref(ufrag))

    def session(self, ufrag: bytes) -> Session | None:
        """A session aggregated over all partitions (None if no partition has a flow of it)."""
        if len(ufrag) > MAX_UFRAG:
            return None
        sref = self._sref(ufrag)
        entries = []
        for p in range(self.partitions):
            r = self._session_in(p, ufrag, sref)
            if isinstance(r, Session):
                entries.append(r)
        return _aggregate(entries) if entries else None

    # -- scans --------------------------------------------------------------------------------

    def _scan_flows(self, p: int) -> tuple[list[Flow], bool]:
        """All flows of a partition, and whether no structural change happened meanwhile.

        Slots are read from the highest index down: backward-shift moves go to lower indexes,
        so a flow moved during the scan is seen twice (deduplicated) rather than missed,
        except across the wrap-around; the structure counter tells whether that could be.
        """
        q = self._q
        scw = self._scw[p]
        fw = self._fw[p]
        rows = self._flows_rows(p)
        flows: list[Flow] = []
        for attempt in range(SCAN_RETRIES):
            s0 = q[scw]
            occupied = np.flatnonzero(rows[:, W_TAG] & np.uint64(M32))[::-1].tolist()
            seen: dict[tuple[bytes, bytes, int, int], Flow] = {}
            for i in occupied:
                c = self._copy_flow((fw + (i << 4)) << 3)
                if c is None or not c[1] & M32:
                    continue
                f = self._flow_record(p, i, c)
                seen.setdefault((c[3], c[4], c[5], c[6]), f)
            flows = list(seen.values())
            if not s0 & 1 and q[scw] == s0:
                return flows, True
            if attempt:
                os.sched_yield()
        return flows, False

    def _scan_sessions(self, p: int) -> tuple[list[Session], bool]:
        q = self._q
        scw = self._scw[p]
        sw = self._sw[p]
        rows = self._sessions_rows(p)
        out: list[Session] = []
        for attempt in range(SCAN_RETRIES):
            s0 = q[scw]
            occupied = np.flatnonzero(rows[:, W_TAG])[::-1].tolist()
            seen: dict[bytes, Session] = {}
            for i in occupied:
                c = self._copy_session((sw + (i << 4)) << 3)
                if c is None or not c[1]:
                    continue
                s = self._session_record(p, c)
                seen.setdefault(s.ufrag, s)
            out = list(seen.values())
            if not s0 & 1 and q[scw] == s0:
                return out, True
            if attempt:
                os.sched_yield()
        return out, False

    def flows(self, partition: int | None = None) -> Iterator[Flow]:
        """Every flow (of one partition, or all), each a seqlock-checked copy.

        Each partition is scanned until one pass saw no structural change (at most
        SCAN_RETRIES passes); a pass that raced constant deletions may miss a flow that moved.
        """
        parts = range(self.partitions) if partition is None else (partition,)
        for p in parts:
            yield from self._scan_flows(p)[0]

    def sessions(self, per_partition: bool = False) -> Iterator[Session]:
        """Every session: aggregated over partitions, or each partition's own entries."""
        if per_partition:
            for p in range(self.partitions):
                yield from self._scan_sessions(p)[0]
            return
        by_ufrag: dict[bytes, list[Session]] = {}
        for p in range(self.partitions):
            for s in self._scan_sessions(p)[0]:
                by_ufrag.setdefault(s.ufrag, []).append(s)
        for entries in by_ufrag.values():
            yield _aggregate(entries)

    # -- figures ------------------------------------------------------------------------------

    def partition_totals(self) -> list[dict[str, int]]:
        """Per partition: counts, capacities, refusals, owner pid, takeovers (header words)."""
        q = self._q
        out = []
        for p in range(self.partitions):
            h = self._hw[p]
            out.append(
                dict(
                    partition=p,
                    flows=q[h + P_FLOWS],
                    sessions=q[h + P_SESSIONS],
                    flow_capacity=self.flow_capacity,
                    session_capacity=self.session_capacity,
                    flow_limit=self.flow_limit,
                    session_limit=self.session_limit,
                    refused_table_full=q[h + P_REFUSED_TABLE_FULL],
                    refused_session_table_full=q[h + P_REFUSED_SESSION_TABLE_FULL],
                    refused_session_flow_limit=q[h + P_REFUSED_SESSION_FLOW_LIMIT],
                    refused_ufrag_too_long=q[h + P_REFUSED_UFRAG_TOO_LONG],
                    inserts=q[h + P_INSERTS],
                    deletes=q[h + P_DELETES],
                    expired=q[h + P_EXPIRED],
                    adopted=q[h + P_ADOPTED],
                    takeovers=q[h + P_TAKEOVERS],
                    owner_pid=q[h + P_OWNER_PID],
                    structure_counter=q[h + P_SC],
                )
            )
        return out

    def totals(self) -> dict[str, int]:
        """Sums over partitions (plus `partitions`, per-partition capacities)."""
        parts = self.partition_totals()
        out = {"partitions": self.partitions, "flow_capacity": self.flow_capacity, "session_capacity": self.session_capacity}
        for key in (
            "flows",
            "sessions",
            "refused_table_full",
            "refused_session_table_full",
            "refused_session_flow_limit",
            "refused_ufrag_too_long",
            "inserts",
            "deletes",
            "expired",
            "adopted",
            "takeovers",
        ):
            out[key] = sum(d[key] for d in parts)
        out["flow_limit"] = self.flow_limit * self.partitions
        out["session_limit"] = self.session_limit * self.partitions
        return out

    # -- invariants ---------------------------------------------------------------------------

    def check_invariants(self, partitions: list[int] | None = None) -> list[str]:
        """Check invariants 2-9 on partitions nobody is writing; returns the violations."""
        problems: list[str] = []
        q = self._q
        mm = self._mm
        for p in range(self.partitions) if partitions is None else partitions:
            h = self._hw[p]
            if q[h + P_SC] & 1:
                problems.append(f"I6: partition {p}: structure counter is odd")
            frows = self._flows_rows(p)
            srows = self._sessions_rows(p)
            for name, rows in (("flow", frows), ("session", srows)):
                odd = np.flatnonzero(rows[:, 0] & np.uint64(1))
                if odd.size:
                    problems.append(f"I2/I3: partition {p}: odd {name} slots {odd[:8].tolist()}")
            focc = np.flatnonzero(frows[:, W_TAG] & np.uint64(M32)).tolist()
            socc = np.flatnonzero(srows[:, W_TAG]).tolist()
            fmask, smask = self._fmask, self._smask
            keys: dict[bytes, int] = {}
            per_sref: dict[int, int] = {}
            for i in focc:
                w = self._fw[p] + (i << 4)
                t32 = q[w + 1] & M32
                off = w << 3
                key = mm[off + 24 : off + 60]
                if _crc32(key, self._seed32) | 1 != t32:
                    problems.append(f"I4: partition {p}: flow slot {i} tag does not match its key")
                home = ((t32 * GOLDEN32) & M32) >> self._fshift
                j = home
                while j != i:
                    if not q[self._fw[p] + (j << 4) + 1] & M32:
                        problems.append(f"I4: partition {p}: flow slot {i} unreachable (empty slot {j} after home {home})")
                        break
                    j = (j + 1) & fmask
                if key in keys:
                    problems.append(f"I5: partition {p}: flow key in slots {keys[key]} and {i}")
                keys[key] = i
                sref = q[w + W_SREF]
                per_sref[sref] = per_sref.get(sref, 0) + 1
                f = self.get_by_handle(make_handle(q[w + 1] >> 32, p, i))
                if f is None or f.partition != p or f.client_ip + f.local_ip != key[:32]:
                    problems.append(f"I7: partition {p}: handle of slot {i} does not resolve to it")
            ufrags: dict[bytes, int] = {}
            srefs_here: set[int] = set()
            for i in socc:
                w = self._sw[p] + (i << 4)
                sref = q[w + 1]
                off = w << 3
                info = q[w + SW_INFO]
                ufrag = mm[off + S_UFRAG_OFF : off + S_UFRAG_OFF + (info & 0xFF)]
                if self._sref(ufrag) != sref:
                    problems.append(f"I4: partition {p}: session slot {i} tag does not match its ufrag")
                j = sref >> self._sshift
                while j != i:
                    if not q[self._sw[p] + (j << 4) + 1]:
                        problems.append(f"I4: partition {p}: session slot {i} unreachable")
                        break
                    j = (j + 1) & smask
                if ufrag in ufrags:
                    problems.append(f"I5: partition {p}: ufrag {ufrag!r} in session slots {ufrags[ufrag]} and {i}")
                ufrags[ufrag] = i
                srefs_here.add(sref)
                n = info >> 32
                if n != per_sref.get(sref, 0):
                    problems.append(f"I9: partition {p}: session {ufrag!r} says {n} flows, has {per_sref.get(sref, 0)}")
                if not 1 <= n <= self.max_flows_per_session:
                    problems.append(f"I9: partition {p}: session {ufrag!r} has {n} flows")
            orphans = [s for s in per_sref if s not in srefs_here]
            if orphans:
                problems.append(f"I9: partition {p}: {len(orphans)} session refs of flows have no session entry")
            if q[h + P_FLOWS] != len(focc) or q[h + P_SESSIONS] != len(socc):
                problems.append(
                    f"I9: partition {p}: header counts {q[h + P_FLOWS]}/{q[h + P_SESSIONS]}, slots {len(focc)}/{len(socc)}"
                )
            if len(focc) > self.flow_limit or len(socc) > self.session_limit:
                problems.append(f"I8: partition {p}: {len(focc)} flows / {len(socc)} sessions exceed the load cap")
        return problems


def _aggregate(entries: list[Session]) -> Session:
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


class TableView(_Reader):
    """A read-only attachment (O_RDONLY, PROT_READ): never locks, never writes."""


# -- the read-write table -------------------------------------------------------------------------


def _map(path: str, writable: bool) -> tuple[mmap.mmap, int, tuple[int, int]]:
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_size < HEADER_SIZE or st.st_size % 8:
            raise LayoutMismatch(f"{path}: {st.st_size} bytes is not a flow table")
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        mm = mmap.mmap(fd, st.st_size, access=access)
    finally:
        os.close(fd)
    return mm, st.st_size, (st.st_dev, st.st_ino)


class FlowTable(_Reader):
    """A read-write attachment: lookups like a view, plus `own(partition)` for a worker."""

    @classmethod
    def create(
        cls,
        path: str,
        *,
        partitions: int,
        flow_capacity: int,
        session_capacity: int,
        max_flows_per_session: int = 8,
        seed: int | None = None,
        mode: int = 0o600,
    ) -> FlowTable:
        """Create the table file, or atomically replace an existing one (no owner may be alive).

        The new file is written under a temporary name and renamed over `path`, so a process
        still mapping the old file keeps reading the old (now unlinked) table unharmed.
        """
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions must be in [1, {MAX_PARTITIONS}], got {partitions}")
        _check_capacity("flow_capacity", flow_capacity)
        _check_capacity("session_capacity", session_capacity)
        if not 1 <= max_flows_per_session <= 0xFFFFFFFF:
            raise ValueError("max_flows_per_session must be >= 1")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        seed &= (1 << 64) - 1
        old_partitions = 0
        with contextlib.suppress(OSError, LayoutMismatch, struct.error):
            with open(path, "rb") as f:
                head = f.read(HEADER.size)
            if head[:8] == MAGIC:
                old_partitions = HEADER.unpack(head)[6]
        # Hold every partition's lock (old and new layout) while the file is replaced.
        fds: list[int] = []
        try:
            for p in range(max(partitions, old_partitions)):
                fds.append(_try_lock(path, p))
            size = file_size(partitions, flow_capacity, session_capacity)
            stride = partition_stride(flow_capacity, session_capacity)
            tmp = f"{path}.new.{os.getpid()}"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
            try:
                os.ftruncate(fd, size)
                # Reserve every page now: a sparse file on a too-small tmpfs (a container's
                # default 64 MiB /dev/shm) would SIGBUS a worker at its first write far in.
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EFBIG):
                        raise
                    raise NoSpace(
                        f"no room for the flow table: {path} needs {size / 2**20:.1f} MiB in "
                        f"{os.path.dirname(path) or '.'}; enlarge it (containers: --shm-size) or lower "
                        "flow_capacity / session_capacity / workers"
                    ) from None
                with mmap.mmap(fd, HEADER_SIZE) as head_map:
                    HEADER.pack_into(
                        head_map,
                        0,
                        b"\x00" * 8,
                        LAYOUT_VERSION,
                        HEADER_SIZE,
                        PART_HEADER_SIZE,
                        FLOW_SLOT,
                        SESSION_SLOT,
                        partitions,
                        flow_capacity,
                        session_capacity,
                        max_flows_per_session,
                        LOAD_NUM,
                        LOAD_DEN,
                        0,
                        stride,
                        size,
                        seed,
                        0,
                    )
                    head_map[0:8] = MAGIC  # last: a header without magic is no table
                os.rename(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            finally:
                os.close(fd)
            return cls.open(path)
        finally:
            for fd in fds:
                _release_lock(fd)

    @classmethod
    def open(
        cls,
        path: str,
        *,
        partitions: int | None = None,
        flow_capacity: int | None = None,
        session_capacity: int | None = None,
        max_flows_per_session: int | None = None,
    ) -> FlowTable:
        """Attach read-write to an existing table whose layout matches every argument given."""
        mm, size, inode = _map(path, writable=True)
        try:
            layout = _read_layout(mm, size, path)
            wanted = dict(
                partitions=partitions,
                flow_capacity=flow_capacity,
                session_capacity=session_capacity,
                max_flows_per_session=max_flows_per_session,
            )
            diff = [
                f"{k}={getattr(layout, k)} (wanted {v})"
                for k, v in wanted.items()
                if v is not None and getattr(layout, k) != v
            ]
            if diff:
                raise LayoutMismatch(f"{path}: " + ", ".join(diff))
        except BaseException:
            mm.close()
            raise
        return cls(path, mm, layout, inode)

    @staticmethod
    def attach_readonly(path: str) -> TableView:
        """A read-only view of an existing table, for tools: never locks, never writes."""
        mm, size, inode = _map(path, writable=False)
        try:
            layout = _read_layout(mm, size, path)
        except BaseException:
            mm.close()
            raise
        return TableView(path, mm, layout, inode)

    def own(self, partition: int, *, on_move: Callable[[int, int], None] | None = None) -> PartitionWriter:
        """Become the single writer of a partition (flock) and take it over."""
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} out of range [0, {self.partitions})")
        fd = _try_lock(self.path, partition)
        try:
            if self.is_stale():
                raise StaleTable(f"{self.path} was replaced or removed after it was opened: reopen it")
            writer = PartitionWriter(self, partition, fd, on_move)
            writer.takeover()
        except BaseException:
            _release_lock(fd)
            raise
        return writer

    def unlink(self) -> None:
        """Remove the file and its lock files (after close(); only when no process uses it)."""
        if not self.is_stale():
            unlink_table(self.path, self.partitions)


# -- the single writer of a partition -------------------------------------------------------------


class PartitionWriter:
    """The owner of one partition: every write to it goes through here (invariant 1)."""

    def __init__(self, table: FlowTable, partition: int, lock_fd: int, on_move: Callable[[int, int], None] | None) -> None:
        self.table = table
        self.partition = p = partition
        self.on_move = on_move
        self._lock_fd = lock_fd
        self._mm = table._mm
        self._q = table._q
        self._hw = hw = table._hw[p]
        self._scw = hw + P_SC
        self._jw = hw + P_JOURNAL
        self._jimg = (hw << 3) + JOURNAL_OFFSET
        self._fw = table._fw[p]
        self._sw = table._sw[p]
        self._fcap = table.flow_capacity
        self._scap = table.session_capacity
        self._fmask = table._fmask
        self._smask = table._smask
        self._fshift = table._fshift
        self._sshift = table._sshift
        self._seed32 = table._seed32
        self._flimit = table.flow_limit
        self._slimit = table.session_limit
        self._maxper = table.max_flows_per_session
        self._pbits = p << HANDLE_SLOT_BITS
        self._sref = table._sref
        self.last_takeover: TakeoverReport | None = None  # own() runs takeover() first

    def close(self) -> None:
        """Give the partition up (the kernel does the same when the process dies). The writer
        can no longer write after this (invariant 1): its methods raise WriterClosed."""
        if self._lock_fd >= 0:
            self._q = _ClosedWords()  # type: ignore[assignment]
            self._mm = _ClosedWords()  # type: ignore[assignment]
            _release_lock(self._lock_fd)
            self._lock_fd = -1

    @property
    def closed(self) -> bool:
        return self._lock_fd < 0

    def __enter__(self) -> PartitionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- slot write primitives (invariants 2 and 3) ----------------------------------------------

    def _begin(self, off: int) -> None:
        """Journal the slot's image, then make its seq odd."""
        mm = self._mm
        j = self._jimg
        mm[j : j + 128] = mm[off : off + 128]
        q = self._q
        q[self._jw] = off
        si = off >> 3
        q[si] = q[si] + 1

    def _end(self, off: int) -> None:
        """Make the slot's seq even again: the write is visible and complete."""
        si = off >> 3
        q = self._q
        q[si] = q[si] + 1

    # -- probing (the owner reads its own partition without seqlock checks) ----------------------

    def _find(self, key: bytes, t32: int) -> tuple[int, bool]:
        """(slot, found): the key's slot, or the empty slot ending its probe chain."""
        q = self._q
        mm = self._mm
        fw = self._fw
        mask = self._fmask
        i = ((t32 * GOLDEN32) & M32) >> self._fshift
        while True:
            w = fw + (i << 4)
            lo = q[w + 1] & M32
            if not lo:
                return i, False
            if lo == t32:
                off = w << 3
                if mm[off + 24 : off + 60] == key:
                    return i, True
            i = (i + 1) & mask

    def _find_session(self, ufrag: bytes, sref: int) -> tuple[int, int]:
        """(slot, state): state 1 found, 0 empty slot ending the chain, -1 ref collision."""
        q = self._q
        mm = self._mm
        sw = self._sw
        mask = self._smask
        n = len(ufrag)
        i = sref >> self._sshift
        while True:
            w = sw + (i << 4)
            t = q[w + 1]
            if not t:
                return i, 0
            if t == sref:
                off = (w << 3) + S_UFRAG_OFF
                if q[w + SW_INFO] & 0xFF == n and mm[off : off + n] == ufrag:
                    return i, 1
                return i, -1
            i = (i + 1) & mask

    def _session_slot(self, sref: int) -> int:
        """Slot of the session entry with this ref, or -1."""
        q = self._q
        sw = self._sw
        mask = self._smask
        i = sref >> self._sshift
        while True:
            t = q[sw + (i << 4) + 1]
            if t == sref:
                return i
            if not t:
                return -1
            i = (i + 1) & mask

    def _record(self, i: int) -> Flow:
        return self.table._flow_record(self.partition, i, _FLOW_UNPACK(self._mm, (self._fw + (i << 4)) << 3))

    # -- structural changes (invariants 4-7) -------------------------------------------------------

    def _shift_out_flow(self, i: int) -> None:
        """Empty flow slot i by backward-shift deletion. The caller holds `sc` odd."""
        q = self._q
        mm = self._mm
        fw = self._fw
        mask = self._fmask
        shift = self._fshift
        hole = i
        j = (i + 1) & mask
        while True:
            wj = fw + (j << 4)
            tj = q[wj + 1]
            lo = tj & M32
            if not lo:
                break
            home = ((lo * GOLDEN32) & M32) >> shift
            if ((j - home) & mask) >= ((j - hole) & mask):
                hoff = (fw + (hole << 4)) << 3
                joff = wj << 3
                self._begin(hoff)
                mm[hoff + 16 : hoff + 128] = mm[joff + 16 : joff + 128]
                th = q[(hoff >> 3) + 1]
                new = ((((th >> 32) + 1) & M32) << 32) | lo
                q[(hoff >> 3) + 1] = new
                self._end(hoff)
                if self.on_move is not None:
                    self.on_move(
                        ((tj >> 32) << HANDLE_GEN_SHIFT) | self._pbits | j,
                        ((new >> 32) << HANDLE_GEN_SHIFT) | self._pbits | hole,
                    )
                hole = j
            j = (j + 1) & mask
        hoff = (fw + (hole << 4)) << 3
        self._begin(hoff)
        th = q[(hoff >> 3) + 1]
        q[(hoff >> 3) + 1] = (((th >> 32) + 1) & M32) << 32
        mm[hoff + 16 : hoff + 128] = _ZERO112
        self._end(hoff)

    def _shift_out_session(self, i: int) -> None:
        """Empty session slot i by backward-shift deletion. The caller holds `sc` odd."""
        q = self._q
        mm = self._mm
        sw = self._sw
        mask = self._smask
        shift = self._sshift
        hole = i
        j = (i + 1) & mask
        while True:
            wj = sw + (j << 4)
            tj = q[wj + 1]
            if not tj:
                break
            home = tj >> shift
            if ((j - home) & mask) >= ((j - hole) & mask):
                hoff = (sw + (hole << 4)) << 3
                joff = wj << 3
                self._begin(hoff)
                mm[hoff + 16 : hoff + 128] = mm[joff + 16 : joff + 128]
                q[(hoff >> 3) + 1] = tj
                self._end(hoff)
                hole = j
            j = (j + 1) & mask
        hoff = (sw + (hole << 4)) << 3
        self._begin(hoff)
        q[(hoff >> 3) + 1] = 0
        mm[hoff + 16 : hoff + 128] = _ZERO112
        self._end(hoff)

    def _remove_flow(self, i: int) -> None:
        """Delete the flow in slot i and account for it in its session (which may go)."""
        q = self._q
        hw = self._hw
        sref = q[self._fw + (i << 4) + W_SREF]
        q[self._scw] += 1
        self._shift_out_flow(i)
        q[self._scw] += 1
        q[hw + P_FLOWS] -= 1
        q[hw + P_DELETES] += 1
        s = self._session_slot(sref)
        if s < 0:
            return
        w = self._sw + (s << 4)
        info = q[w + SW_INFO]
        if info >> 32 <= 1:
            q[self._scw] += 1
            self._shift_out_session(s)
            q[self._scw] += 1
            q[hw + P_SESSIONS] -= 1
        else:
            off = w << 3
            self._begin(off)
            q[w + SW_INFO] = info - (1 << 32)
            self._end(off)

    # -- operations ------------------------------------------------------------------------------

    def insert(
        self,
        client_ip: bytes,
        client_port: int,
        local_ip: bytes,
        local_port: int,
        target_ip: bytes,
        target_port: int,
        ufrag: bytes,
        now: int,
    ) -> InsertResult:
        """Learn a flow (after the STUN request that names it was authenticated)."""
        if len(ufrag) > MAX_UFRAG:
            self._q[self._hw + P_REFUSED_UFRAG_TOO_LONG] += 1
            return _R_UFRAG_TOO_LONG
        if len(client_ip) != 16 or len(local_ip) != 16 or len(target_ip) != 16 or not ufrag:
            raise ValueError("addresses must be 16 bytes (see shm.layout.ip16) and the ufrag non-empty")
        key = _KEY_PACK(client_ip, local_ip, client_port, local_port)
        t32 = _crc32(key, self._seed32) | 1
        i, found = self._find(key, t32)
        if found:
            return InsertResult(InsertStatus.EXISTS, ((self._q[self._fw + (i << 4) + 1] >> 32) << HANDLE_GEN_SHIFT) | self._pbits | i)
        return self._insert_new(
            i, t32, client_ip, client_port, local_ip, local_port, target_ip, target_port, ufrag, now, now, 0, 0, 0, 0, self.partition, now
        )

    def _insert_new(
        self,
        i: int,
        t32: int,
        cip: bytes,
        cport: int,
        lip: bytes,
        lport: int,
        tip: bytes,
        tport: int,
        ufrag: bytes,
        created: int,
        last_seen: int,
        pkts_in: int,
        bytes_in: int,
        pkts_out: int,
        bytes_out: int,
        origin: int,
        session_created: int,
    ) -> InsertResult:
        q = self._q
        mm = self._mm
        hw = self._hw
        jimg = self._jimg
        jw = self._jw
        if q[hw + P_FLOWS] >= self._flimit:
            q[hw + P_REFUSED_TABLE_FULL] += 1
            return _R_TABLE_FULL
        sref = self._sref(ufrag)
        s, state = self._find_session(ufrag, sref)
        # The session entry first, the flow second: a crash in between leaves a count that
        # takeover's recount repairs, never a flow without its session (invariant 9).
        if state == 1:
            w = self._sw + (s << 4)
            info = q[w + SW_INFO]
            if info >> 32 >= self._maxper:
                q[hw + P_REFUSED_SESSION_FLOW_LIMIT] += 1
                return _R_SESSION_FLOW_LIMIT
            off = w << 3
            mm[jimg : jimg + 128] = mm[off : off + 128]  # _begin, inlined
            q[jw] = off
            q[w] += 1
            q[w + SW_INFO] = info + (1 << 32)
            if last_seen > q[w + SW_LAST_SEEN]:
                q[w + SW_LAST_SEEN] = last_seen
            q[w] += 1  # _end
        else:
            if state < 0 or q[hw + P_SESSIONS] >= self._slimit:
                q[hw + P_REFUSED_SESSION_TABLE_FULL] += 1
                return _R_SESSION_TABLE_FULL
            w = self._sw + (s << 4)
            off = w << 3
            mm[jimg : jimg + 128] = mm[off : off + 128]
            q[jw] = off
            q[w] += 1
            SESSION_BODY.pack_into(mm, off + 16, len(ufrag), tport, 1, tip, session_created, max(last_seen, session_created), ufrag, 0)
            q[w + 1] = sref
            q[w] += 1
            q[hw + P_SESSIONS] += 1
        w = self._fw + (i << 4)
        off = w << 3
        mm[jimg : jimg + 128] = mm[off : off + 128]
        q[jw] = off
        q[w] += 1
        FLOW_BODY.pack_into(
            mm, off + 16, sref, cip, lip, cport, lport, tport, self.partition, origin, tip,
            created, last_seen, pkts_in, bytes_in, pkts_out, bytes_out,
        )  # fmt: skip
        gen = ((q[w + 1] >> 32) + 1) & M32
        q[w + 1] = (gen << 32) | t32
        q[w] += 1
        q[hw + P_FLOWS] += 1
        q[hw + P_INSERTS] += 1
        return _tuple_new(InsertResult, (InsertStatus.OK, (gen << HANDLE_GEN_SHIFT) | self._pbits | i))

    def adopt(self, flow: Flow) -> InsertResult:
        """Copy a flow found in another partition into this one (same key, route, counters,
        created time and session); EXISTS if this partition already has the 5-tuple."""
        if flow.ufrag is None:
            raise ValueError("cannot adopt a flow whose ufrag is unknown (read it again)")
        if len(flow.ufrag) > MAX_UFRAG:
            self._q[self._hw + P_REFUSED_UFRAG_TOO_LONG] += 1
            return _R_UFRAG_TOO_LONG
        key = _KEY_PACK(flow.client_ip, flow.local_ip, flow.client_port, flow.local_port)
        t32 = _crc32(key, self._seed32) | 1
        i, found = self._find(key, t32)
        if found:
            return InsertResult(InsertStatus.EXISTS, ((self._q[self._fw + (i << 4) + 1] >> 32) << HANDLE_GEN_SHIFT) | self._pbits | i)
        session_created = flow.created
        if flow.partition != self.partition and 0 <= flow.partition < self.table.partitions:
            src = self.table._session_in(flow.partition, flow.ufrag, self._sref(flow.ufrag))
            if isinstance(src, Session):
                session_created = min(src.created, flow.created)
        r = self._insert_new(
            i, t32, flow.client_ip, flow.client_port, flow.local_ip, flow.local_port, flow.target_ip, flow.target_port,
            flow.ufrag, flow.created, flow.last_seen, flow.pkts_in, flow.bytes_in, flow.pkts_out, flow.bytes_out,
            flow.origin, session_created,
        )  # fmt: skip
        if r.status is InsertStatus.OK:
            self._q[self._hw + P_ADOPTED] += 1
        return r

    def find(self, client_ip: bytes, client_port: int, local_ip: bytes, local_port: int) -> Flow | None:
        """The flow of a 5-tuple in this partition (exact: nobody else writes it)."""
        key = _KEY_PACK(client_ip, local_ip, client_port, local_port)
        i, found = self._find(key, _crc32(key, self._seed32) | 1)
        return self._record(i) if found else None

    def delete(self, client_ip: bytes, client_port: int, local_ip: bytes, local_port: int) -> Flow | None:
        """Remove a flow by 5-tuple; returns it (None if it was not here)."""
        key = _KEY_PACK(client_ip, local_ip, client_port, local_port)
        i, found = self._find(key, _crc32(key, self._seed32) | 1)
        if not found:
            return None
        flow = self._record(i)
        self._remove_flow(i)
        return flow

    def delete_handle(self, handle: int) -> Flow | None:
        """Remove the flow a handle names (None if the handle is stale or not this partition's)."""
        if (handle >> HANDLE_SLOT_BITS) & HANDLE_PART_MASK != self.partition:
            return None
        i = handle & HANDLE_SLOT_MASK
        if i >= self._fcap:
            return None
        t = self._q[self._fw + (i << 4) + 1]
        if t >> 32 != handle >> HANDLE_GEN_SHIFT or not t & M32:
            return None
        flow = self._record(i)
        self._remove_flow(i)
        return flow

    def _delete_keys(self, slots: list[int]) -> list[Flow]:
        """Delete the flows now in `slots` (by key: deletions move the others)."""
        mm = self._mm
        q = self._q
        keys = []
        for i in slots:
            w = self._fw + (i << 4)
            off = w << 3
            keys.append((mm[off + 24 : off + 60], q[w + 1] & M32))
        removed = []
        for key, t32 in keys:
            i, found = self._find(key, t32)
            if found:
                removed.append(self._record(i))
                self._remove_flow(i)
        return removed

    def _rows(self) -> Any:
        return self.table._flows_rows(self.partition)

    def delete_session(self, ufrag: bytes) -> list[Flow]:
        """Remove every flow of a ufrag in this partition, and its session entry here."""
        if len(ufrag) > MAX_UFRAG or not ufrag:
            return []
        sref = self._sref(ufrag)
        s, state = self._find_session(ufrag, sref)
        if state != 1:
            return []
        rows = self._rows()
        slots = np.flatnonzero((rows[:, W_SREF] == np.uint64(sref)) & ((rows[:, W_TAG] & np.uint64(M32)) != 0)).tolist()
        return self._delete_keys(slots)

    def delete_target(self, target_ip: bytes, target_port: int) -> list[Flow]:
        """Remove every flow routed to a transceiver (e.g. one that stopped heartbeating)."""
        lo, hi = struct.unpack("<QQ", target_ip)
        rows = self._rows()
        match = (
            (rows[:, W_TIP_LO] == np.uint64(lo))
            & (rows[:, W_TIP_HI] == np.uint64(hi))
            & (((rows[:, W_PORTS] >> np.uint64(32)) & np.uint64(0xFFFF)) == np.uint64(target_port))
            & ((rows[:, W_TAG] & np.uint64(M32)) != 0)
        )
        return self._delete_keys(np.flatnonzero(match).tolist())

    def flush_counters(self, handle: int, pkts_in: int, bytes_in: int, pkts_out: int, bytes_out: int, last_seen: int) -> bool:
        """Write a flow's counters (absolute values) and last-seen time; False if the handle is
        stale or not this partition's. Moves the session's last_seen by steps of
        SESSION_TOUCH_MS at most."""
        if (handle >> HANDLE_SLOT_BITS) & HANDLE_PART_MASK != self.partition:
            return False
        i = handle & HANDLE_SLOT_MASK
        if i >= self._fcap:
            return False
        q = self._q
        w = self._fw + (i << 4)
        t = q[w + 1]
        if t >> 32 != handle >> HANDLE_GEN_SHIFT or not t & M32:
            return False
        off = w << 3
        mm = self._mm
        jimg = self._jimg
        mm[jimg : jimg + 128] = mm[off : off + 128]  # _begin, inlined
        q[self._jw] = off
        q[w] += 1
        _COUNTERS_PACK(mm, off + 88, last_seen, pkts_in, bytes_in, pkts_out, bytes_out)
        q[w] += 1  # _end
        # The session's last_seen, at most once per SESSION_TOUCH_MS of progress.
        sref = q[w + W_SREF]
        sw = self._sw
        mask = self._smask
        j = sref >> self._sshift
        while True:
            sw_j = sw + (j << 4)
            tj = q[sw_j + 1]
            if tj == sref:
                if last_seen >= q[sw_j + SW_LAST_SEEN] + SESSION_TOUCH_MS:
                    soff = sw_j << 3
                    self._begin(soff)
                    q[sw_j + SW_LAST_SEEN] = last_seen
                    self._end(soff)
                break
            if not tj:
                break
            j = (j + 1) & mask
        return True

    def sweep(self, now: int, idle_timeout: int, max_slots: int, max_removals: int | None = None) -> list[Flow]:
        """Remove the flows idle for more than `idle_timeout` ms among the next `max_slots`
        slots from the cursor (kept in the partition header), and move the cursor on.
        `max_slots >= flow_capacity` sweeps the whole partition. With `max_removals`, stop
        after that many deletes and leave the cursor on the last slot emptied (a shift may
        have refilled it): the next call goes on from there."""
        cap = self._fcap
        q = self._q
        hw = self._hw
        cursor = q[hw + P_SWEEP_CURSOR] % cap
        n = min(max(max_slots, 0), cap)
        if n == 0:
            return []
        threshold = now - idle_timeout  # expired: last_seen < threshold
        if threshold <= 0:
            q[hw + P_SWEEP_CURSOR] = (cursor + n) % cap
            return []
        rows = self._rows()
        if cursor + n <= cap:
            parts = [(cursor, cursor + n)]
        else:
            parts = [(cursor, cap), (0, cursor + n - cap)]
        limit = np.uint64(threshold)
        removed: list[Flow] = []
        while True:  # again after deletions: a shift may pull an idle flow into the window
            slots: list[int] = []
            for a, b in parts:
                seg = rows[a:b]
                hit = np.flatnonzero(((seg[:, W_TAG] & np.uint64(M32)) != 0) & (seg[:, W_LAST_SEEN] < limit))
                slots.extend((hit + a).tolist())
            if not slots:
                break
            if max_removals is not None and len(removed) + len(slots) >= max_removals:
                slots = slots[: max_removals - len(removed)]
                removed += self._delete_keys(slots)
                q[hw + P_SWEEP_CURSOR] = slots[-1] if slots else cursor
                q[hw + P_EXPIRED] += len(removed)
                return removed
            removed += self._delete_keys(slots)
        q[hw + P_SWEEP_CURSOR] = (cursor + n) % cap
        q[hw + P_EXPIRED] += len(removed)
        return removed

    def flows(self) -> Iterator[Flow]:
        """This partition's flows (do not write while iterating: take a list first)."""
        rows = self._rows()
        for i in np.flatnonzero(rows[:, W_TAG] & np.uint64(M32)).tolist():
            yield self._record(i)

    def sessions(self) -> Iterator[Session]:
        """This partition's session entries."""
        rows = self.table._sessions_rows(self.partition)
        for i in np.flatnonzero(rows[:, W_TAG]).tolist():
            off = (self._sw + (i << 4)) << 3
            yield self.table._session_record(self.partition, SESSION_SLOT_STRUCT.unpack_from(self._mm, off))

    def stats(self) -> dict[str, int]:
        return self.table.partition_totals()[self.partition]

    # -- takeover (invariant 10) -------------------------------------------------------------------

    def takeover(self) -> TakeoverReport:
        """Repair the partition after its previous owner died; idempotent, cheap when clean.

        1. Undo the journaled slot write if it was left odd (invariant 3).
        2. Repair any other odd slot (should not exist: counted in the report).
        3. If a structural change was interrupted (`sc` odd): remove the duplicate a
           backward-shift move leaves (the copy farther from its home), which also
           completes the interrupted deletion.
        4. Recount (invariant 9): drop sessions without flows and flows without a session,
           fix session flow counts, rewrite the header counts.
        `sc` stays odd throughout, so readers answer UNKNOWN rather than a false MISS.
        """
        q = self._q
        hw = self._hw
        sc = q[self._scw]
        interrupted = bool(sc & 1)
        if not interrupted:
            q[self._scw] = sc + 1
        restored = self._restore_journal()
        odd = self._repair_odd_slots()
        dups = self._remove_duplicates() if interrupted or odd else 0
        orphan_flows, orphan_sessions, fixed = self._recount()
        frows = self._rows()
        srows = self.table._sessions_rows(self.partition)
        nflows = int(np.count_nonzero(frows[:, W_TAG] & np.uint64(M32)))
        nsessions = int(np.count_nonzero(srows[:, W_TAG]))
        q[hw + P_FLOWS] = nflows
        q[hw + P_SESSIONS] = nsessions
        q[hw + P_TAKEOVERS] += 1
        q[hw + P_OWNER_PID] = os.getpid()
        q[self._scw] += 1
        self.last_takeover = TakeoverReport(
            self.partition, interrupted, restored, odd, dups, orphan_flows, orphan_sessions, fixed, nflows, nsessions
        )
        return self.last_takeover

    def _restore_journal(self) -> int:
        q = self._q
        mm = self._mm
        off = q[self._jw]
        if not off:
            return 0
        base = self._fw << 3  # flow slots, then session slots, all 128 bytes
        end = (self._sw << 3) + self._scap * SESSION_SLOT
        if not (base <= off < end and (off - base) % 128 == 0):
            q[self._jw] = 0  # not a slot of this partition: ignore
            return 0
        si = off >> 3
        if not q[si] & 1:
            q[self._jw] = 0
            return 0
        j = self._jimg
        image = mm[j : j + 128]
        mm[off + 16 : off + 128] = image[16:]
        q[si + 1] = int.from_bytes(image[8:16], "little")
        q[si] = q[si] + 1  # even: the slot is as it was before the interrupted write
        q[self._jw] = 0
        return 1

    def _repair_odd_slots(self) -> int:
        """Odd slots the journal did not explain: keep a complete-looking entry, else empty it."""
        q = self._q
        mm = self._mm
        repaired = 0
        for rows, w0, is_flow in ((self._rows(), self._fw, True), (self.table._sessions_rows(self.partition), self._sw, False)):
            for i in np.flatnonzero(rows[:, 0] & np.uint64(1)).tolist():
                w = w0 + (i << 4)
                t = q[w + 1]
                if not (t & M32 if is_flow else t):
                    mm[(w << 3) + 16 : (w << 3) + 128] = _ZERO112
                q[w] = q[w] + 1
                repaired += 1
        return repaired

    def _remove_duplicates(self) -> int:
        """Remove the second copy of any key (left by an interrupted backward-shift move)."""
        removed = 0
        while True:
            dup = self._find_duplicate_flow()
            if dup < 0:
                break
            self._shift_out_flow(dup)
            removed += 1
        while True:
            dup = self._find_duplicate_session()
            if dup < 0:
                break
            self._shift_out_session(dup)
            removed += 1
        return removed

    def _find_duplicate_flow(self) -> int:
        """A slot holding the second copy of a flow key (the copy farther from home), or -1."""
        rows = self._rows()
        occ = np.flatnonzero(rows[:, W_TAG] & np.uint64(M32))
        if occ.size < 2:
            return -1
        tags = rows[occ, W_TAG] & np.uint64(M32)
        _, inverse, counts = np.unique(tags, return_inverse=True, return_counts=True)
        shared = np.flatnonzero(counts[inverse] > 1)
        mm = self._mm
        by_key: dict[bytes, list[int]] = {}
        for idx in shared.tolist():
            i = int(occ[idx])
            off = (self._fw + (i << 4)) << 3
            by_key.setdefault(mm[off + 24 : off + 60], []).append(i)
        mask = self._fmask
        for copies in by_key.values():
            if len(copies) > 1:
                t32 = self._q[self._fw + (copies[0] << 4) + 1] & M32
                home = ((t32 * GOLDEN32) & M32) >> self._fshift
                return max(copies, key=lambda i: (i - home) & mask)
        return -1

    def _find_duplicate_session(self) -> int:
        rows = self.table._sessions_rows(self.partition)
        occ = np.flatnonzero(rows[:, W_TAG])
        if occ.size < 2:
            return -1
        tags = rows[occ, W_TAG]
        order = np.argsort(tags, kind="stable")
        st = tags[order]
        same = np.flatnonzero(st[1:] == st[:-1])
        mm = self._mm
        mask = self._smask
        q = self._q
        for k in same.tolist():
            a, b = int(occ[order[k]]), int(occ[order[k + 1]])
            ua = mm[((self._sw + (a << 4)) << 3) + S_UFRAG_OFF : ((self._sw + (a << 4)) << 3) + S_UFRAG_OFF + 64]
            ub = mm[((self._sw + (b << 4)) << 3) + S_UFRAG_OFF : ((self._sw + (b << 4)) << 3) + S_UFRAG_OFF + 64]
            if ua == ub and q[self._sw + (a << 4) + SW_INFO] & 0xFF == q[self._sw + (b << 4) + SW_INFO] & 0xFF:
                home = int(st[k]) >> self._sshift
                return max((a, b), key=lambda i: (i - home) & mask)
        return -1

    def _recount(self) -> tuple[int, int, int]:
        """Make invariant 9 true: (orphan flows removed, orphan sessions removed, counts fixed)."""
        q = self._q
        mm = self._mm
        frows = self._rows()
        srows = self.table._sessions_rows(self.partition)
        focc = np.flatnonzero(frows[:, W_TAG] & np.uint64(M32))
        socc = np.flatnonzero(srows[:, W_TAG])
        frefs = frows[focc, W_SREF]
        stags = srows[socc, W_TAG]
        # flows whose session entry is missing
        orphan_mask = ~np.isin(frefs, stags)
        orphan_flows = 0
        if orphan_mask.any():
            keys = []
            for i in focc[orphan_mask].tolist():
                w = self._fw + (i << 4)
                keys.append((mm[(w << 3) + 24 : (w << 3) + 60], q[w + 1] & M32))
            for key, t32 in keys:
                i, found = self._find(key, t32)
                if found:
                    self._shift_out_flow(i)
                    orphan_flows += 1
            focc = np.flatnonzero(frows[:, W_TAG] & np.uint64(M32))
            frefs = frows[focc, W_SREF]
        # expected flow count of every session entry
        uniq, counts = np.unique(frefs, return_counts=True)
        if uniq.size:
            pos = np.minimum(np.searchsorted(uniq, stags), uniq.size - 1)
            expected = np.where(uniq[pos] == stags, counts[pos], 0).astype(np.int64)
        else:
            expected = np.zeros(stags.shape, dtype=np.int64)
        have = (srows[socc, SW_INFO] >> np.uint64(32)).astype(np.int64)
        orphan_refs = stags[expected == 0].tolist()
        wrong = np.flatnonzero((expected != 0) & (have != expected))
        fixes = [(int(stags[k]), int(expected[k])) for k in wrong.tolist()]
        for sref in orphan_refs:
            s = self._session_slot(sref)
            if s >= 0:
                self._shift_out_session(s)
        for sref, n in fixes:
            s = self._session_slot(sref)
            if s >= 0:
                w = self._sw + (s << 4)
                off = w << 3
                self._begin(off)
                q[w + SW_INFO] = (q[w + SW_INFO] & M32) | (n << 32)
                self._end(off)
        return orphan_flows, len(orphan_refs), len(fixes)
