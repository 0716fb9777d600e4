"""Closed sessions: which ufrags must open no flow again, for as long as their token lives.

A session that ended (DELETE, hang-up, connect timeout, ICE restart) still has clients that
send Binding Requests with its ufrag: a browser's next consent check, or anyone replaying a
captured one. The route token is valid until ``token_max_age``, so without a record the relay
would learn a flow for the dead session again. Each partition keeps a set of closed session
refs with the time each entry stops mattering (the token's issue time + ``token_max_age``:
after that the token is refused as too old anyway). Being in shm, the set survives a worker
crash and a relay restart that reopens the table.

The set is open addressing over CLOSED_SLOT-byte slots with these rules, which need neither a
lock nor a seqlock (one writer per partition, readers anywhere):

- A slot, once used, is never emptied: an expired entry is *reused* in place. So a probe can
  stop at the first never-used slot (tag 0): an insert takes the first never-used or expired
  slot of its window, so nothing is stored past a never-used one.
- Inserts and lookups look at most PROBE_WINDOW slots from the home slot; an insert that finds
  no room there is refused (the caller counts it).
- The writer stores ``until`` before ``tag`` (aligned 8-byte stores, in order on x86-64). A
  reader that meets the new tag sees its new ``until``; one that meets the old tag with the new
  ``until`` judges a session that had expired as closed a moment longer: harmless.
"""

from __future__ import annotations

from shm.layout import CLOSED_SLOT

__all__ = ["PROBE_WINDOW", "closed_until", "record_closed"]

PROBE_WINDOW = 32
_SLOT_WORDS = CLOSED_SLOT // 8


def closed_until(q: memoryview, base: int, capacity: int, sref: int, now_ms: int) -> int:
    """The entry's ``until`` (unix ms) if ``sref`` is closed at ``now_ms``, else 0.

    ``q``: the table as 8-byte words; ``base``: word index of closed slot 0 of a partition."""
    mask = capacity - 1
    i = (sref >> 1) & mask  # (bit 0 of a ref is always 1)
    for _ in range(min(PROBE_WINDOW, capacity)):
        w = base + i * _SLOT_WORDS
        tag = q[w + 1]
        if tag == 0:
            return 0
        if tag == sref:
            until = q[w]
            return until if until >= now_ms else 0
        i = (i + 1) & mask
    return 0


def record_closed(q: memoryview, base: int, capacity: int, sref: int, until_ms: int, now_ms: int) -> bool:
    """Record ``sref`` as closed until ``until_ms`` (the single writer of the partition).
    Idempotent: a present entry keeps the later ``until``. False: no room in the window."""
    mask = capacity - 1
    i = (sref >> 1) & mask  # (bit 0 of a ref is always 1)
    free = -1
    for _ in range(min(PROBE_WINDOW, capacity)):
        w = base + i * _SLOT_WORDS
        tag = q[w + 1]
        if tag == sref:
            if until_ms > q[w]:
                q[w] = until_ms
            return True
        if free < 0 and (tag == 0 or q[w] < now_ms):
            free = w
        if tag == 0:
            break  # nothing is stored past a never-used slot
        i = (i + 1) & mask
    if free < 0:
        return False
    q[free] = until_ms
    q[free + 1] = sref
    return True
