"""Tunnel frames: schema round trips, the in-place header, bad bytes → named errors."""
from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wire.tunnel_frame import (
    DATA_HEADER_LEN_V4,
    DATA_HEADER_LEN_V6,
    FRAME_ERROR_REASONS,
    HOP_HEADER_LEN_V4,
    HOP_HEADER_LEN_V6,
    HOP_TAG,
    Data,
    Drain,
    FrameError,
    Heartbeat,
    HopData,
    Probe,
    SessionClosed,
    data_header,
    data_prefix,
    decode_frame,
    encode_frame,
    hop_prefix,
)

LOOPBACK = b"\x7f\x00\x00\x01"


def test_ipv4_data_overhead_is_at_most_32_bytes() -> None:
    assert DATA_HEADER_LEN_V4 == 24 <= 32
    assert len(encode_frame(Data(1 << 40, LOOPBACK, 65000, b""))) <= 32
    assert DATA_HEADER_LEN_V6 == 36


@pytest.mark.parametrize("ip", [LOOPBACK, bytes(range(16))])
@pytest.mark.parametrize("payload_len", [0, 1, 140, 1200, 65535])
def test_fixed_header_decodes_as_data(ip: bytes, payload_len: int) -> None:
    payload = bytes(i & 0xFF for i in range(payload_len))
    frame = decode_frame(data_header((1 << 63) - 1, ip, 54321, payload_len) + payload)
    assert frame == Data((1 << 63) - 1, ip, 54321, payload)


def test_prefix_is_header_without_length() -> None:
    assert data_header(9, LOOPBACK, 1, 300) == data_prefix(9, LOOPBACK, 1) + (300).to_bytes(2, "big")


def test_header_refuses_oversized_payload() -> None:
    with pytest.raises(ValueError):
        data_header(1, LOOPBACK, 1, 65536)


@pytest.mark.parametrize(
    "frame",
    [Heartbeat(3, 100), Heartbeat(0, 0, draining=True), SessionClosed("abc+/"), Drain(12.5), Drain(), Probe()],
)
def test_control_round_trip(frame) -> None:
    assert decode_frame(encode_frame(frame)) == frame


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"", "frame_empty"),
        (b"\x02" + encode_frame(Heartbeat(1, 1))[1:], "frame_bad_version"),
        (b"\x01", "frame_malformed"),
        (b"\x01\x93\x09\x00\x00", "frame_malformed"),  # unknown tag
        (b"\x01" + msgspec.msgpack.encode([1, 5, b"\x00" * 5, 1, b""]), "frame_malformed"),  # 5-byte ip
        (b"\x01" + msgspec.msgpack.encode([1, -1, LOOPBACK, 1, b""]), "frame_malformed"),  # negative handle
        (b"\x01" + msgspec.msgpack.encode([1, 1, LOOPBACK, 70000, b""]), "frame_malformed"),  # port
        (data_header(1, LOOPBACK, 1, 10) + b"short", "frame_malformed"),  # truncated payload
        (b"\x01" + msgspec.msgpack.encode([3, "x" * 300]), "frame_malformed"),  # ufrag too long
    ],
)
def test_bad_bytes_have_named_reasons(raw: bytes, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        decode_frame(raw)
    assert info.value.reason == reason
    assert reason in FRAME_ERROR_REASONS


@settings(max_examples=300, deadline=None)
@given(
    handle=st.integers(0, (1 << 63) - 1),
    ip=st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)),
    port=st.integers(0, 65535),
    payload=st.binary(max_size=1500),
)
def test_data_round_trip_property(handle: int, ip: bytes, port: int, payload: bytes) -> None:
    frame = Data(handle, ip, port, payload)
    assert decode_frame(encode_frame(frame)) == frame
    assert decode_frame(data_header(handle, ip, port, len(payload)) + payload) == frame


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_frame_error(raw: bytes) -> None:
    try:
        decode_frame(raw)
    except FrameError as exc:
        assert exc.reason in FRAME_ERROR_REASONS


@pytest.mark.parametrize("ip", [LOOPBACK, bytes(range(16))])
@pytest.mark.parametrize("hops", [0, 1, 127])
def test_the_fixed_hop_header_decodes_as_hop_data(ip: bytes, hops: int) -> None:
    payload = b"\x00\x01 a STUN check, say"
    prefix = hop_prefix(1 << 40, ip, 4242, hops)
    raw = prefix + len(payload).to_bytes(2, "big") + payload
    assert raw.startswith(HOP_TAG)
    assert len(prefix) + 2 == (HOP_HEADER_LEN_V4 if len(ip) == 4 else HOP_HEADER_LEN_V6)
    assert decode_frame(raw) == HopData(1 << 40, ip, 4242, hops, payload)
    assert decode_frame(encode_frame(HopData(7, ip, 1, hops, payload))) == HopData(7, ip, 1, hops, payload)


def test_a_hop_limit_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        hop_prefix(1, LOOPBACK, 1, 128)
    raw = encode_frame(HopData(1, LOOPBACK, 1, 3, b"x")).replace(b"\x03\xc4\x01x", b"\xcc\xff\xc4\x01x")
    with pytest.raises(FrameError, match="frame_malformed"):
        decode_frame(raw)
