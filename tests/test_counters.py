"""Counter block: create, write per row, read from another process, refuse foreign files."""
from __future__ import annotations

import multiprocessing
import os

import pytest

from shm.counters import CounterBlock, CounterLayoutError


def _writer(path: str, row: int) -> None:
    block = CounterBlock.attach(path, writable=True)
    block.store_row(row, [row * 10 + i for i in range(len(block.names))])
    block.close()


def test_rows_written_by_other_processes_are_read_back(tmp_path) -> None:
    path = str(tmp_path / "c")
    names = ["packets", "bytes", "drop_x"]
    CounterBlock.create(path, names, rows=3).close()
    procs = [multiprocessing.get_context("spawn").Process(target=_writer, args=(path, r)) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    reader = CounterBlock.attach(path)
    assert reader.names == tuple(names)
    assert [reader.load_row(r) for r in range(3)] == [
        {"packets": r * 10, "bytes": r * 10 + 1, "drop_x": r * 10 + 2} for r in range(3)
    ]
    with pytest.raises(TypeError):
        reader.store(0, "packets", 1)  # read-only mapping refuses writes


def test_foreign_file_is_refused(tmp_path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(CounterLayoutError, match="not an rtcrelay counter block"):
        CounterBlock.attach(str(path))
    small = tmp_path / "small"
    small.write_bytes(b"x")
    with pytest.raises(CounterLayoutError, match="too small"):
        CounterBlock.attach(str(small))


def test_large_values_survive(tmp_path) -> None:
    path = str(tmp_path / "c")
    block = CounterBlock.create(path, ["a"], rows=1)
    block.store(0, "a", (1 << 64) - 1)
    assert CounterBlock.attach(path).load_row(0) == {"a": (1 << 64) - 1}
