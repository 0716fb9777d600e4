"""Unit tests of the shared-memory flow table (shm/): every operation, the layout,
and crash recovery at every store of an operation. One process; see test_shm_procs.py and
test_shm_stress.py for the multi-process tests."""
from __future__ import annotations

import os
import random

import pytest
from test_shm_support import (  # noqa: F401  (shm_path is a fixture)
    LOCAL4,
    TARGET_A,
    TARGET_B,
    crash_during,
    key,
    shm_path,
    state,
)

from shm import (
    MISS,
    UNKNOWN,
    Flow,
    FlowTable,
    InsertStatus,
    LayoutMismatch,
    PartitionBusy,
    PartitionWriter,
    Session,
    StaleTable,
    WriterClosed,
)
from shm.layout import (
    HEADER_SIZE,
    MAX_UFRAG,
    P_SC,
    file_size,
    ip16,
    ip_str,
    make_handle,
    split_handle,
)


def small(path: str, **kw) -> FlowTable:
    args = dict(partitions=2, flow_capacity=8, session_capacity=8, max_flows_per_session=8, seed=42)
    args.update(kw)
    return FlowTable.create(path, **args)


# -- layout -----------------------------------------------------------------------------------------


def test_create_open_and_layout_mismatch(shm_path: str) -> None:
    t = FlowTable.create(shm_path, partitions=3, flow_capacity=16, session_capacity=8, max_flows_per_session=4, seed=7)
    assert os.path.getsize(shm_path) == file_size(3, 16, 8)
    assert (t.partitions, t.flow_capacity, t.session_capacity, t.max_flows_per_session) == (3, 16, 8, 4)
    assert t.flow_limit == 12 and t.session_limit == 6
    t.close()
    same = FlowTable.open(shm_path, partitions=3, flow_capacity=16, session_capacity=8, max_flows_per_session=4)
    assert same.layout.seed == 7
    same.close()
    for wrong in (dict(partitions=2), dict(flow_capacity=32), dict(session_capacity=16), dict(max_flows_per_session=8)):
        with pytest.raises(LayoutMismatch):
            FlowTable.open(shm_path, **wrong)


def test_foreign_truncated_and_other_version_files_are_refused(shm_path: str) -> None:
    with open(shm_path, "wb") as f:
        f.write(os.urandom(4096))
    with pytest.raises(LayoutMismatch, match="not a flow table"):
        FlowTable.open(shm_path)
    with pytest.raises(LayoutMismatch):
        FlowTable.attach_readonly(shm_path)
    small(shm_path).close()
    with open(shm_path, "r+b") as f:  # truncated: sizes no longer add up
        f.truncate(HEADER_SIZE + 1024)
    with pytest.raises(LayoutMismatch, match="sizes"):
        FlowTable.open(shm_path)
    small(shm_path).close()
    with open(shm_path, "r+b") as f:  # a future layout version
        f.seek(8)
        f.write((99).to_bytes(4, "little"))
    with pytest.raises(LayoutMismatch, match="version=99"):
        FlowTable.open(shm_path)
    with pytest.raises(LayoutMismatch):
        FlowTable.attach_readonly(shm_path)


def test_bad_arguments(shm_path: str) -> None:
    with pytest.raises(ValueError):
        FlowTable.create(shm_path, partitions=1, flow_capacity=12, session_capacity=8)
    with pytest.raises(ValueError):
        FlowTable.create(shm_path, partitions=0, flow_capacity=8, session_capacity=8)
    with pytest.raises(ValueError):
        FlowTable.create(shm_path, partitions=1, flow_capacity=8, session_capacity=1 << 24)
    t = small(shm_path)
    with pytest.raises(ValueError):
        t.own(2)
    w = t.own(0)
    with pytest.raises(ValueError):
        w.insert(b"\x01\x02\x03\x04", 1, LOCAL4, 3478, TARGET_A, 9000, b"u", 0)  # not ip16
    w.close()
    t.close()


