"""systemd integration without libsystemd: sd_notify, socket activation, watchdog interval.

Both services use it (the transceiver too), so it has no relay-specific logic.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

SD_LISTEN_FDS_START = 3


def notify(state: str, fds: list[int] | None = None, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (e.g. "READY=1\\nSTATUS=...") to $NOTIFY_SOCKET; False when not under systemd.

    ``fds`` are passed with SCM_RIGHTS (for FDSTORE=1).
    """
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            if fds:
                socket.send_fds(sock, [state.encode()], fds)
            else:
                sock.sendall(state.encode())
        except OSError:
            return False  # systemd going away must not take the service down with it
    return True


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is set."""
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def listen_fds(environ: Mapping[str, str] = os.environ) -> dict[str, list[int]]:
    """File descriptors passed by socket activation (sd_listen_fds semantics), grouped by name.

    Names come from LISTEN_FDNAMES (FileDescriptorName=, or FDNAME= of the fd store); unnamed
    fds are grouped under "unknown". Empty when LISTEN_PID is not this process.
    """
    pid = environ.get("LISTEN_PID", "")
    count = environ.get("LISTEN_FDS", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return {}
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    grouped: dict[str, list[int]] = {}
    for index in range(int(count)):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        name = names[index] if index < len(names) and names[index] else "unknown"
        grouped.setdefault(name, []).append(fd)
    return grouped


def unset_listen_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Forget the activation variables so child processes do not think the fds are theirs."""
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(key, None)
