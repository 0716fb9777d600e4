"""Tunnel frames between relay and transceiver: a version byte, then one MessagePack array.

The msgspec Structs below are the schema and the single source of truth. The relay's packet
paths do not run the encoder or the decoder per datagram: they write and match a fixed-width
encoding of the same Data array in place (:func:`data_prefix`, :data:`DATA_HEADER_V4` /
:data:`DATA_HEADER_V6`, :data:`DATA_TAG_HANDLE`), which the decoder reads back as a
:class:`Data` (tests hold the two to each other). Fixed widths keep the header a constant
24 bytes for an IPv4 client (36 for IPv6), so the relay can reserve it as headroom in front
of the received payload. This module is the one place that knows that layout (the C hit
path, relay/_hitpath.c, writes the same bytes and says so).

Direction and meaning:

- ``Data``            both ways: relay→transceiver carries a client datagram; transceiver→relay
                      carries a datagram for that client. ``handle`` names the relay's flow.
- ``Heartbeat``       transceiver→relay, every second: alive, load, draining.
- ``SessionClosed``   transceiver→relay: drop every flow of that ufrag now.
- ``Drain``           transceiver→relay: it takes no new sessions; existing flows stay.
- ``SessionRenamed``  transceiver→relay, after an ICE restart: the session's flows now belong to
                      ``new`` (the client restarted on the same 5-tuple: its flow is still
                      labelled ``old``), and ``old`` is closed as ``SessionClosed`` closes it.
- ``Probe``           relay→transceiver: its link's port refused a datagram (ICMP); a live
                      transceiver answers at once with a ``Heartbeat`` to the sender.
- ``HopData``         edge relay→cluster relay: a client datagram of a session that lives in
                      another cluster (the route token names it), with the client's address,
                      the edge's ``handle`` for the way back (a ``Data`` frame with that handle,
                      as a transceiver answers) and ``hops`` left: a relay that would forward
                      it again with no hop left drops it, so routes can never loop.
"""

from __future__ import annotations

import struct
from typing import Annotated

import msgspec

FRAME_VERSION = 1
_VERSION_BYTE = bytes([FRAME_VERSION])

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
MAX_HOPS = 127  # a positive fixint: one byte in the fixed-width HopData header
Handle = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]


class Data(msgspec.Struct, array_like=True, frozen=True, tag=1):
    handle: Handle
    ip: bytes  # packed client IP, 4 or 16 bytes
    port: Port
    payload: bytes

    def __post_init__(self) -> None:
        if len(self.ip) not in (4, 16):
            raise ValueError("ip must be 4 or 16 bytes")


class Heartbeat(msgspec.Struct, array_like=True, frozen=True, tag=2):
    sessions: Annotated[int, msgspec.Meta(ge=0)]
    capacity: Annotated[int, msgspec.Meta(ge=0)]
    draining: bool = False


class SessionClosed(msgspec.Struct, array_like=True, frozen=True, tag=3):
    ufrag: Annotated[str, msgspec.Meta(max_length=256)]


class Drain(msgspec.Struct, array_like=True, frozen=True, tag=4):
    deadline_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class SessionRenamed(msgspec.Struct, array_like=True, frozen=True, tag=5):
    old: Annotated[str, msgspec.Meta(max_length=256)]
    new: Annotated[str, msgspec.Meta(max_length=256)]


class HopData(msgspec.Struct, array_like=True, frozen=True, tag=6):
    handle: Handle
    ip: bytes  # packed client IP, 4 or 16 bytes
    port: Port
    hops: Annotated[int, msgspec.Meta(ge=0, le=MAX_HOPS)]
    payload: bytes

    def __post_init__(self) -> None:
        if len(self.ip) not in (4, 16):
            raise ValueError("ip must be 4 or 16 bytes")


class Probe(msgspec.Struct, array_like=True, frozen=True, tag=7):
    pass


Frame = Data | Heartbeat | SessionClosed | Drain | SessionRenamed | HopData | Probe

FRAME_ERROR_REASONS = frozenset({"frame_empty", "frame_bad_version", "frame_malformed"})