def test_table_survives_close_and_reopen(shm_path: str) -> None:
    t = small(shm_path)
    w = t.own(1)
    h = w.insert(*key(1), TARGET_A, 9000, b"ufrag1", 1000).handle
    w.close()
    t.close()
    t2 = FlowTable.open(shm_path, partitions=2, flow_capacity=8, session_capacity=8, max_flows_per_session=8)
    f = t2.lookup(*key(1))
    assert isinstance(f, Flow) and f.handle == h and f.partition == 1 and f.ufrag == b"ufrag1"
    w2 = t2.own(1)
    assert not w2.takeover().interrupted
    assert w2.find(*key(1)) == f
    w2.close()
    t2.close()


def test_recreate_replaces_the_file_and_old_attachments_go_stale(shm_path: str) -> None:
    t = small(shm_path)
    w = t.own(0)
    w.insert(*key(1), TARGET_A, 9000, b"u", 1)
    with pytest.raises(PartitionBusy):  # an owner is alive: no re-create under its feet
        small(shm_path)
    w.close()
    view = FlowTable.attach_readonly(shm_path)
    t2 = small(shm_path, partitions=3)
    assert t2.partitions == 3 and t2.lookup(*key(1)) is MISS
    assert view.is_stale() and isinstance(view.lookup(*key(1)), Flow)  # the old inode, unharmed
    with pytest.raises(StaleTable):
        t.own(0)
    view.close()
    t.close()
    t2.close()


def test_same_process_second_owner_is_refused(shm_path: str) -> None:
    t = small(shm_path)
    w = t.own(0)
    with pytest.raises(PartitionBusy) as exc:
        t.own(0)
    assert exc.value.partition == 0
    other = t.own(1)
    w.close()
    t.own(0).close()
    other.close()
    t.close()


# -- insert, lookup, handles ----------------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True])
def test_insert_lookup_get_by_handle(shm_path: str, v6: bool) -> None:
    t = small(shm_path, flow_capacity=16)
    w0, w1 = t.own(0), t.own(1)
    target = TARGET_B if v6 else TARGET_A
    r = w1.insert(*key(1, v6), target, 9000, b"sess-1", 5_000)
    assert r.status is InsertStatus.OK and r.ok and r.has_flow
    f = t.lookup(*key(1, v6))
    assert isinstance(f, Flow)
    cip, cport, lip, lport = key(1, v6)
    assert (f.client_ip, f.client_port, f.local_ip, f.local_port) == (cip, cport, lip, lport)
    assert (f.target_ip, f.target_port, f.ufrag, f.partition, f.worker, f.origin) == (target, 9000, b"sess-1", 1, 1, 1)
    assert (f.created, f.last_seen, f.pkts_in, f.bytes_in, f.pkts_out, f.bytes_out) == (5_000, 5_000, 0, 0, 0, 0)
    assert f.handle == r.handle and f.handle < (1 << 63)
    gen, part, slot = split_handle(f.handle)
    assert part == 1 and gen == 1 and make_handle(gen, part, slot) == f.handle
    assert t.lookup_in(1, *key(1, v6)) == f
    assert t.lookup_in(0, *key(1, v6)) is MISS
    assert t.lookup(*key(2, v6)) is MISS
    assert not MISS and not UNKNOWN
    assert t.get_by_handle(r.handle) == f
    assert w1.find(*key(1, v6)) == f and w0.find(*key(1, v6)) is None
    again = w1.insert(*key(1, v6), target, 9000, b"sess-1", 6_000)
    assert again.status is InsertStatus.EXISTS and again.handle == r.handle and not again.ok and again.has_flow
    assert t.lookup(*key(1, v6)).created == 5_000
    if v6:
        assert ip_str(f.client_ip).startswith("2001:db8:")
    else:
        assert ip_str(f.client_ip) == "100.0.0.1" and ip16("100.0.0.1") == f.client_ip


