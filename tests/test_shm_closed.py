"""shm/closed.py: closed sessions in the table, seen from every process, bounded, expiring."""

from __future__ import annotations

import random

import pytest
from test_shm_support import remove_table_files, tmp_table_path

from shm import FlowTable
from shm.closed import PROBE_WINDOW, closed_until, record_closed

NOW = 1_750_000_000_000


def test_record_and_look_up_across_partitions() -> None:
    path = tmp_table_path()  # /dev/shm, as the relay's
    table = FlowTable.create(path, partitions=2, flow_capacity=64, session_capacity=64, max_flows_per_session=8)
    try:
        w1 = table.own(1)
        assert table.session_closed(b"ufrag-a", NOW) == 0
        assert w1.record_closed(b"ufrag-a", NOW + 300_000, NOW)
        view = FlowTable.attach_readonly(path)  # another process's view: no lock, no write
        assert view.session_closed(b"ufrag-a", NOW + 1) == NOW + 300_000
        assert view.session_closed(b"ufrag-b", NOW + 1) == 0
        assert view.session_closed(b"ufrag-a", NOW + 300_001) == 0  # its token is too old now anyway
        assert w1.record_closed(b"ufrag-a", NOW + 100, NOW)  # idempotent: the later until stays
        assert view.session_closed(b"ufrag-a", NOW + 200) == NOW + 300_000
        view.close()
        w1.close()
        # A new owner (a worker restarted after a crash) sees what the old one wrote.
        table.close()
        reopened = FlowTable.open(path, partitions=2, flow_capacity=64, session_capacity=64, max_flows_per_session=8)
        assert reopened.session_closed(b"ufrag-a", NOW + 1) == NOW + 300_000
        reopened.close()
    finally:
        remove_table_files(path)


def _words(capacity: int) -> memoryview:
    return memoryview(bytearray(capacity * 16)).cast("Q")


def test_expired_entries_are_reused_and_never_hide_live_ones() -> None:
    capacity = 64
    q = _words(capacity)
    rng = random.Random(5)
    live: dict[int, int] = {}
    now = NOW
    for step in range(5_000):
        now += rng.randint(0, 40)
        sref = rng.getrandbits(63) << 1 | 1
        until = now + rng.randint(100, 2_000)
        if record_closed(q, 0, capacity, sref, until, now):
            live[sref] = until
        live = {k: v for k, v in live.items() if v >= now}
        if step % 50 == 0:
            for k, v in live.items():
                assert closed_until(q, 0, capacity, k, now) == v
    assert len(live) > capacity // 2  # the table stayed useful, not clogged by the expired


def test_a_full_window_refuses_and_keeps_the_others() -> None:
    capacity = 64
    q = _words(capacity)
    same_home = [((i * capacity) << 1) | 1 for i in range(PROBE_WINDOW + 1)]  # all home at slot 0
    for sref in same_home[:PROBE_WINDOW]:
        assert record_closed(q, 0, capacity, sref, NOW + 1000, NOW)
    assert not record_closed(q, 0, capacity, same_home[-1], NOW + 1000, NOW)
    assert all(closed_until(q, 0, capacity, s, NOW) == NOW + 1000 for s in same_home[:PROBE_WINDOW])


@pytest.mark.parametrize("capacity", [4, 8])
def test_windows_larger_than_small_tables(capacity: int) -> None:
    q = _words(capacity)
    srefs = [(i << 1) | 1 for i in range(capacity + 2)]
    stored = [s for s in srefs if record_closed(q, 0, capacity, s, NOW + 5, NOW)]
    assert len(stored) == capacity
    assert all(closed_until(q, 0, capacity, s, NOW) for s in stored)
