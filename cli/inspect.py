"""Read a running relay's state straight from shared memory, for the CLI.

Read-only: the table is attached with O_RDONLY/PROT_READ and never locked, so inspecting a
live relay cannot harm it. Everything here returns plain dicts (the ``--json`` form); the
CLI renders them with rich.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psutil

from relay.metrics import DROP_REASONS
from shm import Flow, FlowTable, LayoutMismatch, Session, TableView
from shm.counters import CounterBlock, CounterLayoutError
from shm.layout import ip_str


class InspectError(Exception):
    """Something an operator can fix: no table at that path, not a table, wrong name."""


def table_paths(table_dir: str, name: str) -> tuple[str, str]:
    return os.path.join(table_dir, f"rtcrelay-{name}.table"), os.path.join(table_dir, f"rtcrelay-{name}.stats")


def yield_to_the_relay() -> None:
    """Run this process at SCHED_IDLE (else nice 19): reading 100k flows takes a second of
    CPU, and on a host whose cores all run workers a reader at normal priority takes its
    time slices from their packet path; at SCHED_IDLE any worker's wakeup preempts it."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with suppress(OSError):
            os.nice(19)


@contextmanager
def open_view(path: str) -> Iterator[TableView]:
    if not os.path.exists(path):
        raise InspectError(f"no flow table at {path} (is the relay running? check --name / --table-dir)")
    try:
        view = FlowTable.attach_readonly(path)
    except (LayoutMismatch, OSError, ValueError) as exc:
        raise InspectError(f"{path}: {exc}") from None
    try:
        yield view
    finally:
        view.close()


def now_ms() -> int:
    """The clock the relay stamps flows with (CLOCK_MONOTONIC is system-wide)."""
    return time.monotonic_ns() // 1_000_000


def addr(ip: bytes, port: int) -> str:
    text = ip_str(ip)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def flow_row(flow: Flow, now: int) -> dict[str, Any]:
    return {
        "client": addr(flow.client_ip, flow.client_port),
        "relay": addr(flow.local_ip, flow.local_port),
        "ufrag": (flow.ufrag or b"").decode(errors="replace"),
        "transceiver": addr(flow.target_ip, flow.target_port),
        "worker": flow.worker,
        "handle": flow.handle,
        "age_s": round(max(0, now - flow.created) / 1000, 1),
        "idle_s": round(max(0, now - flow.last_seen) / 1000, 1),
        "packets_in": flow.pkts_in,
        "bytes_in": flow.bytes_in,
        "packets_out": flow.pkts_out,
        "bytes_out": flow.bytes_out,
    }


SORT_KEYS = {
    "age": lambda r: -r["age_s"],
    "idle": lambda r: -r["idle_s"],
    "packets": lambda r: -(r["packets_in"] + r["packets_out"]),
    "bytes": lambda r: -(r["bytes_in"] + r["bytes_out"]),
    "client": lambda r: r["client"],
}


def list_flows(view: TableView, *, ufrag: str | None = None, transceiver: str | None = None,
               worker: int | None = None, sort: str = "age") -> list[dict[str, Any]]:
    now = now_ms()
    rows = [flow_row(flow, now) for flow in view.flows()]
    rows = [r for r in rows if (ufrag is None or r["ufrag"] == ufrag)
            and (transceiver is None or r["transceiver"] == transceiver)
            and (worker is None or r["worker"] == worker)]
    return sorted(rows, key=SORT_KEYS[sort])


def session_row(session: Session, now: int) -> dict[str, Any]:
    return {
        "ufrag": session.ufrag.decode(errors="replace"),
        "transceiver": addr(session.target_ip, session.target_port),
        "flows": session.flows,
        "workers": list(session.partitions),
        "age_s": round(max(0, now - session.created) / 1000, 1),
        "idle_s": round(max(0, now - session.last_seen) / 1000, 1),
    }


def list_sessions(view: TableView) -> list[dict[str, Any]]:
    now = now_ms()
    return sorted((session_row(s, now) for s in view.sessions()), key=lambda r: -r["age_s"])


def worker_stats(stats_path: str) -> list[dict[str, Any]]:
    """Per-worker counters, with CPU and RSS of the live worker processes (psutil)."""
    if not os.path.exists(stats_path):
        raise InspectError(f"no counter file at {stats_path} (is the relay running?)")
    try:
        block = CounterBlock.attach(stats_path)
    except CounterLayoutError as exc:
        raise InspectError(str(exc)) from None
    try:
        rows = [block.load_row(i) for i in range(block.rows)]
    finally:
        block.close()
    out = []
    for index, row in enumerate(rows):
        entry: dict[str, Any] = {"worker": index, **{k: v for k, v in row.items() if not k.startswith("drop_")}}
        entry["drops"] = {reason: row.get("drop_" + reason, 0)
                          for reason in DROP_REASONS if row.get("drop_" + reason, 0)}
        entry["alive"] = False
        if row.get("pid"):
            try:
                proc = psutil.Process(row["pid"])
                with proc.oneshot():
                    entry["cpu_percent"] = proc.cpu_percent(interval=0.1)
                    entry["rss_bytes"] = proc.memory_info().rss
                entry["alive"] = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                pass
        out.append(entry)
    return out


def totals(view: TableView, workers: Iterable[dict[str, Any]]) -> dict[str, Any]:
    table = view.totals()
    workers = list(workers)
    drops: dict[str, int] = {}
    for w in workers:
        for reason, count in w["drops"].items():
            drops[reason] = drops.get(reason, 0) + count
    return {
        "table": table,
        "table_fill": round(table.get("flows", 0) / max(1, table.get("flow_limit", table.get("flow_capacity", 1))), 4),
        "packets_to_transceivers": sum(w.get("client_packets", 0) for w in workers),
        "packets_to_clients": sum(w.get("transceiver_packets", 0) for w in workers),
        "bytes_to_transceivers": sum(w.get("client_bytes", 0) for w in workers),
        "bytes_to_clients": sum(w.get("transceiver_bytes", 0) for w in workers),
        # of those, what the in-kernel fast path forwarded (relay/kernel_flows.py)
        "kernel_packets_to_transceivers": sum(w.get("kernel_to_transceiver", 0) for w in workers),
        "kernel_packets_to_clients": sum(w.get("kernel_to_client", 0) for w in workers),
        "drops": dict(sorted(drops.items())),
        "workers": workers,
    }
