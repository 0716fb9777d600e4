"""Loopback addresses the socket tests run on: IPv4 always, IPv6 where the host has ::1."""

from __future__ import annotations

import socket

import pytest


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


#: (family, host) parameters: ids "v4" and "v6"
FAMILIES = [
    pytest.param((socket.AF_INET, "127.0.0.1"), id="v4"),
    pytest.param((socket.AF_INET6, "::1"), id="v6", marks=pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")),
]
