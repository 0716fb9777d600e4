"""The forwarders bench/relay.py measures: the `Forwarder` contract, the C reference
(bench/c/fwd_ref.c) and the rtcrelay relay itself: with its workers' C hit path (`relay`), its
in-kernel eBPF fast path (`ebpf`, `ebpf-egress`) and as two hops (`hops`)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from bench import udpload
from bench.harness import processes
from bench.harness.ports import free_port
from bench.harness.relay_files import write_relay_config, write_route_keys

HOST = "127.0.0.1"
RELAY_IDLE_TIMEOUT = 30.0     # the default: flush and sweep at their production pace (every run sends to
                              # every flow within seconds; "flows held" checks none expired)


class Forwarder(ABC):
    """A UDP forwarder under test: datagrams to 127.0.0.1:listen_port come out at `target`
    with the relay's 24-byte tunnel header in front of the unchanged payload, and (the cpu
    phase's round trip) Data frames the target sends back to where they came from come out at
    the flow's source without the header, from 127.0.0.1:listen_port.

    Contract (what the harness relies on):
      start(listen_port, target)  bind 127.0.0.1:listen_port with `self.workers` worker
                                  processes and return only once every worker's socket is bound
                                  and forwarding; raise on failure. Use a big receive buffer
                                  (>= 128 MiB: the drain test queues 100k x ~832 B).
      pids()                      the processes that do the packet work, processes_per_worker
                                  per worker, worker i at i, i + workers, ... (SIGSTOP/SIGCONT
                                  and CPU pinning apply to these only).
      stop()                      stop everything start() started, bounded; idempotent.
      preambles(n_flows)          optional: one datagram per flow, sent once from that flow's
                                  socket before its traffic (after start()); None = none.
      counters()                  optional: one dict of counters per worker ("flows", "drop_*",
                                  "flows_learned", ...); None = none.
      in_kernel                   "" or why its work is not the workers' (the drain phase, which
                                  stops the workers, is skipped then, saying that).
      kernel_program()            optional: the id of the BPF program doing the work (the cpu
                                  phase reads its run count and time); None = none.
    `flows` is what each worker must hold (the load has flows x workers).
    Processes should be started with bench.harness.processes.spawn() (own process group, killed at exit).
    """

    kind = "?"        # "ref", "relay", "ebpf", ...: ratios compare a row with the ref row
    label = "?"
    processes_per_worker = 1  # pids() gives workers x this
    in_kernel = ""    # why the workers' processes are not where the forwarding happens ("": they are)

    def __init__(self, workers: int = 1, *, flows: int = 64) -> None:
        self.workers, self.flows = workers, flows
        self.target: tuple[str, int] | None = None

    @abstractmethod
    def start(self, listen_port: int, target: tuple[str, int]) -> None: ...

    @abstractmethod
    def pids(self) -> list[int]: ...

    @abstractmethod
    def stop(self) -> None: ...

    def preambles(self, n_flows: int) -> list[bytes] | None:
        return None

    def counters(self) -> list[dict[str, int]] | None:
        return None

    def flows_learned(self) -> int | None:
        """The flows the workers hold now (None: the forwarder does not say)."""
        rows = self.counters()
        return None if rows is None else sum(r["flows"] for r in rows)

    def table_path(self) -> Path | None:
        """A file holding the flow table (for its size), if any."""
        return None

    def kernel_program(self) -> int | None:
        """The id of the BPF program that forwards, if any."""
        return None

    def describe(self) -> str:
        return ""


class CReferenceForwarder(Forwarder):
    """bench/c/fwd_ref.c: recvmmsg/sendmmsg batch 64, connected destination, a flow table sized
    for its flows (-F); with -R (always here) a thread per worker forwards the target's Data
    frames back by handle (idle but for the cpu phase's round trips: the forward loop is the
    same code either way)."""

    kind = "ref"
    label = "C reference"

    def __init__(self, workers: int = 1, *, tools: dict[str, Path], rcvbuf: int = 256 << 20,
                 flows: int = 64) -> None:
        super().__init__(workers, flows=flows)
        self.tools, self.rcvbuf = tools, rcvbuf
        self._proc = None
        self._pids: list[int] = []
        self.effective_rcvbuf = 0

    def start(self, listen_port: int, target: tuple[str, int]) -> None:
        self.target = target
        argv = [str(self.tools["fwd_ref"]), "-l", f"{HOST}:{listen_port}", "-t", f"{target[0]}:{target[1]}",
                "-n", str(self.workers), "-r", str(self.rcvbuf), "-F", str(self.flows), "-R"]
        self._proc = processes.spawn(argv)
        fields = processes.read_fields(self._proc, "READY", timeout=10)
        self._pids = [int(p) for p in fields["pids"].split(",")]
        self.effective_rcvbuf = int(fields["rcvbuf"])
        udpload.wait_udp_bound(listen_port, self.workers, proc=self._proc)

    def pids(self) -> list[int]:
        return list(self._pids)

    def stop(self) -> None:
        if self._proc is not None:
            processes.stop(self._proc)
            self._proc = None

    def describe(self) -> str:
        return f"rcvbuf {self.effective_rcvbuf >> 20} MiB (effective)"


class PythonRelayForwarder(Forwarder):
    """The rtcrelay relay (`rtcrelay relay ...`): a supervisor and its SO_REUSEPORT workers,
    with its full logic: flows learned from authenticated STUN, shm table, counters. Its
    `hit_path` is given explicitly ("c" unless told otherwise): "auto" would load the kernel
    path where it can (as root), and this forwarder measures the workers."""

    kind = "relay"
    label = "rtcrelay relay"
    token_cluster: int | None = None  # the cluster the flows' route tokens name
    settings: ClassVar[dict[str, object]] = {}  # more of the relay's configuration

    def __init__(self, workers: int = 1, *, flows: int = 64, idle_timeout: float = RELAY_IDLE_TIMEOUT,
                 hit_path: str = "c", **_: object) -> None:
        super().__init__(workers, flows=flows)
        self.idle_timeout = idle_timeout
        self.hit_path = hit_path  # the relay's `hit_path`: c or python (ebpf: EbpfRelayForwarder)
        self._proc = None
        self._pids: list[int] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._stats: Path | None = None
        self._table: Path | None = None
        self.keyring = None

    def describe(self) -> str:
        return f"hit_path {self.hit_path}"

    def start(self, listen_port: int, target: tuple[str, int]) -> None:
        tmp = self._prepare(target)
        self._proc, self._stats, self._table, self._pids = self._start_relay(
            tmp, f"bench{os.getpid()}", listen_port, {"tunnel_host": HOST})

    def _prepare(self, target: tuple[str, int]) -> Path:
        """A temporary directory in /dev/shm with new route keys (the forwarder's): its path."""
        from daemon.keys import load_keyring

        self.target = target
        self._tmp = tempfile.TemporaryDirectory(prefix="rtcrelay-bench-", dir="/dev/shm")
        tmp = Path(self._tmp.name)
        self.keys = write_route_keys(tmp / "keys.toml")
        self.keyring = load_keyring(str(self.keys))
        return tmp

    def _start_relay(self, tmp: Path, name: str, listen_port: int, extra: dict[str, object],
                     ) -> tuple[object, Path, Path, list[int]]:
        """One `rtcrelay relay` on 127.0.0.1:listen_port with the forwarder's keys: (its
        process, stats and table files, its workers' pids), once every worker serves."""
        settings = {
            "name": name, "listen": [f"{HOST}:{listen_port}"], "workers": self.workers,
            "route_keys_file": str(self.keys), "admin_listen": "", "table_dir": str(tmp),
            "socket_buffer": 256 << 20,  # the drain test queues ~83 MB
            "heartbeat_timeout": 3600.0,  # the sink is no transceiver: it never heartbeats
            "standby_workers": False,  # only the serving processes, for SIGSTOP and pinning
            # room for the flows (each its own session) at under half load, wherever the kernel's
            # SO_REUSEPORT hash puts them; none expires between the runs of a variant
            "flow_capacity": capacity_for(self.flows), "session_capacity": capacity_for(self.flows),
            "idle_timeout": self.idle_timeout,
            "hit_path": self.hit_path,
            **self.settings,
            **extra,
        }
        config = write_relay_config(tmp / f"{name}.toml", settings)
        proc = processes.spawn([sys.executable, "-m", "cli.main", "relay", "--config", str(config), "--ephemeral"])
        udpload.wait_udp_bound(listen_port, self.workers, timeout=20, proc=proc)
        stats, table = tmp / f"rtcrelay-{name}.stats", tmp / f"rtcrelay-{name}.table"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = _counter_rows(stats) if stats.exists() else None
            if rows and all(r["ready"] == 1 and r["pid"] for r in rows):
                return proc, stats, table, [r["pid"] for r in rows]
            time.sleep(0.05)
        raise RuntimeError(f"relay {name}'s workers did not become ready within 20 s")

    def counters(self) -> list[dict[str, int]] | None:
        """The workers' counter rows (published about once a second)."""
        assert self._stats is not None, "start() first"
        return _counter_rows(self._stats)

    def table_path(self) -> Path | None:
        return self._table

    def preambles(self, n_flows: int) -> list[bytes] | None:
        """One authenticated STUN Binding Request per flow: the relay learns each flow from it."""
        from wire.route_token import derive_password, issue_token
        from wire.stun import build_binding_request

        assert self.target is not None and self.keyring is not None
        out = []
        for i in range(n_flows):
            ufrag = issue_token(self.keyring, socket.inet_aton(self.target[0]), self.target[1], time.time(),
                                cluster=self.token_cluster)
            pwd = derive_password(self.keyring, ufrag)
            out.append(build_binding_request(os.urandom(12), f"{ufrag}:cli{i}", pwd.encode(), 1 << 24,
                                             controlling=True, tie_breaker=i))
        return out

    def pids(self) -> list[int]:
        return list(self._pids)

    def stop(self) -> None:
        if self._proc is not None:
            processes.stop(self._proc, grace=5.0)
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class TwoHopRelayForwarder(PythonRelayForwarder):
    """Two rtcrelay relays in a row (#19): an edge relay on the listen port, whose route tokens
    name another cluster, forwards every flow to a cluster relay's hop socket (HopData); the
    cluster relay sends it on to the target as a transceiver gets it. ``pids()``: both relays'
    workers (pinned together: their CPU is the hop's cost)."""

    label = "rtcrelay edge + cluster relay"
    token_cluster = 7
    processes_per_worker = 2

    def __init__(self, workers: int = 1, **kwargs: object) -> None:
        super().__init__(workers, **kwargs)  # type: ignore[arg-type]
        self._cluster_proc: object = None

    def describe(self) -> str:
        return f"two hops, hit_path {self.hit_path}"

    def start(self, listen_port: int, target: tuple[str, int]) -> None:
        tmp = self._prepare(target)
        hop_port = free_port(HOST)
        spare_port = free_port(HOST, avoid=(hop_port, listen_port))  # the cluster relay's unused public port
        self._cluster_proc, _, _, cluster_pids = self._start_relay(
            tmp, f"benchc{os.getpid()}", spare_port,
            {"tunnel_host": HOST, "cluster_id": self.token_cluster, "hop_listen": [f"{HOST}:{hop_port}"]})
        self._proc, self._stats, self._table, edge_pids = self._start_relay(
            tmp, f"benche{os.getpid()}", listen_port,
            {"tunnel_host": HOST, "cluster_id": 1, "cluster_routes": {str(self.token_cluster): [f"{HOST}:{hop_port}"]}})
        self._pids = edge_pids + cluster_pids

    def stop(self) -> None:
        if self._cluster_proc is not None:
            processes.stop(self._cluster_proc, grace=5.0)  # type: ignore[arg-type]
            self._cluster_proc = None
        super().stop()


class EbpfRelayForwarder(PythonRelayForwarder):
    """The relay with its in-kernel fast path (`hit_path = "ebpf"`: the relay does not start
    without it; needs root or CAP_BPF + CAP_NET_ADMIN and relay/ebpf/fastpath.bpf.o): a TC
    clsact-ingress program on lo forwards every established flow's datagrams both ways, in
    softirq context on the CPU that sent them (here the load's CPU: a loopback send is received
    on the sender's CPU); the workers see only what needs a decision (the preambles)."""

    kind = "ebpf"
    label = "rtcrelay relay, eBPF"
    in_kernel = ("the kernel path forwards in softirq context of the sending CPU: stopping the workers "
                 "does not stop it, so nothing queues for a drain to time (see the cpu phase)")

    def __init__(self, workers: int = 1, **kwargs: object) -> None:
        kwargs.pop("hit_path", None)
        super().__init__(workers, hit_path="ebpf", **kwargs)  # type: ignore[arg-type]
        self._listen: int | None = None

    def describe(self) -> str:
        return "hit_path ebpf" + "".join(f", {k} {v}" for k, v in self.settings.items())

    def kernel_program(self) -> int | None:
        """Our program's id, from its TC filter on lo (the relay's filter handle is derived from
        its first listen address, relay/kernel_path.py: other relays on lo keep theirs)."""
        from relay.kernel_path import filter_handle

        if self._listen is None or shutil.which("tc") is None:
            return None
        handle = f"handle {filter_handle([(HOST, self._listen)]):#x} "
        out = subprocess.run(["tc", "filter", "show", "dev", "lo", "ingress"], capture_output=True, text=True,
                             timeout=10).stdout
        for line in out.splitlines():
            if handle in line and " id " in line:
                return int(line.split(" id ", 1)[1].split()[0])
        return None

    def start(self, listen_port: int, target: tuple[str, int]) -> None:
        self._listen = listen_port
        super().start(listen_port, target)


class EbpfEgressRelayForwarder(EbpfRelayForwarder):
    """The eBPF relay with `kernel_loopback = "egress"`: a datagram the program forwards from one
    loopback address to another goes out through lo again (and through its ingress hook once
    more) instead of being delivered in place."""

    kind = "ebpf-egress"
    label = "rtcrelay relay, eBPF egress"
    settings: ClassVar[dict[str, object]] = {"kernel_loopback": "egress"}


def _counter_rows(stats: Path) -> list[dict[str, int]]:
    from shm.counters import CounterBlock

    block = CounterBlock.attach(str(stats))
    try:
        return [block.load_row(i) for i in range(block.rows)]
    finally:
        block.close()


def capacity_for(flows: int) -> int:
    """Relay table slots per worker for `flows`: the power of two >= 2 x flows, at least 65,536."""
    return max(65536, 1 << (2 * flows - 1).bit_length())


FORWARDERS: dict[str, type[Forwarder]] = {"ref": CReferenceForwarder, "relay": PythonRelayForwarder,
                                          "hops": TwoHopRelayForwarder, "ebpf": EbpfRelayForwarder,
                                          "ebpf-egress": EbpfEgressRelayForwarder}


def make_forwarder(kind: str, workers: int, flows: int, tools: dict[str, Path], hit_path: str = "c") -> Forwarder:
    """`hit_path`: the workers' hit path of the `relay` and `hops` forwarders (the eBPF ones
    set theirs)."""
    cls = FORWARDERS[kind]
    return cls(workers, tools=tools, flows=flows) if cls is CReferenceForwarder else cls(workers, flows=flows, hit_path=hit_path)

