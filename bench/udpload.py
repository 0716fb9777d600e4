"""The UDP load of the relay benchmark (bench/relay.py): the C load generator's runs (gen, churn
and sink of bench/c/loadgen.c) over a fixed source plan, the preamble files they send, and what
the kernel says of the UDP sockets on a port (sock_diag: bound, queued, dropped).

The processes start through bench.harness.processes (own process group, stopped at exit).
"""
from __future__ import annotations

import ipaddress
import os
import resource
import socket
import struct
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness.errors import BenchError
from bench.harness.processes import json_summary, read_line, reap, spawn, stderr_tail


@dataclass
class UdpSock:
    local_port: int
    rx_queue: int   # bytes queued (receive memory in use)
    drops: int      # datagrams dropped (receive buffer full, ...)
    inode: int


# sock_diag (NETLINK_SOCK_DIAG, linux/inet_diag.h): the kernel filters by port itself. Reading
# /proc/net/udp instead formats every UDP socket of the host as text: with a 50k-flow generator
# that took tens of ms per read, on whatever CPU the harness ran, a worker's included.
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP, _NLMSG_DONE, _NLMSG_ERROR = 0x1, 0x300, 3, 2
_INET_DIAG_REQ_BYTECODE, _INET_DIAG_SKMEMINFO = 1, 7
_INET_DIAG_BC_S_EQ = 11
_SK_MEMINFO_RMEM_ALLOC, _SK_MEMINFO_DROPS = 0, 8


def _diag_request(family: int, port: int, seq: int) -> bytes:
    # bytecode: "source port == port" (an S_EQ op, then an op whose `no` holds the port);
    # yes = go on after these 8 bytes (accept), no = jump past the end (reject)
    bytecode = struct.pack("=BBH", _INET_DIAG_BC_S_EQ, 8, 12) + struct.pack("=BBH", 0, 0, port)
    attr = struct.pack("=HH", 4 + len(bytecode), _INET_DIAG_REQ_BYTECODE) + bytecode
    # inet_diag_req_v2: family, protocol, ext (SKMEMINFO), pad, states, then an empty sockid
    req = struct.pack("=BBBBI", family, socket.IPPROTO_UDP, 1 << (_INET_DIAG_SKMEMINFO - 1), 0, 0xFFFFFFFF)
    req += bytes(48)
    body = req + attr
    return struct.pack("=IHHII", 16 + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + body


def _diag_dump(family: int, port: int) -> list[UdpSock]:
    out = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:  # NETLINK_SOCK_DIAG
        nl.settimeout(5)
        nl.send(_diag_request(family, port, 1))
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if kind == _NLMSG_DONE:
                    return out
                if kind == _NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, off + 16)[0]
                    raise OSError(err, f"sock_diag: {os.strerror(err)}")
                msg = off + 16  # inet_diag_msg: family..retrans (4 B), sockid (48 B), expires, rqueue, wqueue, uid, inode
                sport = struct.unpack_from("!H", data, msg + 4)[0]
                inode = struct.unpack_from("=I", data, msg + 4 + 48 + 16)[0]
                rx_queue, drops = struct.unpack_from("=I", data, msg + 4 + 48 + 4)[0], 0
                attr = msg + 4 + 48 + 20
                while attr + 4 <= off + length:
                    alen, atype = struct.unpack_from("=HH", data, attr)
                    if alen < 4:
                        break
                    if atype == _INET_DIAG_SKMEMINFO and alen >= 4 + 4 * (_SK_MEMINFO_DROPS + 1):
                        mem = struct.unpack_from(f"={_SK_MEMINFO_DROPS + 1}I", data, attr + 4)
                        rx_queue, drops = mem[_SK_MEMINFO_RMEM_ALLOC], mem[_SK_MEMINFO_DROPS]
                    attr += (alen + 3) & ~3
                if sport == port:
                    out.append(UdpSock(sport, rx_queue, drops, inode))
                off += (length + 3) & ~3


