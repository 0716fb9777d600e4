"""Multi-process stress of the flow table: writers killed with SIGKILL at random points (also
inside writes), restarted, taking over; readers looking up and scanning all the while.

What is checked is exactly the numbered invariants in the docstring of shm/__init__.py:
  1      each writer owns its partition by flock; a restarted writer can own it only because
         the kernel dropped the dead one's lock (own() would raise PartitionBusy otherwise);
  2      readers never see a torn record: every record carries a self-check (its counters,
         session and route are functions of its key and of one flush);
  4,5,7,8,9  check_invariants() after every takeover and at the end;
  3,10   takeover after each kill; then the writer re-applies its log from the last op it had
         recorded as done (every operation is idempotent), and at the end the table equals a
         model of the log exactly — flows, counters, times, sessions;
  6      no reader ever gets MISS for a key that was durably inserted and is never deleted
         (UNKNOWN is allowed, and counted).
The short version runs in the default suite; `--long` adds a longer one.
"""
from __future__ import annotations

import mmap
import multiprocessing
import os
import random
import signal
import time
from dataclasses import dataclass, field

import pytest
from test_shm_support import LOCAL4, remove_table_files, tmp_table_path

from shm import MISS, UNKNOWN, Flow, FlowTable, PartitionWriter
from shm.layout import ip16

CTX = multiprocessing.get_context("fork")

WRITERS = 2
FLOW_CAP, SESSION_CAP, MAX_PER = 128, 32, 4
FLIMIT, SLIMIT = FLOW_CAP * 3 // 4, SESSION_CAP * 3 // 4
KEYS_PER_WRITER = 140
PERM = 20  # keys 0..PERM-1 of each writer: inserted first, never deleted, never idle
UFRAGS = 30
TARGETS = [ip16("10.1.0.1"), ip16("10.1.0.2"), ip16("fd00::3")]
PERM_TARGET = ip16("10.9.9.9")
FAR = 10**12  # last_seen of the permanent flows: they never expire
T0 = 1_000_000
SESSION_TOUCH_MS = 1000
CALM = 7  # control word: set when the chaos is over (writers stop pacing themselves)
STAT_FIELDS = ("incarnations", "takeovers", "interrupted", "journal_restored", "duplicates", "orphans", "fixed")


# -- keys and their self-check --------------------------------------------------------------------


def kid(w: int, j: int) -> int:
    return w * 100_000 + j


def kkey(k: int) -> tuple[bytes, int, bytes, int]:
    return ip16(bytes([100, (k >> 16) & 255, (k >> 8) & 255, k & 255])), 10_000 + k % 50_000, LOCAL4, 3478


def key_of(f: Flow) -> int:
    return int.from_bytes(f.client_ip[13:16], "big")


def ufrag_of(k: int) -> bytes:
    w, j = divmod(k, 100_000)
    return b"perm-%d-%d" % (w, j) if j < PERM else b"u%02d" % (j % UFRAGS)


def target_of(ufrag: bytes) -> tuple[bytes, int]:
    if ufrag.startswith(b"perm"):
        return PERM_TARGET, 7000
    return TARGETS[int(ufrag[1:]) % len(TARGETS)], 9000


def counters(k: int, t: int) -> tuple[int, int, int, int]:
    m = k % 97 + 1
    return t, t * m, 2 * t, (t * m + 7 if t else 0)


def self_check(f: Flow) -> str | None:
    """None when the record is one the table could hold; else what is torn about it."""
    k = key_of(f)
    w = k // 100_000
    if (f.client_port, f.local_ip, f.local_port) != kkey(k)[1:]:
        return f"key fields {f}"
    if f.partition != w or f.worker != w or f.origin != w:
        return f"partition/worker {f}"
    if f.ufrag is not None and f.ufrag != ufrag_of(k):
        return f"ufrag {f}"
    if (f.target_ip, f.target_port) != target_of(ufrag_of(k)):
        return f"target {f}"
    if (f.pkts_in, f.bytes_in, f.pkts_out, f.bytes_out) != counters(k, f.pkts_in):
        return f"counters {f}"
    if f.last_seen < f.created:
        return f"times {f}"
    return None


# -- the operation log and its model --------------------------------------------------------------


def make_log(w: int, n_ops: int, seed: int) -> list[tuple]:
    rng = random.Random(seed * 1000 + w)
    log: list[tuple] = [("insert", kid(w, j)) for j in range(PERM)]
    log += [("flush_perm", kid(w, j)) for j in range(PERM)]
    while len(log) < n_ops:
        x = rng.random()
        k = kid(w, rng.randrange(PERM, KEYS_PER_WRITER))
        if x < 0.45:
            log.append(("insert", k))
        elif x < 0.70:
            log.append(("delete", k))
        elif x < 0.90:
            log.append(("flush", k))
        elif x < 0.94:
            log.append(("delete_session", b"u%02d" % rng.randrange(UFRAGS)))
        elif x < 0.97:
            log.append(("delete_target", rng.randrange(len(TARGETS))))
        else:
            log.append(("sweep", rng.choice((300, 1_500, 5_000))))
    return log


