"""A worker's flows: local dicts for the packet path, mirrored in its shm partition.

The dicts are the truth for forwarding (one lookup per packet); the partition is the truth
that survives the worker (a restarted worker reloads its dicts from it) and that other
workers and the CLI can read. Every change goes to shm first, then to the dicts.
"""

from __future__ import annotations

import socket
from typing import Any

from relay.config import RelayConfig
from relay.decision import Learn
from relay.mmsg import sockaddr_for
from relay.tunnel_frame import data_header_len, data_prefix
from shm.flowtable import Flow, FlowTable, InsertStatus, LookupStatus

_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"

_REFUSALS = {
    InsertStatus.TABLE_FULL: "table_full",
    InsertStatus.SESSION_TABLE_FULL: "session_table_full",
    InsertStatus.SESSION_FLOW_LIMIT: "session_flow_limit",
    InsertStatus.UFRAG_TOO_LONG: "ufrag_too_long",
}


def ip16(ip: bytes) -> bytes:
    return _V4_MAPPED + ip if len(ip) == 4 else ip


def unmap(ip: bytes) -> bytes:
    return ip[12:] if ip[:12] == _V4_MAPPED else ip


class FlowEntry:
    """One client 5-tuple, as the packet path needs it."""

    __slots__ = (
        "client_key", "client", "public_index", "handle", "prefix", "header_len", "tunnel_dest",
        "target", "ufrag", "packets_in", "bytes_in", "packets_out", "bytes_out", "last_seen",
    )

    def __init__(self, client_key: bytes, client: tuple[bytes, int], public_index: int, handle: int,
                 tunnel_dest: bytes, target: tuple[bytes, int], ufrag: str, now: float) -> None:
        self.client_key = client_key
        self.client = client
        self.public_index = public_index
        self.handle = handle
        self.prefix = data_prefix(handle, client[0], client[1])
        self.header_len = data_header_len(client[0])
        self.tunnel_dest = tunnel_dest
        self.target = target
        self.ufrag = ufrag
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        self.last_seen = now


class TableView:
    """The decision function's read-only window on the whole table (all partitions)."""

    __slots__ = ("table", "local")

    def __init__(self, table: FlowTable, local: tuple[bytes, int]) -> None:
        self.table = table
        self.local = local

    def find(self, source: tuple[bytes, int]) -> Flow | None:
        found = self.table.lookup(ip16(source[0]), source[1], ip16(self.local[0]), self.local[1])
        return found if isinstance(found, Flow) else None

    def session_known(self, ufrag: str) -> bool:
        return self.table.session(ufrag.encode()) is not None


