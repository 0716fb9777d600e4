"""Frames said again with the sender's next heartbeats: a transceiver's session ends to its
relays (transceiver/tunnel.py), a cluster relay's to its edges (relay/hop_ingress.py). Over UDP
one may be lost; saying it again costs the receiver nothing (wire/tunnel_frame.py CLOSE_REPEATS)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

from wire.tunnel_frame import CLOSE_REPEATS

MAX_REPEATING = 4096  # items waiting for their repeats (beyond: the oldest go unrepeated)

K = TypeVar("K", bound=Hashable)


class Repeats(Generic[K]):
    def __init__(self, times: int = CLOSE_REPEATS, limit: int = MAX_REPEATING) -> None:
        self.times = times
        self.limit = limit
        self._left: dict[K, int] = {}  # item -> repeats left (insertion order: oldest first)

    def add(self, item: K) -> None:
        """Say ``item`` again with the next ``times`` heartbeats (it was just said once)."""
        self._left[item] = self.times
        while len(self._left) > self.limit:
            del self._left[next(iter(self._left))]

    def due(self) -> list[K]:
        """At a heartbeat: what to say again now (each item counts one of its repeats)."""
        items = list(self._left)
        for item in items:
            if self._left[item] > 1:
                self._left[item] -= 1
            else:
                del self._left[item]
        return items

    def __len__(self) -> int:
        return len(self._left)
