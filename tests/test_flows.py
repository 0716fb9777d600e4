"""relay/flows.py's counter flush on a real shm table, in C and in Python: in steps, and only flows
that moved."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.batchio import sockaddr_for
from relay.config import RelayConfig
from relay.decision import Learn
from relay.flows import LOOKS_PER_WRITE, LocalFlows
from shm import FlowTable, Lookup
from shm.layout import ip16

PUBLIC = (socket.inet_aton("127.0.0.1"), 3478)
TRANSCEIVER = (socket.inet_aton("127.0.0.2"), 40000)


@pytest.fixture(params=["c", "python"], ids=["c-flush", "python-flush"])
def flows(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalFlows]:
    """hit_path "c": the counter flush in C (relay/_counter_flush.c), "python": in Python."""
    config = RelayConfig(name="flowtest", workers=1, table_dir=str(tmp_path), flow_capacity=64, session_capacity=64,
                         hit_path=request.param)
    table = FlowTable.create(config.table_path, partitions=1, flow_capacity=64, session_capacity=64)  # as the supervisor
    local = LocalFlows(config, 0, socket.AF_INET, [PUBLIC])
    local.take_over(now=100.0)
    if request.param == "c" and local.counter_flush is None:
        pytest.skip("relay._counter_flush is not built")
    yield local
    local.close()
    table.close()


def client(n: int) -> tuple[bytes, int]:
    return socket.inet_aton(f"10.0.0.{n}"), 50000 + n


def learn(flows: LocalFlows, n: int, now: float) -> None:
    source = client(n)
    entry, refusal = flows.learn(sockaddr_for(*source), source, 0, Learn(f"ufrag{n}", *TRANSCEIVER, 1), now)
    assert entry is not None, refusal


def in_shm(flows: LocalFlows, n: int) -> tuple[int, int, int]:
    ip, port = client(n)
    flow = flows.table.lookup(ip16(ip), port, ip16(PUBLIC[0]), PUBLIC[1])
    return flow.pkts_in, flow.pkts_out, flow.last_seen  # type: ignore[union-attr]


def test_flush_writes_moved_flows_in_steps_and_skips_idle_ones(flows: LocalFlows) -> None:
    for n in range(1, 6):
        learn(flows, n, now=100.0)
    for n in (1, 2, 4):
        entry = flows.by_key[sockaddr_for(*client(n))]
        entry.packets_in += n
        entry.packets_out += 1
    steps = list(flows.flush_counters_steps(now=105.0, chunk=2, budget=100))
    assert steps == [2, 3]  # three flows moved: two steps of at most two
    for n in (1, 2, 4):
        assert in_shm(flows, n) == (n, 1, 105_000)
    for n in (3, 5):
        assert in_shm(flows, n) == (0, 0, 100_000)  # idle: untouched, and it ages towards expiry
    assert list(flows.flush_counters_steps(now=106.0, chunk=2, budget=100)) == [0]  # nothing moved since
    assert in_shm(flows, 1) == (1, 1, 105_000)


def test_flush_budget_goes_round_robin_across_calls(flows: LocalFlows) -> None:
    """With more moved flows than a tick's budget, the next tick goes on where the last one
    stopped: every moved flow is written within ceil(moved / budget) ticks."""
    for n in range(1, 11):
        learn(flows, n, now=100.0)
        flows.by_key[sockaddr_for(*client(n))].packets_in += 1
    assert list(flows.flush_counters_steps(now=101.0, chunk=2, budget=4)) == [2, 4]
    assert list(flows.flush_counters_steps(now=102.0, chunk=2, budget=4)) == [2, 4]
    assert list(flows.flush_counters_steps(now=103.0, chunk=2, budget=4))[-1] == 2  # one pass at most
    stamps = sorted(in_shm(flows, n)[2] for n in range(1, 11))
    assert stamps == [101_000] * 4 + [102_000] * 4 + [103_000] * 2


def test_a_flow_removed_between_steps_is_not_written(flows: LocalFlows) -> None:
    for n in range(1, 4):
        learn(flows, n, now=100.0)
        flows.by_key[sockaddr_for(*client(n))].packets_in += 1
    steps = flows.flush_counters_steps(now=110.0, chunk=1, budget=100)
    assert next(steps) == 1
    pending = [n for n in range(1, 4) if in_shm(flows, n)[2] == 100_000]  # not flushed yet
    assert len(pending) == 2
    victim = pending[0]
    assert flows.close_session(f"ufrag{victim}", sockaddr_for(*TRANSCEIVER)) == 1
    list(steps)
    ip, port = client(victim)
    assert flows.table.lookup(ip16(ip), port, ip16(PUBLIC[0]), PUBLIC[1]) is Lookup.MISS
    assert all(in_shm(flows, n) == (1, 0, 110_000) for n in range(1, 4) if n != victim)


def test_entries_stay_one_per_flow_through_removals(flows: LocalFlows) -> None:
    for n in range(1, 8):
        learn(flows, n, now=100.0)
    for n in (2, 7, 1):
        assert flows.close_session(f"ufrag{n}", sockaddr_for(*TRANSCEIVER)) == 1
    assert sorted(e.client_key for e in flows.entries) == sorted(flows.by_key)
    assert all(flows.entries[e.index] is e for e in flows.entries)


def test_flows_of_one_transceiver_share_its_address_object(flows: LocalFlows) -> None:
    for n in range(1, 4):
        learn(flows, n, now=100.0)
    first, *others = (flows.by_key[sockaddr_for(*client(n))].tunnel_dest for n in range(1, 4))
    assert all(dest is first for dest in others)
    for n in range(1, 4):
        flows.close_session(f"ufrag{n}", first)
    assert not flows.by_transceiver_dest  # forgotten with its last flow


def test_a_silent_transceivers_flows_go_in_bounded_steps(flows: LocalFlows) -> None:
    for n in range(1, 11):
        learn(flows, n, now=100.0)
    assert flows.expire_silent_transceivers(now=101.0, timeout=3.0) == 0  # heard within the timeout
    assert flows.expire_silent_transceivers(now=104.0, timeout=3.0) == 10
    assert not flows.transceivers
    assert list(flows.remove_doomed_steps(4)) == [4, 8, 10]
    assert not flows.by_key and not flows.entries and not flows.by_transceiver and not flows.by_ufrag
    assert flows.table.totals()["flows"] == 0 and flows.table.totals()["sessions"] == 0


def test_a_flow_learned_again_before_its_doomed_copy_goes_stays(flows: LocalFlows) -> None:
    learn(flows, 1, now=100.0)
    learn(flows, 2, now=100.0)
    assert flows.expire_silent_transceivers(now=104.0, timeout=3.0) == 2
    assert flows.close_session("ufrag1", sockaddr_for(*TRANSCEIVER)) == 1  # gone before its step
    learn(flows, 1, now=104.5)  # the same 5-tuple, a new session on the restarted transceiver
    assert list(flows.remove_doomed_steps(8)) == [1]  # flow 2 only
    assert list(flows.by_key) == [sockaddr_for(*client(1))]
    assert flows.by_key[sockaddr_for(*client(1))].ufrag == "ufrag1"


def test_the_flush_finds_idle_flows_and_expiry_takes_only_those_still_idle(flows: LocalFlows) -> None:
    """A flush that looks at a flow which has not moved for idle_timeout (30 s) since a flush
    saw it move, or since it was learned, lists it; expiry removes it from shm and the dicts
    in steps, unless a datagram came between the look and the removal."""
    for n in range(1, 21):
        learn(flows, n, now=100.0)
    for n in (5, 10, 15):
        flows.by_key[sockaddr_for(*client(n))].packets_in += 1
    list(flows.flush_counters_steps(now=125.0, chunk=32, budget=100))
    assert flows.idle_found == []  # 25 s: nothing idle yet
    list(flows.flush_counters_steps(now=131.0, chunk=32, budget=100))
    assert sorted(e.client_address[1] - 50000 for e in flows.idle_found) == [n for n in range(1, 21) if n not in (5, 10, 15)]
    flows.by_key[sockaddr_for(*client(7))].packets_out += 1  # a datagram back after the look
    steps = list(flows.expire_idle_steps(3))
    assert steps[-1] == 16 and all(b - a <= 3 for a, b in zip([0, *steps], steps))
    assert sorted(flows.by_key) == sorted(sockaddr_for(*client(n)) for n in (5, 7, 10, 15))
    assert flows.table.totals()["flows"] == 4 and flows.table.totals()["expired"] == 16
    assert flows.idle_found == []


def test_the_flush_never_expires_a_flow_that_moved_however_slow_its_pass(flows: LocalFlows) -> None:
    """Expiry reads the flow's own counters at the look, not a last_seen a slow pass left
    stale: with one write a tick, a pass over 20 sending flows takes 20 ticks of 2 s, longer
    than the 30 s idle timeout, and none expires; the one that stops sending does."""
    for n in range(1, 21):
        learn(flows, n, now=100.0)
    quiet = flows.by_key[sockaddr_for(*client(20))]
    now = 100.0
    while now < 200.0:
        now += 2.0
        for entry in flows.entries:
            if entry is not quiet:
                entry.packets_in += 1
        list(flows.flush_counters_steps(now, chunk=1, budget=1))
        list(flows.expire_idle_steps(8))
        assert len(flows.by_key) >= 19, f"at {now - 100:.0f} s"
    assert sorted(flows.by_key) == sorted(sockaddr_for(*client(n)) for n in range(1, 20))


def test_a_sweep_of_the_table_expires_every_flow_idle_in_shm_in_short_steps(flows: LocalFlows) -> None:
    """The sweep (orphans: flows in shm the worker has no entry for) by shm's last_seen."""
    for n in range(1, 21):
        learn(flows, n, now=100.0)
    for n in (5, 10):
        flows.by_key[sockaddr_for(*client(n))].packets_in += 1
    list(flows.flush_counters_steps(now=125.0, chunk=32, budget=100))
    # capacity 64: one window of all the slots, at most 3 deletes a step
    steps = list(flows.sweep_steps(now=131.0, slots=64, chunk=64, removals=3, idle_s=30.0))
    assert steps[-1] == 18 and all(b - a <= 3 for a, b in zip([0, *steps], steps))
    assert sorted(flows.by_key) == sorted(sockaddr_for(*client(n)) for n in (5, 10))
    assert flows.table.totals()["flows"] == 2