def test_handles_go_stale(shm_path: str) -> None:
    t = small(shm_path)
    w = t.own(0)
    h = w.insert(*key(1), TARGET_A, 9000, b"u", 1).handle
    assert w.delete(*key(1)).handle == h
    assert t.get_by_handle(h) is None
    assert w.flush_counters(h, 1, 1, 1, 1, 2) is False
    assert w.delete_handle(h) is None
    h2 = w.insert(*key(1), TARGET_A, 9000, b"u", 1).handle
    assert split_handle(h2)[2] == split_handle(h)[2] and h2 != h  # same slot, new generation
    assert t.get_by_handle(h) is None and t.get_by_handle(h2).handle == h2
    assert t.get_by_handle(h2 ^ (1 << 23)) is None  # another partition's slot: empty
    assert t.get_by_handle(make_handle(1, 7, 0)) is None  # no such partition
    assert w.delete_handle(h2).handle == h2 and t.lookup(*key(1)) is MISS


def test_session_records_and_aggregation_across_partitions(shm_path: str) -> None:
    t = small(shm_path)
    w0, w1 = t.own(0), t.own(1)
    w0.insert(*key(1), TARGET_A, 9000, b"shared", 1_000)
    w0.insert(*key(2), TARGET_A, 9000, b"shared", 1_500)
    w1.insert(*key(3), TARGET_A, 9000, b"shared", 2_000)
    w1.insert(*key(4), TARGET_B, 9001, b"other", 3_000)
    s = t.session(b"shared")
    assert isinstance(s, Session)
    assert (s.flows, s.created, s.last_seen, s.partition, s.partitions) == (3, 1_000, 2_000, 0, (0, 1))
    assert (s.target_ip, s.target_port) == (TARGET_A, 9000)
    assert t.session_in(1, b"shared").flows == 1 and t.session_in(1, b"nope") is MISS
    assert t.session(b"nope") is None
    assert {x.ufrag: x.flows for x in t.sessions()} == {b"shared": 3, b"other": 1}
    assert sorted((x.partition, x.ufrag, x.flows) for x in t.sessions(per_partition=True)) == [
        (0, b"shared", 2),
        (1, b"other", 1),
        (1, b"shared", 1),
    ]
    assert {f.ufrag for f in w1.flows()} == {b"shared", b"other"}
    assert sorted(x.ufrag for x in w1.sessions()) == [b"other", b"shared"]
    assert t.check_invariants() == []


# -- refusals -----------------------------------------------------------------------------------------


def test_full_partition_refuses_without_evicting(shm_path: str) -> None:
    t = small(shm_path)
    w = t.own(0)
    handles = [w.insert(*key(n), TARGET_A, 9000, b"s%d" % n, n).handle for n in range(6)]  # 6 = 3/4 of 8
    for n in range(6, 10):
        r = w.insert(*key(n), TARGET_A, 9000, b"s%d" % n, n)
        assert r.status is InsertStatus.TABLE_FULL and r.handle == 0 and not r.has_flow
    assert [t.get_by_handle(h) is not None for h in handles] == [True] * 6
    assert all(isinstance(t.lookup(*key(n)), Flow) for n in range(6))
    assert t.partition_totals()[0]["refused_table_full"] == 4 and t.totals()["flows"] == 6
    assert w.insert(*key(0), TARGET_A, 9000, b"s0", 0).status is InsertStatus.EXISTS  # still found
    w.delete(*key(0))
    assert w.insert(*key(9), TARGET_A, 9000, b"s9", 9).ok
    assert t.check_invariants() == []


def test_session_table_full_and_session_flow_limit(shm_path: str) -> None:
    t = small(shm_path, flow_capacity=32, session_capacity=4, max_flows_per_session=2)
    w = t.own(0)
    for n in range(3):  # 3 sessions = 3/4 of 4
        assert w.insert(*key(n), TARGET_A, 9000, b"s%d" % n, 0).ok
    r = w.insert(*key(3), TARGET_A, 9000, b"s3", 0)
    assert r.status is InsertStatus.SESSION_TABLE_FULL
    assert w.insert(*key(4), TARGET_A, 9000, b"s0", 0).ok  # a second flow of s0
    r = w.insert(*key(5), TARGET_A, 9000, b"s0", 0)
    assert r.status is InsertStatus.SESSION_FLOW_LIMIT
    # the bound is per partition: partition 1 may hold two more flows of s0
    w1 = t.own(1)
    assert w1.insert(*key(5), TARGET_A, 9000, b"s0", 0).ok and w1.insert(*key(6), TARGET_A, 9000, b"s0", 0).ok
    assert t.session(b"s0").flows == 4
    # a learning's relay-wide check reads the other partitions only (its writer knows its own)
    assert (t.session_flows_elsewhere(b"s0", 0), t.session_flows_elsewhere(b"s0", 1)) == (2, 2)
    assert t.session_flows_elsewhere(b"s1", 0) == 0 and t.session_flows_elsewhere(b"s1", 1) == 1
    assert t.session_flows_elsewhere(b"nobody", 0) == 0 and t.session_flows_elsewhere(b"A" * (MAX_UFRAG + 1), 0) == 0
    totals = t.totals()
    assert (totals["refused_session_table_full"], totals["refused_session_flow_limit"]) == (1, 1)
    assert t.lookup(*key(3)) is MISS and t.lookup_in(0, *key(5)) is MISS
    assert t.check_invariants() == []


