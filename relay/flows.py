"""A worker's flows: local dicts for the packet path, mirrored in its shm partition.

The dicts are the truth for forwarding (one lookup per packet); the partition is the truth
that survives the worker (a restarted worker reloads its dicts from it) and that other
workers and the CLI can read. Every change goes to shm first, then to the dicts.

Times: the packet path keeps ``time.monotonic()`` floats; shm keeps integer milliseconds of
the same clock (system-wide, so every worker and the CLI agree). A backward-shift delete can
move a flow to another slot, which changes its handle: the old handle stays an alias of the
entry, so return frames the transceiver sent with it still validate.
"""

from __future__ import annotations

import collections
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from relay.batchio import address_tuple, sockaddr_for
from relay.check_changes import CheckChanges
from relay.config import RelayConfig
from relay.decision import Learn
from relay.flow_entry import C_FIELDS, FlowEntry
from relay.partition_view import AllPartitionsView
from shm import Flow, FlowTable, InsertStatus, PartitionWriter, TakeoverReport
from shm.layout import ip16

if TYPE_CHECKING:
    from relay.flow_indexes import CFlowIndexes
    from relay.kernel_flows import KernelFlows
    from relay.warm_takeover import WarmCopy

log = logging.getLogger("rtcrelay.relay")

_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
MAX_GONE = 4096  # silent transceivers remembered (their tokens' sessions get an error answer)

_REFUSALS = {
    InsertStatus.TABLE_FULL: "table_full",
    InsertStatus.SESSION_TABLE_FULL: "session_table_full",
    InsertStatus.SESSION_FLOW_LIMIT: "session_flow_limit",
    InsertStatus.UFRAG_TOO_LONG: "ufrag_too_long",
}


# Flows a C flush unit writes for a Python one's: a C write is ~0.27 µs at 50k flows with the
# caches warm (bench/counter_flush.py), ~1 µs in a worker at 50k flows and 20k pps, a Python one
# ~3.5 µs. 16 in C: a unit of ~16-30 µs there (the steps that run units: housekeeping_steps.py).
C_FLUSH_SPEEDUP = 2
LOOKS_PER_WRITE = 16  # flows a flush looks at for each one it may write
# Counters of moved flows to shm: FLUSH_MIN_PER_S writes a second, or a pass per idle_timeout /
# FLUSH_PASSES_PER_IDLE if that is faster: a flow's write is CPU the packet path needs more at 50k
# flows than shm needs fresh counters. Expiry does not wait on it (the flush's own look at a flow
# finds it idle, below), but how soon it comes does: a flow that stopped is found idle at the
# first look idle_timeout after a look saw it move, so it stays idle_timeout + a pass on average,
# + 2 passes at most. At 50k flows (bench/relay_latency.py, p99 at 20k pps, median of 5 runs):
# 3 passes and expiry by a sweep of shm's last_seen, 790 ms of housekeeping CPU and 136-148 µs;
# expiry from the flush with 2 passes, 294 ms and 77-100 µs; with 1 pass, 177 ms and 77 µs:
# within the noise of 2, for expiry twice as late.
FLUSH_MIN_PER_S = 1024
FLUSH_PASSES_PER_IDLE = 2


def counter_flush_for(writer: PartitionWriter) -> Any:
    """relay._counter_flush.CounterFlush for this partition; None when it (or the entries' C
    fields it reads, relay._hitpath.FlowFields) was not built."""
    try:
        from relay._counter_flush import CounterFlush
    except ImportError:
        return None
    if not C_FIELDS:
        return None
    return CounterFlush(**writer.flush_layout())


def unmap(ip: bytes) -> bytes:
    """16-byte IPv4-mapped → 4-byte IPv4; IPv6 unchanged."""
    return ip[12:] if ip[:12] == _V4_MAPPED else ip