def test_by_address_follows_by_key_through_learn_and_close(flows: LocalFlows) -> None:
    """The packet path finds recv_one's datagrams by address tuple: the two maps must agree."""
    for n in range(1, 4):
        learn(flows, n, now=100.0)
    for n in range(1, 4):
        ip, port = client(n)
        assert flows.by_address[(socket.inet_ntoa(ip), port)] is flows.by_key[sockaddr_for(ip, port)]
    assert flows.close_session("ufrag2", sockaddr_for(*TRANSCEIVER)) == 1
    assert ("10.0.0.2", 50002) not in flows.by_address
    assert sorted(flows.by_address) == [("10.0.0.1", 50001), ("10.0.0.3", 50003)]
    assert len(flows.by_address) == len(flows.by_key)


def test_a_flush_of_idle_flows_looks_at_16_per_write_of_its_budget(flows: LocalFlows) -> None:
    """Idle flows are not written, and not all read every tick either: a call looks at most
    LOOKS_PER_WRITE x budget of them, and the next one goes on from there."""
    for n in range(1, 41):
        learn(flows, n, now=100.0)
    assert list(flows.flush_counters_steps(now=101.0, chunk=1, budget=2))[-1] == 0
    assert flows._flush_cursor == 2 * LOOKS_PER_WRITE  # 32 of the 40
    flows.entries[2 * LOOKS_PER_WRITE + 3].packets_in += 1
    assert list(flows.flush_counters_steps(now=102.0, chunk=1, budget=2))[-1] == 1
    assert flows._flush_cursor == (4 * LOOKS_PER_WRITE) % 40  # 32 more: round the end, on from the start