@dataclass
class Model:
    """What a partition must hold after a prefix of its log (the same rules as the table)."""

    w: int
    flows: dict[int, list] = field(default_factory=dict)  # k -> [created, last_seen, t]
    sessions: dict[bytes, list] = field(default_factory=dict)  # ufrag -> [n, created, last_seen]

    def _drop(self, k: int) -> None:
        del self.flows[k]
        s = self.sessions[ufrag_of(k)]
        s[0] -= 1
        if not s[0]:
            del self.sessions[ufrag_of(k)]

    def apply(self, i: int, op: tuple) -> None:
        kind, arg = op
        now = T0 + i
        if kind == "insert":
            k, u = arg, ufrag_of(arg)
            if k in self.flows or len(self.flows) >= FLIMIT:
                return
            s = self.sessions.get(u)
            if s is not None:
                if s[0] >= MAX_PER:
                    return
                s[0] += 1
                s[2] = max(s[2], now)
            else:
                if len(self.sessions) >= SLIMIT:
                    return
                self.sessions[u] = [1, now, now]
            self.flows[k] = [now, now, 0]
        elif kind in ("flush", "flush_perm"):
            f = self.flows.get(arg)
            if f is None:
                return
            last = FAR if kind == "flush_perm" else now
            f[1], f[2] = last, i
            s = self.sessions[ufrag_of(arg)]
            if last >= s[2] + SESSION_TOUCH_MS:
                s[2] = last
        elif kind == "delete":
            if arg in self.flows:
                self._drop(arg)
        elif kind == "delete_session":
            for k in [k for k in self.flows if ufrag_of(k) == arg]:
                self._drop(k)
        elif kind == "delete_target":
            for k in [k for k in self.flows if target_of(ufrag_of(k)) == (TARGETS[arg], 9000)]:
                self._drop(k)
        elif kind == "sweep":
            for k in [k for k, f in self.flows.items() if f[1] < now - arg]:
                self._drop(k)

    def expected(self) -> tuple[dict, dict]:
        flows = {}
        for k, (created, last, t) in self.flows.items():
            u = ufrag_of(k)
            flows[k] = (*target_of(u), u, created, last, *counters(k, t))
        sessions = {u: (*target_of(u), n, c, ls) for u, (n, c, ls) in self.sessions.items()}
        return flows, sessions


def table_contents(table: FlowTable, p: int) -> tuple[dict, dict]:
    flows = {}
    for f in table.flows(p):
        assert key_of(f) not in flows
        flows[key_of(f)] = (f.target_ip, f.target_port, f.ufrag, f.created, f.last_seen, f.pkts_in, f.bytes_in, f.pkts_out, f.bytes_out)
    sessions = {
        s.ufrag: (s.target_ip, s.target_port, s.flows, s.created, s.last_seen)
        for s in table.sessions(per_partition=True)
        if s.partition == p
    }
    return flows, sessions


# -- processes ----------------------------------------------------------------------------------


class KillingQ:
    """The writer's word view, killing its own process (SIGKILL) right before store n."""

    def __init__(self, q: memoryview, n: int) -> None:
        self._q, self._n, self._stores = q, n, 0

    def __getitem__(self, i: int) -> int:
        return self._q[i]

    def __setitem__(self, i: int, v: int) -> None:
        self._stores += 1
        if self._stores == self._n:
            os.kill(os.getpid(), signal.SIGKILL)
        self._q[i] = v


