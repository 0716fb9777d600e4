"""The single writer's hold on one partition (invariant 1), and the slot-level steps every
write is made of: a journaled, seqlocked slot write (invariants 2 and 3), the owner's own
probes, and backward-shift deletion (invariants 4-7), written once for both kinds of slot."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Self

from shm.layout import (
    FLOW_SLOT_STRUCT,
    GOLDEN32,
    HANDLE_GEN_SHIFT,
    HANDLE_SLOT_BITS,
    JOURNAL_OFFSET,
    M32,
    P_JOURNAL,
    P_SC,
    S_UFRAG_OFF,
    SW_INFO,
)
from shm.records import Flow, TakeoverReport, WriterClosed
from shm.tablefile import release_lock

if TYPE_CHECKING:
    from shm.table import FlowTable

M64 = (1 << 64) - 1
ZERO_BODY = bytes(112)  # a slot's body: everything after its seq and tag words
_FLOW_UNPACK = FLOW_SLOT_STRUCT.unpack_from


class SlotKind(NamedTuple):
    """What probing and backward-shift deletion need to know of one kind of slot."""

    base: int  # word index of slot 0 in the partition
    mask: int  # capacity - 1
    key_bits: int  # the tag bits holding the key's hash; all zero there: an empty slot
    home_mul: int  # home slot: ((key * home_mul) & key_bits) >> home_shift
    home_shift: int
    generations: bool  # the tag's high half counts the slot's writes (flow handles name it)


class _ClosedWords:
    """Stands in for a closed writer's views of the table: any access raises WriterClosed."""

    def _refuse(self, *_: object) -> Any:
        raise WriterClosed("this partition writer was closed (it no longer owns the partition)")

    __getitem__ = __setitem__ = __len__ = _refuse


class PartitionOwner:
    """The owner of one partition: its lock, its words, and the slot write primitives."""

    def __init__(self, table: FlowTable, partition: int, lock_fd: int,
                 on_move: Callable[[int, int], None] | None) -> None:
        self.table = table
        self.partition = p = partition
        # on_move(old_handle, new_handle): a deletion shifted a flow to another slot.
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
        # A flow's home is Fibonacci hashing of its 32-bit tag; a session's, its ref's top bits.
        self._flow_slots = SlotKind(self._fw, self._fmask, M32, GOLDEN32, self._fshift, True)
        self._session_slots = SlotKind(self._sw, self._smask, M64, 1, self._sshift, False)
        self.last_takeover: TakeoverReport | None = None  # own() runs takeover() first

    def close(self) -> None:
        """Give the partition up (the kernel does the same when the process dies). The writer
        can no longer write after this (invariant 1): its methods raise WriterClosed."""
        if self._lock_fd >= 0:
            self._q = _ClosedWords()  # type: ignore[assignment]
            self._mm = _ClosedWords()  # type: ignore[assignment]
            release_lock(self._lock_fd)
            self._lock_fd = -1

    @property
    def closed(self) -> bool:
        return self._lock_fd < 0

    def __enter__(self) -> Self:
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

    def _rows(self) -> Any:
        """This partition's flow slots as a (capacity, 16) uint64 array (a view, not a copy)."""
        return self.table._flows_rows(self.partition)

    def _session_rows(self) -> Any:
        return self.table._sessions_rows(self.partition)

    # -- backward-shift deletion (invariants 4-7) --------------------------------------------------

    def _shift_out(self, kind: SlotKind, i: int) -> None:
        """Empty slot i (flow or session, per `kind`) by backward-shift deletion: each later
        entry of the run whose home allows it moves back into the hole, so no probe chain gets
        a gap. A flow slot written takes its next generation, and a moved flow's handle change
        goes to on_move. The caller holds `sc` odd."""
        q = self._q
        mm = self._mm
        base, mask, key_bits, mul, shift, generations = kind  # one unpack: cheaper than 6 attributes
        hole = i
        j = (i + 1) & mask
        while True:
            wj = base + (j << 4)
            tj = q[wj + 1]
            key = tj & key_bits
            if not key:
                break
            home = ((key * mul) & key_bits) >> shift
            if ((j - home) & mask) >= ((j - hole) & mask):
                hoff = (base + (hole << 4)) << 3
                joff = wj << 3
                self._begin(hoff)
                mm[hoff + 16 : hoff + 128] = mm[joff + 16 : joff + 128]
                new = (((((q[(hoff >> 3) + 1] >> 32) + 1) & M32) << 32) | key) if generations else key
                q[(hoff >> 3) + 1] = new
                self._end(hoff)
                if generations and self.on_move is not None:
                    self.on_move(
                        ((tj >> 32) << HANDLE_GEN_SHIFT) | self._pbits | j,
                        ((new >> 32) << HANDLE_GEN_SHIFT) | self._pbits | hole,
                    )
                hole = j
            j = (j + 1) & mask
        hoff = (base + (hole << 4)) << 3
        self._begin(hoff)
        q[(hoff >> 3) + 1] = ((((q[(hoff >> 3) + 1] >> 32) + 1) & M32) << 32) if generations else 0
        mm[hoff + 16 : hoff + 128] = ZERO_BODY
        self._end(hoff)
