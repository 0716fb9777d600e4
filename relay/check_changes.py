"""What can turn a new session's passed check into a refusal before the worker learns it.

The miss path learns a session one step after its check ends (relay.decision.
decide_then_learn_steps); the worker serves other datagrams in between, and one of them may
close a session (SessionClosed) or show a transceiver gone. Checking every waiting session
again after *any* such change costs a whole check (~130 µs of CPU) per session in flight
while closes arrive at call rate; only a change that names the session or its transceiver
can make its check stale. Sans-IO.
"""
from __future__ import annotations

import collections
from collections.abc import Callable

#: changes remembered: more than a worker can record in one step of a check
LIMIT = 256


class CheckChanges:
    """The sessions this worker recorded closed and the transceivers (or cluster relays) it
    marked gone, numbered in order, the last :data:`LIMIT` of them."""

    def __init__(self, destination: Callable[[bytes, int], bytes | None]) -> None:
        #: (packed IP, port) of a learned flow's transceiver or hop -> its tunnel sockaddr
        self._destination = destination
        self.seq = 0
        self._log: collections.deque[tuple[int, str | None, bytes | None]] = collections.deque(maxlen=LIMIT)

    def closed(self, ufrag: str) -> None:
        self.seq += 1
        self._log.append((self.seq, ufrag, None))

    def gone(self, tunnel_key: bytes) -> None:
        self.seq += 1
        self._log.append((self.seq, None, tunnel_key))

    def mark(self) -> int:
        """Where the log stands: pass it to :meth:`stale` after the step."""
        return self.seq

    def stale(self, since: int, ufrag: str, target: tuple[bytes, int]) -> bool:
        """True when a change after ``since`` names session ``ufrag`` or the flow's ``target``
        (packed IP, port): its check must run again. True too when the log no longer reaches
        back to ``since`` (it cannot tell)."""
        if self.seq == since:
            return False
        if self._log[0][0] > since + 1:
            return True
        destination = None
        for seq, closed, gone in reversed(self._log):
            if seq <= since:
                break
            if closed == ufrag:
                return True
            if gone is not None:
                if destination is None:
                    destination = self._destination(*target)
                if gone == destination:
                    return True
        return False
