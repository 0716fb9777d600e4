"""Helpers shared by the shm tests (no tests here): tmp table paths, keys, crash injection."""
from __future__ import annotations

import contextlib
import glob
import os
import uuid
from collections.abc import Iterator

import pytest

from shm import FlowTable, PartitionWriter, unlink_table
from shm.layout import ip16

LOCAL4 = ip16("203.0.113.7")
LOCAL6 = ip16("2001:db8::7")
TARGET_A = ip16("10.1.0.5")
TARGET_B = ip16("fd00::b")


def tmp_table_path(tag: str = "t") -> str:
    return f"/dev/shm/rtcrelay-test-{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def remove_table_files(path: str) -> None:
    with contextlib.suppress(Exception):
        unlink_table(path)
    for leftover in glob.glob(glob.escape(path) + "*"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)


@pytest.fixture
def shm_path() -> Iterator[str]:
    path = tmp_table_path()
    try:
        yield path
    finally:
        remove_table_files(path)


def client(n: int, v6: bool = False) -> tuple[bytes, int]:
    """A distinct client address for every n."""
    if v6:
        return ip16(f"2001:db8:{(n >> 16) & 0xFFFF:x}:{n & 0xFFFF:x}::1"), 10_000 + n % 50_000
    return ip16(bytes([100, (n >> 16) & 255, (n >> 8) & 255, n & 255])), 10_000 + n % 50_000


def key(n: int, v6: bool = False) -> tuple[bytes, int, bytes, int]:
    cip, cport = client(n, v6)
    return cip, cport, (LOCAL6 if v6 else LOCAL4), 3478


class SimulatedCrash(BaseException):
    """Raised by CrashingQ: the writer 'dies' right before one of its 8-byte stores."""


class CrashingQ:
    """Wraps a writer's memoryview('Q'): raises SimulatedCrash before the n-th store.

    Every store a writer makes to a seq, tag, counter or header word goes through its `_q`, so
    crashing before store n, for every n, visits every point between two stores of an
    operation (body bytes are written while the slot is odd, between two such points).
    """

    def __init__(self, q: memoryview, crash_at: int) -> None:
        self._inner = q
        self.crash_at = crash_at
        self.stores = 0

    def __getitem__(self, i: int) -> int:
        return self._inner[i]

    def __setitem__(self, i: int, value: int) -> None:
        self.stores += 1
        if self.stores == self.crash_at:
            raise SimulatedCrash(self.stores)
        self._inner[i] = value


def crash_during(writer: PartitionWriter, crash_at: int, op, *args) -> bool:
    """Run writer.op(*args) with a crash before store `crash_at`; True if it crashed.

    After a crash the writer is dead: its lock is released, as the kernel would on kill -9.
    """
    real = writer._q
    writer._q = CrashingQ(real, crash_at)  # type: ignore[assignment]
    try:
        getattr(writer, op)(*args)
    except SimulatedCrash:
        writer._q = real
        writer.close()
        return True
    writer._q = real
    return False


def state(table: FlowTable, partition: int | None = None) -> tuple[dict, dict]:
    """Comparable contents: flows by (partition, key), session entries by (partition, ufrag)."""
    # fmt: off
    flows = {
        (f.partition, f.client_ip, f.client_port, f.local_ip, f.local_port): (
            f.target_ip, f.target_port, f.ufrag, f.created, f.last_seen,
            f.pkts_in, f.bytes_in, f.pkts_out, f.bytes_out, f.worker, f.origin,
        )
        for f in table.flows(partition)
    }
    # fmt: on
    sessions = {
        (s.partition, s.ufrag): (s.target_ip, s.target_port, s.flows, s.created, s.last_seen)
        for s in table.sessions(per_partition=True)
        if partition is None or s.partition == partition
    }
    return flows, sessions