def test_ufrag_length_bound(shm_path: str) -> None:
    t = small(shm_path)
    w = t.own(0)
    longest = b"A" * MAX_UFRAG
    assert w.insert(*key(1), TARGET_A, 9000, longest, 0).ok
    assert t.session(longest).flows == 1 and t.lookup(*key(1)).ufrag == longest
    r = w.insert(*key(2), TARGET_A, 9000, longest + b"B", 0)
    assert r.status is InsertStatus.UFRAG_TOO_LONG and t.lookup(*key(2)) is MISS
    assert t.totals()["refused_ufrag_too_long"] == 1
    assert w.delete_session(longest + b"B") == []


# -- deletion and probe chains ------------------------------------------------------------------------


def keys_by_home(t: FlowTable, count: int) -> dict[int, list[int]]:
    """Key numbers grouped by their home slot (the same in every partition)."""
    homes: dict[int, list[int]] = {}
    n = 0
    while sum(len(v) for v in homes.values()) < count:
        homes.setdefault(t.home_slot(*key(n)), []).append(n)
        n += 1
    return homes


def test_backward_shift_with_colliding_keys_and_wraparound(shm_path: str) -> None:
    t = small(shm_path)  # 8 slots, 6 flows at most
    w = t.own(0)
    moves: list[tuple[int, int]] = []
    w.on_move = lambda old, new: moves.append((old, new))
    homes = keys_by_home(t, 400)
    last = t.flow_capacity - 1
    # three keys whose home is the last slot (they wrap round to slots 0 and 1), one homed at 0
    wrap = homes[last][:3]
    at0 = homes[0][:1]
    at1 = homes[1][:1]
    order = wrap + at0 + at1
    handles = {n: w.insert(*key(n), TARGET_A, 9000, b"s", n).handle for n in order}
    slots = {n: split_handle(h)[2] for n, h in handles.items()}
    assert [slots[n] for n in order] == [last, 0, 1, 2, 3]
    assert t.check_invariants() == []
    # deleting the first of the chain shifts every other one back by one slot
    w.delete(*key(wrap[0]))
    assert t.check_invariants() == []
    assert sorted(split_handle(new)[2] for _, new in moves) == [0, 1, 2, last]
    for old, new in moves:
        assert t.get_by_handle(old) is None or t.get_by_handle(old).handle == old
        f = t.get_by_handle(new)
        assert f is not None and f.handle == new
    for n in order[1:]:
        f = t.lookup(*key(n))
        assert isinstance(f, Flow) and f.created == n
    assert [split_handle(t.lookup(*key(n)).handle)[2] for n in order[1:]] == [last, 0, 1, 2]