class FrameError(Exception):
    """Bytes that are not a tunnel frame; ``reason`` is one of FRAME_ERROR_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


def encode_frame(frame: Frame) -> bytes:
    return _VERSION_BYTE + _encoder.encode(frame)


#: a Probe's bytes (it has no fields): what a relay sends and a receiver can match as is
PROBE = encode_frame(Probe())


def decode_frame(buf: bytes | memoryview) -> Frame:
    if not buf:
        raise FrameError("frame_empty")
    if buf[0] != FRAME_VERSION:
        raise FrameError("frame_bad_version", f"version byte {buf[0]}")
    try:
        return _decoder.decode(memoryview(buf)[1:])
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        # msgspec reports a str field that is not UTF-8 as UnicodeDecodeError.
        raise FrameError("frame_malformed", str(exc)) from None


# --- the fixed-width Data header, written and matched in place by the packet paths --------
# version, fixarray(5), tag 1, uint64 handle, bin8 ip, uint16 port, bin16 payload length
_HEADER_V4 = struct.Struct("!BBBBQBB4sBHBH")
_HEADER_V6 = struct.Struct("!BBBBQBB16sBHBH")
DATA_HEADER_LEN_V4 = _HEADER_V4.size  # 24
DATA_HEADER_LEN_V6 = _HEADER_V6.size  # 36
MAX_PAYLOAD = 0xFFFF
#: SessionClosed and SessionRenamed go out at once and again with the sender's next
#: CLOSE_REPEATS heartbeats (a transceiver's to its relays, a cluster relay's to its edges):
#: over UDP one may be lost, and receiving one again changes nothing.
CLOSE_REPEATS = 2
#: The first 4 bytes of every fixed-width Data frame: version, fixarray(5), tag 1, uint64 marker.
DATA_TAG = bytes((FRAME_VERSION, 0x95, 0x01, 0xCF))
#: The tag and the flow's handle, the first 12 bytes: ``tag, handle = DATA_TAG_HANDLE.unpack_from(buf, off)``.
DATA_TAG_HANDLE = struct.Struct("!4sQ")
#: The whole header as (prefix, payload length): the prefix is constant per flow
#: (:func:`data_prefix`), the length a big-endian uint16 (bin16). ``pack_into`` writes it in
#: front of a payload, ``unpack_from`` reads it back to match a frame against its flow.
DATA_HEADER_V4 = struct.Struct(f"!{DATA_HEADER_LEN_V4 - 2}sH")
DATA_HEADER_V6 = struct.Struct(f"!{DATA_HEADER_LEN_V6 - 2}sH")


def data_header_struct(ip: bytes) -> struct.Struct:
    """:data:`DATA_HEADER_V4` or :data:`DATA_HEADER_V6`, for a client of ``ip``'s family."""
    return DATA_HEADER_V4 if len(ip) == 4 else DATA_HEADER_V6


def data_prefix(handle: int, ip: bytes, port: int) -> bytes:
    """Header bytes up to (not including) the 2-byte payload length: constant per flow, cache it."""
    header_struct = _HEADER_V4 if len(ip) == 4 else _HEADER_V6
    return header_struct.pack(FRAME_VERSION, 0x95, 0x01, 0xCF, handle, 0xC4, len(ip), ip, 0xCD, port, 0xC5, 0)[:-2]


def data_frame(prefix: bytes, payload: bytes) -> bytes:
    """A whole Data frame from a flow's cached :func:`data_prefix` (payload ≤ MAX_PAYLOAD)."""
    return b"".join((prefix, len(payload).to_bytes(2, "big"), payload))


def data_header(handle: int, ip: bytes, port: int, payload_len: int) -> bytes:
    """The full fixed-width header of a Data frame; ``header + payload`` decodes as :class:`Data`."""
    if payload_len > MAX_PAYLOAD:
        raise ValueError("payload larger than 65535 bytes")
    return data_prefix(handle, ip, port) + payload_len.to_bytes(2, "big")


# --- the fixed-width HopData header (edge relay -> cluster relay) ----------------------------
# version, fixarray(6), tag 6, uint64 handle, bin8 ip, uint16 port, fixint hops, bin16 length
_HOP_HEADER_V4 = struct.Struct("!BBBBQBB4sBHBBH")
_HOP_HEADER_V6 = struct.Struct("!BBBBQBB16sBHBBH")
HOP_HEADER_LEN_V4 = _HOP_HEADER_V4.size  # 25
HOP_HEADER_LEN_V6 = _HOP_HEADER_V6.size  # 37
#: The first 4 bytes of every fixed-width HopData frame.
HOP_TAG = bytes((FRAME_VERSION, 0x96, 0x06, 0xCF))


def hop_prefix(handle: int, ip: bytes, port: int, hops: int) -> bytes:
    """HopData header bytes up to the 2-byte payload length: constant per edge flow."""
    if not 0 <= hops <= MAX_HOPS:
        raise ValueError(f"hops must be 0..{MAX_HOPS}")
    header_struct = _HOP_HEADER_V4 if len(ip) == 4 else _HOP_HEADER_V6
    return header_struct.pack(FRAME_VERSION, 0x96, 0x06, 0xCF, handle, 0xC4, len(ip), ip, 0xCD, port, hops,
                              0xC5, 0)[:-2]
