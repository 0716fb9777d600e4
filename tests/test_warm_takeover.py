"""A standby's warm copy of its partition (relay/warm_takeover.py): a takeover from the copy
leaves the worker's dicts exactly as a takeover that loads every flow, and builds only what
changed since the copy was refreshed. Real shm, no sockets."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from relay.batchio import sockaddr_for
from relay.config import RelayConfig
from relay.decision import Learn
from relay.flows import LocalFlows
from relay.warm_takeover import WarmCopy
from shm import FlowTable
from shm.layout import HANDLE_SLOT_MASK

PUBLIC = (socket.inet_aton("127.0.0.1"), 3478)
TRANSCEIVERS = [(socket.inet_aton("127.0.0.2"), 40000 + i) for i in range(3)]
FLOWS = 2400  # (+200 below: under the table's load limit, 0.75 of 4,096)


def source(n: int) -> tuple[bytes, int]:
    return bytes([10, 1, (n >> 8) & 255, n & 255]), 5000 + n % 5


@pytest.fixture
def config(tmp_path: Path) -> RelayConfig:
    # small tables: removals shift flows between slots (what the copy must follow)
    config = RelayConfig(name="warm", workers=1, table_dir=str(tmp_path), flow_capacity=4096, session_capacity=4096,
                         idle_timeout=30.0)
    FlowTable.create(config.table_path, partitions=1, flow_capacity=4096, session_capacity=4096).close()
    return config


def learn(flows: LocalFlows, n: int, now: float) -> None:
    src = source(n)
    entry, refusal = flows.learn(sockaddr_for(*src), src, 0, Learn(f"s{n:05d}", *TRANSCEIVERS[n % 3], 1), now)
    assert entry is not None, refusal


def state(flows: LocalFlows) -> dict:
    """Everything a worker's dicts say about its flows, comparable across two LocalFlows."""
    entries = {key: (e.handle, e.client, e.public_index, e.tunnel_dest, e.target, e.ufrag, e.hops, e.prefix, e.match,
                     e.client_address, e.packets_in, e.bytes_in, e.packets_out, e.bytes_out, e.flushed_activity,
                     e.flushed_ms, e.aliases)
               for key, e in flows.by_key.items()}
    return {"entries": entries, "by_handle": {h: e.client_key for h, e in flows.by_handle.items()},
            "by_address": {a: e.client_key for a, e in flows.by_address.items()},
            "by_ufrag": flows.by_ufrag, "by_transceiver": flows.by_transceiver,
            "transceivers": flows.transceivers, "entries_list": sorted(e.client_key for e in flows.entries),
            "indexes": sorted(e.index for e in flows.entries)}


def test_a_takeover_from_the_copy_is_a_takeover_of_every_flow(config: RelayConfig) -> None:
    owner = LocalFlows(config, 0, socket.AF_INET, [PUBLIC])
    owner.take_over(now=100.0)
    for n in range(FLOWS):
        learn(owner, n, 100.0)
    standby = LocalFlows(config, 0, socket.AF_INET, [PUBLIC])
    warm = WarmCopy(standby)
    while warm.refresh(101.0, limit=500):  # bounded slices, as the standby does once a second
        assert len(standby.entries) <= FLOWS
    assert len(standby.by_key) == FLOWS and warm.refresh(101.0) == 0  # caught up: nothing changed
    # The owner goes on: new sessions, closed ones (deletions shift others between slots),
    # traffic counted into shm.
    for n in range(FLOWS, FLOWS + 200):
        learn(owner, n, 102.0)
    for n in range(0, FLOWS, 7):
        src = source(n)
        assert owner.remove(sockaddr_for(*src))
    for n in range(FLOWS + 200):  # every flow of one transceiver gone: the copy must forget it too
        if n % 3 == 2 and (n % 7 or n >= FLOWS):
            assert owner.remove(sockaddr_for(*source(n)))
    for entry in owner.entries[:50]:
        entry.packets_in += 5
        entry.bytes_in += 500
    owner.flush_counters(103.0)
    changed = sum(1 for n in range(FLOWS + 200) if n >= FLOWS or n % 7 == 0 or n % 3 == 2)
    owner.writer.close()  # (its lock released, as by its death)

    fresh = LocalFlows(config, 0, socket.AF_INET, [PUBLIC])
    fresh.take_over(now=110.0)
    expected = state(fresh)
    fresh.writer.close()

    looked = []
    original = warm.refresh
    warm.refresh = lambda now, limit=None: looked.append(original(now, limit)) or looked[-1]  # type: ignore[method-assign]
    standby.take_over(now=110.0, warm=warm)
    assert state(standby) == expected
    gone = sum(1 for n in range(FLOWS + 200) if (n < FLOWS and n % 7 == 0) or n % 3 == 2)
    assert len(standby.by_key) == FLOWS + 200 - gone and len(standby.transceivers) == 2
    assert changed <= looked[0] < FLOWS  # only what changed (and what the shifts moved)
    standby.close()


def test_a_slot_read_mid_write_is_read_again(config: RelayConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    owner = LocalFlows(config, 0, socket.AF_INET, [PUBLIC])
    owner.take_over(now=100.0)
    for n in range(20):
        learn(owner, n, 100.0)
    standby = LocalFlows(config, 0, socket.AF_INET, [PUBLIC])
    warm = WarmCopy(standby)
    table = standby.table
    real = table.flow_at
    busy = {next(iter(owner.by_handle)) & HANDLE_SLOT_MASK}  # one slot's writer "busy" (seqlock odd) once

    def flow_at(p: int, i: int):
        if i in busy:
            busy.discard(i)
            return None
        return real(p, i)

    monkeypatch.setattr(table, "flow_at", flow_at)
    warm.refresh(101.0)
    assert len(standby.by_key) == 19
    assert warm.refresh(101.0) == 1 and len(standby.by_key) == 20  # read again, and only it
    warm.reset()
    assert standby.by_key == {} and standby.entries == [] and standby.transceivers == {}
    owner.close()
    standby.close()
