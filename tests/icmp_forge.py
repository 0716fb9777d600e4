"""ICMP errors as a stranger could send them: the tests' forger (a raw socket: root)."""
from __future__ import annotations

import socket
import struct
from pathlib import Path


def forge_unreachable(link: tuple[str, int], transceiver: tuple[str, int], code: int) -> None:
    """An ICMP destination unreachable (``code``: 2 protocol, 3 port, 13 administratively
    filtered) about a datagram from ``link`` to ``transceiver``, as anyone who can reach the
    relay could send it (a raw socket: root): the kernel hands it to the socket the quoted
    header names."""
    udp = struct.pack("!HHHH", link[1], transceiver[1], 8 + 20, 0)
    inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 20, 0x1234, 0, 64, socket.IPPROTO_UDP, 0,
                        socket.inet_aton(link[0]), socket.inet_aton(transceiver[0])) + udp

    def checksum(data: bytes) -> int:
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        total = (total >> 16) + (total & 0xFFFF)
        return ~(total + (total >> 16)) & 0xFFFF

    icmp = struct.pack("!BBHI", 3, code, 0, 0) + inner + bytes(20)
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw:
        raw.sendto(icmp, (link[0], 0))


def link_to(transceiver: tuple[str, int]) -> tuple[str, int]:
    """The local address of the (one) UDP socket connected to ``transceiver``: the relay's link."""
    want = f"{socket.inet_aton(transceiver[0])[::-1].hex().upper()}:{transceiver[1]:04X}"
    rows = [line.split() for line in Path("/proc/net/udp").read_text().splitlines()[1:]]
    (local,) = [row[1] for row in rows if row[2] == want]
    ip_hex, port_hex = local.split(":")
    return socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1]), int(port_hex, 16)
