"""The relay's sockets: public SO_REUSEPORT sockets (one per worker and listen address) and one
tunnel socket per worker. The supervisor makes and keeps them all, so a restarted worker gets
the very same sockets and the kernel's reuseport hash moves no flow."""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("rtcrelay.relay")


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def set_buffers(sock: socket.socket, size: int) -> None:
    """Large buffers absorb bursts; as root, *BUFFORCE goes past net.core.rmem_max."""
    for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF),
                         (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def open_udp(host: str, port: int, *, reuseport: bool, buffer_size: int) -> socket.socket:
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        set_buffers(sock, buffer_size)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def adopt_fd(fd: int) -> socket.socket:
    """Wrap an inherited (socket-activated or fd-store) UDP socket."""
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_DGRAM:
        sock.detach()
        raise ValueError(f"fd {fd} is not a UDP socket")
    sock.setblocking(False)
    return sock


def bound_address(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return host, port
