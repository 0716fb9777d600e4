"""The single writer of a partition (invariant 1): insert, adopt, delete, counter flushes and
the idle sweep. Every operation is idempotent (invariant 10), so the next owner's takeover
plus a retry completes one its predecessor died in."""
from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import numpy as np

from shm.closed import record_closed
from shm.layout import (
    FLOW_BODY,
    FLOW_COUNTERS,
    FLOW_KEY,
    HANDLE_GEN_SHIFT,
    HANDLE_PART_MASK,
    HANDLE_SLOT_BITS,
    HANDLE_SLOT_MASK,
    M32,
    MAX_UFRAG,
    P_ADOPTED,
    P_CLOSED,
    P_DELETES,
    P_EXPIRED,
    P_FLOWS,
    P_INSERTS,
    P_REFUSED_SESSION_FLOW_LIMIT,
    P_REFUSED_SESSION_TABLE_FULL,
    P_REFUSED_TABLE_FULL,
    P_REFUSED_UFRAG_TOO_LONG,
    P_SESSIONS,
    P_SWEEP_CURSOR,
    SESSION_BODY,
    SESSION_SLOT_STRUCT,
    SW_INFO,
    SW_LAST_SEEN,
    W_LAST_SEEN,
    W_PORTS,
    W_SREF,
    W_TAG,
    W_TIP_HI,
    W_TIP_LO,
)
from shm.records import Flow, InsertResult, InsertStatus, Session, WriterClosed
from shm.repair import PartitionRepair

SESSION_TOUCH_MS = 1000  # a flush moves its session's last_seen only when it gains this much

# Module-level aliases: a global name is one lookup, an attribute chain is several.
_KEY_PACK = FLOW_KEY.pack
_crc32 = zlib.crc32
_tuple_new = tuple.__new__
_COUNTERS_PACK = FLOW_COUNTERS.pack_into

_R_TABLE_FULL = InsertResult(InsertStatus.TABLE_FULL)
_R_SESSION_TABLE_FULL = InsertResult(InsertStatus.SESSION_TABLE_FULL)
_R_SESSION_FLOW_LIMIT = InsertResult(InsertStatus.SESSION_FLOW_LIMIT)
_R_UFRAG_TOO_LONG = InsertResult(InsertStatus.UFRAG_TOO_LONG)


class PartitionWriter(PartitionRepair):
    """The owner of one partition: every write to it goes through here (invariant 1).

    Got from `FlowTable.own(partition, on_move=...)`, which has already run takeover() (its
    report: `last_takeover`). Times are int ms, addresses 16 bytes, a ufrag 1..64 bytes.
    """

    def _remove_flow(self, i: int) -> None:
        """Delete the flow in slot i and account for it in its session (which may go)."""
        q = self._q
        hw = self._hw
        sref = q[self._fw + (i << 4) + W_SREF]
        q[self._scw] += 1
        self._shift_out(self._flow_slots, i)
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
            self._shift_out(self._session_slots, s)
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
            return InsertResult(InsertStatus.EXISTS,
                                ((self._q[self._fw + (i << 4) + 1] >> 32) << HANDLE_GEN_SHIFT) | self._pbits | i)
        return self._insert_new(
            i, t32, client_ip, client_port, local_ip, local_port, target_ip, target_port, ufrag, now, now, 0, 0, 0, 0,
            self.partition, now,
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
            SESSION_BODY.pack_into(mm, off + 16, len(ufrag), tport, 1, tip, session_created,
                                   max(last_seen, session_created), ufrag, 0)
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
            return InsertResult(InsertStatus.EXISTS,
                                ((self._q[self._fw + (i << 4) + 1] >> 32) << HANDLE_GEN_SHIFT) | self._pbits | i)
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

    @property
    def flow_count(self) -> int:
        """The partition's live flows (its header's count)."""
        return self._q[self._hw + P_FLOWS]

    def delete_handle(self, handle: int, expired: bool = False) -> Flow | None:
        """Remove the flow a handle names (None if the handle is stale or not this partition's);
        ``expired``: it idled out (counted with the sweep's)."""
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
        if expired:
            self._q[self._hw + P_EXPIRED] += 1
        return flow

    def record_closed(self, ufrag: bytes, until_ms: int, now_ms: int) -> bool:
        """Remember that ``ufrag``'s session ended: it opens no flow until ``until_ms``
        (shm/closed.py). False: no room near its home slot (the caller counts it)."""
        table = self.table
        done = record_closed(self._q, table._cw[self.partition], self._scap, self._sref(ufrag), until_ms, now_ms)
        if done:
            self._q[self._hw + P_CLOSED] += 1
        return done

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


    def delete_session(self, ufrag: bytes) -> list[Flow]:
        """Remove every flow of a ufrag in this partition, and its session entry here."""
        if len(ufrag) > MAX_UFRAG or not ufrag:
            return []
        sref = self._sref(ufrag)
        _slot, state = self._find_session(ufrag, sref)
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

    def flush_counters(self, handle: int, pkts_in: int, bytes_in: int, pkts_out: int, bytes_out: int,
                       last_seen: int) -> bool:
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

    def flush_layout(self) -> dict[str, int]:
        """Where flush_counters writes, for its C twin (relay._counter_flush.CounterFlush):
        word indexes into the table (the journal image's: a byte offset) and the handle's bits."""
        return {"partition": self.partition, "fw": self._fw, "sw": self._sw, "fcap": self._fcap,
                "smask": self._smask, "sshift": self._sshift, "jw": self._jw, "jimg": self._jimg,
                "slot_bits": HANDLE_SLOT_BITS, "part_mask": HANDLE_PART_MASK, "gen_shift": HANDLE_GEN_SHIFT,
                "touch_ms": SESSION_TOUCH_MS}

    @property
    def table_buffer(self) -> object:
        """The table's writable memory, for writes in C (WriterClosed once the writer is closed)."""
        if self.closed:
            raise WriterClosed("this partition writer was closed (it no longer owns the partition)")
        return self._mm

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
        parts = [(cursor, cursor + n)] if cursor + n <= cap else [(cursor, cap), (0, cursor + n - cap)]
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
        rows = self._session_rows()
        for i in np.flatnonzero(rows[:, W_TAG]).tolist():
            off = (self._sw + (i << 4)) << 3
            yield self.table._session_record(self.partition, SESSION_SLOT_STRUCT.unpack_from(self._mm, off))

    def stats(self) -> dict[str, int]:
        """This partition's header figures (see TableScanner.partition_totals)."""
        return self.table.partition_totals()[self.partition]
