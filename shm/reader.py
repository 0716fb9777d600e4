"""Point reads of the flow table, lock-free from any process: lookups by 5-tuple, by handle,
sessions by ufrag. Every answer is a seqlock-checked copy (invariant 2); a MISS is vouched for
by an even, unchanged structure counter (invariant 6). These are the relay's hot read paths:
they are written for the interpreter (local aliases, 8- and 4-byte word loads, no calls per
probe step), measured by bench/shm.py."""
from __future__ import annotations

import mmap
import os
import struct
import zlib
from typing import Any, Self

import numpy as np

from shm.closed import closed_until
from shm.layout import (
    FLOW_KEY,
    FLOW_SLOT,
    FLOW_SLOT_STRUCT,
    GOLDEN32,
    HANDLE_GEN_SHIFT,
    HANDLE_PART_MASK,
    HANDLE_SLOT_BITS,
    HANDLE_SLOT_MASK,
    HEADER_SIZE,
    M32,
    MAX_UFRAG,
    P_SC,
    PART_HEADER_SIZE,
    S_UFRAG_OFF,
    SESSION_SLOT,
    SESSION_SLOT_STRUCT,
    SW_INFO,
    W_LAST_SEEN,
    W_TAG,
    W_TIP_HI,
    load_limit,
    session_ref,
)
from shm.records import MISS, UNKNOWN, Flow, Layout, Lookup, Session, aggregate_sessions

READ_RETRIES = 32  # probe attempts before a reader answers UNKNOWN
SLOT_SPINS = 64  # reads of an odd seq before an attempt is abandoned
UFRAG_CACHE_MAX = 4096  # session ref -> ufrag entries a table object keeps (small: a dict resize is O(n))
YIELD_AFTER = 4  # attempts after which a reader yields the CPU between attempts

# Module-level aliases: a global name is one lookup, an attribute chain is several.
_KEY_PACK = FLOW_KEY.pack
_crc32 = zlib.crc32
_FLOW_UNPACK = FLOW_SLOT_STRUCT.unpack_from


class TableReader:
    """Lock-free reads of any partition: seqlock-checked copies, structure-counter misses.

    Addresses are 16 bytes (`shm.layout.ip16()`), ports ints, a ufrag 1..64 bytes.
    """

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
        self._cw = [sw + ((scap * SESSION_SLOT) >> 3) for sw in self._sw]  # closed slot 0
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

    def __enter__(self) -> Self:
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

    def session_closed(self, ufrag: bytes, now_ms: int) -> int:
        """Unix ms until which ``ufrag`` stays closed (in any partition), 0 when it is not."""
        sref = self._sref(ufrag)
        q, scap = self._q, self.session_capacity
        return max(closed_until(q, cw, scap, sref, now_ms) for cw in self._cw)

    def _flows_rows(self, p: int) -> Any:
        w = self._fw[p]
        return self._np[w : w + self.flow_capacity * 16].reshape(self.flow_capacity, 16)

    def flow_identities(self, p: int) -> Any:
        """Words 1-9 of every flow slot of partition p, copied (an array of (capacity, 9)): tag
        with its generation, session ref, key, ports, target. A slot whose words did not change
        holds the same flow under the same handle; words 11-15 (last seen, counters) move."""
        return self._flows_rows(p)[:, W_TAG : W_TIP_HI + 1].copy()

    def flow_counters(self, p: int) -> Any:
        """pkts_in, bytes_in, pkts_out, bytes_out of every flow slot of partition p, copied."""
        return self._flows_rows(p)[:, W_LAST_SEEN + 1 : W_LAST_SEEN + 5].copy()

    def flow_at(self, p: int, i: int) -> Flow | None:
        """Slot i of partition p (a seqlock-checked read): None when it is empty or its writer
        kept it busy."""
        t = self._copy_flow((self._fw[p] + (i << 4)) << 3)
        if t is None or not t[1] & M32:
            return None
        return self._flow_record(p, i, t)

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
        """The flow of a 5-tuple in any partition: Flow (from any of them), MISS (in none) or
        UNKNOWN: none had it and some partition could not answer within READ_RETRIES (its
        writer kept restructuring, or died mid-deletion and was not taken over yet)."""
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
        """The flow a handle names, in O(1) without hashing; None when the handle is stale (slot
        emptied, or reused / moved: generation changed) or, very rarely, when its slot could not
        be read consistently."""
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

    def _session_entries(self, ufrag: bytes, skip: int | None = None) -> list[Session]:
        """The session's entry in each partition that has one (but ``skip``)."""
        if len(ufrag) > MAX_UFRAG:
            return []
        sref = self._sref(ufrag)
        found = (self._session_in(p, ufrag, sref) for p in range(self.partitions) if p != skip)
        return [r for r in found if isinstance(r, Session)]

    def session_flows_elsewhere(self, ufrag: bytes, partition: int) -> int:
        """The flows of ``ufrag`` in every partition but ``partition`` (its writer knows its
        own): the relay-wide max_flows_per_session check of a learning, one read fewer."""
        return sum(s.flows for s in self._session_entries(ufrag, skip=partition))

    def session(self, ufrag: bytes) -> Session | None:
        """A session aggregated over all partitions (None if no partition has a flow of it)."""
        entries = self._session_entries(ufrag)
        return aggregate_sessions(entries) if entries else None