def test_random_insert_delete_against_a_model(shm_path: str) -> None:
    """Tiny capacity, so nearly every key collides; invariants after every operation."""
    t = small(shm_path, flow_capacity=16, session_capacity=8, max_flows_per_session=3)
    w = t.own(0)
    rng = random.Random(1234)
    model: dict[int, bytes] = {}
    per_session: dict[bytes, int] = {}
    for step in range(1500):
        n = rng.randrange(40)
        ufrag = b"s%d" % (n % 5)
        if rng.random() < 0.55:
            r = w.insert(*key(n), TARGET_A, 9000, ufrag, step)
            if n in model:
                assert r.status is InsertStatus.EXISTS
            elif len(model) >= 12:
                assert r.status is InsertStatus.TABLE_FULL
            elif per_session.get(ufrag, 0) >= 3:
                assert r.status is InsertStatus.SESSION_FLOW_LIMIT
            else:
                assert r.ok
                model[n] = ufrag
                per_session[ufrag] = per_session.get(ufrag, 0) + 1
        else:
            f = w.delete(*key(n))
            assert (f is not None) == (n in model)
            if f is not None:
                assert f.ufrag == model.pop(n)
                per_session[f.ufrag] -= 1
        problems = t.check_invariants()
        assert problems == [], (step, problems)
    for n in range(40):
        f = t.lookup(*key(n))
        assert (isinstance(f, Flow) and f.ufrag == model[n]) if n in model else f is MISS
    assert {s.ufrag: s.flows for s in t.sessions()} == {u: c for u, c in per_session.items() if c}


def test_delete_session_and_delete_target(shm_path: str) -> None:
    t = small(shm_path, flow_capacity=32, session_capacity=16)
    w0, w1 = t.own(0), t.own(1)
    for n in range(10):
        w0.insert(*key(n), TARGET_A if n % 2 else TARGET_B, 9000, b"s%d" % (n % 3), n)
    w1.insert(*key(100), TARGET_B, 9000, b"s0", 100)
    removed = w0.delete_session(b"s0")
    assert sorted(f.client_port for f in removed) == sorted(key(n)[1] for n in (0, 3, 6, 9))
    assert all(f.ufrag == b"s0" for f in removed)
    assert t.session_in(0, b"s0") is MISS
    assert t.session(b"s0").flows == 1 and t.session(b"s0").partitions == (1,)  # other partition untouched
    assert w0.delete_session(b"s0") == [] and w0.delete_session(b"never") == []
    removed = w0.delete_target(TARGET_B, 9000)
    assert sorted(f.client_port for f in removed) == sorted(key(n)[1] for n in (2, 4, 8))
    assert w0.delete_target(TARGET_A, 9001) == []  # port differs
    left = sorted(f.client_port for f in w0.flows())
    assert left == sorted(key(n)[1] for n in (1, 5, 7))
    assert {s.ufrag: s.flows for s in w0.sessions()} == {b"s1": 2, b"s2": 1}
    assert t.check_invariants() == []
    assert t.totals()["deletes"] == 7


def forty_flows_some_fresh(shm_path: str, fresh_every: int) -> tuple[FlowTable, PartitionWriter, set[int]]:
    """40 flows seen at 1 s; every `fresh_every`-th seen again at 50 s (the fresh ones)."""
    t = small(shm_path, flow_capacity=64, session_capacity=64)
    w = t.own(0)
    for n in range(40):
        w.insert(*key(n), TARGET_A, 9000, b"s%d" % (n % 7), 1_000)
    fresh = {n for n in range(40) if n % fresh_every == 0}
    for n in fresh:
        w.flush_counters(t.lookup(*key(n)).handle, 1, 2, 3, 4, 50_000)
    return t, w, fresh


def test_sweep_is_incremental_and_complete(shm_path: str) -> None:
    t, w, fresh = forty_flows_some_fresh(shm_path, 3)
    removed: list[Flow] = []
    rounds = 0
    while rounds < 8:  # 8 x 8 slots = one full turn of the cursor
        got = w.sweep(60_000, 30_000, 8)
        assert all(f.last_seen == 1_000 for f in got)
        removed += got
        rounds += 1
        assert t.check_invariants() == []
    assert len(removed) == 40 - len(fresh)
    assert {f.client_port for f in w.flows()} == {key(n)[1] for n in fresh}
    assert w.sweep(60_000, 30_000, 1_000) == []  # nothing more idle
    assert len(w.sweep(200_000, 30_000, 1_000)) == len(fresh)  # max_slots > capacity: one full round
    assert t.totals()["flows"] == 0 and t.totals()["sessions"] == 0 and t.totals()["expired"] == 40


