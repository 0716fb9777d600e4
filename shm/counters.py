"""Per-process counter rows in shared memory: one writer per row, any number of readers.

The relay's workers count packets, bytes and drops by reason in Python ints and copy them
here about once a second; the supervisor's /metrics and the CLI read them without asking
anyone. The file is self-describing (the counter names are in its header), so a reader needs
no knowledge of the writer's code version.

Layout: 4096-byte header (magic, version, rows, columns, then the names, newline-separated),
then ``rows`` rows of ``columns`` aligned u64 words. Words are stored whole through
``memoryview.cast('Q')``; a reader may see row values from two different flushes, never a
torn word.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence

MAGIC = b"RTCRCNT1"
_HEADER = struct.Struct("<8sII")
HEADER_SIZE = 4096


class CounterLayoutError(Exception):
    pass


class CounterBlock:
    def __init__(self, mm: mmap.mmap, names: tuple[str, ...], rows: int, writable: bool) -> None:
        self._mm = mm
        self.names = names
        self.rows = rows
        self.writable = writable
        self._index = {name: i for i, name in enumerate(names)}
        self._words = memoryview(mm)[HEADER_SIZE:].cast("Q")

    @classmethod
    def create(cls, path: str, names: Sequence[str], rows: int) -> CounterBlock:
        blob = "\n".join(names).encode()
        if _HEADER.size + len(blob) > HEADER_SIZE:
            raise CounterLayoutError("too many counter names for the header")
        size = HEADER_SIZE + rows * len(names) * 8
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, _HEADER.pack(MAGIC, rows, len(names)) + blob, 0)
            os.rename(tmp, path)  # readers never see a half-written header
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(mm, tuple(names), rows, writable=True)

    @classmethod
    def attach(cls, path: str, *, writable: bool = False) -> CounterBlock:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise CounterLayoutError(f"{path}: too small to be a counter block")
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        finally:
            os.close(fd)
        magic, rows, columns = _HEADER.unpack_from(mm, 0)
        if magic != MAGIC:
            raise CounterLayoutError(f"{path}: not an rtcrelay counter block")
        names = tuple(bytes(mm[_HEADER.size : HEADER_SIZE]).rstrip(b"\0").decode().split("\n"))
        if len(names) != columns or size != HEADER_SIZE + rows * columns * 8:
            raise CounterLayoutError(f"{path}: header and size disagree")
        return cls(mm, names, rows, writable)

    def index(self, name: str) -> int:
        return self._index[name]

    def store_row(self, row: int, values: Sequence[int]) -> None:
        """Copy a writer's local counters into its row (whole aligned words)."""
        columns = len(self.names)
        base = row * columns
        words = self._words
        for i, value in enumerate(values):
            words[base + i] = value

    def store(self, row: int, name: str, value: int) -> None:
        self._words[row * len(self.names) + self._index[name]] = value

    def load_row(self, row: int) -> dict[str, int]:
        columns = len(self.names)
        values = self._words[row * columns : (row + 1) * columns].tolist()
        return dict(zip(self.names, values))

    def close(self) -> None:
        self._words.release()
        self._mm.close()
