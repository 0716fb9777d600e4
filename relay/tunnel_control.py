"""The relay worker's slow tunnel path: every frame from a transceiver (or, on an edge, a
cluster relay) that is not a fixed-width Data frame of a known flow — control frames, compact
encodings — and what the kernel says about a link (ICMP port unreachable).

A mixin of :class:`relay.worker.Worker` (its flows, counters, senders, links, hop wiring);
kept apart so the worker's packet paths stay readable in one file.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING

from relay.batchio import address_tuple, decode_sockaddr
from relay.decision import closed_until, sender_token
from relay.metrics import COUNTER_INDEX
from wire.tunnel_frame import (
    PROBE,
    Data,
    Drain,
    FrameError,
    Heartbeat,
    SessionClosed,
    SessionRenamed,
    decode_frame,
)

if TYPE_CHECKING:
    from relay.worker import Worker

log = logging.getLogger("rtcrelay.relay")
_C = COUNTER_INDEX


class TunnelControl:
    def on_tunnel_frame(self: Worker, key: bytes, raw: bytes, now: float) -> None:
        """The slow path: any frame that is not our fixed-width Data for a known flow."""
        try:
            frame = decode_frame(raw)
        except FrameError as exc:
            self.drop(exc.reason)
            return
        if isinstance(frame, Data):
            entry = self.flows.by_handle.get(frame.handle)
            if entry is None:
                self.drop("tunnel_unknown_flow")
                return
            if entry.tunnel_dest != key or entry.client != (frame.ip, frame.port):
                self.drop("tunnel_foreign_flow")
                return
            self.public_tx[entry.public_index].add(entry.client_key, frame.payload)
            entry.packets_out += 1
            entry.bytes_out += len(frame.payload)
            self.counts[_C["transceiver_packets"]] += 1
            self.counts[_C["transceiver_bytes"]] += len(frame.payload)
        elif isinstance(frame, Heartbeat):
            self.flows.transceiver_heartbeat(key, now, frame.draining)
            self.counts[_C["heartbeats"]] += 1
        elif isinstance(frame, SessionClosed):
            self.hops.session_ended(frame, self.flows)  # (edges forwarding it to us: told too)
            self.counts[_C["flows_closed"]] += self.flows.close_session(frame.ufrag, key)
            self.remember_closed(frame.ufrag, key)
        elif isinstance(frame, SessionRenamed):
            # an ICE restart: the new ufrag must be the sender's too
            if sender_token(frame.new, decode_sockaddr(key), self.auth, time.time()) is not None:
                self.hops.session_ended(frame, self.flows)
                self.flows.rename_session(frame.old, frame.new, key, now)
            self.remember_closed(frame.old, key)
        elif isinstance(frame, Drain):
            self.flows.transceiver_heartbeat(key, now, True)
        else:  # HopData: only edge relays send it, to a cluster relay's hop address
            self.drop("tunnel_unexpected_frame")

    def link_refused(self: Worker, sock: socket.socket) -> None:
        """The kernel says nothing listens at a link's transceiver (ICMP port unreachable): a
        crash, or a forged or passing error (relay/link_refusals.py). The transceiver is asked
        (a Probe); unanswered, it is gone within a second (expire_refusing_transceivers)
        rather than after heartbeat_timeout."""
        dest = self.links.dest_of(sock)
        if dest is None or dest not in self.flows.transceivers:
            return
        self.counts[_C["transceiver_refusals"]] += 1
        if self.refusals.refused(dest, time.monotonic()):
            with contextlib.suppress(OSError):  # (refused again: the answer that does not come tells)
                sock.send(PROBE)

    def expire_refusing_transceivers(self: Worker, now: float) -> None:
        """Each housekeeping tick: the refusing transceivers that did not answer their probe
        are gone: their flows go at this tick and their sessions' checks get an error."""
        def last_heard(dest: bytes) -> float | None:
            state = self.flows.transceivers.get(dest)
            return None if state is None else state[0]

        for dest in self.refusals.crashed(now, last_heard):
            if self.flows.transceiver_refused(dest):
                log.warning("worker %d: transceiver %s refuses the tunnel and did not answer a probe: "
                            "treating it as gone", self.index, address_tuple(dest))

    def remember_closed(self: Worker, ufrag: str, key: bytes) -> None:
        """A session ended: no Binding Request may open a flow for it again, on any worker,
        while its token is young enough to be learned (shm's closed set)."""
        now = time.time()
        until = closed_until(ufrag, decode_sockaddr(key), self.auth, now)
        if until is not None and not self.flows.remember_closed(ufrag, until, now):
            self.drop("closed_table_full")