def test_sweep_with_a_removal_limit_stops_early_and_goes_on_from_there(shm_path: str) -> None:
    """A mass expiry is removed a few deletes per call (each call is a short step of the
    worker's housekeeping), and the calls together remove exactly the idle flows."""
    t, w, fresh = forty_flows_some_fresh(shm_path, 4)
    removed: list[Flow] = []
    for _ in range(100):  # bounded: 30 idle flows at 3 a call, plus calls that find none
        got = w.sweep(60_000, 30_000, 64, max_removals=3)
        assert len(got) <= 3
        assert t.check_invariants() == []
        removed += got
        if len(removed) == 40 - len(fresh):
            break
    assert len(removed) == 40 - len(fresh)
    assert {f.client_port for f in w.flows()} == {key(n)[1] for n in fresh}
    assert w.sweep(60_000, 30_000, 64, max_removals=3) == []


def test_flush_counters_and_session_last_seen(shm_path: str) -> None:
    t = small(shm_path)
    w = t.own(0)
    h = w.insert(*key(1), TARGET_A, 9000, b"s", 1_000).handle
    assert w.flush_counters(h, 10, 1_000, 20, 2_000, 1_500)
    f = t.get_by_handle(h)
    assert (f.pkts_in, f.bytes_in, f.pkts_out, f.bytes_out, f.last_seen, f.created) == (10, 1_000, 20, 2_000, 1_500, 1_000)
    assert t.session(b"s").last_seen == 1_000  # moved by SESSION_TOUCH_MS steps only
    assert w.flush_counters(h, 11, 1_100, 21, 2_100, 2_000)
    assert t.session(b"s").last_seen == 2_000
    assert w.flush_counters(h, 12, 1_200, 22, 2_200, 2_999)
    assert t.session(b"s").last_seen == 2_000
    assert t.get_by_handle(h).pkts_in == 12
    w1 = t.own(1)
    assert w1.flush_counters(h, 1, 1, 1, 1, 1) is False  # not its partition


def test_adopt_copies_flow_and_links_session(shm_path: str) -> None:
    t = small(shm_path)
    w0, w1 = t.own(0), t.own(1)
    h = w0.insert(*key(1), TARGET_A, 9000, b"sess", 1_000).handle
    w0.flush_counters(h, 5, 500, 6, 600, 4_000)
    found = t.lookup(*key(1))
    r = w1.adopt(found)
    assert r.ok
    copy = t.get_by_handle(r.handle)
    assert copy.partition == 1 and copy.worker == 1 and copy.origin == 0
    assert (copy.ufrag, copy.created, copy.last_seen, copy.pkts_in, copy.bytes_out) == (b"sess", 1_000, 4_000, 5, 600)
    assert (copy.target_ip, copy.target_port) == (TARGET_A, 9000)
    assert t.session_in(1, b"sess").created == 1_000
    assert t.session(b"sess").flows == 2
    assert w1.adopt(found).status is InsertStatus.EXISTS
    assert t.totals()["adopted"] == 1
    assert t.check_invariants() == []


# -- crash recovery at every store --------------------------------------------------------------------


def scenario(t: FlowTable) -> None:
    w = t.own(0)
    for n in range(10):
        w.insert(*key(n), TARGET_A if n < 6 else TARGET_B, 9000, b"s%d" % (n % 3), 1_000 + n)
    w.close()


OPS = [
    ("insert", (*key(50), TARGET_A, 9000, b"s0", 5_000)),  # joins a session
    ("insert", (*key(51), TARGET_A, 9000, b"fresh", 5_000)),  # creates one
    ("delete", key(3)),
    ("delete", key(0)),
    ("flush", None),
    ("delete_session", (b"s1",)),
    ("delete_target", (TARGET_B, 9000)),
    ("sweep", (50_000, 44_000, 32)),
]