def _writer(path: str, w: int, log: list[tuple], incarnation: int, self_kill: int, pace: bool) -> None:
    ctl = _control(path)
    stats = ctl.cast("Q")
    base = 8 + w * 8
    stats[base] += 1  # incarnations
    if self_kill:
        init = PartitionWriter.__init__

        def killing_init(self, *a, **kw) -> None:  # type: ignore[no-untyped-def]
            init(self, *a, **kw)
            self._q = KillingQ(self._q, self_kill)

        PartitionWriter.__init__ = killing_init  # type: ignore[method-assign]
    table = FlowTable.open(path)
    writer = table.own(w)  # takes the partition over: may itself be killed midway
    report = writer.last_takeover
    stats[base + 1] += 1
    stats[base + 2] += report.interrupted
    stats[base + 3] += report.journal_restored
    stats[base + 4] += report.duplicates_removed
    stats[base + 5] += report.orphan_flows_removed + report.orphan_sessions_removed
    stats[base + 6] += report.session_counts_fixed
    problems = table.check_invariants([w])
    if problems or report.odd_slots_repaired:
        with open(f"{path}.err{w}", "a") as f:
            f.write(f"incarnation {incarnation}: after takeover {report}: {problems}\n")
        os._exit(3)
    handles = {key_of(f): f.handle for f in writer.flows()}
    progress = stats  # word w: next op to apply
    i = progress[w]
    n = len(log)
    while i < n:
        kind, arg = log[i]
        now = T0 + i
        if kind == "insert":
            r = writer.insert(*kkey(arg), *target_of(ufrag_of(arg)), ufrag_of(arg), now)
            if r.has_flow:
                handles[arg] = r.handle
        elif kind in ("flush", "flush_perm"):
            last = FAR if kind == "flush_perm" else now
            h = handles.get(arg)
            if h is None or not writer.flush_counters(h, *counters(arg, i), last):
                f = writer.find(*kkey(arg))
                if f is not None:
                    handles[arg] = f.handle
                    writer.flush_counters(f.handle, *counters(arg, i), last)
        elif kind == "delete":
            writer.delete(*kkey(arg))
        elif kind == "delete_session":
            writer.delete_session(arg)
        elif kind == "delete_target":
            writer.delete_target(TARGETS[arg], 9000)
        elif kind == "sweep":
            writer.sweep(now, arg, FLOW_CAP)
        i += 1
        progress[w] = i  # durably applied: a restart resumes here (or replays op i-1)
        if pace and i % 8 == 0 and not progress[CALM]:
            time.sleep(0.001)
    os._exit(0)


def _control(path: str) -> memoryview:
    fd = os.open(f"{path}.ctl", os.O_RDWR)
    try:
        return memoryview(mmap.mmap(fd, 4096))
    finally:
        os.close(fd)


def _reader(path: str, seed: int, stop, out) -> None:
    rng = random.Random(seed)
    ctl = _control(path)
    progress = ctl.cast("Q")
    view = FlowTable.attach_readonly(path)
    counts = dict(lookups=0, hits=0, unknown=0, unknown_permanent=0, scans=0, scanned=0, inconsistent_scans=0, handles=0, no_ufrag=0)
    errors: list[str] = []
    seen_handles: list[int] = []

    def check(f: Flow) -> None:
        problem = self_check(f)
        if problem:
            errors.append("torn: " + problem)
        if f.ufrag is None:
            counts["no_ufrag"] += 1

    it = 0
    while not stop.is_set() and len(errors) < 20:
        it += 1
        w = rng.randrange(WRITERS)
        done = min(progress[w], PERM)  # permanent keys already durably inserted
        if done:
            k = kid(w, rng.randrange(done))
            r = view.lookup(*kkey(k)) if it % 2 else view.lookup_in(w, *kkey(k))
            counts["lookups"] += 1
            if r is MISS:
                errors.append(f"false miss: permanent key {k} (writer {w} at op {progress[w]})")
            elif r is UNKNOWN:
                counts["unknown_permanent"] += 1
            else:
                counts["hits"] += 1
                check(r)
                seen_handles.append(r.handle)
        k = kid(w, rng.randrange(PERM, KEYS_PER_WRITER))
        r = view.lookup(*kkey(k))
        counts["lookups"] += 1
        counts["unknown"] += r is UNKNOWN
        if isinstance(r, Flow):
            check(r)
            seen_handles.append(r.handle)
        if seen_handles and it % 3 == 0:
            f = view.get_by_handle(seen_handles[rng.randrange(len(seen_handles))])
            counts["handles"] += 1
            if f is not None:
                check(f)
            del seen_handles[:-200]
        if it % 40 == 0:
            done = min(progress[w], PERM)
            flows, consistent = view._scan_flows(w)
            counts["scans"] += 1
            counts["scanned"] += len(flows)
            for f in flows:
                check(f)
            if consistent:
                present = {key_of(f) for f in flows}
                missing = [j for j in range(done) if kid(w, j) not in present]
                if missing:
                    errors.append(f"consistent scan of partition {w} misses permanent keys {missing}")
            else:
                counts["inconsistent_scans"] += 1
            errors.extend(f"torn session {s}" for s in view.sessions(per_partition=True)
                          if (s.target_ip, s.target_port) != target_of(s.ufrag) or not 1 <= s.flows <= MAX_PER)
        if it % 64 == 0:
            time.sleep(0.001)
    view.close()
    out.send((counts, errors))


