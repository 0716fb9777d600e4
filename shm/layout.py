"""Binary layout of the shared-memory flow table: file header, partition header, slots, hashes.

Everything here is a fixed, versioned byte layout (little-endian, x86-64 / TSO assumed; see
the `shm` package docstring for the concurrency rules). Nothing in this module touches shared memory
concurrently: it only describes where things are and how keys hash.

File (one per relay instance, under /dev/shm)::

    0                 file header (HEADER_SIZE bytes)
    HEADER_SIZE       partition 0: header (PART_HEADER_SIZE) | flow slots | session slots | closed slots
    + stride          partition 1 ...

Flow slot (FLOW_SLOT = 128 bytes, 8-byte aligned words)::

    0   seq        u64  seqlock word: odd while the owner writes the slot
    8   tag        u64  high 32 bits: generation; low 32 bits: key hash | 1 (0 = empty slot)
    16  session    u64  session ref: the keyed 64-bit hash of the ufrag (| 1)
    24  client ip  16s  IPv6 or IPv4-mapped (::ffff:a.b.c.d)      \
    40  local ip   16s                                              | the 36-byte key
    56  client port u16, 58 local port u16                         /
    60  target port u16, 62 worker u8, 63 origin u8 (partition the flow was first learned in)
    64  target ip  16s  the transceiver's tunnel address
    80  created, 88 last seen (int ms), 96 packets in, 104 bytes in, 112 packets out, 120 bytes out

Session slot (SESSION_SLOT = 128 bytes)::

    0   seq        u64
    8   tag        u64  the session ref (keyed hash of the ufrag | 1); 0 = empty slot
    16  ufrag len u8, pad u8, target port u16, flows u32
    24  target ip 16s, 40 created u64, 48 last seen u64, 56 ufrag 64s, 120 reserved u64

Closed slot (CLOSED_SLOT = 16 bytes; as many as session slots): a session that ended, whose
ufrag must open no flow again until its token is too old to be accepted anyway (shm/closed.py)::

    0   until      u64  unix ms after which the entry is void (written first)
    8   tag        u64  the session ref (keyed hash of the ufrag | 1); 0 = never used
"""
from __future__ import annotations

import hashlib
import ipaddress
import struct
import zlib
from typing import Final

MAGIC: Final = b"RTCRFLT\x00"
LAYOUT_VERSION: Final = 2  # 2: closed-session slots

HEADER_SIZE: Final = 256
PART_HEADER_SIZE: Final = 256
FLOW_SLOT: Final = 128
SESSION_SLOT: Final = 128
CLOSED_SLOT: Final = 16
SLOT_WORDS: Final = 16  # 128 / 8

MAX_PARTITIONS: Final = 256
MAX_CAPACITY: Final = 1 << 23  # slot index must fit the handle's 23 bits
MIN_CAPACITY: Final = 4
MAX_UFRAG: Final = 64
LOAD_NUM: Final = 3  # load cap 3/4: a partition holds at most capacity * 3 // 4 entries
LOAD_DEN: Final = 4

# File header: magic, version, sizes, partition count, capacities, hash seed.
HEADER = struct.Struct("<8sIIIIIIIIIIIIQQQQ")
# (magic, version, header_size, part_header_size, flow_slot, session_slot, partitions,
#  flow_capacity, session_capacity, max_flows_per_session, load_num, load_den, reserved,
#  partition_stride, file_size, seed, reserved)

# Partition header: 8-byte words, each written by the partition's owner only.
P_SC: Final = 0  # structure counter: odd while a move / delete / repair is under way
P_FLOWS: Final = 1  # live flows
P_SESSIONS: Final = 2  # live session entries
P_REFUSED_TABLE_FULL: Final = 3
P_REFUSED_SESSION_TABLE_FULL: Final = 4
P_REFUSED_SESSION_FLOW_LIMIT: Final = 5
P_REFUSED_UFRAG_TOO_LONG: Final = 6
P_SWEEP_CURSOR: Final = 7
P_OWNER_PID: Final = 8
P_TAKEOVERS: Final = 9
P_INSERTS: Final = 10
P_DELETES: Final = 11
P_JOURNAL: Final = 12  # byte offset of the slot whose previous image is in the journal (0 = none)
P_ADOPTED: Final = 13
P_EXPIRED: Final = 14
P_CLOSED: Final = 15  # closed-session entries written (the last word before the journal image)
JOURNAL_OFFSET: Final = 128  # journal image: 128 bytes at partition header + 128