@pytest.mark.parametrize("tick_s", [0.1, 0.45], ids=["ticks-on-time", "ticks-late"])
def test_sending_flows_outlive_the_sweep_however_far_apart_ticks_come(
        flows: LocalFlows, tick_s: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's ticks as housekeeping_units makes them: flush with the budget for the time
    since the last tick, expire what it found idle, then sweep the whole table for orphans.
    Every flow sends between ticks, and none may expire. An overloaded worker's ticks come
    further apart (below STALLED_S late: no stall): with a budget per tick, its pass of 40
    flows took 8 ticks, 3.6 s at 0.45 s, longer than the 3 s idle timeout, and a sweep by
    shm's last_seen (expiry did that then) expired flows that were sending."""
    monkeypatch.setattr("relay.flows.FLUSH_MIN_PER_S", 1)
    monkeypatch.setattr("relay.flows.FLUSH_PASSES_PER_IDLE", 3)
    flows.idle_timeout = 3.0  # a pass: 40 flows x 3 passes / 3 s = 40 writes a second
    for n in range(1, 41):
        learn(flows, n, now=100.0)
    now = 100.0
    while now < 100.0 + 4 * flows.idle_timeout:
        now += tick_s
        for entry in flows.entries:
            entry.packets_in += 1
        list(flows.flush_counters_steps(now, chunk=4, budget=flows.flush_budget(tick_s)))
        assert list(flows.expire_idle_steps(8)) == [], f"at {now - 100:.2f} s"
        assert list(flows.sweep_steps(now, slots=64, chunk=64, removals=64, idle_s=3.0))[-1] == 0, \
            f"at {now - 100:.2f} s"
    assert len(flows.by_key) == 40 and flows.table.totals()["flows"] == 40


def test_flows_of_a_dropped_listen_address_are_orphans_that_the_sweep_expires(tmp_path: Path) -> None:
    """A worker restarted with one listen address fewer takes over flows it cannot serve: no
    entry, so no flush expires them. The partition then holds more flows than the worker has
    entries, and the sweep runs until those idled out by shm's last_seen are gone."""
    config = RelayConfig(name="orphans", workers=1, table_dir=str(tmp_path), flow_capacity=64, session_capacity=64)
    table = FlowTable.create(config.table_path, partitions=1, flow_capacity=64, session_capacity=64)
    other = (socket.inet_aton("127.0.0.1"), 3479)
    before = LocalFlows(config, 0, socket.AF_INET, [PUBLIC, other])
    before.take_over(now=100.0)
    for n in range(1, 7):
        source = client(n)
        entry, _ = before.learn(sockaddr_for(*source), source, n % 2, Learn(f"u{n}", *TRANSCEIVER, 1), 100.0)
        assert entry is not None
    before.close()
    after = LocalFlows(config, 0, socket.AF_INET, [PUBLIC])
    after.take_over(now=101.0)
    try:
        assert len(after.by_key) == 3 and after.orphaned
        assert list(after.sweep_steps(now=110.0, slots=64, chunk=64, removals=8, idle_s=30.0)) == [0]  # not idle yet
        list(after.flush_counters_steps(now=132.0, chunk=8, budget=64))  # 31 s after the takeover
        assert list(after.expire_idle_steps(8))[-1] == 3  # its own flows: by the flush
        assert after.orphaned
        assert list(after.sweep_steps(now=131.0, slots=64, chunk=64, removals=8, idle_s=30.0))[-1] == 3
        assert not after.orphaned and after.table.totals()["flows"] == 0
    finally:
        after.close()
        table.close()


def test_a_flow_adopted_for_a_transceiver_it_cannot_reach_leaves_nothing_in_shm(tmp_path: Path) -> None:
    """Another worker's flow whose target is IPv6, adopted by a worker whose tunnel is IPv4:
    refused, and no copy stays in the adopter's partition (no entry would ever expire it)."""
    config = RelayConfig(name="adopt", workers=2, table_dir=str(tmp_path), flow_capacity=64, session_capacity=64)
    table = FlowTable.create(config.table_path, partitions=2, flow_capacity=64, session_capacity=64)
    other = LocalFlows(config, 0, socket.AF_INET6, [PUBLIC])
    other.take_over(now=100.0)
    adopter = LocalFlows(config, 1, socket.AF_INET, [PUBLIC])
    adopter.take_over(now=100.0)
    try:
        source = client(1)
        learned = Learn("u1", socket.inet_pton(socket.AF_INET6, "fd00::2"), 40000, 1)
        entry, refusal = other.learn(sockaddr_for(*source), source, 0, learned, 100.0)
        assert entry is not None, refusal
        flow = adopter.views[0].find(source)
        assert flow is not None and flow.partition == 0
        assert adopter.adopt(sockaddr_for(*source), 0, flow, 101.0) == (None, "token_target_unreachable")
        assert not adopter.orphaned and adopter._own().flow_count == 0
        assert adopter.table.totals()["flows"] == 1  # the other worker's, untouched
    finally:
        adopter.close()
        other.close()
        table.close()


def test_the_session_flow_limit_counts_every_worker_and_reads_only_the_others(tmp_path: Path) -> None:
    """max_flows_per_session is the relay's: a learning counts its own flows of the session
    from its index and reads the other partitions only."""
    config = RelayConfig(name="limit", workers=2, table_dir=str(tmp_path), flow_capacity=64, session_capacity=64,
                         max_flows_per_session=3)
    table = FlowTable.create(config.table_path, partitions=2, flow_capacity=64, session_capacity=64,
                             max_flows_per_session=3)
    first, second = LocalFlows(config, 0, socket.AF_INET, [PUBLIC]), LocalFlows(config, 1, socket.AF_INET, [PUBLIC])
    first.take_over(now=100.0)
    second.take_over(now=100.0)
    session = Learn("shared", *TRANSCEIVER, 1)

    def learn_on(flows: LocalFlows, n: int) -> str:
        source = client(n)
        return flows.learn(sockaddr_for(*source), source, 0, session, 100.0)[1]

    read = first.table._session_in
    partitions_read: list[int] = []

    def recording(p: int, ufrag: bytes, sref: int):  # type: ignore[no-untyped-def]
        partitions_read.append(p)
        return read(p, ufrag, sref)

    first.table._session_in = recording  # type: ignore[method-assign]
    try:
        assert [learn_on(second, 1), learn_on(second, 2), learn_on(first, 3)] == ["", "", ""]
        assert partitions_read == [1]  # worker 0's learning read worker 1's partition, not its own
        assert learn_on(first, 4) == "session_flow_limit" and learn_on(second, 5) == "session_flow_limit"
        assert table.session(b"shared").flows == 3
        second.remove(sockaddr_for(*client(1)))
        assert learn_on(first, 4) == ""  # room again: first holds 2, second 1
        assert learn_on(first, 6) == "session_flow_limit"
    finally:
        second.close()
        first.close()
        table.close()
