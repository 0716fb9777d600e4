"""Where a session's media goes when its client's address changes (sans-IO).

A NAT that rebinds mid-call (a new source port after a conntrack flush, Wi-Fi to cellular)
moves every datagram of the client to a new 5-tuple at once. The relay learns the new flow
from the client's next connectivity check, but ICE on our side stays on the nominated pair:
aioice (as the controlled agent) nominates once, and sends media and its own consent checks
to the old address until consent expires and the call dies. RFC 8445 leaves a controlled
agent no say in nomination; media servers (mediasoup's ICE-Lite server, Janus) follow the
client anyway, and so does this, under three rules:

1. Only an authenticated Binding Request from the new address counts (MESSAGE-INTEGRITY
   with the session's password: see stun_screen.py), and only a fresh one: a transaction id
   seen before on this session is a replay, however well signed.
2. Never away from a live path: the selected address must have been silent for ``quiet_s``.
   A client using two live paths keeps its media on one, so that one is never quiet and
   checks on the other move nothing (no flip-flop). A request that comes while the old path
   is not quiet yet (the first check after the rebinding can come in the same instant) is
   remembered, and the move happens on the first datagram from that address once the old
   path has been quiet for ``quiet_s``.
3. The move is to where the client *is*: the pending address must still be heard after
   the request (a stale one is forgotten after ``pending_s``).

Everything here is by address and monotonic time; the caller applies a move to aioice.
"""

from __future__ import annotations

import collections
from typing import Literal

__all__ = ["PathTracker", "RequestVerdict"]

RequestVerdict = Literal["move", "stay", "replay"]

Addr = tuple[str, int]

QUIET_S = 1.0  # Opus sends at least every 400 ms even in DTX; RTCP every few seconds
PENDING_S = 10.0  # a check from an address nothing has come from since is forgotten
SEEN_TRANSACTIONS = 256  # per session: checks of the last minutes at Chromium's ~2.5 s cadence
ADDRESSES = 64  # client addresses remembered per session (a long call through many rebindings)


class PathTracker:
    """One session's client addresses: when each was last heard, and where media should go."""

    def __init__(self, quiet_s: float = QUIET_S, pending_s: float = PENDING_S) -> None:
        self.quiet_s = quiet_s
        self.pending_s = pending_s
        self.last_heard: dict[Addr, float] = {}
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._pending: tuple[Addr, float] | None = None  # (address, when its check came)

    def heard(self, addr: Addr, now: float) -> None:
        """Any datagram of the session from ``addr``."""
        last_heard = self.last_heard
        if addr not in last_heard and len(last_heard) >= ADDRESSES:
            del last_heard[min(last_heard, key=last_heard.__getitem__)]  # the longest silent
        last_heard[addr] = now

    def _quiet(self, selected: Addr, now: float) -> bool:
        return now - self.last_heard.get(selected, float("-inf")) >= self.quiet_s

    def on_request(self, addr: Addr, transaction_id: bytes, selected: Addr | None, now: float) -> RequestVerdict:
        """An authenticated Binding Request from ``addr`` (already :meth:`heard`): "move"
        when media should go to ``addr`` now."""
        if transaction_id in self._seen:
            return "replay"
        self._seen[transaction_id] = None
        if len(self._seen) > SEEN_TRANSACTIONS:
            self._seen.popitem(last=False)
        if selected is None or addr == selected:
            if addr == selected:
                self._pending = None  # the selected path is checked: it is alive
            return "stay"
        if self._quiet(selected, now):
            self._pending = None
            return "move"
        self._pending = (addr, now)
        return "stay"

    def on_datagram(self, addr: Addr, selected: Addr | None, now: float) -> bool:
        """A datagram from ``addr`` (already :meth:`heard`): True when a pending move to
        ``addr`` is due now."""
        pending = self._pending
        if pending is None or pending[0] != addr or selected is None:
            return False
        if now - pending[1] > self.pending_s:
            self._pending = None
            return False
        if self._quiet(selected, now):
            self._pending = None
            return True
        return False
