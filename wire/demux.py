"""RFC 7983 demultiplexing: what a datagram is, from its first byte alone.

Sans-IO. The relay calls :func:`classify` only on a flow-table miss, so it is one length test
and one tuple index. RFC 7983 §7 ranges::

    0..3      STUN
    16..19    ZRTP        -> OTHER (WebRTC never uses it)
    20..63    DTLS
    64..79    TURN channel -> OTHER (we are not a TURN server)
    128..191  RTP / RTCP
"""

from __future__ import annotations

import enum

__all__ = ["PacketKind", "classify"]


class PacketKind(enum.IntEnum):
    OTHER = 0
    STUN = 1
    DTLS = 2
    RTP = 3  # RTP and RTCP: the relay forwards both the same way


def _kind_of(first: int) -> PacketKind:
    if first <= 3:
        return PacketKind.STUN
    if 20 <= first <= 63:
        return PacketKind.DTLS
    if 128 <= first <= 191:
        return PacketKind.RTP
    return PacketKind.OTHER


# Built once at import: a lookup beats a chain of comparisons on the miss path.
_TABLE: tuple[PacketKind, ...] = tuple(_kind_of(b) for b in range(256))
_OTHER = PacketKind.OTHER


def classify(datagram: bytes | memoryview) -> PacketKind:
    """Kind of ``datagram`` by its first byte; an empty datagram is OTHER."""
    # Indexing a bytes or 'B'-format memoryview yields an int in 0..255.
    return _TABLE[datagram[0]] if datagram else _OTHER
