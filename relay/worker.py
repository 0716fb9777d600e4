"""A relay worker process: the packet path. Started by the supervisor as ``python -m relay.worker``.

Client → transceiver:
    hit: the source is a known flow → the hit path (relay/hit_path.py: C or Python, one
         interface) writes the flow's fixed tunnel header into the headroom in front of the
         payload and sends it to the flow's transceiver. No copy. One datagram a wakeup takes
         ``forward_one``, datagrams that were waiting ``forward_batches``.
    what the hit path leaves in its slot: a hit whose transceiver has no link yet goes out
         at once (:class:`relay.hit_path.FlowSender`); junk is dropped
         (:func:`relay.decision.screen`); the rest is a miss, queued behind the hits and
         served in short slices with at most half the worker's time, in steps between which
         waiting datagrams are served (relay/miss_path.py, relay/miss_budget.py):
         :func:`relay.decision.decide_steps` (demux, STUN, route token, integrity), then learn
         the flow in this worker's shm partition, or adopt one found in another partition.

Transceiver → client: a tunnel frame whose fixed-width Data header (wire/tunnel_frame.py) has
the flow's own prefix (handle, client IP and port) and the frame's payload length, from the
flow's transceiver address, is sent on; anything else goes through the msgspec decoder
(control frames, compact encodings) and is validated the same way. The relay sends only to
clients it has a flow for: it is no reflector.

Housekeeping ten times a second, in short steps between which the sockets are served:
per-flow counters to shm (the same look at each flow finds those idle past the timeout, then
expired), a slow sweep of the partition for flows without an entry, the flows of transceivers
past their heartbeat timeout, the worker's counter row (heartbeat for the supervisor's watchdog).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import gc
import ipaddress
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from daemon.keys import load_keyring
from daemon.networks import AllowedNetworks
from relay.batchio import BatchReceiver, BatchSender
from relay.decision import AuthPolicy
from relay.flows import FlowEntry, LocalFlows
from relay.hit_path import HEADROOM, FlowSender, HitPath, open_hit_path, open_return_path
from relay.hop_ingress import HopReturn
from relay.housekeeping_steps import StepRunner
from relay.kernel_flows import KernelFlows
from relay.link_refusals import LinkRefusals
from relay.metrics import COUNTER_INDEX, WORKER_COUNTERS
from relay.miss_budget import MissBudget
from relay.miss_path import MissPath
from relay.return_path import ReturnPath
from relay.tunnel_control import TunnelControl
from relay.tunnel_links import TunnelLinks
from relay.wakeup import BACK_TO_BACK_S, MAX_BATCHES_PER_WAKEUP
from relay.warm_takeover import WarmCopy
from relay.worker_directory import WorkerDirectory
from relay.worker_hops import WorkerHops, hop_locals
from relay.worker_spec import WorkerSpec, decode_spec
from shm.counters import CounterBlock
from wire.tunnel_frame import (
    DATA_HEADER_LEN_V6,
    data_header_struct,
)

log = logging.getLogger("rtcrelay.relay")

BUFSIZE = 2048  # larger than any WebRTC datagram (MTU-bound); bigger ones are counted "oversized"
# Housekeeping ticks ten times a second and runs in steps of ~20 µs (relay/housekeeping_steps.py),
# datagrams served between steps: nothing it does grows a step with the number of flows (done in one go once a
# second it held the packet path for ~0.6 ms with 64 flows, and ~100 ms with 50k). Small ticks
# spread its work over the second: at 10k flows the same work in one burst a second (~30 ms of
# steps) tripled the p99 of datagrams it did not even delay (bench/relay.py; the load's CPU
# shares the host with the worker's).
HOUSEKEEPING_S = 0.1
WARM_REFRESH_S = 1.0  # a standby's copy of its partition: a slice per second (relay/warm_takeover.py)
STALLED_S = 0.5  # a tick this late: the worker did not run (see housekeeping_units)
GC_TICKS = 10  # the young generations once a second
FULL_GC_TICKS = 600  # everything once a minute (flows are frozen: ~180 µs at 50k flows)
# A unit of housekeeping (a step runs as many as fit its ~20 µs): each ~5-40 µs at 50k flows
FLUSH_FLOWS_PER_UNIT = 8  # counter writes in Python (~3.5 µs each; C: flows.flush_step_scale times more)
SWEEP_SLOTS_PER_UNIT = 256  # ~6 µs with nothing to expire and the caches warm, ~45 µs cold
# The flush expires the flows a worker serves. A sweep of the partition in shm expires those it
# has no entry for, and runs only while there are some (take_over leaves them: rare): idle for
# ORPHAN_IDLE_FACTOR x idle_timeout by shm's last_seen (which a flush pass leaves at most
# idle_timeout / FLUSH_PASSES_PER_IDLE old), a pass in that time. (Expiry by a sweep of every
# slot, a pass per idle_timeout / 4, cost ~3 ms of every second at 50k flows: 118 µs a unit.)
ORPHAN_IDLE_FACTOR = 4
REMOVALS_PER_UNIT = 2  # shm deletes (~12 µs each with the dicts and backward shifts)

_C = COUNTER_INDEX
_monotonic = time.monotonic
_CLIENT_PACKETS, _CLIENT_BYTES = _C["client_packets"], _C["client_bytes"]
_SLOT_0 = (0,)


class Worker(TunnelControl, ReturnPath, MissPath):
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        cfg = spec.config
        self.index = spec.index
        # hop sockets (a cluster relay) and routes to other clusters (an edge): relay/worker_hops.py
        self.hops = WorkerHops(cfg, spec.hop, len(spec.public), cfg.batch, BUFSIZE, self.deliver, self.drop)
        # the shared route directory (relay/worker_directory.py), if one is configured
        self.directory = WorkerDirectory(cfg, lambda: self.auth.keyring, self.adopt_from_directory, self.drop)
        self.auth = AuthPolicy(load_keyring(cfg.route_keys_file or None), cfg.token_max_age, cfg.cluster_id,
                               self.hops.routes, cfg.hop_limit)
        # (an edge's cluster relays answer like transceivers: from peer_networks)
        networks = cfg.transceiver_networks + (cfg.peer_networks if self.hops.routes is not None else [])
        self.allowed_networks = AllowedNetworks.parse(networks, "transceiver_networks/peer_networks")
        self.counts = [0] * len(WORKER_COUNTERS)
        self.counters = CounterBlock.attach(cfg.stats_path, writable=True)
        self.public = [socket.socket(fileno=p.fd) for p in spec.public]
        self.public_addr = [(ipaddress.ip_address(p.host).packed, p.port) for p in spec.public]
        self.tunnel = socket.socket(fileno=spec.tunnel_fd)
        routes = self.hops.routes
        self.flows = LocalFlows(cfg, spec.index, self.tunnel.family, self.public_addr + hop_locals(spec.hop),
                                is_hop=routes.is_hop if routes is not None else lambda ip, port: False)
        if spec.kernel is not None:
            tunnel_host, tunnel_port = self.tunnel.getsockname()[:2]
            self.flows.kernel = KernelFlows(spec.kernel, (ipaddress.ip_address(tunnel_host).packed, tunnel_port),
                                            self.public_addr)
        batch = cfg.batch
        self.public_rx = [BatchReceiver(s, batch=batch, bufsize=BUFSIZE, headroom=HEADROOM) for s in self.public]
        # per socket index (public sockets, then hop indexes): how clients' datagrams go back,
        # and the tunnel Data header of its clients (their family's)
        self.public_tx: list[BatchSender | HopReturn] = [BatchSender(s, batch=batch) for s in self.public]
        self.public_tx += self.hops.senders()
        self.public_header = [data_header_struct(ip) for ip, _port in self.public_addr] + self.hops.headers()
        self.tunnel_rx = BatchReceiver(self.tunnel, batch=batch, bufsize=BUFSIZE + DATA_HEADER_LEN_V6, headroom=0)
        self.tunnel_tx = BatchSender(self.tunnel, batch=batch)
        self.links = TunnelLinks(
            self.tunnel, limit=cfg.tunnel_links, batch=batch, buffer_size=cfg.socket_buffer,
            on_open=self._watch_link, on_close=self._unwatch_link,
        )
        #: a standby's copy of its partition while it waits (relay/warm_takeover.py)
        self.warm: WarmCopy | None = WarmCopy(self.flows) if spec.go_fd is not None else None
        #: the links refused (ICMP) whose transceiver was asked if it lives (relay/link_refusals.py)
        self.refusals = LinkRefusals()
        #: per public socket: a known flow's datagram → its transceiver, in Python
        self.flow_senders = [FlowSender(header, self.links, self.tunnel_tx) for header in self.public_header]
        #: per public socket: the hit path (C or Python: the same calls)
        self.hit_paths: list[HitPath] = [
            open_hit_path(cfg.hit_path, rx, sender, self.flows, self.links.fds)
            for rx, sender in zip(self.public_rx, self.flow_senders)
        ]
        #: misses waiting for serve_misses: (public socket index, source sockaddr, datagram)
        self.misses: collections.deque[tuple[int, bytes, bytes]] = collections.deque()
        #: the miss whose steps are under way (public_miss_steps), if any
        self.miss_in_progress: Iterator[None] | None = None
        #: the sockets a miss slice serves between its steps (one poll, ~1 µs), by fd: their
        #: reader callbacks (serve_misses calls them itself: see serve_waiting)
        self.datagrams_waiting = select.poll()
        self.readers: dict[int, tuple[Callable[..., None], tuple[Any, ...]]] = {}
        for which, sock in enumerate(self.public):
            self._wait_on(sock, self.on_public_readable, which)
        self._wait_on(self.tunnel, self.on_tunnel_readable, self.tunnel)
        for j, sock in enumerate(self.hops.sockets):
            self._wait_on(sock, self.hops.ingress.on_readable, j)
        self._misses_scheduled = False
        self.miss_budget = MissBudget(_monotonic())  # relay/miss_budget.py: misses never starve hits
        self._miss_packets = 0  # client_packets that were misses' first datagrams
        self.flows_added = 0
        self.loop: asyncio.AbstractEventLoop  # set by run()
        self.public_done = [0.0] * len(self.public)  # when each public callback last returned
        self.tunnel_done = 0.0  # when a tunnel callback last returned
        #: a link's one-frame receive (return_one), and the link sockets' transceivers
        self.return_frame = bytearray(BUFSIZE + DATA_HEADER_LEN_V6)
        self.return_view = memoryview(self.return_frame)
        #: the links' return path in C when the hit path is C (relay/_returnpath.h), else None
        self.c_return = open_return_path(cfg.hit_path, self.flows, [s.fileno() for s in self.public],
                                         [h.size for h in self.public_header[: len(self.public)]], batch,
                                         len(self.return_frame))
        self.link_dest: dict[socket.socket, bytes] = {}
        self.housekeeping_running = False  # a tick's steps are under way (the loop runs them in turn)
        self._stop = asyncio.Event()
        self.ticks = 0
        self.last_tick = _monotonic()  # when the last housekeeping tick began

    # -- client → transceiver -----------------------------------------------------------------

    def on_public_readable(self, which: int) -> None:
        """Public socket ``which`` is readable (its reader callback: a bug inside costs a
        counted batch, never the loop; a ``try`` costs nothing until it catches)."""
        try:
            hit_path = self.hit_paths[which]
            # At call rates (~20k pps per worker and below) a wakeup brings one datagram, and the
            # worker is busy about half the time: every µs here shows in the latency tail
            # (bench/relay.py). Such a wakeup takes one receive and a straight line with no
            # batch bookkeeping. If more came meanwhile, the loop calls back at once (then:
            # batches only), unless it has other work queued (a housekeeping step, misses):
            # then whatever came is drained now in recvmmsg batches, or a burst that arrived
            # during a step would wait a step per datagram (p99 1.1-1.3 ms at 30,000 sending
            # flows; 0.2 ms draining; without it during misses, the established p99 at 2,000 new
            # sessions/s was 2.3 ms). Draining after every straight line cost a syscall per
            # datagram (an empty socket's recvmmsg).
            if _monotonic() - self.public_done[which] > BACK_TO_BACK_S:
                length = hit_path.forward_one()
                if length is None:
                    return
                if length >= 0:
                    counts = self.counts
                    counts[_CLIENT_PACKETS] += 1
                    counts[_CLIENT_BYTES] += length
                else:
                    rx = self.public_rx[which]
                    rx.take_one(hit_path.last_length, hit_path.last_key, hit_path.last_truncated)
                    self.forward_left(which, rx, _SLOT_0)
                if not self.loop_has_other_work:
                    self.public_done[which] = _monotonic()
                    return
            self.forward_batches(which, hit_path)
            self.public_done[which] = _monotonic()
        except Exception:
            self.internal_error()

    def forward_batches(self, which: int, hit_path: HitPath) -> None:
        """Waiting datagrams in batches through the hit path: it sends the hits; what it
        leaves of a batch is handled here, in its slots, before the next batch."""
        rx = self.public_rx[which]
        counts = self.counts
        batches = 0
        while batches < MAX_BATCHES_PER_WAKEUP:  # (then yield to the other sockets)
            packets, nbytes, done, last_count, leftover = hit_path.forward_batches(MAX_BATCHES_PER_WAKEUP - batches)
            counts[_CLIENT_PACKETS] += packets
            counts[_CLIENT_BYTES] += nbytes
            if leftover is None:
                return  # the socket is empty, the batch was short, or the budget is spent
            batches += done
            slots, lengths, keys, truncated = leftover
            rx.take_batch(lengths, keys, truncated)
            self.forward_left(which, rx, slots)
            if last_count < rx.batch:
                return

    def forward_left(self, which: int, rx: BatchReceiver, slots: list[int] | tuple[int, ...]) -> None:
        """The datagrams the hit path left in these slots of ``rx``: a hit (its transceiver has
        no link yet: C opens none) goes now; a truncated datagram or a miss to queue_miss."""
        get = self.flows.by_key.get
        keys = rx.keys()
        for i in slots:
            entry = None if rx.truncated(i) else get(keys[i])
            if entry is None:
                self.queue_miss(which, rx, i)
            else:
                self.forward_hit(which, entry, rx.buffer, rx.offsets[i], rx.lengths[i])

    def forward_hit(self, which: int, entry: FlowEntry, buffer: memoryview | bytearray, off: int, length: int) -> None:
        """A datagram of a known flow that the hit path did not send (headroom in front of it)."""
        self.flow_senders[which].send(entry, buffer, off, length)
        counts = self.counts
        counts[_CLIENT_PACKETS] += 1
        counts[_CLIENT_BYTES] += length

    # -- misses: junk dropped at once, the rest queued behind the hits -------------------------

    @property
    def loop_has_other_work(self) -> bool:
        """A housekeeping tick or misses wait for the loop: a socket callback then drains what
        waits instead of leaving it for the loop's next round (see on_public_readable)."""
        return self.housekeeping_running or bool(self.misses) or self.miss_in_progress is not None

    def deliver(self, which: int, key: bytes, buffer: memoryview | bytearray, off: int, length: int, hops: int) -> None:
        """A client datagram that came in another way (a hop socket: an edge relay's client,
        ``hops`` left): a hit goes on now, the rest is queued as a miss."""
        entry = self.flows.by_key.get(key)
        if entry is not None:  # (batched: the hop socket's reader flushes after each batch)
            self.flow_senders[which].send(entry, buffer, off, length, self.hops.queued)
            self.counts[_CLIENT_PACKETS] += 1
            self.counts[_CLIENT_BYTES] += length
        else:
            self.hops.note_miss(key, hops)
            self.queue_datagram(which, key, bytes(buffer[off : off + length]))

    # -- bookkeeping --------------------------------------------------------------------------

    def internal_error(self) -> None:
        """In a socket handler's ``except``: a bug costs a counted batch, never the worker's loop."""
        self.counts[_C["internal_errors"]] += 1
        if self.counts[_C["internal_errors"]] <= 10:  # the first ones with a traceback
            log.exception("worker %d: a batch failed", self.index)
        for tx in (self.tunnel_tx, *self.public_tx):
            with contextlib.suppress(Exception):
                tx.flush()

    def _watch_link(self, sock: socket.socket) -> None:
        dest = self.links.dest_of(sock)
        if dest is not None:
            self.link_dest[sock] = dest
        self._wait_on(sock, self.on_tunnel_readable, sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), self.on_tunnel_readable, sock)

    def _unwatch_link(self, sock: socket.socket) -> None:
        self.link_dest.pop(sock, None)
        self.readers.pop(sock.fileno(), None)
        with contextlib.suppress(KeyError):
            self.datagrams_waiting.unregister(sock.fileno())
        asyncio.get_running_loop().remove_reader(sock.fileno())

    def drop(self, reason: str, count: int = 1) -> None:
        self.counts[_C["drop_" + reason]] += count

    def housekeeping_units(self) -> Iterator[None]:
        """One housekeeping tick, as short units of work: the caller runs them in steps of
        bounded time (relay/housekeeping_steps.py) and serves the sockets between steps.

        A tick that comes STALLED_S late or more (the worker did not run: SIGSTOP, a starved
        host) expires nothing: the datagrams and heartbeats that keep its flows alive may still
        wait in its sockets, and the flush's few loop rounds read only some of them (the bench's
        drain left 2.4% of 100,000 flows idled out that way). The next tick expires."""
        self.ticks += 1
        now = time.monotonic()
        since_last = now - self.last_tick
        stalled = since_last >= HOUSEKEEPING_S + STALLED_S
        self.last_tick = now
        if self.ticks % GC_TICKS == 0:
            gc.collect(2 if self.ticks % FULL_GC_TICKS == 0 else 1)  # small: flows are frozen (see run())
            yield
        cfg = self.spec.config
        flows = self.flows
        chunk = FLUSH_FLOWS_PER_UNIT * flows.flush_step_scale  # (more when the flush is in C)
        for _ in flows.flush_counters_steps(now, chunk, flows.flush_budget(max(since_last, HOUSEKEEPING_S))):
            yield
        if stalled:
            flows.idle_found.clear()  # (their datagrams may wait in the sockets: looked at again next pass)
            self.counts[_C["housekeeping_stalls"]] += 1
            self.publish_counters(ready=1)
            return
        expired = orphans = 0  # the steps yield the flows removed so far: the last value is the total
        for expired in flows.expire_idle_steps(REMOVALS_PER_UNIT):  # noqa: B007
            yield
        if flows.orphaned:
            orphan_idle = cfg.idle_timeout * ORPHAN_IDLE_FACTOR
            slots = int(cfg.flow_capacity * HOUSEKEEPING_S / orphan_idle) + 1
            for orphans in flows.sweep_steps(now, slots, SWEEP_SLOTS_PER_UNIT, REMOVALS_PER_UNIT, orphan_idle):  # noqa: B007
                yield
        self.counts[_C["flows_expired"]] += expired + orphans
        self.expire_refusing_transceivers(now)
        self.rearm_waiting_links()
        yield
        flows.expire_silent_transceivers(now, cfg.heartbeat_timeout)
        closed = 0
        for closed in flows.remove_doomed_steps(REMOVALS_PER_UNIT):  # noqa: B007
            yield
        self.counts[_C["flows_closed"]] += closed
        self.links.retain(flows.transceivers)
        self.hops.tick(now, flows)
        self.directory.tick(flows)
        self.publish_counters(ready=1)

    def publish_counters(self, ready: int) -> None:
        counts = self.counts
        counts[_C["pid"]] = os.getpid()
        counts[_C["ready"]] = ready
        counts[_C["heartbeat_ms"]] = int(time.time() * 1000)
        counts[_C["flows"]] = len(self.flows.by_key)
        counts[_C["transceivers"]] = len(self.flows.transceivers)
        counts[_C["tunnel_links"]] = len(self.links)
        counts[_C["hit_path_packets"]] = sum(h.forwarded for h in self.hit_paths)
        counts[_C["drop_send_failed"]] = self.send_failures()
        kernel = self.flows.kernel
        if kernel is not None:
            packets_in, bytes_in, packets_out, bytes_out = kernel.take_totals()
            counts[_CLIENT_PACKETS] += packets_in
            counts[_CLIENT_BYTES] += bytes_in
            counts[_C["transceiver_packets"]] += packets_out
            counts[_C["transceiver_bytes"]] += bytes_out
            counts[_C["kernel_to_transceiver"]] += packets_in
            counts[_C["kernel_to_client"]] += packets_out
            counts[_C["kernel_flows"]] = kernel.flow_count
        for event, value in self.directory.counts.items():
            counts[_C["directory_" + event]] = value
        self.counters.store_row(self.index, counts)

    def send_failures(self) -> int:
        """Datagrams the kernel refused to send (buffer full, unreachable, ...), of every sender:
        the batch senders, the links (closed ones too), the C hit and return paths."""
        senders = {id(s): s for s in (self.tunnel_tx, *(tx if isinstance(tx, BatchSender) else tx.tx
                                                         for tx in self.public_tx))}
        native = [h for h in (*self.hit_paths, self.c_return) if h is not None and hasattr(h, "failed")]
        return (sum(s.failed + s.dropped_eagain for s in senders.values()) + self.links.send_failures()
                + sum(n.failed + n.dropped_eagain for n in native))

    def reload_keys(self) -> None:
        try:
            keyring = load_keyring(self.spec.config.route_keys_file or None)
        except Exception as exc:
            log.error("worker %d: route keys not reloaded: %s", self.index, exc)
            return
        self.auth = dataclasses.replace(self.auth, keyring=keyring)

    async def run(self) -> None:
        self.loop = loop = asyncio.get_running_loop()
        report = self.flows.take_over(time.monotonic(), self.warm)
        self.warm = None  # (its entries are the worker's now)
        log.info("worker %d (pid %d) owns partition %d: %s; counter flush in %s", self.index, os.getpid(),
                 self.index, report, "Python" if self.flows.counter_flush is None else "C")
        for fd, (callback, args) in self.readers.items():  # (public, tunnel and hop sockets: __init__)
            loop.add_reader(fd, callback, *args)
        self.hops.start(loop)
        self.directory.start(loop)
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_keys)
        self.publish_counters(ready=1)
        # No collector pauses on the packet path: every batch allocates a few tuples, which made
        # a young-generation collection every ~100 wakeups, each a latency spike for the
        # datagram that waited. The packet path makes no reference cycles; housekeeping
        # collects the young generations once a second and everything every ten minutes. What
        # exists now (imports, buffers, the flows taken over) is frozen out of every
        # collection, and so is every flow learned later (serve_misses): a collection walks
        # every object it is given, ~1.2 µs per flow (64 ms at 50k flows, measured).
        gc.disable()
        gc.freeze()
        steps = StepRunner(self.counts, _C)
        while not self._stop.is_set():
            await asyncio.sleep(HOUSEKEEPING_S)  # (SIGTERM sets _stop: seen within a tick)
            if self._stop.is_set():
                break
            if os.getppid() != self.spec.supervisor_pid:
                log.error("worker %d: supervisor gone, exiting", self.index)
                break
            units = self.housekeeping_units()
            self.housekeeping_running = True
            while steps.step(units):
                await asyncio.sleep(0)  # one loop iteration: ready sockets are served
            self.housekeeping_running = False
        for fd in self.readers:
            loop.remove_reader(fd)
        self.hops.stop()
        await self.directory.stop()
        self.links.close_all()
        self.flows.flush_counters(time.monotonic())
        self.publish_counters(ready=0)
        self.flows.close()


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the kernel sends SIGTERM if the supervisor dies, even by kill -9."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)