class LocalFlows:
    def __init__(self, config: RelayConfig, index: int) -> None:
        self.table = FlowTable.open(
            config.table_path,
            partitions=config.worker_count,
            flow_capacity=config.flow_capacity,
            session_capacity=config.session_capacity,
            max_flows_per_session=config.max_flows_per_session,
        )
        self.writer = self.table.own(index)
        self.index = index
        self.idle_timeout = config.idle_timeout
        self.by_key: dict[bytes, FlowEntry] = {}
        self.by_handle: dict[int, FlowEntry] = {}
        self.by_ufrag: dict[str, set[bytes]] = {}
        # transceiver sockaddr → [last heartbeat (monotonic), draining]
        self.transceivers: dict[bytes, list[Any]] = {}
        self._tunnel_family = socket.AF_INET
        self._views: dict[tuple[bytes, int], TableView] = {}
        self._publics: list[tuple[bytes, int]] = []

    def configure(self, tunnel_family: int, publics: list[tuple[bytes, int]]) -> None:
        self._tunnel_family = tunnel_family
        self._publics = publics

    def view(self, local: tuple[bytes, int]) -> TableView:
        view = self._views.get(local)
        if view is None:
            view = self._views[local] = TableView(self.table, local)
        return view

    # -- changes ------------------------------------------------------------------------------

    def _add(self, entry: FlowEntry, now: float) -> FlowEntry:
        self.by_key[entry.client_key] = entry
        self.by_handle[entry.handle] = entry
        self.by_ufrag.setdefault(entry.ufrag, set()).add(entry.client_key)
        # A transceiver is given one heartbeat timeout from its first flow to say it is alive.
        self.transceivers.setdefault(entry.tunnel_dest, [now, False])
        return entry

    def _remove(self, client_key: bytes) -> None:
        entry = self.by_key.pop(client_key, None)
        if entry is None:
            return
        self.by_handle.pop(entry.handle, None)
        keys = self.by_ufrag.get(entry.ufrag)
        if keys is not None:
            keys.discard(client_key)
            if not keys:
                del self.by_ufrag[entry.ufrag]

    def _tunnel_dest(self, target_ip: bytes, target_port: int) -> bytes | None:
        if self._tunnel_family == socket.AF_INET:
            return sockaddr_for(target_ip, target_port, socket.AF_INET) if len(target_ip) == 4 else None
        return sockaddr_for(ip16(target_ip), target_port, socket.AF_INET6)

    def learn(self, client_key: bytes, source: tuple[bytes, int], public_index: int,
              local: tuple[bytes, int], learned: Learn, now: float) -> tuple[FlowEntry | None, str]:
        tunnel_dest = self._tunnel_dest(learned.target_ip, learned.target_port)
        if tunnel_dest is None:
            return None, "token_bad_length"  # a target this relay's tunnel cannot reach
        result = self.writer.insert(
            ip16(source[0]), source[1], ip16(local[0]), local[1],
            ip16(learned.target_ip), learned.target_port, learned.ufrag.encode(), now,
        )
        if result.status not in (InsertStatus.OK, InsertStatus.EXISTS):
            return None, _REFUSALS.get(result.status, "table_full")
        entry = FlowEntry(client_key, source, public_index, result.handle, tunnel_dest,
                          (learned.target_ip, learned.target_port), learned.ufrag, now)
        return self._add(entry, now), ""

    def adopt(self, client_key: bytes, public_index: int, flow: Flow, now: float) -> tuple[FlowEntry | None, str]:
        result = self.writer.adopt(flow)
        if result.status not in (InsertStatus.OK, InsertStatus.EXISTS):
            return None, _REFUSALS.get(result.status, "table_full")
        return self._add(self._entry_from(flow, result.handle, client_key, public_index, now), now), ""

    def _entry_from(self, flow: Flow, handle: int, client_key: bytes, public_index: int, now: float) -> FlowEntry:
        target = (unmap(flow.target_ip), flow.target_port)
        tunnel_dest = self._tunnel_dest(*target) or b""
        entry = FlowEntry(client_key, (unmap(flow.client_ip), flow.client_port), public_index, handle,
                          tunnel_dest, target, flow.ufrag.decode(), now)
        entry.packets_in, entry.bytes_in = flow.packets_in, flow.bytes_in
        entry.packets_out, entry.bytes_out = flow.packets_out, flow.bytes_out
        entry.last_seen = max(flow.last_seen, now - self.idle_timeout / 2)
        return entry

    def close_session(self, ufrag: str, tunnel_key: bytes) -> int:
        """SessionClosed from a transceiver: drop that session's flows, only if they are its own."""
        keys = self.by_ufrag.get(ufrag)
        if not keys or any(self.by_key[k].tunnel_dest != tunnel_key for k in keys):
            return 0
        removed = self.writer.delete_session(ufrag.encode())
        for key in list(keys):
            self._remove(key)
        return max(len(removed), 0)

    def transceiver_heartbeat(self, tunnel_key: bytes, now: float, draining: bool) -> None:
        state = self.transceivers.get(tunnel_key)
        if state is None:
            self.transceivers[tunnel_key] = [now, draining]
        else:
            state[0] = now
            state[1] = draining

    def transceiver_count(self) -> int:
        return len(self.transceivers)

    def expire_silent_transceivers(self, now: float, timeout: float) -> int:
        removed = 0
        for tunnel_key, (last, _draining) in list(self.transceivers.items()):
            if now - last <= timeout:
                continue
            del self.transceivers[tunnel_key]
            keys = [k for k, e in self.by_key.items() if e.tunnel_dest == tunnel_key]
            if not keys:
                continue
            target = self.by_key[keys[0]].target
            self.writer.delete_target(ip16(target[0]), target[1])
            for key in keys:
                self._remove(key)
            removed += len(keys)
        return removed

    def flush_counters(self) -> None:
        flush = self.writer.flush_counters
        for entry in self.by_key.values():
            flush(entry.handle, entry.packets_in, entry.bytes_in, entry.packets_out, entry.bytes_out, entry.last_seen)

    def sweep(self, now: float, max_slots: int) -> int:
        removed = self.writer.sweep(now, self.idle_timeout, max_slots)
        keys = {f.handle for f in removed}
        count = 0
        for handle in keys:
            entry = self.by_handle.get(handle)
            if entry is not None:
                self._remove(entry.client_key)
                count += 1
        return count

    def take_over(self, now: float) -> object:
        """Own the partition: repair what a dead predecessor left, reload the dicts from it."""
        report = self.writer.takeover()
        for flow in self.writer.flows():
            local = (unmap(flow.local_ip), flow.local_port)
            public_index = self._publics.index(local) if local in self._publics else 0
            client = (unmap(flow.client_ip), flow.client_port)
            family = socket.AF_INET if len(self._publics[public_index][0]) == 4 else socket.AF_INET6
            client_key = sockaddr_for(client[0] if family == socket.AF_INET else ip16(client[0]), client[1], family)
            self._add(self._entry_from(flow, flow.handle, client_key, public_index, now), now)
        return report

    def close(self) -> None:
        self.writer.close()
        self.table.close()
