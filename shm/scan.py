"""Whole-partition reads of the flow table: listings of flows and sessions, the header
figures, and the invariants check (tests, the stress test, tools). Lock-free like the point
reads; a listing retries until a pass saw no structural change."""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from shm.layout import (
    M32,
    P_ADOPTED,
    P_DELETES,
    P_EXPIRED,
    P_FLOWS,
    P_INSERTS,
    P_OWNER_PID,
    P_REFUSED_SESSION_FLOW_LIMIT,
    P_REFUSED_SESSION_TABLE_FULL,
    P_REFUSED_TABLE_FULL,
    P_REFUSED_UFRAG_TOO_LONG,
    P_SC,
    P_SESSIONS,
    P_TAKEOVERS,
    S_UFRAG_OFF,
    SW_INFO,
    W_SREF,
    W_TAG,
    flow_home,
    flow_tag32,
    make_handle,
)
from shm.reader import TableReader
from shm.records import Flow, Session, aggregate_sessions

SCAN_RETRIES = 4  # whole-partition scans until one saw no structural change


class TableScanner(TableReader):
    """The point reads plus whole-partition scans, figures and the invariants check."""

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
            yield aggregate_sessions(entries)

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
        out = {"partitions": self.partitions, "flow_capacity": self.flow_capacity,
               "session_capacity": self.session_capacity}
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
                if flow_tag32(key, self._seed32) != t32:
                    problems.append(f"I4: partition {p}: flow slot {i} tag does not match its key")
                home = flow_home(t32, self._fshift)
                j = home
                while j != i:
                    if not q[self._fw[p] + (j << 4) + 1] & M32:
                        problems.append(f"I4: partition {p}: flow slot {i} unreachable "
                                        f"(empty slot {j} after home {home})")
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
                    f"I9: partition {p}: header counts {q[h + P_FLOWS]}/{q[h + P_SESSIONS]}, "
                    f"slots {len(focc)}/{len(socc)}"
                )
            if len(focc) > self.flow_limit or len(socc) > self.session_limit:
                problems.append(f"I8: partition {p}: {len(focc)} flows / {len(socc)} sessions exceed the load cap")
        return problems
