"""The flow table's file: creating it, mapping it, validating its header, the partition
locks, removing it. No slot is read or written here."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from collections.abc import Iterator

from shm.layout import (
    FLOW_SLOT,
    HEADER,
    HEADER_SIZE,
    LAYOUT_VERSION,
    LOAD_DEN,
    LOAD_NUM,
    MAGIC,
    MAX_CAPACITY,
    MAX_PARTITIONS,
    MIN_CAPACITY,
    PART_HEADER_SIZE,
    SESSION_SLOT,
    file_size,
    partition_stride,
)
from shm.records import Layout, LayoutMismatch, NoSpace, PartitionBusy

# -- layout -------------------------------------------------------------------------------------


def check_capacity(name: str, value: int) -> int:
    if not isinstance(value, int) or value < MIN_CAPACITY or value > MAX_CAPACITY or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{MIN_CAPACITY}, {MAX_CAPACITY}], got {value!r}")
    return value


def read_layout(mm: mmap.mmap, actual_size: int, path: str) -> Layout:
    """The layout the mapped file's header states; LayoutMismatch unless it is one of ours."""
    if actual_size < HEADER_SIZE:
        raise LayoutMismatch(f"{path}: {actual_size} bytes, too short for a flow table header")
    (
        magic,
        version,
        header_size,
        part_header_size,
        flow_slot,
        session_slot,
        partitions,
        fcap,
        scap,
        maxper,
        load_num,
        load_den,
        _r0,
        stride,
        size,
        seed,
        _r1,
    ) = HEADER.unpack_from(mm, 0)
    if magic != MAGIC:
        raise LayoutMismatch(f"{path}: not a flow table (magic {magic!r})")
    found = dict(
        version=version,
        header_size=header_size,
        part_header_size=part_header_size,
        flow_slot=flow_slot,
        session_slot=session_slot,
        load=(load_num, load_den),
    )
    expected = dict(
        version=LAYOUT_VERSION,
        header_size=HEADER_SIZE,
        part_header_size=PART_HEADER_SIZE,
        flow_slot=FLOW_SLOT,
        session_slot=SESSION_SLOT,
        load=(LOAD_NUM, LOAD_DEN),
    )
    diff = [f"{k}={found[k]} (expected {expected[k]})" for k in expected if found[k] != expected[k]]
    if diff:
        raise LayoutMismatch(f"{path}: layout differs: " + ", ".join(diff))
    try:
        check_capacity("flow_capacity", fcap)
        check_capacity("session_capacity", scap)
    except ValueError as exc:
        raise LayoutMismatch(f"{path}: {exc}") from None
    if not 1 <= partitions <= MAX_PARTITIONS or maxper < 1:
        raise LayoutMismatch(f"{path}: partitions={partitions}, max_flows_per_session={maxper} out of range")
    if stride != partition_stride(fcap, scap) or size != file_size(partitions, fcap, scap) or size != actual_size:
        raise LayoutMismatch(f"{path}: sizes do not add up (stride {stride}, size {size}, file {actual_size})")
    return Layout(partitions, fcap, scap, maxper, seed, stride, size)


def partitions_of(path: str) -> int:
    """The partition count in a table file's header; 0 when there is no file or no table."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
    except FileNotFoundError:
        return 0
    return HEADER.unpack(head)[6] if len(head) == HEADER.size and head[:8] == MAGIC else 0


# -- partition locks ------------------------------------------------------------------------------


def lock_path(path: str, partition: int) -> str:
    """The lock file whose exclusive flock makes a process the owner of a partition."""
    return f"{path}.p{partition}.lock"


def try_lock(path: str, partition: int) -> int:
    """Exclusive non-blocking flock on the partition's lock file; returns its fd."""
    lp = lock_path(path, partition)
    fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise PartitionBusy(partition, lp) from None
        raise
    return fd


def release_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def partitions_locked(path: str, partitions: int) -> Iterator[None]:
    """Hold the locks of partitions 0..partitions-1 (PartitionBusy if one is owned)."""
    fds: list[int] = []
    try:
        for p in range(partitions):
            fds.append(try_lock(path, p))  # noqa: PERF401 - one by one: the finally unlocks those taken
        yield
    finally:
        for fd in fds:
            release_lock(fd)


# -- the file -------------------------------------------------------------------------------------


def write_table_file(
    path: str, partitions: int, flow_capacity: int, session_capacity: int, max_flows_per_session: int, seed: int,
    mode: int,
) -> None:
    """Write an empty table under a temporary name and rename it over `path` (atomic: a process
    still mapping the old file keeps reading it). The caller holds every partition's lock."""
    size = file_size(partitions, flow_capacity, session_capacity)
    stride = partition_stride(flow_capacity, session_capacity)
    tmp = f"{path}.new.{os.getpid()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.ftruncate(fd, size)
        # Reserve every page now: a sparse file on a too-small tmpfs (a container's
        # default 64 MiB /dev/shm) would SIGBUS a worker at its first write far in.
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EFBIG):
                raise
            raise NoSpace(
                f"no room for the flow table: {path} needs {size / 2**20:.1f} MiB in "
                f"{os.path.dirname(path) or '.'}; enlarge it (containers: --shm-size) or lower "
                "flow_capacity / session_capacity / workers"
            ) from None
        with mmap.mmap(fd, HEADER_SIZE) as head_map:
            HEADER.pack_into(
                head_map,
                0,
                b"\x00" * 8,
                LAYOUT_VERSION,
                HEADER_SIZE,
                PART_HEADER_SIZE,
                FLOW_SLOT,
                SESSION_SLOT,
                partitions,
                flow_capacity,
                session_capacity,
                max_flows_per_session,
                LOAD_NUM,
                LOAD_DEN,
                0,
                stride,
                size,
                seed,
                0,
            )
            head_map[0:8] = MAGIC  # last: a header without magic is no table
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def map_file(path: str, writable: bool) -> tuple[mmap.mmap, int, tuple[int, int]]:
    """(mapping, size, (st_dev, st_ino)) of a table file; the inode tells a replaced file."""
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_size < HEADER_SIZE or st.st_size % 8:
            raise LayoutMismatch(f"{path}: {st.st_size} bytes is not a flow table")
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        mm = mmap.mmap(fd, st.st_size, access=access)
    finally:
        os.close(fd)
    return mm, st.st_size, (st.st_dev, st.st_ino)


def unlink_table(path: str, partitions: int | None = None) -> None:
    """Remove a table's file and its lock files. Only when no process uses it any more."""
    if partitions is None:
        partitions = partitions_of(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    for p in range(max(partitions, 0)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(path, p))