def udp_sockets(port: int) -> list[UdpSock]:
    """The UDP sockets bound to a local port (IPv4 and IPv6), from sock_diag."""
    return _diag_dump(socket.AF_INET, port) + _diag_dump(socket.AF_INET6, port)


def wait_queues_empty(port: int, timeout: float, poll: float = 0.005, settle: float = 0.02) -> float:
    """Wait until the receive queues of every socket on port are empty (and stay empty for
    `settle` s); returns the time waited. BenchError after timeout."""
    t0 = time.monotonic()
    empty_since = None
    while True:
        now = time.monotonic()
        if sum(s.rx_queue for s in udp_sockets(port)) == 0:
            empty_since = empty_since or now
            if now - empty_since >= settle:
                return now - t0
        else:
            empty_since = None
        if now - t0 > timeout:
            raise BenchError(f"receive queue on port {port} not drained after {timeout:.0f}s")
        time.sleep(poll)


def rmem_max() -> int:
    try:
        return int(Path("/proc/sys/net/core/rmem_max").read_text())
    except (OSError, ValueError):
        return 0


def wait_udp_bound(port: int, count: int = 1, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until `count` UDP sockets are bound to port (e.g. all SO_REUSEPORT workers)."""
    deadline = time.monotonic() + timeout
    while len(udp_sockets(port)) < count:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{proc.args[0]} exited ({proc.returncode}) before binding port {port}\n"
                             f"{stderr_tail(proc)}")
        if time.monotonic() > deadline:
            raise BenchError(f"fewer than {count} UDP socket(s) on port {port} after {timeout:.0f}s")
        time.sleep(0.02)


def write_preambles(datagrams: list[bytes]) -> str:
    """The generator's preamble file: u32 big-endian length + bytes, one record per flow."""
    fd, path = tempfile.mkstemp(prefix="rtcrelay-bench-pre-", suffix=".bin")
    with os.fdopen(fd, "wb") as f:
        for d in datagrams:
            f.write(struct.pack("!I", len(d)) + d)
    return path


# --------------------------------------------------------------------------- gen + sink

EPHEMERAL_LO = 32768  # Linux's default ephemeral ports start here: source plans stay below


@dataclass(frozen=True)
class SourcePlan:
    """loadgen's -S plan: address i = (ip + i // per_ip, port + i % per_ip), per_ip = 32768 - port.
    Two runs with one plan send from the same 5-tuples, so what a forwarder learned stays learned."""
    ip: str = "127.1.0.1"
    port: int = 2000

    def __post_init__(self) -> None:
        if not ipaddress.IPv4Address(self.ip).is_loopback or not 1 <= self.port < EPHEMERAL_LO:
            raise BenchError(f"source plan {self}: wants a 127/8 address and a port in 1..{EPHEMERAL_LO - 1}")

    @classmethod
    def parse(cls, text: str) -> SourcePlan:
        ip, _, port = text.rpartition(":")
        return cls(ip, int(port))

    @property
    def per_ip(self) -> int:
        return EPHEMERAL_LO - self.port

    def address(self, i: int) -> tuple[str, int]:
        return str(ipaddress.IPv4Address(self.ip) + i // self.per_ip), self.port + i % self.per_ip

    def after(self, n: int) -> SourcePlan:
        """A plan disjoint from this one's first n addresses (from the next IP it leaves unused)."""
        return SourcePlan(str(ipaddress.IPv4Address(self.ip) + -(-n // self.per_ip)), self.port)

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


def flows_per_process() -> int:
    """How many flows (one socket each) one loadgen may open: it raises its soft RLIMIT_NOFILE up
    to the hard limit, which only CAP_SYS_RESOURCE raises (not granted in every container)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    return max(hard - 64, 1)


def _share(total: int, k: int, n: int) -> int:
    """Part k of n of total (the parts add up to total)."""
    return total * (k + 1) // n - total * k // n


class Gen:
    """One generator run: one loadgen, or several when the flows exceed flows_per_process().
    Shard k sends flows [lo, hi) (-o lo: same flow ids, plan addresses and preamble records as
    one process would) with its share of the count or rate; shards start armed and are
    released together."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        self.procs = procs

    def wait_armed(self, timeout: float) -> None:
        for p in self.procs:
            read_line(p, "ARMED", timeout)

    def go(self) -> None:
        """Release the shards (started armed: after their ARMED lines)."""
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(b"\n")
            p.stdin.flush()

    def result(self, timeout: float) -> dict:
        """The summary, summed over the shards (pps: all sent over the whole span)."""
        parts = [json_summary(p, timeout, "loadgen gen") for p in self.procs]
        if len(parts) == 1:
            return parts[0]
        out = dict(parts[0], shards=len(parts))
        for k in ("flows", "planned", "sent", "send_errors", "preambles", "target_pps", "cpu_s", "back"):
            if k in parts[0]:
                out[k] = sum(x[k] for x in parts)
        for k in [k for k in parts[0] if k.startswith("back_")]:  # (the worst shard's: an upper bound)
            out[k] = max(x[k] for x in parts)
        out["start_ns"], out["end_ns"] = min(x["start_ns"] for x in parts), max(x["end_ns"] for x in parts)
        out["elapsed_ns"] = out["end_ns"] - out["start_ns"]
        out["pps"] = out["sent"] * 1e9 / out["elapsed_ns"] if out["elapsed_ns"] else 0.0
        return out

    def reap(self) -> None:
        reap(*self.procs)


#: port -> the socket hold_port bound for it, while its holder keeps it
_held: weakref.WeakValueDictionary[int, socket.socket] = weakref.WeakValueDictionary()


def hold_port(host: str) -> socket.socket:
    """A UDP socket bound to a free port of host: every `sink` and `tgen` on that port receives
    on it (inherited) while the caller keeps it, so the port stays bound between runs. A closed
    port answers with ICMP port unreachable, and a relay takes that from its transceiver's
    address as the transceiver's end: it drops every flow of it (relay/tunnel_control.py), and
    the next run measures misses."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    _held[sock.getsockname()[1]] = sock
    return sock


def _receiver(argv: list[str], port: int, cpus: set[int] | None, stdin: bool = False) -> subprocess.Popen:
    """`loadgen sink` or `tgen` on port (on its held socket, if any), once it says READY."""
    held = _held.get(port)
    env = None if held is None else {**os.environ, "LOADGEN_FD": str(held.fileno())}
    p = spawn(argv, stdin=stdin, cpus=cpus, env=env, pass_fds=() if held is None else (held.fileno(),))
    read_line(p, "READY", timeout=5)
    return p


@dataclass
class Load:
    """Where the load tools run and what they send."""
    tools: dict[str, Path]
    flows: int = 64
    size: int = 140
    cpus: set[int] | None = None      # generator + sink affinity (None: unpinned)
    host: str = "127.0.0.1"
    source: SourcePlan | None = None  # fixed source addresses (None: ephemeral ports, new each run)
    max_flows_per_process: int = field(default_factory=flows_per_process)

    def _target(self, port: int) -> str:
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    def sink(self, port: int, *, expected: int = 0, idle_ms: int = 1000, max_s: float = 30,
             late_ns: int = 10_000_000, check_header: bool = False, kernel_stamps: bool = False,
             rcvbuf: int = 64 << 20) -> subprocess.Popen:
        argv = [str(self.tools["loadgen"]), "sink", "-B", self.host, "-p", str(port), "-s", str(self.size),
                "-e", str(expected), "-i", str(idle_ms), "-T", str(max_s), "-D", str(late_ns), "-r", str(rcvbuf)]
        if check_header:
            argv.append("-H")
        if kernel_stamps:
            argv.append("-K")
        return _receiver(argv, port, self.cpus)

    @property
    def shards(self) -> int:
        """Generator processes a run of every flow takes (open files: flows_per_process)."""
        return -(-self.flows // self.max_flows_per_process)

    def paced_count(self, rate: float, duration: float) -> int:
        """What a paced gen() sends: each shard rounds its own share (rate / shards x duration,
        as loadgen does), so the sum may differ from round(rate x duration) by a few: a sink
        expecting that would stop before the last and count them lost."""
        n = self.shards
        return n * int(rate / n * duration + 0.5)

    def gen(self, target_port: int, *, count: int = 0, rate: float = 0, duration: float = 0, batch: int = 0,
            preamble_file: str | None = None, preamble_rate: float = 0, preamble_wait_ms: int = 100,
            armed: bool = False, max_s: float = 30, receive: int | None = None, receive_idle_ms: int = 300) -> Gen:
        """count > 0: as fast as possible; rate: paced for duration s; count 0 with a preamble
        file: the preambles only. armed: call wait_armed() and go() (else it sends right away).
        receive: also take what comes to the flow sockets (the clients of `tgen`'s frames),
        until that many came (the summary's "back" and one-way latencies of those) or none for
        receive_idle_ms after the first."""
        n = self.shards
        if not rate and count:
            n = min(n, count)  # every shard needs a datagram to send
        if rate and not batch:  # as loadgen picks it for the whole rate, not for a shard's share
            batch = min(max(int(rate * 50e-6), 1), 64)
        procs = []
        try:
            for k in range(n):
                lo, flows = self.flows * k // n, _share(self.flows, k, n)
                argv = [str(self.tools["loadgen"]), "gen", "-t", self._target(target_port), "-f", str(flows),
                        "-o", str(lo), "-s", str(self.size), "-T", str(max_s), "-w", str(preamble_wait_ms)]
                argv += ["-r", str(rate / n), "-d", str(duration)] if rate else ["-n", str(_share(count, k, n))]
                if batch:
                    argv += ["-b", str(batch)]
                if self.source:
                    argv += ["-S", str(self.source)]
                if preamble_file:
                    argv += ["-P", preamble_file]
                    if preamble_rate:
                        argv += ["-R", str(preamble_rate / n)]
                if receive is not None:
                    argv += ["-E", "-e", str(_share(receive, k, n)), "-i", str(receive_idle_ms)]
                if armed or n > 1:
                    argv.append("-G")
                procs.append(spawn(argv, stdin=armed or n > 1, cpus=self.cpus))
            g = Gen(procs)
            if n > 1 and not armed:
                g.wait_armed(timeout=max_s)
                g.go()
            return g
        except BaseException:
            reap(*procs)
            raise

    def tgen(self, port: int, rate: float, duration: float, max_s: float = 60) -> subprocess.Popen:
        """The transceivers' side (`loadgen tgen`), bound at host:port where the forwarder sends:
        it learns each flow from one datagram, prints ARMED, then on a line on stdin sends paced
        Data frames with the flows' prefixes back to where they came from (see loadgen.c)."""
        argv = [str(self.tools["loadgen"]), "tgen", "-B", self.host, "-p", str(port), "-f", str(self.flows),
                "-s", str(self.size), "-r", str(rate), "-d", str(duration), "-T", str(max_s)]
        return _receiver(argv, port, self.cpus, stdin=True)

    def churn(self, target_port: int, preamble_file: str, source: SourcePlan, rate: float, duration: float,
              max_s: float = 60) -> subprocess.Popen:
        """New sessions: record i of preamble_file from a new socket on source address i, at rate/s."""
        argv = [str(self.tools["loadgen"]), "churn", "-t", self._target(target_port), "-P", preamble_file,
                "-S", str(source), "-r", str(rate), "-d", str(duration), "-T", str(max_s)]
        return spawn(argv, cpus=self.cpus)