def _discard(index: dict[Any, set[bytes]], name: Any, client_key: bytes) -> None:
    keys = index.get(name)
    if keys is not None:
        keys.discard(client_key)
        if not keys:
            del index[name]


def ms(seconds: float) -> int:
    return int(seconds * 1000)


class LocalFlows:
    def __init__(self, config: RelayConfig, index: int, tunnel_family: int, publics: list[tuple[bytes, int]],
                 is_hop: Callable[[bytes, int], bool] = lambda ip, port: False) -> None:
        self.table = FlowTable.open(
            config.table_path,
            partitions=config.worker_count,
            flow_capacity=config.flow_capacity,
            session_capacity=config.session_capacity,
            max_flows_per_session=config.max_flows_per_session,
        )
        self.writer: PartitionWriter | None = None
        self.index = index
        self.idle_timeout = config.idle_timeout
        self.tunnel_family = tunnel_family
        self.publics = publics
        self.by_key: dict[bytes, FlowEntry] = {}
        #: the same entries by the client's address tuple: the lookup for recv_one's datagram
        self.by_address: dict[tuple[Any, ...], FlowEntry] = {}
        self.by_handle: dict[int, FlowEntry] = {}
        self.by_ufrag: dict[str, set[bytes]] = {}
        self.by_transceiver: dict[bytes, set[bytes]] = {}
        self.by_transceiver_dest: dict[bytes, bytes] = {}  # the one copy of each tunnel_dest
        #: every entry once, in no order (swap-remove): the counter flush walks it round robin
        self.entries: list[FlowEntry] = []
        self._flush_cursor = 0
        #: flows to remove in housekeeping steps (their transceiver went silent)
        self.doomed: list[FlowEntry] = []
        #: flows the flush found idle for idle_timeout (expire_idle_steps removes them)
        self.idle_found: list[FlowEntry] = []
        # transceiver sockaddr → [last heartbeat (monotonic s), draining]
        self.transceivers: dict[bytes, list[Any]] = {}
        # transceivers that went silent (tunnel sockaddr -> unix time): the checks of sessions
        # they started are answered with an error (relay/decision.py), until they heartbeat again
        self.gone: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        #: what can turn a new session's passed check into a refusal (a session this worker
        #: recorded closed, a transceiver it marked gone): the miss path learns a step after
        #: the check, and checks again if one names the session
        self.check_changes = CheckChanges(self._tunnel_sockaddr)
        self.views = [AllPartitionsView(self.table, local, self.is_gone, self.hops_gone) for local in publics]
        #: is this (packed IP, port) a cluster relay's hop address (a flow to it is a hop)
        self.is_hop = is_hop
        self.hop_limit = config.hop_limit
        #: the kernel fast path's maps (relay/kernel_flows.py), when it serves: every flow added
        #: or removed here is added to or removed from the kernel too
        self.kernel: KernelFlows | None = None
        #: the C packet paths' copies of by_key and by_handle (relay/flow_indexes.py), once
        #: relay/hit_path.py has set them
        self.c_indexes: CFlowIndexes | None = None
        #: the counter flush in C (relay/_counter_flush.c), set by take_over when it was built
        #: and the hit path is not "python" (then everything is Python, the reference)
        self.counter_flush: Any = None
        self._counter_flush_wanted = config.hit_path != "python"

    def _own(self) -> PartitionWriter:
        assert self.writer is not None, "take_over() first"
        return self.writer

    # -- changes ------------------------------------------------------------------------------

    def _add(self, entry: FlowEntry, now: float) -> FlowEntry:
        self.by_key[entry.client_key] = entry
        if self.c_indexes is not None:
            self.c_indexes.add(entry)
        self.by_address[entry.client_address] = entry
        self.by_handle[entry.handle] = entry
        self.by_ufrag.setdefault(entry.ufrag, set()).add(entry.client_key)
        self.by_transceiver.setdefault(entry.tunnel_dest, set()).add(entry.client_key)
        entry.index = len(self.entries)
        entry.flushed_ms = ms(now)  # (taken over or adopted: a full idle timeout from now, not from shm's last_seen)
        self.entries.append(entry)
        if self.kernel is not None:
            self.kernel.add(entry)
        # A transceiver is given one heartbeat timeout from its first flow to say it is alive.
        self.transceivers.setdefault(entry.tunnel_dest, [now, False])
        return entry

    def _remove(self, client_key: bytes) -> None:
        entry = self.by_key.pop(client_key, None)
        if entry is None:
            return
        if self.c_indexes is not None:
            self.c_indexes.remove(entry)
        if self.kernel is not None:
            self.kernel.remove(entry)
        self.by_address.pop(entry.client_address, None)
        self.by_handle.pop(entry.handle, None)
        for alias in entry.aliases:
            self.by_handle.pop(alias, None)
        _discard(self.by_ufrag, entry.ufrag, client_key)
        _discard(self.by_transceiver, entry.tunnel_dest, client_key)
        if entry.tunnel_dest not in self.by_transceiver:  # its last flow: forget the shared copy
            self.by_transceiver_dest.pop(entry.tunnel_dest, None)
        last = self.entries.pop()
        if last is not entry:
            self.entries[entry.index] = last
            last.index = entry.index

    def _tunnel_sockaddr(self, target_ip: bytes, target_port: int) -> bytes | None:
        """The transceiver's address in the tunnel socket's sockaddr form (None: unreachable)."""
        if self.tunnel_family == socket.AF_INET:
            if len(target_ip) != 4:
                return None
            return sockaddr_for(target_ip, target_port, socket.AF_INET)
        return sockaddr_for(ip16(target_ip), target_port, socket.AF_INET6)

    def _tunnel_dest(self, target_ip: bytes, target_port: int) -> bytes | None:
        """:meth:`_tunnel_sockaddr`, one bytes object per transceiver, shared by its flows: the
        hit path reads it for every datagram, and at 50k flows one object stays in cache where
        50k would not."""
        dest = self._tunnel_sockaddr(target_ip, target_port)
        return None if dest is None else self.by_transceiver_dest.setdefault(dest, dest)

    def learn(self, client_key: bytes, source: tuple[bytes, int], public_index: int,
              learned: Learn, now: float) -> tuple[FlowEntry | None, str]:
        # Where the flow's datagrams go: the token's transceiver, or (another cluster's session
        # on an edge) the cluster relay chosen for it, which the table records as the target.
        target = learned.destination
        hops = learned.hops if learned.hop is not None else None
        tunnel_dest = self._tunnel_dest(*target)
        if tunnel_dest is None:
            return None, "token_target_unreachable"
        # max_flows_per_session holds for the relay, not for each worker's partition (the
        # insert checks its own partition only): the other partitions' count is read, this
        # worker's is its own index (one worker: no read at all).
        held = len(self.by_ufrag.get(learned.ufrag, ()))
        if held + self.table.session_flows_elsewhere(learned.ufrag.encode(), self.index) \
                >= self.table.max_flows_per_session:
            return None, "session_flow_limit"
        local = self.views[public_index].local
        result = self._own().insert(
            ip16(source[0]), source[1], local[0], local[1],
            ip16(target[0]), target[1], learned.ufrag.encode(), ms(now),
        )
        if not result.has_flow:
            return None, _REFUSALS[result.status]
        entry = FlowEntry(client_key, source, public_index, result.handle, tunnel_dest, target, learned.ufrag, hops)
        return self._add(entry, now), ""

    def adopt(self, client_key: bytes, public_index: int, flow: Flow, now: float) -> tuple[FlowEntry | None, str]:
        result = self._own().adopt(flow)
        if not result.has_flow:
            return None, _REFUSALS[result.status]
        entry = self._entry_from(flow, result.handle, client_key, public_index)
        if entry is None:
            self._own().delete_handle(result.handle)  # (a flow in shm without an entry would be an orphan)
            return None, "token_target_unreachable"
        return self._add(entry, now), ""

    def _entry_from(self, flow: Flow, handle: int, client_key: bytes, public_index: int) -> FlowEntry | None:
        target = (unmap(flow.target_ip), flow.target_port)
        tunnel_dest = self._tunnel_dest(*target)
        if tunnel_dest is None:
            return None
        # a flow to a cluster relay is a hop (the count it left with is not in the table: the
        # most a flow of this relay starts with)
        hops = self.hop_limit - 1 if self.is_hop(*target) else None
        entry = FlowEntry(client_key, (unmap(flow.client_ip), flow.client_port), public_index, handle,
                          tunnel_dest, target, (flow.ufrag or b"").decode(), hops)
        entry.packets_in, entry.bytes_in = flow.pkts_in, flow.bytes_in
        entry.packets_out, entry.bytes_out = flow.pkts_out, flow.bytes_out
        entry.flushed_activity = flow.pkts_in + flow.pkts_out
        return entry

    def close_session(self, ufrag: str, tunnel_key: bytes) -> int:
        """SessionClosed from a transceiver: drop that session's flows, only if they are its own.
        By handle (at most max_flows_per_session deletes), never a scan of the partition."""
        keys = self._sessions_own_keys(ufrag, tunnel_key)
        for key in keys:
            self.remove(key)
        return len(keys)

    def _sessions_own_keys(self, ufrag: str, tunnel_key: bytes) -> list[bytes]:
        """The flows of ``ufrag`` when every one belongs to ``tunnel_key``'s transceiver, else
        none: a transceiver acts on its own sessions only."""
        keys = self.by_ufrag.get(ufrag)
        if not keys or any(self.by_key[k].tunnel_dest != tunnel_key for k in keys):
            return []
        return list(keys)

    def rename_session(self, old: str, new: str, tunnel_key: bytes, now: float) -> int:
        """After an ICE restart: the flows of ``old`` (only if they are the sender's) are
        learned again under ``new``, same 5-tuple, same transceiver; their handles change (the
        transceiver follows on the next client datagram). Returns the flows renamed."""
        renamed = 0
        for key in self._sessions_own_keys(old, tunnel_key):
            entry = self.by_key[key]
            self.remove(key)
            learned = Learn(new, entry.target[0], entry.target[1], 0)
            renamed += self.learn(key, entry.client, entry.public_index, learned, now)[0] is not None
        return renamed

    def remember_closed(self, ufrag: str, until: float, now: float) -> bool:
        """Record an ended session in this worker's partition of the shm closed set (read by
        every worker's decision); False when it had no room (counted by the caller)."""
        self.check_changes.closed(ufrag)
        return self._own().record_closed(ufrag.encode(), ms(until), ms(now))

    def remove(self, client_key: bytes, expired: bool = False) -> bool:
        """Remove one flow from shm and the dicts (False: it was gone already); ``expired``:
        it idled out (the partition counts it)."""
        entry = self.by_key.get(client_key)
        if entry is None:
            return False
        self._own().delete_handle(entry.handle, expired)  # (a backward shift may rehandle others: _on_move)
        self._remove(client_key)
        return True

    def is_gone(self, target_ip: bytes, target_port: int, issued_at: int) -> bool:
        """The transceiver at this address went away after issuing a token at ``issued_at``.
        A token issued later comes from a process started since at the same address (a fixed
        tunnel port): its sessions are learned, and reaching it is what clears the mark."""
        if not self.gone:
            return False  # (every check asks: no sockaddr built when no transceiver went away)
        dest = self._tunnel_sockaddr(target_ip, target_port)
        gone_at = self.gone.get(dest) if dest is not None else None
        return gone_at is not None and issued_at <= gone_at

    def hops_gone(self) -> frozenset[tuple[str, int]]:
        """The cluster relays (hop addresses) that went silent or refused: for the decision."""
        if not self.gone:
            return frozenset()
        return frozenset(address_tuple(key)[:2] for key in self.gone)

    def mark_gone(self, tunnel_key: bytes) -> None:
        self.check_changes.gone(tunnel_key)
        self.gone[tunnel_key] = time.time()
        self.gone.move_to_end(tunnel_key)
        while len(self.gone) > MAX_GONE:
            self.gone.popitem(last=False)

    def transceiver_heartbeat(self, tunnel_key: bytes, now: float, draining: bool) -> None:
        if self.gone and self.gone.pop(tunnel_key, None) is not None:
            log.info("transceiver %s is back", address_tuple(tunnel_key))
        state = self.transceivers.get(tunnel_key)
        if state is None:
            self.transceivers[tunnel_key] = [now, draining]
        else:
            state[0] = now
            state[1] = draining

    def transceiver_refused(self, tunnel_key: bytes) -> bool:
        """The transceiver's port refuses datagrams: expire it at the next pass (False: it was
        not one this worker knew)."""
        state = self.transceivers.get(tunnel_key)
        if state is None:
            return False
        state[0] = float("-inf")
        return True

    def expire_silent_transceivers(self, now: float, timeout: float) -> int:
        """Forget every transceiver not heard from for ``timeout`` seconds; its flows join
        ``doomed`` (removed by :meth:`remove_doomed_steps`). Returns the flows doomed."""
        doomed = 0
        for tunnel_key, (last, _draining) in list(self.transceivers.items()):
            if now - last <= timeout:
                continue
            del self.transceivers[tunnel_key]
            self.mark_gone(tunnel_key)
            keys = self.by_transceiver.get(tunnel_key, ())
            self.doomed.extend(self.by_key[key] for key in keys)
            doomed += len(keys)
        return doomed

    def remove_doomed_steps(self, chunk: int) -> Iterator[int]:
        """Remove the doomed flows, ``chunk`` per step (a delete is ~10 µs: 10k flows of a
        dead transceiver at once would hold the packet path for 100 ms). Yields the flows
        removed so far."""
        return self._remove_steps(self.doomed, chunk, lambda entry: True, expired=False)

    def expire_idle_steps(self, chunk: int) -> Iterator[int]:
        """Remove the flows the flush found idle, ``chunk`` per step, those that are still idle
        (a datagram may have come since). Yields the flows expired so far."""
        return self._remove_steps(self.idle_found, chunk, self._still_idle, expired=True)

    def _still_idle(self, entry: FlowEntry) -> bool:
        if self.kernel is not None and entry.kernel is not None:
            self.kernel.fold(entry)
        return entry.packets_in + entry.packets_out == entry.flushed_activity

    def _remove_steps(self, pending: list[FlowEntry], chunk: int, still: Callable[[FlowEntry], bool],
                      expired: bool) -> Iterator[int]:
        """Remove ``pending``'s flows, ``chunk`` per step, each only if it is still the entry
        of its 5-tuple (not one learned since from the same address: a client back on a
        restarted transceiver) and ``still`` says so."""
        removed = 0
        while pending:
            batch = pending[-chunk:]
            del pending[-chunk:]
            removed += sum(self.remove(entry.client_key, expired) for entry in batch
                           if self.by_key.get(entry.client_key) is entry and still(entry))
            yield removed

    def flush_counters(self, now: float) -> None:
        """Counters of every moved flow to shm, all at once (at shutdown)."""
        for _ in self.flush_counters_steps(now, len(self.entries) or 1, budget=len(self.entries)):
            pass

    def flush_counters_steps(self, now: float, chunk: int, budget: int) -> Iterator[int]:
        """Counters to shm, round robin over the flows from where the last call stopped:
        at most ``chunk`` flows written or LOOKS_PER_WRITE x ``chunk`` looked at per step (the
        caller yields to the packet path between steps), at most ``budget`` written,
        LOOKS_PER_WRITE x ``budget`` looked at and one pass per call. Yields the flows written so far. (Without the look
        limit, a worker whose 10,000 flows were idle read them all every tick: 5 ms a second.)

        The packet path does not stamp every packet: a flow whose counters moved since its
        last look was seen now (± one pass). A flow that did not move is not written: shm
        already holds its counters and last-seen time. One that did not move for idle_timeout
        since a look saw it move joins ``idle_found`` (expire_idle_steps removes it): expiry
        needs no second pass over the table, and never reads a last-seen time that a slow pass
        left stale (a flow's counters are the truth, not shm's copy)."""
        kernel = self.kernel
        stamp = ms(now)
        if self.counter_flush is not None and kernel is None:
            yield from self._flush_counters_steps_c(stamp, chunk, budget)
            return
        flush = self._own().flush_counters
        idle_ms, idle_found = ms(self.idle_timeout), self.idle_found
        entries = self.entries
        written = looked = 0
        total = min(len(entries), LOOKS_PER_WRITE * budget)
        while looked < total and written < budget:
            step_written = min(written + chunk, budget)
            # (a flow in the kernel costs a map read here: ~2 µs, as much as a write)
            step_looked = looked + (chunk if kernel is not None else LOOKS_PER_WRITE * chunk)
            while looked < total and written < step_written and looked < step_looked:
                if self._flush_cursor >= len(entries):
                    self._flush_cursor = 0
                    if not entries:
                        break
                entry = entries[self._flush_cursor]
                self._flush_cursor += 1
                looked += 1
                if kernel is not None and entry.kernel is not None:
                    kernel.fold(entry)
                activity = entry.packets_in + entry.packets_out
                if activity != entry.flushed_activity:
                    entry.flushed_activity = activity
                    entry.flushed_ms = stamp
                    flush(entry.handle, entry.packets_in, entry.bytes_in, entry.packets_out, entry.bytes_out, stamp)
                    written += 1
                elif stamp - entry.flushed_ms > idle_ms:
                    idle_found.append(entry)
            yield written

    def flush_budget(self, elapsed: float) -> int:
        """The counter writes a housekeeping tick makes ``elapsed`` s after the last one: a pass
        over the moved flows takes at most idle_timeout / FLUSH_PASSES_PER_IDLE of wall time
        however far apart ticks come. (The budget was per tick: an overloaded worker's ticks
        came further apart, a pass outlasted the idle timeout, and the sweep, which expired by
        shm's last_seen then, expired flows that were sending: 4.5% of 2 x 50,000 in the
        bench's paced search.)"""
        per_s = max(FLUSH_MIN_PER_S, len(self.entries) * FLUSH_PASSES_PER_IDLE / self.idle_timeout)
        return int(per_s * elapsed) + 1

    @property
    def flush_step_scale(self) -> int:
        """How many times a Python step's flows a flush step may write in the same time."""
        return C_FLUSH_SPEEDUP if self.counter_flush is not None and self.kernel is None else 1

    def _flush_counters_steps_c(self, stamp: int, chunk: int, budget: int) -> Iterator[int]:
        """flush_counters_steps in C: the same round robin, writes and steps."""
        flush = self.counter_flush.flush
        writer = self._own()
        written = looked = 0
        total = min(len(self.entries), LOOKS_PER_WRITE * budget)
        while looked < total and written < budget:
            self._flush_cursor, step_written, step_looked = flush(
                self.entries, self._flush_cursor, min(chunk, budget - written),
                min(LOOKS_PER_WRITE * chunk, total - looked), writer.table_buffer, stamp,
                ms(self.idle_timeout), self.idle_found)
            if not step_looked:
                return  # (no entries left)
            written += step_written
            looked += step_looked
            yield written

    @property
    def orphaned(self) -> bool:
        """Does the partition hold flows this worker has no entry for (left by take_over: a
        listen address the configuration dropped, a target it cannot reach)?"""
        return self._own().flow_count > len(self.by_key)

    def sweep_steps(self, now: float, slots: int, chunk: int, removals: int, idle_s: float) -> Iterator[int]:
        """Expire the flows of the partition whose last_seen in shm is ``idle_s`` old among
        its next ``slots`` slots, ``chunk`` slots and at most ``removals`` deletes a step. The
        flush expires the flows this worker serves (expire_idle_steps); this catches those it
        has no entry for (a listen address the configuration dropped, a target it cannot
        reach), so ``idle_s`` is well above the oldest a flush pass leaves a sending flow's
        last_seen. A step that met its delete limit did not cover its slots: it is not counted
        against ``slots``, so every idle flow in the window goes this tick, in as many short
        steps as it takes. Yields the flows expired so far."""
        writer = self._own()
        idle = ms(idle_s)
        expired = 0
        done = 0
        while done < slots:
            removed = writer.sweep(ms(now), idle, min(chunk, slots - done), max_removals=removals)
            if len(removed) < removals:
                done += chunk
            for flow in removed:
                entry = self.by_handle.get(flow.handle)
                if entry is not None:
                    self._remove(entry.client_key)
            expired += len(removed)
            yield expired

    def _on_move(self, old_handle: int, new_handle: int) -> None:
        entry = self.by_handle.get(old_handle)
        if entry is not None:
            entry.rehandle(new_handle)
            self.by_handle[new_handle] = entry
            if self.c_indexes is not None:
                self.c_indexes.moved(entry, old_handle)
            if self.kernel is not None:
                self.kernel.rehandle(entry)

    def take_over(self, now: float, warm: WarmCopy | None = None) -> TakeoverReport:
        """Own the partition (flock + repair what a dead predecessor left), reload the dicts:
        every flow, or only what changed since ``warm`` (a standby's copy) was refreshed."""
        self.writer = self.table.own(self.index, on_move=self._on_move)
        report = self.writer.takeover()  # idempotent: own() already repaired; this reports it
        if self._counter_flush_wanted:
            self.counter_flush = counter_flush_for(self.writer)
        if warm is None:
            for flow in self.writer.flows():
                self.load(flow, now)
        else:
            warm.refresh(now, limit=None)  # (exact now: nobody else writes the partition)
            warm.settle(now)
            if self.kernel is not None:  # (the copy's entries were kept out of the maps)
                for entry in self.entries:
                    self.kernel.add(entry)
        if self.kernel is not None:
            stale = self.kernel.forget_others(self.entries)
            if stale:
                log.info("worker %d: %d flows a predecessor left in the kernel removed", self.index, stale)
        return report

    def load(self, flow: Flow, now: float) -> FlowEntry | None:
        """The entry of a flow of this partition as shm holds it (None: a listen address this
        configuration no longer has, left to expire, or a target the tunnel cannot reach)."""
        local = (unmap(flow.local_ip), flow.local_port)
        if local not in self.publics:
            return None
        client_ip = unmap(flow.client_ip)
        family = socket.AF_INET if len(local[0]) == 4 else socket.AF_INET6
        client_key = sockaddr_for(client_ip if family == socket.AF_INET else ip16(client_ip), flow.client_port,
                                  family)
        entry = self._entry_from(flow, flow.handle, client_key, self.publics.index(local))
        return None if entry is None else self._add(entry, now)

    def remove_entry(self, entry: FlowEntry) -> None:
        """Forget an entry from the dicts only (a standby's copy: shm is not its to change)."""
        if self.by_key.get(entry.client_key) is entry:
            self._remove(entry.client_key)

    def restart_timers(self, now: float) -> None:
        """A whole idle timeout for every flow and a heartbeat timeout for every transceiver
        from ``now``: a takeover's, whatever shm's last-seen times say."""
        for entry in self.entries:
            entry.flushed_ms = ms(now)
        for state in self.transceivers.values():
            state[0] = now

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.table.close()
