"""The relay worker's miss path: a client datagram with no flow in this worker. Junk is
dropped at once; the rest waits in a queue that :meth:`MissPath.serve_misses` serves in
slices, a new session's checks, learning and first datagram as steps
(:meth:`MissPath.public_miss_steps`), with the datagrams that arrive meanwhile served between
the steps (:meth:`MissPath.serve_waiting`) and the slices bounded by relay/miss_budget.py: a
miss never holds an established flow's datagram for more than one step.

A mixin of :class:`relay.worker.Worker` (its flows, counters, senders, sockets); kept apart so
each of the worker's packet paths stays readable in one file.
"""

from __future__ import annotations

import gc
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from relay.batchio import BatchReceiver, decode_sockaddr
from relay.decision import Answer, Drop, Forward, Learn, decide_then_learn_steps, learn_from_directory, screen
from relay.hit_path import HEADROOM
from relay.metrics import COUNTER_INDEX
from relay.miss_budget import MISS_QUEUE_MAX, MISS_SLICE_WALL_S

if TYPE_CHECKING:
    from relay.flows import FlowEntry
    from relay.worker import Worker

_C = COUNTER_INDEX
_monotonic = time.monotonic
_CLIENT_PACKETS = _C["client_packets"]
_DONE = object()


class MissPath:
    def queue_miss(self: Worker, which: int, rx: BatchReceiver, i: int) -> None:
        """Datagram i of ``rx`` has no flow in this worker: drop junk now, queue the rest for
        :meth:`serve_misses` (a copy: the slot is reused by the next receive)."""
        if rx.truncated(i):
            self.drop("oversized")
            return
        self.queue_datagram(which, rx.keys()[i], bytes(rx.payload(i)))

    def queue_datagram(self: Worker, which: int, key: bytes, datagram: bytes) -> None:
        junk = screen(datagram)
        if junk is not None:
            self.drop(junk.reason)
            return
        if len(self.misses) >= MISS_QUEUE_MAX:
            self.drop("miss_queue_full")
            return
        self.misses.append((which, key, datagram))
        if not self._misses_scheduled:
            self._misses_scheduled = True
            self.loop.call_soon(self.serve_misses)

    def take_flow(self: Worker, which: int, key: bytes, source: tuple[bytes, int], decision: Learn | Forward,
                  ) -> FlowEntry | None:
        """Learn the flow a check allowed, or adopt one another worker holds (None: refused,
        counted)."""
        if isinstance(decision, Learn):
            entry, refusal = self.flows.learn(key, source, which, decision, _monotonic())
            if entry is not None:
                self.counts[_C["flows_learned"]] += 1
                self.directory.publish(entry)
        else:
            entry, refusal = self.flows.adopt(key, which, decision.flow, _monotonic())
            if entry is not None:
                self.counts[_C["flows_adopted"]] += 1
        if entry is None:
            self.drop(refusal)
            return None
        self.flows_added += 1
        return entry

    def serve_misses(self: Worker) -> None:
        """Queued misses in order, for the slice the budget allows (relay/miss_budget.py), the
        datagrams that arrive meanwhile served between the steps (serve_waiting); then the
        loop polls the sockets before the next slice, or, out of credit, serves only hits
        until a slice's worth has accrued."""
        self._misses_scheduled = False
        misses = self.misses
        started = _monotonic()
        counts = self.counts
        deadline = self.miss_budget.start(started, counts[_CLIENT_PACKETS] + counts[_C["transceiver_packets"]]
                                          - self._miss_packets)
        if deadline is not None:
            hits_s = 0.0  # of the slice: serving datagrams, not misses
            try:
                learned = self.flows_added
                wall_deadline = started + MISS_SLICE_WALL_S
                while misses or self.miss_in_progress is not None:
                    if self.miss_in_progress is None:
                        self.miss_in_progress = self.public_miss_steps(*misses.popleft())
                    if next(self.miss_in_progress, _DONE) is _DONE:
                        self.miss_in_progress = None
                    now = _monotonic()
                    if now >= deadline + hits_s or now >= wall_deadline:
                        break
                    ready = self.datagrams_waiting.poll(0)
                    if ready:
                        hits_s += self.serve_waiting(ready, now)
                if self.flows_added != learned:
                    gc.freeze()  # the new flows' objects: out of every collection (see run())
            except Exception:
                self.miss_in_progress = None
                self.internal_error()
            self.miss_budget.spent(_monotonic() - started - hits_s)
        if (misses or self.miss_in_progress is not None) and not self._misses_scheduled:
            self._misses_scheduled = True
            wait = self.miss_budget.wait_s()
            if wait:
                self.loop.call_later(wait, self.serve_misses)
            else:
                self.loop.call_soon(self.serve_misses)
        self.counts[_C["miss_queue"]] = len(misses)

    def serve_waiting(self: Worker, ready: list[tuple[int, int]], since: float) -> float:
        """Between two steps of a miss: the datagrams that wait on these sockets, served at
        once by their reader callbacks; the seconds it took. (A slice used to end here and
        hand the loop back: a loop iteration per step, 5.5 per new session at 20k pps, and the
        datagram waited for it.)"""
        readers = self.readers
        for fd, _events in ready:
            reader = readers.get(fd)
            if reader is not None:
                callback, args = reader
                try:
                    callback(*args)
                except Exception:  # (a hop socket's reader has no guard of its own: its bug
                    self.internal_error()  # must not cost the miss in progress, as from the loop)
        return _monotonic() - since

    def adopt_from_directory(self: Worker, which: int, key: bytes, ufrag: str, held: list[bytes]) -> None:
        """The route directory knew this 5-tuple's session: learn its flow as the session's own
        check would have, and send what was held meanwhile (relay/worker_directory.py)."""
        decision = learn_from_directory(ufrag, self.flows.views[which], self.auth, time.time())
        entry, reason = (None, decision.reason) if isinstance(decision, Drop) else \
            self.flows.learn(key, decode_sockaddr(key), which, decision, _monotonic())
        if entry is None:
            self.drop(reason, len(held))
            return
        self.counts[_C["flows_learned"]] += 1
        self.directory.publish(entry)
        gc.freeze()
        for datagram in held:
            self.forward_hit(which, entry, bytearray(HEADROOM) + datagram, HEADROOM, len(datagram))

    def public_miss_steps(self: Worker, which: int, key: bytes, datagram: bytes) -> Iterator[None]:
        """One miss in steps (serve_misses serves the sockets between them): the checks
        (relay.decision.decide_then_learn_steps), learning or adopting the flow, then sending
        its first datagram. A new session costs ~250 µs of CPU in a worker at 20k pps: served in one go,
        it held every established flow's datagram that arrived meanwhile (at 500 new
        sessions/s the established p99 was 4x its figure without them)."""
        entry = self.flows.by_key.get(key)  # learned from an earlier miss in the queue
        if entry is None:
            source = decode_sockaddr(key)
            decision = yield from decide_then_learn_steps(datagram, source, self.flows.views[which], self.auth,
                                                          time.time, self.hops.hops_left(key), self.flows.check_changes)
            if isinstance(decision, Drop):
                # media from a 5-tuple unknown here: a failover may have moved it from another relay
                if decision.reason != "unknown_flow" or not self.directory.lookup(which, key, source, datagram):
                    self.drop(decision.reason)
                return
            if isinstance(decision, Answer):  # the relay answers the check itself
                self.drop(decision.reason)
                tx = self.public_tx[which]
                tx.add(key, decision.datagram)
                tx.flush()
                return
            # (learned meanwhile, from the route directory: this datagram goes on to it)
            entry = self.flows.by_key.get(key) or self.take_flow(which, key, source, decision)
            if entry is None:
                return
            yield
            if self.flows.by_key.get(key) is not entry:
                return  # (gone meanwhile: its session closed)
        # (the send opens the flow's link to its transceiver: the C path sends its next datagrams)
        self.forward_hit(which, entry, bytearray(HEADROOM) + datagram, HEADROOM, len(datagram))
        self._miss_packets += 1

    def _wait_on(self: Worker, sock: socket.socket, callback: Callable[..., None], *args: Any) -> None:
        """Serve ``sock`` between a miss's steps with its reader callback (serve_waiting)."""
        self.datagrams_waiting.register(sock.fileno(), select.POLLIN)
        self.readers[sock.fileno()] = (callback, args)
