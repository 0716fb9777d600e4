"""relay/_counter_flush.c against its reference, shm.writer.PartitionWriter.flush_counters: from
the same table and the same entries, both must leave the same bytes (slots, seqs, journal,
sessions' last_seen) and the same entries (flushed activity and time, the idle flows found),
whatever moved, idled, went stale or belongs to another partition."""
from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.batchio import sockaddr_for
from relay.config import RelayConfig
from relay.decision import Learn
from relay.flows import FlowEntry, LocalFlows
from shm import FlowTable
from shm.layout import HANDLE_GEN_SHIFT
from shm.records import WriterClosed

pytest.importorskip("relay._counter_flush", reason="the C extension is built by scripts/bootstrap.sh")

PUBLIC = (socket.inet_aton("127.0.0.1"), 3478)
TRANSCEIVER = (socket.inet_aton("127.0.0.2"), 40000)
FLOWS = 300


@pytest.fixture
def flows(tmp_path: Path) -> Iterator[LocalFlows]:
    config = RelayConfig(name="cflush", workers=2, table_dir=str(tmp_path), flow_capacity=1024, session_capacity=1024)
    table = FlowTable.create(config.table_path, partitions=2, flow_capacity=1024, session_capacity=1024)
    local = LocalFlows(config, 1, socket.AF_INET, [PUBLIC])  # partition 1: partition 0's bytes come first
    local.take_over(now=100.0)
    for n in range(FLOWS):
        source = (bytes([10, 1, n >> 8, n & 255]), 6000 + n)
        entry, refusal = local.learn(sockaddr_for(*source), source, 0, Learn(f"s{n // 3}", *TRANSCEIVER, 1), 100.0)
        assert entry is not None, refusal
    yield local
    local.close()
    table.close()


def table_bytes(flows: LocalFlows) -> bytes:
    return bytes(flows._own().table_buffer)  # type: ignore[call-overload]


def run_both(flows: LocalFlows, now: float, chunk: int, budget: int) -> tuple[list[int], list[int], int]:
    """The flush in Python, then from the same bytes and entries in C: (steps of each, idle
    flows found)."""
    c_flush = flows.counter_flush
    assert c_flush is not None
    before = table_bytes(flows)
    flushed = [(e.flushed_activity, e.flushed_ms) for e in flows.entries]
    cursor = flows._flush_cursor

    flows.counter_flush = None
    python_steps = list(flows.flush_counters_steps(now, chunk, budget))
    python_bytes, python_cursor = table_bytes(flows), flows._flush_cursor
    python_flushed = [(e.flushed_activity, e.flushed_ms) for e in flows.entries]
    python_idle = flows.idle_found[:]

    flows._own().table_buffer[:] = before  # type: ignore[index]
    for entry, (activity, at) in zip(flows.entries, flushed):
        entry.flushed_activity, entry.flushed_ms = activity, at
    flows._flush_cursor = cursor
    flows.idle_found.clear()
    flows.counter_flush = c_flush
    c_steps = list(flows.flush_counters_steps(now, chunk, budget))
    assert table_bytes(flows) == python_bytes
    assert flows._flush_cursor == python_cursor
    assert [(e.flushed_activity, e.flushed_ms) for e in flows.entries] == python_flushed
    assert flows.idle_found == python_idle
    flows.idle_found.clear()
    return python_steps, c_steps, len(python_idle)


def test_c_and_python_write_the_same_bytes(flows: LocalFlows) -> None:
    rng = random.Random(7)
    now = 101.0
    idle = 0
    for step in (0.2, 0.9, 31.0, 1.0, 3.0, 31.0):  # the session's last_seen moves only by >= 1 s
        for entry in rng.sample(flows.entries, FLOWS // 2):
            entry.packets_in += rng.randrange(1, 1000)
            entry.bytes_in += rng.randrange(1, 1 << 40)  # beyond 32 bits
            if rng.random() < 0.5:
                entry.packets_out += 1
                entry.bytes_out += rng.randrange(1, 1 << 20)
        now += step
        python_steps, c_steps, found = run_both(flows, now, chunk=16, budget=FLOWS)
        assert python_steps[-1] == c_steps[-1] > 0  # the same flows written
        idle += found
    assert idle > 0  # (the 31 s step: the flows that did not move before it were found idle)


def test_a_budget_stops_both_at_the_same_flow(flows: LocalFlows) -> None:
    for entry in flows.entries:
        entry.packets_in += 1
    python_steps, c_steps, _ = run_both(flows, 105.0, chunk=8, budget=50)
    assert python_steps[-1] == c_steps[-1] == 50
    python_steps, c_steps, _ = run_both(flows, 106.0, chunk=8, budget=50)  # the next 50, round robin
    assert python_steps[-1] == c_steps[-1] == 50


def test_stale_and_foreign_handles_are_not_written(flows: LocalFlows) -> None:
    """A handle of an older generation of its slot, or of another partition, counts as
    written (as in Python) but touches no slot."""
    stale, foreign = flows.entries[3], flows.entries[4]
    stale.handle += 1 << HANDLE_GEN_SHIFT
    foreign.handle ^= 1 << 23  # the partition bit (HANDLE_SLOT_BITS)
    for entry in (stale, foreign):
        entry.packets_in += 5
    before = table_bytes(flows)
    python_steps, c_steps, _ = run_both(flows, 110.0, chunk=4, budget=FLOWS)
    assert python_steps[-1] == c_steps[-1] == 2
    assert table_bytes(flows) == before


def test_an_entry_of_another_type_is_refused_before_anything_is_written(flows: LocalFlows) -> None:
    class Bare:
        __slots__ = ("handle", "packets_in")

    c_flush = flows.counter_flush
    buffer = flows._own().table_buffer
    before = table_bytes(flows)
    idle: list[FlowEntry] = []
    with pytest.raises(TypeError, match=r"Bare has no 64-bit int member packets_in"):
        c_flush.flush([Bare()], 0, 10, 10, buffer, 1, 30_000, idle)
    entry = flows.entries[0]
    with pytest.raises(TypeError):
        entry.packets_in = "x"  # type: ignore[assignment]  # a C integer field: only an int gets in
    entry.packets_in = 5  # (the refused assignment left -1: CPython's T_LONGLONG setter)
    entry.handle = "x"  # type: ignore[assignment]
    with pytest.raises(TypeError, match="handle must be an int"):
        c_flush.flush([entry], 0, 10, 10, buffer, 1, 30_000, idle)
    assert table_bytes(flows) == before and idle == []
    with pytest.raises(ValueError, match="smaller than the partition"):
        c_flush.flush(flows.entries, 0, 10, 10, bytearray(64), 1, 30_000, idle)
    assert isinstance(entry, FlowEntry)


def test_a_closed_writer_gives_no_buffer(flows: LocalFlows) -> None:
    writer = flows._own()
    writer.close()
    with pytest.raises(WriterClosed):
        writer.table_buffer  # noqa: B018