# Flow slot word indexes (within the slot) and byte offsets.
W_SEQ: Final = 0
W_TAG: Final = 1
W_SREF: Final = 2
W_PORTS: Final = 7  # client port | local port << 16 | target port << 32 | worker << 48 | origin << 56
W_TIP_LO: Final = 8
W_TIP_HI: Final = 9
W_CREATED: Final = 10
W_LAST_SEEN: Final = 11
KEY_OFF: Final = 24
KEY_END: Final = 60
TIP_OFF: Final = 64
COUNTERS_OFF: Final = 88  # last seen, packets in, bytes in, packets out, bytes out

# Session slot word indexes.
SW_INFO: Final = 2  # ufrag len | target port << 16 | flows << 32
SW_CREATED: Final = 5
SW_LAST_SEEN: Final = 6
S_UFRAG_OFF: Final = 56

FLOW_SLOT_STRUCT = struct.Struct("<QQQ16s16sHHHBB16sQQQQQQ")  # the whole slot
FLOW_BODY = struct.Struct("<Q16s16sHHHBB16sQQQQQQ")  # bytes 16..128 (never seq / tag)
FLOW_KEY = struct.Struct("<16s16sHH")  # bytes 24..60
FLOW_COUNTERS = struct.Struct("<QQQQQ")  # bytes 88..128
SESSION_SLOT_STRUCT = struct.Struct("<QQBxHI16sQQ64sQ")
SESSION_BODY = struct.Struct("<BxHI16sQQ64sQ")  # bytes 16..128

M32: Final = 0xFFFFFFFF
GOLDEN32: Final = 0x9E3779B1

# Flow handle: generation (32 bits) << 31 | partition (8 bits) << 23 | slot (23 bits): 63 bits.
HANDLE_SLOT_BITS: Final = 23
HANDLE_PART_BITS: Final = 8
HANDLE_SLOT_MASK: Final = (1 << HANDLE_SLOT_BITS) - 1
HANDLE_PART_MASK: Final = (1 << HANDLE_PART_BITS) - 1
HANDLE_GEN_SHIFT: Final = HANDLE_SLOT_BITS + HANDLE_PART_BITS


def make_handle(gen: int, partition: int, slot: int) -> int:
    return (gen << HANDLE_GEN_SHIFT) | (partition << HANDLE_SLOT_BITS) | slot


def split_handle(handle: int) -> tuple[int, int, int]:
    """(generation, partition, slot) of a handle."""
    return handle >> HANDLE_GEN_SHIFT, (handle >> HANDLE_SLOT_BITS) & HANDLE_PART_MASK, handle & HANDLE_SLOT_MASK


def partition_stride(flow_capacity: int, session_capacity: int) -> int:
    # closed slots: as many as session slots (sessions end about as often as they start)
    return PART_HEADER_SIZE + flow_capacity * FLOW_SLOT + session_capacity * (SESSION_SLOT + CLOSED_SLOT)


def file_size(partitions: int, flow_capacity: int, session_capacity: int) -> int:
    return HEADER_SIZE + partitions * partition_stride(flow_capacity, session_capacity)


def load_limit(capacity: int) -> int:
    """Most entries a table of `capacity` slots may hold (the load cap)."""
    return capacity * LOAD_NUM // LOAD_DEN


def flow_home(tag32: int, shift: int) -> int:
    """Home slot of a flow key from its 32-bit tag (Fibonacci hashing of the CRC)."""
    return ((tag32 * GOLDEN32) & M32) >> shift


def flow_tag32(key: bytes, seed32: int) -> int:
    """Non-zero 32-bit hash of a 36-byte flow key (seeded CRC-32; the seed is in the header)."""
    return zlib.crc32(key, seed32) | 1


def session_ref(ufrag: bytes, seed: int) -> int:
    """Non-zero 64-bit keyed hash of a ufrag (BLAKE2b keyed with the table's seed)."""
    digest = hashlib.blake2b(ufrag, digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") | 1


def ip16(addr: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """16-byte form of an address: IPv6 as is, IPv4 as IPv4-mapped (::ffff:a.b.c.d)."""
    if isinstance(addr, bytes):
        if len(addr) == 16:
            return addr
        if len(addr) == 4:
            return b"\x00" * 10 + b"\xff\xff" + addr
        raise ValueError(f"packed address must be 4 or 16 bytes, got {len(addr)}")
    ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    if isinstance(ip, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def ip_str(packed: bytes) -> str:
    """Text form of a 16-byte address; IPv4-mapped addresses print as plain IPv4."""
    ip = ipaddress.IPv6Address(packed)
    mapped = ip.ipv4_mapped
    return str(mapped) if mapped is not None else str(ip)
