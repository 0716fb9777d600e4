"""A packet capture on the loopback (AF_PACKET + a classic BPF filter; no tcpdump needed):
``LoopbackCapture`` sees every UDP datagram the relay sends from its ports."""
from __future__ import annotations

import socket
import struct
import time
from typing import Self

_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_STATISTICS = 6
_PACKET_OUTGOING = 4
_SO_ATTACH_FILTER = 26


def _bpf_udp_src_ports(ports: list[int]) -> bytes:
    """cBPF for 'ip and udp and not a fragment and src port in ports' on an Ethernet-framed
    device (the loopback has 14-byte all-zero Ethernet headers), as `tcpdump -dd` writes it."""
    n = len(ports)
    prog: list[tuple[int, int, int, int]] = [
        (0x28, 0, 0, 12),  # ldh [12]: ethertype
        (0x15, 0, 6 + n, 0x0800),  # IPv4?
        (0x30, 0, 0, 23),  # ldb [23]: protocol
        (0x15, 0, 4 + n, 17),  # UDP?
        (0x28, 0, 0, 20),  # ldh [20]: flags, fragment offset
        (0x45, 2 + n, 0, 0x1FFF),  # a later fragment: reject
        (0xB1, 0, 0, 14),  # ldxb 4*([14]&0xf): IP header length
        (0x48, 0, 0, 14),  # ldh [x+14]: UDP source port
    ]
    for i, port in enumerate(ports):
        prog.append((0x15, n - i, 0, port))  # jeq port -> accept
    prog.append((0x06, 0, 0, 0))  # reject
    prog.append((0x06, 0, 0, 0xFFFF))  # accept
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


class LoopbackCapture:
    """Every UDP datagram sent on ``lo`` from one of ``ports`` (IPv4), captured while in use.

    ``packets``: (src ip, src port, dst ip, dst port, payload length), outgoing copies only
    (the loopback shows each datagram twice). ``drops``: what the capture itself lost (must be
    0 for a verdict). Needs CAP_NET_RAW (root).
    """

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.packets: list[tuple[str, int, str, int, int]] = []
        self.drops = 0
        self.seen = 0
        self._sock: socket.socket | None = None
        self._thread = None
        self._stop = False

    def __enter__(self) -> Self:
        import ctypes
        import threading

        # Protocol 0: the socket takes no packet until bind() names one, i.e. until the filter
        # is attached (a socket made with ETH_P_ALL queues unfiltered packets meanwhile).
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        prog = _bpf_udp_src_ports(self.ports)
        self._prog_buf = ctypes.create_string_buffer(prog)  # must outlive the setsockopt call
        fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(self._prog_buf))
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        sock.bind(("lo", _ETH_P_ALL))  # Python applies htons to the protocol itself
        sock.settimeout(0.1)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop:
            try:
                frame, addr = self._sock.recvfrom(70000)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] != _PACKET_OUTGOING or len(frame) < 42:
                continue
            ihl = (frame[14] & 0x0F) * 4
            src = socket.inet_ntoa(frame[26:30])
            dst = socket.inet_ntoa(frame[30:34])
            sport, dport, ulen = struct.unpack_from("!HHH", frame, 14 + ihl)
            self.packets.append((src, sport, dst, dport, ulen - 8))

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # let the thread read what is queued
        self._stop = True
        if self._thread is not None:
            self._thread.join(2)
        if self._sock is not None:
            stats = self._sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)
            self.seen, self.drops = struct.unpack("II", stats)
            self._sock.close()

    def destinations(self) -> set[tuple[str, int]]:
        return {(p[2], p[3]) for p in self.packets}
