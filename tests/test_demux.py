"""wire/demux.py: RFC 7983 first-byte classification."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wire import demux
from wire.demux import PacketKind, classify
from wire.stun import build_binding_request


def _reference(first: int) -> PacketKind:
    # RFC 7983 §7, written out independently of the module's table.
    if first in range(4):
        return PacketKind.STUN
    if first in range(20, 64):
        return PacketKind.DTLS
    if first in range(128, 192):
        return PacketKind.RTP
    return PacketKind.OTHER


def test_every_first_byte() -> None:
    for first in range(256):
        assert classify(bytes([first])) is _reference(first), first


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (0, PacketKind.STUN), (3, PacketKind.STUN), (4, PacketKind.OTHER),
        (16, PacketKind.OTHER), (19, PacketKind.OTHER),  # ZRTP
        (20, PacketKind.DTLS), (63, PacketKind.DTLS),
        (64, PacketKind.OTHER), (79, PacketKind.OTHER),  # TURN channels
        (127, PacketKind.OTHER), (128, PacketKind.RTP), (191, PacketKind.RTP),
        (192, PacketKind.OTHER), (255, PacketKind.OTHER),
    ],
)
def test_range_boundaries(first: int, kind: PacketKind) -> None:
    assert classify(bytes([first]) + b"\x00" * 11) is kind


def test_empty_datagram_is_other() -> None:
    assert classify(b"") is PacketKind.OTHER
    assert classify(memoryview(b"")) is PacketKind.OTHER
    assert classify(memoryview(b"\x00\x01")[2:]) is PacketKind.OTHER


def test_real_packets() -> None:
    stun = build_binding_request(bytes(12), "a:b", b"k", 1, controlling=True, tie_breaker=1)
    assert classify(stun) is PacketKind.STUN
    assert classify(bytes.fromhex("16fefd000000000000000000")) is PacketKind.DTLS  # handshake record
    assert classify(bytes.fromhex("17fefd00010000000000")) is PacketKind.DTLS  # application data
    assert classify(bytes.fromhex("806f0001000000a0deadbeef")) is PacketKind.RTP  # RTP, PT 111
    assert classify(bytes.fromhex("81c90007deadbeef")) is PacketKind.RTP  # RTCP RR
    assert classify(b"GET / HTTP/1.1\r\n") is PacketKind.OTHER


@given(st.binary(max_size=64))
def test_only_the_first_byte_counts_and_buffers_agree(data: bytes) -> None:
    kind = classify(data)
    assert kind is classify(data[:1])
    assert kind is classify(memoryview(data))
    assert kind is classify(memoryview(bytearray(b"\xff" + data))[1:])
    assert kind is (_reference(data[0]) if data else PacketKind.OTHER)


def test_kinds_are_distinct_ints_and_the_table_is_a_tuple() -> None:
    assert len({int(k) for k in PacketKind}) == len(PacketKind) == 4
    assert isinstance(demux._TABLE, tuple) and len(demux._TABLE) == 256
