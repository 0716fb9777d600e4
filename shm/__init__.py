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
package never reads a clock. All processes of a relay must use the same clock, e.g.
`time.monotonic_ns() // 1_000_000` (system-wide on Linux; /dev/shm does not survive a reboot
either).

Modules
-------
`layout` the byte layout and hashes; `tablefile` the file, its header and the partition locks;
`records` errors, results and records; `reader` point reads (lookups: the hot path) and
`scan` whole-partition reads, figures and the invariants check; `table` the attachments
(FlowTable, TableView); `owner` a partition owner's slot primitives and backward-shift delete;
`repair` takeover; `writer` the partition writer's operations; `counters` the per-worker
counter rows (a separate file). Importers use the names below: `from shm import FlowTable`.
"""
from __future__ import annotations

from shm.records import (
    MISS,
    UNKNOWN,
    Flow,
    InsertResult,
    InsertStatus,
    LayoutMismatch,
    Lookup,
    NoSpace,
    PartitionBusy,
    Session,
    ShmError,
    StaleTable,
    TakeoverReport,
    WriterClosed,
)
from shm.table import FlowTable, TableView
from shm.tablefile import unlink_table
from shm.writer import PartitionWriter

__all__ = [
    "MISS",
    "UNKNOWN",
    "Flow",
    "FlowTable",
    "InsertResult",
    "InsertStatus",
    "LayoutMismatch",
    "Lookup",
    "NoSpace",
    "PartitionBusy",
    "PartitionWriter",
    "Session",
    "ShmError",
    "StaleTable",
    "TableView",
    "TakeoverReport",
    "WriterClosed",
    "unlink_table",
]
