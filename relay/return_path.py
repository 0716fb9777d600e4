"""The relay worker's return path: frames from transceivers (or, on an edge, cluster relays) on
the shared tunnel socket and on the links, whose fixed-width Data frames of a known flow go to
the flow's client from its public socket. Everything else goes to the slow path
(relay/tunnel_control.py).

A mixin of :class:`relay.worker.Worker` (its flows, counters, senders, links, buffers); kept
apart so each of the worker's packet paths stays readable in one file.
"""

from __future__ import annotations

import asyncio
import errno
import select
import socket
import time
from typing import TYPE_CHECKING

from relay.batchio import decode_sockaddr
from relay.metrics import COUNTER_INDEX
from relay.wakeup import BACK_TO_BACK_S, MAX_BATCHES_PER_WAKEUP
from wire.tunnel_frame import DATA_TAG, DATA_TAG_HANDLE

if TYPE_CHECKING:
    from relay.flows import FlowEntry
    from relay.worker import Worker

_C = COUNTER_INDEX
_monotonic = time.monotonic
_TRANSCEIVER_PACKETS, _TRANSCEIVER_BYTES = _C["transceiver_packets"], _C["transceiver_bytes"]
_tag_handle = DATA_TAG_HANDLE.unpack_from
_MIN_HEADER = DATA_TAG_HANDLE.size