@pytest.mark.parametrize("op,args", OPS, ids=[f"{o}-{i}" for i, (o, _) in enumerate(OPS)])
def test_crash_at_every_store_then_takeover(shm_path: str, op: str, args: tuple | None) -> None:
    """Invariant 10: die before any store of an operation; the next owner's takeover restores
    every invariant, and the state is the one before or after the operation (for multi-flow
    operations: a subset of it); re-applying the operation gives exactly the state after it."""
    t = FlowTable.create(shm_path, partitions=1, flow_capacity=32, session_capacity=8, seed=5)
    scenario(t)
    before_bytes = bytes(t._mm)
    before = state(t)
    w = t.own(0)
    if op == "flush":
        op, args = "flush_counters", (t.lookup(*key(4)).handle, 7, 700, 8, 800, 9_000)
    getattr(w, op)(*args)
    after = state(t)
    w.close()
    assert after != before
    crash_at = 1
    while True:
        t._mm[:] = before_bytes
        w = t.own(0)
        crashed = crash_during(w, crash_at, op, *args)
        if not crashed:
            w.close()
            break
        w = t.own(0)
        report = w.takeover()
        assert t.check_invariants() == [], (crash_at, report)
        mid = state(t)
        if op in ("insert", "delete", "flush_counters"):
            assert mid[0] in (before[0], after[0]), crash_at
        else:
            assert set(after[0]) <= set(mid[0]) <= set(before[0]), crash_at
        getattr(w, op)(*args)  # re-apply: idempotent
        assert state(t) == after, crash_at
        assert t.check_invariants() == []
        w.close()
        crash_at += 1
    assert crash_at > 5  # the operation had several stores


def test_takeover_is_idempotent_when_it_dies_midway(shm_path: str) -> None:
    t = FlowTable.create(shm_path, partitions=1, flow_capacity=8, session_capacity=8, seed=5)
    w = t.own(0)
    homes = keys_by_home(t, 400)
    chain = homes[2][:4] + homes[3][:1]  # one long chain: a deletion shifts several flows
    for n in chain:
        w.insert(*key(n), TARGET_A, 9000, b"s%d" % (n % 2), n)
    w.close()
    clean = bytes(t._mm)
    # A mess: the owner died in the middle of a deletion's backward shift (odd sc, a duplicate).
    messy = None
    for crash_at in range(1, 60):
        t._mm[:] = clean
        if not crash_during(t.own(0), crash_at, "delete", *key(chain[0])):
            break
        problems = t.check_invariants()
        dup = any(p.startswith("I5") for p in problems) and not any(p.startswith("I2") for p in problems)
        if t._q[t._hw[0] + P_SC] & 1 and dup:  # between two moves: no odd slot, a duplicate
            messy = bytes(t._mm)
            break
    assert messy is not None, "no crash point left a duplicate"
    t._mm[:] = messy
    w = t.own(0)
    assert w.takeover().duplicates_removed == 0  # own() already removed it
    ref = state(t)
    assert t.check_invariants() == [] and len(ref[0]) == len(chain) - 1
    assert t.lookup(*key(chain[0])) is MISS
    w.close()
    # Now the takeover itself dies at each of its stores; the next one must end the same.
    crash_at = 1
    while True:
        w = t.own(0)  # holds the lock; put the mess back under it and take over again
        t._mm[:] = messy
        if not crash_during(w, crash_at, "takeover"):
            assert state(t) == ref
            w.close()
            break
        w = t.own(0)
        assert t.check_invariants() == [], crash_at
        assert state(t) == ref, crash_at
        w.close()
        crash_at += 1
    assert crash_at > 3


def test_closed_writer_cannot_write_and_unlink_removes_files(shm_path: str) -> None:
    t = small(shm_path)
    w = t.own(0)
    h = w.insert(*key(1), TARGET_A, 9000, b"u", 1).handle
    w.close()
    assert w.closed
    with pytest.raises(WriterClosed):
        w.insert(*key(2), TARGET_A, 9000, b"u", 1)
    with pytest.raises(WriterClosed):
        w.flush_counters(h, 1, 1, 1, 1, 1)
    with pytest.raises(WriterClosed):
        w.delete(*key(1))
    w.close()  # twice is fine
    rows = t._flows_rows(0)  # a caller's numpy view must not make close() fail
    t.close()
    assert t.closed
    del rows
    assert os.path.exists(shm_path) and os.path.exists(shm_path + ".p1.lock")
    t.unlink()
    assert not os.path.exists(shm_path) and not os.path.exists(shm_path + ".p0.lock")
    assert not os.path.exists(shm_path + ".p1.lock")
