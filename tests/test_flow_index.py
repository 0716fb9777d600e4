"""relay._hitpath.FlowIndex (relay/_flow_index.h): the C hit path's copy of by_key, checked
against a dict through every kind of change, at sizes that make it grow and probe far."""
from __future__ import annotations

import random
import socket
import sys

import pytest

from relay._hitpath import FlowIndex  # the suite's set-up (scripts/bootstrap.sh) builds it
from relay.batchio import sockaddr_for


def v4_key(n: int) -> bytes:
    return sockaddr_for(socket.inet_aton(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"), 1024 + n % 50_000,
                        socket.AF_INET)


def v6_key(n: int) -> bytes:
    return sockaddr_for(socket.inet_pton(socket.AF_INET6, f"2001:db8::{n >> 16:x}:{n & 0xFFFF:x}"), 1024 + n % 50_000,
                        socket.AF_INET6)


def check_same(index: FlowIndex, model: dict[bytes, object], absent: list[bytes]) -> None:
    assert len(index) == len(model)
    for key, entry in model.items():
        assert index.get(key) is entry
    for key in absent:
        assert index.get(key) is None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_follows_a_dict_through_adds_replacements_and_removals(seed: int) -> None:
    rng = random.Random(seed)
    keys = [v4_key(n) for n in range(3_000)] + [v6_key(n) for n in range(1_000)] + [b"", b"x" * 63]
    index, model = FlowIndex(), {}
    for step in range(30_000):
        key = rng.choice(keys)
        if rng.random() < 0.55:
            entry = object()
            index.set(key, entry)
            model[key] = entry
        else:
            assert index.discard(key) is (model.pop(key, None) is not None)
        if step % 5_000 == 0:
            check_same(index, model, [k for k in keys if k not in model])
    check_same(index, model, [k for k in keys if k not in model])
    assert index.capacity >= 2 * len(model)


def test_removing_every_key_in_any_order_leaves_it_empty_and_usable() -> None:
    """Backward-shift deletion: a removal moves later slots of its probe run back; a wrong move
    would lose a key that is still there (get() None) or keep one that is gone."""
    keys = [v4_key(n) for n in range(20_000)]
    index = FlowIndex()
    entries = {key: object() for key in keys}
    for key, entry in entries.items():
        index.set(key, entry)
    order = keys[:]
    random.Random(7).shuffle(order)
    for i, key in enumerate(order):
        assert index.discard(key)
        if i % 997 == 0:
            check_same(index, {k: entries[k] for k in order[i + 1:]}, order[: i + 1])
    assert len(index) == 0 and not index.discard(keys[0])
    index.set(keys[1], entries[keys[1]])
    assert index.get(keys[1]) is entries[keys[1]]


def test_keys_that_share_their_first_eight_bytes_are_told_apart() -> None:
    index = FlowIndex()
    a, b = v6_key(1), v6_key(1)[:-1] + b"\x01"  # the same address and port, another scope id
    ea, eb = object(), object()
    index.set(a, ea)
    assert index.get(b) is None
    index.set(b, eb)
    assert (index.get(a), index.get(b)) == (ea, eb)


def test_holds_its_references_and_gives_them_back() -> None:
    entry, key = object(), v4_key(5)
    before = sys.getrefcount(entry)
    index = FlowIndex()
    index.set(key, entry)
    index.set(key, entry)  # a replacement holds one reference, not two
    assert sys.getrefcount(entry) == before + 1
    index.discard(key)
    assert sys.getrefcount(entry) == before
    index.set(key, entry)
    index.clear()
    assert sys.getrefcount(entry) == before and len(index) == 0
    index.set(key, entry)
    del index
    assert sys.getrefcount(entry) == before


def test_bad_keys_are_refused_by_name() -> None:
    index = FlowIndex()
    with pytest.raises(TypeError, match="bytes"):
        index.set("10.0.0.1", object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most 63 bytes"):
        index.set(b"x" * 64, object())
    assert len(index) == 0