def run_stress(seconds: float, n_ops: int, seed: int) -> dict:
    path = tmp_table_path("stress")
    try:
        FlowTable.create(path, partitions=WRITERS, flow_capacity=FLOW_CAP, session_capacity=SESSION_CAP,
                         max_flows_per_session=MAX_PER, seed=seed).close()  # fmt: skip
        with open(f"{path}.ctl", "wb") as f:
            f.write(bytes(4096))
        stats = _control(path).cast("Q")
        logs = [make_log(w, n_ops, seed) for w in range(WRITERS)]
        rng = random.Random(seed)
        incarnation = [0] * WRITERS
        procs: list = [None] * WRITERS
        self_kills = 0

        def start(w: int, chaos: bool) -> None:
            nonlocal self_kills
            incarnation[w] += 1
            self_kill = rng.randrange(1, 4000) if chaos and incarnation[w] % 2 == 0 else 0
            self_kills += bool(self_kill)
            procs[w] = CTX.Process(target=_writer, args=(path, w, logs[w], incarnation[w], self_kill, True))
            procs[w].start()

        stop = CTX.Event()
        pipes = [CTX.Pipe(duplex=False) for _ in range(2)]
        readers = [CTX.Process(target=_reader, args=(path, seed * 10 + r, stop, pipes[r][1])) for r in range(2)]
        for r in readers:
            r.start()
        for w in range(WRITERS):
            start(w, chaos=True)
        kills = 0
        deadline = time.monotonic() + seconds
        finished = [False] * WRITERS
        while time.monotonic() < deadline and not all(finished):
            time.sleep(rng.uniform(0.01, 0.12))
            w = rng.randrange(WRITERS)
            for v in range(WRITERS):  # restart writers that died by their own hand
                p = procs[v]
                if not finished[v] and not p.is_alive():
                    p.join()
                    assert p.exitcode in (0, -signal.SIGKILL), _errors(path, p.exitcode)
                    if p.exitcode == 0:
                        finished[v] = True
                    else:
                        start(v, chaos=True)
            if not finished[w] and procs[w].is_alive():
                os.kill(procs[w].pid, signal.SIGKILL)
                procs[w].join()
                kills += 1
                if procs[w].exitcode == 0:
                    finished[w] = True
                else:
                    start(w, chaos=True)
        chaos_end = time.monotonic()
        progress_at_chaos_end = [stats[w] for w in range(WRITERS)]
        # calm: let every writer finish its log
        stats[CALM] = 1
        for w in range(WRITERS):
            while not finished[w]:
                procs[w].join(120)
                assert procs[w].exitcode in (0, -signal.SIGKILL), _errors(path, procs[w].exitcode)
                if procs[w].exitcode == 0:
                    finished[w] = True
                else:
                    start(w, chaos=False)
        stop.set()
        results = []
        for (recv, _), r in zip(pipes, readers):
            assert recv.poll(60), "reader did not report"
            results.append(recv.recv())
            r.join(30)
        errors = [e for _, errs in results for e in errs]
        assert not errors, errors[:10]
        assert [stats[w] for w in range(WRITERS)] == [n_ops] * WRITERS
        table = FlowTable.open(path)
        assert table.check_invariants() == []
        for w in range(WRITERS):
            model = Model(w)
            for i, op in enumerate(logs[w]):
                model.apply(i, op)
            assert table_contents(table, w) == model.expected(), f"partition {w} differs from its model"
        totals = table.totals()
        table.close()
        summary = dict(kills=kills, self_kills=self_kills, flows=totals["flows"], takeovers=totals["takeovers"])
        summary["calm_seconds"] = round(time.monotonic() - chaos_end, 2)
        summary["ops_done_in_chaos"] = progress_at_chaos_end
        for name in ("lookups", "hits", "unknown", "unknown_permanent", "scans", "scanned", "inconsistent_scans", "handles", "no_ufrag"):
            summary[name] = sum(c[name] for c, _ in results)
        for j, name in enumerate(STAT_FIELDS):
            summary[name] = sum(stats[8 + w * 8 + j] for w in range(WRITERS))
        return summary
    finally:
        remove_table_files(path)


def _errors(path: str, code: int | None) -> str:
    out = [f"writer exit code {code}"]
    for w in range(WRITERS):
        try:
            with open(f"{path}.err{w}") as f:
                out.append(f.read())
        except FileNotFoundError:
            pass
    return "\n".join(out)


def test_stress_short() -> None:
    summary = run_stress(seconds=6.0, n_ops=20_000, seed=1)
    print(summary)
    assert summary["kills"] + summary["self_kills"] >= 5
    assert summary["hits"] > 100 and summary["scans"] > 5


@pytest.mark.long
def test_stress_long() -> None:
    summary = run_stress(seconds=90.0, n_ops=400_000, seed=2)
    print(summary)
    assert summary["kills"] + summary["self_kills"] >= 100
    assert summary["hits"] > 10_000
