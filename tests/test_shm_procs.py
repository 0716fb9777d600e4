"""The flow table across real processes: partition ownership by flock (PartitionBusy, and the
lock freed by kill -9), and read-only views that never write, attached and detached while a
writer works."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
from test_shm_support import TARGET_A, key, shm_path, state  # noqa: F401  (shm_path is a fixture)

from shm import Flow, FlowTable, PartitionBusy

CTX = multiprocessing.get_context("fork")


def _own_and_hold(path: str, partition: int, ready, n: int) -> None:
    table = FlowTable.open(path)
    w = table.own(partition)
    w.insert(*key(n), TARGET_A, 9000, b"held", 1_000)
    ready.send("owned")
    time.sleep(120)


def _try_own(path: str, partition: int, out) -> None:
    table = FlowTable.open(path)
    try:
        w = table.own(partition)
    except PartitionBusy as exc:
        out.send(("busy", exc.partition))
        return
    report = w.takeover()
    f = table.lookup(*key(1))
    out.send(("owned", report.flows, isinstance(f, Flow) and f.ufrag))
    w.close()


def _pipe_call(target, *args):
    recv, send = CTX.Pipe(duplex=False)
    p = CTX.Process(target=target, args=(*args, send))
    p.start()
    assert recv.poll(60), "child did not answer"
    answer = recv.recv()
    p.join(30)
    return answer


def test_second_owner_process_is_refused_until_the_first_is_killed(shm_path: str) -> None:
    FlowTable.create(shm_path, partitions=2, flow_capacity=64, session_capacity=16).close()
    recv, send = CTX.Pipe(duplex=False)
    holder = CTX.Process(target=_own_and_hold, args=(shm_path, 0, send, 1))
    holder.start()
    try:
        assert recv.poll(60) and recv.recv() == "owned"
        assert _pipe_call(_try_own, shm_path, 0) == ("busy", 0)
        assert _pipe_call(_try_own, shm_path, 1)[0] == "owned"  # other partitions are free
        with pytest.raises(PartitionBusy):  # nor may the file be re-created under the owner
            FlowTable.create(shm_path, partitions=2, flow_capacity=64, session_capacity=16)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(30)
    assert holder.exitcode == -signal.SIGKILL
    # the kernel released the flock with the process: the next owner takes over
    assert _pipe_call(_try_own, shm_path, 0) == ("owned", 1, b"held")


def _read_everything(path: str, rounds: int, out) -> None:
    maps_ok = True
    write_refused = False
    for _ in range(rounds):
        view = FlowTable.attach_readonly(path)
        with open("/proc/self/maps") as f:
            perms = [line.split()[1] for line in f if line.rstrip().endswith(path)]
        maps_ok &= bool(perms) and all(p.startswith("r") and p[1] == "-" for p in perms)
        try:
            view._mm[0:1] = b"x"
        except TypeError:
            write_refused = True
        flows = list(view.flows())
        list(view.sessions())
        list(view.sessions(per_partition=True))
        view.totals()
        view.partition_totals()
        view.check_invariants()
        for f in flows:
            assert view.get_by_handle(f.handle) == f
            assert view.lookup(f.client_ip, f.client_port, f.local_ip, f.local_port) == f
            assert view.session(f.ufrag) is not None
        view.lookup(*key(999_999))
        view.close()
    out.send((maps_ok, write_refused, len(flows)))


def test_readonly_view_never_writes(shm_path: str) -> None:
    table = FlowTable.create(shm_path, partitions=2, flow_capacity=64, session_capacity=16)
    w = table.own(1)
    for n in range(20):
        w.insert(*key(n), TARGET_A, 9000, b"s%d" % (n % 4), 1_000 + n)
    w.close()
    table.close()
    before = os.stat(shm_path)
    digest = hashlib.sha256(Path(shm_path).read_bytes()).hexdigest()
    time.sleep(0.02)  # mtime granularity
    maps_ok, write_refused, n = _pipe_call(_read_everything, shm_path, 20)
    assert maps_ok, "the view's mapping is writable"
    assert write_refused and n == 20
    after = os.stat(shm_path)
    assert (after.st_mtime_ns, after.st_ctime_ns, after.st_size) == (before.st_mtime_ns, before.st_ctime_ns, before.st_size)
    assert hashlib.sha256(Path(shm_path).read_bytes()).hexdigest() == digest


def _work(path: str, seconds: float, out) -> None:
    """Deterministic churn on partition 0; sends the expected final contents."""
    table = FlowTable.open(path)
    w = table.own(0)
    model: dict[int, int] = {}
    step = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or step < 2_000:
        n = (step * 7919) % 300
        if n in model and step % 3:
            w.delete(*key(n))
            del model[n]
        elif n in model:
            assert w.flush_counters(table.lookup_in(0, *key(n)).handle, step, step, step, step, 10_000 + step)
            model[n] = step
        else:
            assert w.insert(*key(n), TARGET_A, 9000, b"s%d" % (n % 40), 10_000 + step).ok
            model[n] = -1
        step += 1
    out.send((dict(model), table.check_invariants()))
    w.close()


def _attach_detach(path: str, seconds: float, out) -> None:
    deadline = time.monotonic() + seconds
    attaches = lookups = 0
    while time.monotonic() < deadline:
        view = FlowTable.attach_readonly(path)
        attaches += 1
        for n in range(0, 300, 17):
            r = view.lookup(*key(n))
            lookups += 1
            assert r is not None
        list(view.flows())
        view.close()
    out.send((attaches, lookups))


def test_views_attach_and_detach_while_a_writer_works(shm_path: str) -> None:
    FlowTable.create(shm_path, partitions=2, flow_capacity=512, session_capacity=64).close()
    r1, s1 = CTX.Pipe(duplex=False)
    r2, s2 = CTX.Pipe(duplex=False)
    writer = CTX.Process(target=_work, args=(shm_path, 2.0, s1))
    readers = [CTX.Process(target=_attach_detach, args=(shm_path, 2.0, s2)) for _ in range(2)]
    writer.start()
    for r in readers:
        r.start()
    writer.join(120)
    assert writer.exitcode == 0 and r1.poll(5)
    model, problems = r1.recv()
    counts = [r2.recv() for _ in readers if r2.poll(120)]
    writer.join(30)
    for r in readers:
        r.join(30)
    assert writer.exitcode == 0 and all(r.exitcode == 0 for r in readers)
    assert problems == [] and len(counts) == 2 and all(a > 0 for a, _ in counts)
    table = FlowTable.open(shm_path)
    assert table.check_invariants() == []
    flows, _ = state(table)
    assert {k[2] for k in flows} == {key(n)[1] for n in model}
    for n, flushed in model.items():
        f = table.lookup(*key(n))
        assert isinstance(f, Flow) and f.pkts_in == max(flushed, 0)
    table.close()
