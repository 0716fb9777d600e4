"""The two ways to attach to a flow table: FlowTable (read-write: create, open, own a
partition) and TableView (read-only, for tools). Both read like a TableScanner."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from shm.layout import MAX_PARTITIONS
from shm.records import LayoutMismatch, StaleTable
from shm.scan import TableScanner
from shm.tablefile import (
    check_capacity,
    map_file,
    partitions_locked,
    partitions_of,
    read_layout,
    release_lock,
    try_lock,
    unlink_table,
    write_table_file,
)
from shm.writer import PartitionWriter


class TableView(TableScanner):
    """A read-only attachment (O_RDONLY, PROT_READ): never locks, never writes."""


class FlowTable(TableScanner):
    """A read-write attachment: lookups like a view, plus `own(partition)` for a worker."""

    @classmethod
    def create(
        cls,
        path: str,
        *,
        partitions: int,
        flow_capacity: int,
        session_capacity: int,
        max_flows_per_session: int = 8,
        seed: int | None = None,
        mode: int = 0o600,
    ) -> FlowTable:
        """Create the table file, or atomically replace an existing one (no owner may be alive:
        PartitionBusy otherwise).

        The new file is written under a temporary name and renamed over `path`, so a process
        still mapping the old file keeps reading the old (now unlinked) table unharmed.
        Capacities are slots per partition, powers of two in [4, 2**23]; at most 3/4 of them
        are ever used. `seed` (random by default) keys the hashes and is stored in the header.
        """
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions must be in [1, {MAX_PARTITIONS}], got {partitions}")
        check_capacity("flow_capacity", flow_capacity)
        check_capacity("session_capacity", session_capacity)
        if not 1 <= max_flows_per_session <= 0xFFFFFFFF:
            raise ValueError("max_flows_per_session must be >= 1")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        seed &= (1 << 64) - 1
        old_partitions = 0
        with contextlib.suppress(OSError):
            old_partitions = partitions_of(path)
        # Hold every partition's lock (old and new layout) while the file is replaced.
        with partitions_locked(path, max(partitions, old_partitions)):
            write_table_file(path, partitions, flow_capacity, session_capacity, max_flows_per_session, seed, mode)
            return cls.open(path)

    @classmethod
    def open(
        cls,
        path: str,
        *,
        partitions: int | None = None,
        flow_capacity: int | None = None,
        session_capacity: int | None = None,
        max_flows_per_session: int | None = None,
    ) -> FlowTable:
        """Attach read-write to an existing table whose layout matches every argument given
        (else LayoutMismatch, also for a foreign, truncated or other-version file;
        FileNotFoundError when there is none). This is how the table survives a restart."""
        mm, size, inode = map_file(path, writable=True)
        try:
            layout = read_layout(mm, size, path)
            wanted = dict(
                partitions=partitions,
                flow_capacity=flow_capacity,
                session_capacity=session_capacity,
                max_flows_per_session=max_flows_per_session,
            )
            diff = [
                f"{k}={getattr(layout, k)} (wanted {v})"
                for k, v in wanted.items()
                if v is not None and getattr(layout, k) != v
            ]
            if diff:
                raise LayoutMismatch(f"{path}: " + ", ".join(diff))
        except BaseException:
            mm.close()
            raise
        return cls(path, mm, layout, inode)

    @staticmethod
    def attach_readonly(path: str) -> TableView:
        """A read-only view of an existing table, for tools: never locks, never writes."""
        mm, size, inode = map_file(path, writable=False)
        try:
            layout = read_layout(mm, size, path)
        except BaseException:
            mm.close()
            raise
        return TableView(path, mm, layout, inode)

    def own(self, partition: int, *, on_move: Callable[[int, int], None] | None = None) -> PartitionWriter:
        """Become the single writer of a partition (flock `<path>.p<N>.lock`) and take it over.

        PartitionBusy if another process holds the lock; StaleTable if the file was replaced
        since open. on_move(old_handle, new_handle) is called when a deletion shifts a flow to
        another slot (its handle changes); it must not call the writer.
        """
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} out of range [0, {self.partitions})")
        fd = try_lock(self.path, partition)
        try:
            if self.is_stale():
                raise StaleTable(f"{self.path} was replaced or removed after it was opened: reopen it")
            writer = PartitionWriter(self, partition, fd, on_move)
            writer.takeover()
        except BaseException:
            release_lock(fd)
            raise
        return writer

    def unlink(self) -> None:
        """Remove the file and its lock files (after close(); only when no process uses it)."""
        if not self.is_stale():
            unlink_table(self.path, self.partitions)
