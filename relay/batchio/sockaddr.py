"""Sockaddr bytes: how the relay names a UDP address, as a cheap dict key and a send destination.

They are the raw ``sockaddr`` the kernel writes for a datagram's source, in a compact form:

- IPv4 (``AF_INET`` socket): 8 bytes ``family (native u16) | port (BE) | addr (4)``;
- IPv6 (``AF_INET6`` socket): the whole 28-byte ``sockaddr_in6`` (family, port, flowinfo,
  addr, scope id). flowinfo is 0 unless the socket enables ``IPV6_FLOWINFO``; a dual-stack
  socket receives IPv4 clients as v4-mapped ``::ffff:a.b.c.d`` (16-byte ``ip_packed``).

A receiver's ``keys()`` are these bytes (relay/_hitpath.c builds the same ones), the worker's
flows are keyed by them and a sender takes them as destinations. :func:`sockaddr_for` builds
them from ``(ip_packed, port)`` (build it once per flow and keep it in the flow entry);
:func:`decode_sockaddr` goes back (miss path only).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

KEY_LEN_V4 = 8  # family, port, addr: sin_zero is always zero and not part of the key
SOCKADDR_IN_LEN = 16
SOCKADDR_IN6_LEN = 28
_FAM4 = struct.pack("=H", AF_INET)
_FAM6 = struct.pack("=H", AF_INET6)
_V4MAPPED = b"\x00" * 10 + b"\xff\xff"
_SA4 = struct.Struct("=H")  # family only; port and address are packed big-endian below
_SA6_TAIL = struct.Struct("=I")  # sin6_scope_id is host order; sin6_flowinfo is network order


def sockaddr_for(ip_packed: bytes, port: int, family: int | None = None, scope_id: int = 0) -> bytes:
    """The sockaddr bytes for ``(ip_packed, port)``, as a receiver's ``key()`` returns them.

    ``family`` is the family of the socket that will use it (default: by the address length).
    An IPv4 address for an ``AF_INET6`` socket becomes v4-mapped; a v4-mapped IPv6 address for
    an ``AF_INET`` socket becomes plain IPv4.
    """
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    n = len(ip_packed)
    if n not in (4, 16):
        raise ValueError(f"ip_packed must be 4 or 16 bytes, not {n}")
    if family is None:
        family = AF_INET if n == 4 else AF_INET6
    port_be = port.to_bytes(2, "big")
    if family == AF_INET:
        if n == 16:
            if ip_packed[:12] != _V4MAPPED:
                raise ValueError("an IPv6 address needs an AF_INET6 socket")
            ip_packed = ip_packed[12:]
        return _FAM4 + port_be + bytes(ip_packed)
    if family == AF_INET6:
        if n == 4:
            ip_packed = _V4MAPPED + bytes(ip_packed)
        return _FAM6 + port_be + b"\x00\x00\x00\x00" + bytes(ip_packed) + _SA6_TAIL.pack(scope_id)
    raise ValueError(f"unsupported address family {family}")


def decode_sockaddr(raw: bytes) -> tuple[bytes, int]:
    """``(ip_packed, port)`` of sockaddr bytes (8/16-byte IPv4 or 28-byte IPv6 form)."""
    if len(raw) < KEY_LEN_V4:
        raise ValueError("sockaddr too short")
    fam = _SA4.unpack_from(raw)[0]
    port = int.from_bytes(raw[2:4], "big")
    if fam == AF_INET:
        return bytes(raw[4:8]), port
    if fam == AF_INET6 and len(raw) >= 24:
        return bytes(raw[8:24]), port
    raise ValueError(f"not an AF_INET/AF_INET6 sockaddr (family {fam}, {len(raw)} bytes)")


def address_tuple(raw: bytes) -> tuple[Any, ...]:
    """The Python socket-module address tuple of sockaddr bytes: what ``recvfrom`` returns for
    that source (``recv_one``'s address; the fallback path)."""
    ip, port = decode_sockaddr(raw)
    if len(ip) == 4:
        return (socket.inet_ntop(AF_INET, ip), port)
    flowinfo = int.from_bytes(raw[4:8], "big")
    scope_id = _SA6_TAIL.unpack_from(raw, 24)[0] if len(raw) >= 28 else 0
    return (socket.inet_ntop(AF_INET6, ip), port, flowinfo, scope_id)


def sockaddr_of_tuple(family: int, addr: tuple[Any, ...]) -> bytes:
    """sockaddr bytes of a Python socket-module address tuple (``recvfrom``'s; the fallback path)."""
    if family == AF_INET:
        return _FAM4 + addr[1].to_bytes(2, "big") + socket.inet_pton(AF_INET, addr[0])
    host = addr[0].split("%", 1)[0]
    return (
        _FAM6
        + addr[1].to_bytes(2, "big")
        + (addr[2] if len(addr) > 2 else 0).to_bytes(4, "big")
        + socket.inet_pton(AF_INET6, host)
        + _SA6_TAIL.pack(addr[3] if len(addr) > 3 else 0)
    )
