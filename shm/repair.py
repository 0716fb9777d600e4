"""Takeover (invariant 10): the next owner of a partition repairs what a killed writer left —
the journaled slot, odd slots, the duplicate of an interrupted move, the session counts."""
from __future__ import annotations

import os

import numpy as np

from shm.layout import (
    M32,
    P_FLOWS,
    P_OWNER_PID,
    P_SESSIONS,
    P_TAKEOVERS,
    S_UFRAG_OFF,
    SESSION_SLOT,
    SW_INFO,
    W_SREF,
    W_TAG,
    flow_home,
)
from shm.owner import ZERO_BODY, PartitionOwner
from shm.records import TakeoverReport


class PartitionRepair(PartitionOwner):
    """A partition owner's takeover and the repairs it is made of (all idempotent)."""

    def takeover(self) -> TakeoverReport:
        """Repair the partition after its previous owner died (own() runs it first); idempotent,
        cheap when clean.

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
        srows = self._session_rows()
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
        for kind, rows in ((self._flow_slots, self._rows()), (self._session_slots, self._session_rows())):
            for i in np.flatnonzero(rows[:, 0] & np.uint64(1)).tolist():
                w = kind.base + (i << 4)
                if not q[w + 1] & kind.key_bits:
                    mm[(w << 3) + 16 : (w << 3) + 128] = ZERO_BODY
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
            self._shift_out(self._flow_slots, dup)
            removed += 1
        while True:
            dup = self._find_duplicate_session()
            if dup < 0:
                break
            self._shift_out(self._session_slots, dup)
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
                home = flow_home(t32, self._fshift)
                return max(copies, key=lambda i: (i - home) & mask)
        return -1

    def _find_duplicate_session(self) -> int:
        rows = self._session_rows()
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
        srows = self._session_rows()
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
                    self._shift_out(self._flow_slots, i)
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
                self._shift_out(self._session_slots, s)
        for sref, n in fixes:
            s = self._session_slot(sref)
            if s >= 0:
                w = self._sw + (s << 4)
                off = w << 3
                self._begin(off)
                q[w + SW_INFO] = (q[w + SW_INFO] & M32) | (n << 32)
                self._end(off)
        return orphan_flows, len(orphan_refs), len(fixes)