def _wait_warming(channel: socket.socket, worker: Worker) -> bytes:
    """A standby's wait for the supervisor's word. Meanwhile it copies the partition it would
    take over (relay/warm_takeover.py), a bounded slice per WARM_REFRESH_S, so that taking
    over builds only what changed since."""
    assert worker.warm is not None
    channel.settimeout(WARM_REFRESH_S)
    while True:
        try:
            return channel.recv(16)
        except TimeoutError:
            try:
                worker.warm.refresh(time.monotonic())
            except Exception:  # the copy is a guess take_over checks: never worth the standby
                log.exception("worker %d (standby): the partition's copy failed; starting over", worker.index)
                worker.warm.reset()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    spec = decode_spec(os.environ.pop("RTCRELAY_WORKER_SPEC"))
    _die_with_parent()
    if os.getppid() != spec.supervisor_pid:
        sys.exit(1)
    import uvloop

    worker = Worker(spec)  # imports done, table attached, buffers allocated: ready to serve
    if spec.go_fd is not None:
        # A standby: wait for the supervisor's word. EOF (the supervisor closed the pipe or
        # died) means "not needed": exit without having touched the partition. A key reload
        # (SIGHUP) must not kill it (it reads the keys when it takes over), nor a terminal's
        # Ctrl-C to the whole process group (SIGINT): the supervisor decides when it leaves.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        channel = socket.socket(fileno=spec.go_fd)
        try:
            channel.sendall(b"r")
            go = _wait_warming(channel, worker)
        except ConnectionError:  # the supervisor let it go while it was starting
            go = b""
        if not go:
            sys.exit(0)
        channel.close()
        worker.reload_keys()  # keys may have rotated while it waited
    uvloop.run(worker.run())


if __name__ == "__main__":
    main()