class ReturnPath:
    def on_tunnel_readable(self: Worker, sock: socket.socket) -> None:
        """Frames from transceivers, on the shared tunnel socket or on one of the links (the
        sockets' reader callback: a bug inside costs a counted batch, never the loop). A
        wakeup on a link takes one frame on a straight line first, as on_public_readable does
        (the batches' recvmmsg and sendmmsg through ctypes cost ~25 µs for one frame)."""
        try:
            dest = self.link_dest.get(sock)
            if dest is not None and self.c_return is not None and self.allowed_networks.verdicts.get(dest):
                self.return_link_c(sock, dest)
                self.tunnel_done = _monotonic()
                return
            if dest is not None and _monotonic() - self.tunnel_done > BACK_TO_BACK_S:
                if not self.return_one(sock, dest):
                    return
                if not self.loop_has_other_work:
                    self.tunnel_done = _monotonic()
                    return
            self.return_batches(sock)
            self.tunnel_done = _monotonic()
        except Exception:
            self.internal_error()

    def returning_flow(self: Worker, key: bytes, buffer: memoryview | bytearray, off: int, length: int,
                       ) -> tuple[FlowEntry, int] | None:
        """(flow, header length) when the frame at ``off`` is a Data frame from ``key`` for one
        of its flows, whose prefix (handle, client) and length match: it goes to that client.
        (The buffer always holds a whole header: a shorter frame leaves old bytes there, and
        its length does not match; a frame the C return path handed back is its own bytes.)"""
        if len(buffer) - off < _MIN_HEADER:
            return None
        tag, handle = _tag_handle(buffer, off)
        if tag != DATA_TAG:
            return None
        entry = self.flows.by_handle.get(handle)
        if entry is None or entry.tunnel_dest != key:
            return None
        header = self.public_header[entry.public_index]
        if len(buffer) - off < header.size:
            return None
        prefix, payload_len = header.unpack_from(buffer, off)
        hl = header.size
        if prefix != entry.match or payload_len != length - hl:
            return None
        return entry, hl

    def return_link_c(self: Worker, sock: socket.socket, dest: bytes) -> None:
        """The link's frames through the C return path (relay/_returnpath.h); what it hands
        back (control frames, hop flows' frames, anything odd) as in a batch."""
        packets, nbytes, others, oversized, error = self.c_return.forward(sock.fileno(), dest, MAX_BATCHES_PER_WAKEUP)
        if others:
            now = time.monotonic()
            for frame in others:
                sent = self.route_frame(dest, frame, 0, len(frame), now)
                if sent >= 0:
                    packets += 1
                    nbytes += sent
            for tx in self.public_tx:
                tx.flush()
        self.counts[_TRANSCEIVER_PACKETS] += packets
        self.counts[_TRANSCEIVER_BYTES] += nbytes
        if oversized:
            self.drop("oversized", oversized)
        if error:
            errors = self.tunnel_rx.errors
            errors[error] = errors.get(error, 0) + 1
            self.rearm_link(sock)
            if error == errno.ECONNREFUSED:
                self.link_refused(sock)

    def route_frame(self: Worker, key: bytes, buffer: memoryview | bytearray | bytes, off: int, length: int,
                    now: float) -> int:
        """A frame from ``key``: a Data frame of one of its flows is queued for its client (the
        payload's length); anything else goes to the slow path (-1)."""
        found = self.returning_flow(key, buffer, off, length)
        if found is None:
            self.on_tunnel_frame(key, bytes(buffer[off : off + length]), now)
            return -1
        entry, hl = found
        self.public_tx[entry.public_index].add(entry.client_key, buffer[off + hl : off + length])
        entry.packets_out += 1
        entry.bytes_out += length - hl
        return length - hl

    def tunnel_source_allowed(self: Worker, key: bytes) -> bool:
        allowed = self.allowed_networks.verdicts.get(key)
        if allowed is None:
            allowed = self.allowed_networks.verdict(key, decode_sockaddr(key)[0])
        if not allowed:
            self.drop("tunnel_source_not_allowed")
        return allowed

    def return_one(self: Worker, sock: socket.socket, dest: bytes) -> bool:
        """One frame from the link to ``dest`` (False: none was waiting, or the transceiver's
        port refused): a Data frame of one of its flows goes to the client from its public
        socket with one sendto; anything else as in a batch."""
        view = self.return_view
        try:
            length = sock.recv_into(self.return_frame)
        except BlockingIOError:
            return False
        except OSError as exc:
            errors = self.tunnel_rx.errors
            errors[exc.errno] = errors.get(exc.errno, 0) + 1
            self.rearm_link(sock)
            if exc.errno == errno.ECONNREFUSED:
                self.link_refused(sock)
                return False
            return True
        if length >= len(view):  # (recv_into truncates silently: nothing valid is this long)
            self.drop("oversized")
            return True
        if not self.tunnel_source_allowed(dest):
            return True
        found = self.returning_flow(dest, view, 0, length)
        if found is None:
            self.on_tunnel_frame(dest, bytes(view[:length]), time.monotonic())
            return True
        entry, hl = found
        which = entry.public_index
        if which < len(self.public):
            try:
                self.public[which].sendto(view[hl:length], entry.client_address)
            except OSError:  # the batch sender's error rules and counters decide
                self.public_tx[which].add(entry.client_key, view[hl:length])
                self.public_tx[which].flush()
        else:  # a cluster relay's hop socket (HopReturn)
            self.public_tx[which].add(entry.client_key, view[hl:length])
            self.public_tx[which].flush()
        entry.packets_out += 1
        entry.bytes_out += length - hl
        counts = self.counts
        counts[_TRANSCEIVER_PACKETS] += 1
        counts[_TRANSCEIVER_BYTES] += length - hl
        return True

    def return_batches(self: Worker, sock: socket.socket) -> None:
        """Waiting frames in recvmmsg batches, the clients' datagrams in sendmmsg batches."""
        rx = self.tunnel_rx
        rx.use_socket(sock)
        buffer = rx.buffer
        offsets = rx.offsets
        senders = self.public_tx
        now = time.monotonic()
        packets = 0
        nbytes = 0
        refused = rx.errors.get(errno.ECONNREFUSED, 0)
        errors = sum(rx.errors.values())
        for _ in range(MAX_BATCHES_PER_WAKEUP):
            n = rx.recv()
            if not n:
                break
            keys = rx.keys()
            lengths = rx.lengths
            for i in range(n):
                key = keys[i]
                if not self.tunnel_source_allowed(key):
                    continue
                off = offsets[i]
                length = lengths[i]
                if rx.truncated_count and rx.truncated(i):
                    self.drop("oversized")
                    continue
                sent = self.route_frame(key, buffer, off, length, now)
                if sent >= 0:
                    packets += 1
                    nbytes += sent
            for tx in senders:
                tx.flush()
            if n < rx.batch:
                break
        self.counts[_TRANSCEIVER_PACKETS] += packets
        self.counts[_TRANSCEIVER_BYTES] += nbytes
        if sock is not self.tunnel and sum(rx.errors.values()) != errors:
            self.rearm_link(sock)
            if rx.errors.get(errno.ECONNREFUSED, 0) != refused:
                self.link_refused(sock)

    def rearm_link(self: Worker, sock: socket.socket) -> None:
        """Watch a link again after it reported an error. uvloop (libuv's uv_poll) stops
        watching a socket for good once epoll says POLLERR, which an ICMP error on a connected
        link is: without this the worker read nothing more from that transceiver (its clients
        heard nothing) until it was given up for silent."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        loop.add_reader(sock.fileno(), self.on_tunnel_readable, sock)

    def rearm_waiting_links(self: Worker) -> None:
        """Each housekeeping tick: a link with datagrams waiting is watched again, in case the
        error that stopped its watch was taken by a send (the hit path's) before the reader saw it."""
        if not self.link_dest:
            return
        waiting = select.poll()
        for sock in self.link_dest:
            waiting.register(sock, select.POLLIN)
        by_fd = {sock.fileno(): sock for sock in self.link_dest}
        for fd, _events in waiting.poll(0):
            self.rearm_link(by_fd[fd])
