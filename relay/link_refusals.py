"""When a refused datagram means that a transceiver crashed. Sans-IO.

The kernel reports an ICMP port unreachable for a connected link socket as ECONNREFUSED on
its next call. Taken at its word, one such error dropped every flow of the transceiver. But
one ICMP error proves little: anyone who can send to the relay can forge one (the kernel
matches it to a socket by the header it quotes: the relay's and the transceiver's tunnel
addresses and the link's port, which a sweep of 28k ports finds), and a transceiver that
reopens its socket in place refuses for a moment. So a refusal asks the transceiver (a Probe
frame, which a live one answers at once with a Heartbeat), and the transceiver crashed when
nothing was heard from it for :data:`PROBE_WAIT_S` after the question. (Waiting for a second
refusal instead does not work: the worker's hit path sends on the same link and takes the
next errors for its own.)
"""
from __future__ import annotations

from collections.abc import Callable

#: how long a live transceiver may take to answer a probe: its event loop may be busy (a
#: transceiver's audio pipeline runs on it) and a heartbeat is due each second anyway
PROBE_WAIT_S = 1.0


class LinkRefusals:
    """The questions asked (monotonic s, by the transceiver's tunnel address) and not answered."""

    def __init__(self) -> None:
        self._asked: dict[bytes, float] = {}

    def refused(self, dest: bytes, now: float) -> bool:
        """A refusal from ``dest``: True when a question must go out (a probe), False when one
        is out already."""
        if dest in self._asked:
            return False
        self._asked[dest] = now
        return True

    def crashed(self, now: float, last_heard: Callable[[bytes], float | None]) -> list[bytes]:
        """The transceivers that did not answer in time (each once). ``last_heard``: when a
        transceiver last heartbeat (None: the worker forgot it; its question goes too)."""
        out = []
        for dest, asked in list(self._asked.items()):
            heard = last_heard(dest)
            if heard is not None and heard < asked and now - asked < PROBE_WAIT_S:
                continue  # (still waiting)
            del self._asked[dest]
            if heard is not None and heard < asked:
                out.append(dest)
        return out

    def __len__(self) -> int:
        return len(self._asked)
