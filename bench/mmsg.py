"""Drain benchmark of the relay's batched UDP I/O (relay/batchio), in the style of PERFORMANCE.md.

A forwarder process does what the relay worker's hit path does: receive a datagram, look the
source up in a dict, write a 24-byte tunnel header in front of the payload, send header +
payload to a sink. It is stopped (SIGSTOP) while ``--packets`` datagrams from ``--flows``
client sockets queue in its (large) receive buffer, then resumed (SIGCONT) and timed until a
sink process has seen them all. Forwarder variants:

- ``recvfrom``      blocking ``recvfrom_into`` + ``sendto`` (the baseline of the ratios)
- ``mmsg``          BatchReceiver → dict by raw sockaddr → header in place → BatchSender.send_rx
                    (the whole batch in one call, no per-packet sender work)
- ``mmsg-conn``     the same, sending on a socket connected to the sink
- ``mmsg-add``      the same with per-packet ``add_rx`` + ``flush``
- ``fallback``      the same loop over FallbackReceiver/FallbackSender (recvfrom_into/sendto)
- ``uvloop``        uvloop DatagramProtocol, ``transport.sendto(header + data, dest)``
- ``c``             with ``--c-forwarder PATH``: a reference binary (e.g. a C recvmmsg/sendmmsg
                    forwarder), exec'd with the sockets' fds

Forwarder on one CPU, sink and generator on the other (2-vCPU VM). Traffic is loopback only;
every wait is bounded. Run as root for SO_RCVBUFFORCE (otherwise net.core.rmem_max caps the
queue and the run reports the drops). Example::

    .venv/bin/python bench/mmsg.py --packets 100000 --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import os
import select
import signal
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness.cpu import cpu_seconds, steal_seconds
from bench.harness.procinfo import pin, proc_state
from bench.udpload import udp_sockets
from relay import batchio

HEADER_LEN = 24
HEADER = struct.Struct("!22sH")  # cached per-flow prefix + payload length (as wire/tunnel_frame.py)
RCVBUF = 256 << 20
IMPLS = ("recvfrom", "mmsg", "mmsg-conn", "mmsg-add", "fallback", "uvloop")
FORWARDER_CPU = 1
OTHER_CPU = 0
BATCH = 64  # --batch
C_FORWARDER = ""  # --c-forwarder


def _pin(cpu: int) -> None:
    pin(os.getpid(), {cpu})  # not there (fewer CPUs): left unpinned


def _big_rcvbuf(sock: socket.socket) -> int:
    force = getattr(socket, "SO_RCVBUFFORCE", 33)
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, RCVBUF)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def _udp_stats(port: int) -> tuple[int, int]:
    """(rx_queue bytes, drops) of the UDP socket(s) bound to ``port``."""
    socks = udp_sockets(port)
    return sum(s.rx_queue for s in socks), sum(s.drops for s in socks)


# --- forwarders (run in the child) ---------------------------------------------------------


def _flows_raw(clients: list[tuple[str, int]], sink_dest: bytes) -> dict[bytes, tuple[bytes, bytes]]:
    flows = {}
    for n, (ip, port) in enumerate(clients):
        key = batchio.sockaddr_for(socket.inet_aton(ip), port)
        flows[key] = (sink_dest, n.to_bytes(8, "big") * 2 + b"\x01\x95\x01\xcf\x00\x00")
    # a realistic table size: other flows that are never hit
    for n in range(1000):
        flows[batchio.sockaddr_for(bytes([10, 0, n >> 8, n & 255]), 40000 + n)] = (sink_dest, b"\x00" * 22)
    return flows


def _fwd_mmsg(sock: socket.socket, out: socket.socket, sink: tuple[str, int], clients, impl: str) -> None:
    conn = impl == "mmsg-conn"
    if conn:
        out.connect(sink)
    rx_cls, tx_cls = (batchio.FallbackReceiver, batchio.FallbackSender) if impl == "fallback" else (batchio.BatchReceiver, batchio.BatchSender)
    rx = rx_cls(sock, batch=BATCH, headroom=64)
    tx = tx_cls(out, batch=BATCH, connected=conn)
    flows = _flows_raw(clients, tx.sockaddr_for(socket.inet_aton(sink[0]), sink[1]))
    get = flows.get
    pack_into = HEADER.pack_into
    buf, offsets = rx.buffer, rx.offsets
    recv, add_rx, flush, send_rx = rx.recv, tx.add_rx, tx.flush, tx.send_rx
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    gc.freeze()
    dropped = oversized = 0
    if impl == "mmsg-add":  # per-packet add_rx, then flush
        while True:
            n = recv()
            if not n:
                poll.poll(1000)
                continue
            keys, lengths = rx.keys(), rx.lengths
            if rx.truncated_count:
                oversized += rx.truncated_count
                lengths = tuple(0 if rx.truncated(i) else ln for i, ln in enumerate(lengths))
            for i in range(n):
                flow = get(keys[i])
                if flow is None or not lengths[i]:
                    dropped += 1
                    continue
                pack_into(buf, offsets[i] - HEADER_LEN, flow[1], lengths[i])
                add_rx(flow[0], rx, i, HEADER_LEN)
            flush()
    while True:  # the batch send without per-datagram work: send_rx
        n = recv()
        if not n:
            poll.poll(1000)
            continue
        dests: list[bytes] = []
        skip: list[int] = []
        i = 0
        for key, length, off in zip(rx.keys(), rx.lengths, offsets):
            flow = get(key)
            if flow is None:
                dropped += 1
                skip.append(i)
                dests.append(b"")
            else:
                pack_into(buf, off - HEADER_LEN, flow[1], length)
                dests.append(flow[0])
            i += 1  # noqa: SIM113 - cheaper than enumerate(zip(...)) per datagram
        if rx.truncated_count:  # rare: redo the skip list with the oversized ones
            oversized += rx.truncated_count
            skip = sorted(set(skip) | {k for k in range(n) if rx.truncated(k)})
        send_rx(rx, dests, HEADER_LEN, skip)


def _fwd_recvfrom(sock: socket.socket, out: socket.socket, sink: tuple[str, int], clients) -> None:
    sock.setblocking(True)
    out.setblocking(True)
    flows = {c: (sink, n.to_bytes(8, "big") * 2 + b"\x01\x95\x01\xcf\x00\x00") for n, c in enumerate(clients)}
    for n in range(1000):
        flows[(f"10.0.{n >> 8}.{n & 255}", 40000 + n)] = (sink, b"\x00" * 22)
    get = flows.get
    buf = bytearray(HEADER_LEN + 2048)
    view = memoryview(buf)
    payload_view = view[HEADER_LEN:]
    pack_into = HEADER.pack_into
    recvfrom_into, sendto = sock.recvfrom_into, out.sendto
    gc.freeze()
    while True:
        nbytes, addr = recvfrom_into(payload_view, 2048)
        flow = get(addr)
        if flow is None:
            continue
        pack_into(buf, 0, flow[1], nbytes)
        sendto(view[: HEADER_LEN + nbytes], flow[0])


def _fwd_uvloop(sock: socket.socket, out: socket.socket, sink: tuple[str, int], clients) -> None:
    import asyncio

    import uvloop

    flows = {c: (sink, n.to_bytes(8, "big") * 2 + b"\x01\x95\x01\xcf\x00\x00") for n, c in enumerate(clients)}
    for n in range(1000):
        flows[(f"10.0.{n >> 8}.{n & 255}", 40000 + n)] = (sink, b"\x00" * 22)
    get = flows.get
    pack = HEADER.pack

    class Out(asyncio.DatagramProtocol):
        pass

    class In(asyncio.DatagramProtocol):
        def __init__(self, out_transport: asyncio.DatagramTransport) -> None:
            self.sendto = out_transport.sendto

        def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
            flow = get(addr)
            if flow is None:
                return
            self.sendto(pack(flow[1], len(data)) + data, flow[0])

    async def main() -> None:
        loop = asyncio.get_running_loop()
        out_t, _ = await loop.create_datagram_endpoint(Out, sock=out)
        await loop.create_datagram_endpoint(lambda: In(out_t), sock=sock)
        gc.freeze()
        await asyncio.Event().wait()

    uvloop.run(main())


def _forwarder(impl: str, sock, out, sink, clients, ready_w: int, lifetime: float) -> None:
    _pin(FORWARDER_CPU)
    signal.alarm(int(lifetime) + 1)  # bounded even if the parent dies
    os.write(ready_w, b"r")
    os.close(ready_w)
    if impl == "c":  # an external reference binary: argv = in_fd out_fd sink_ip sink_port
        for s in (sock, out):
            os.set_inheritable(s.fileno(), True)
        os.execv(C_FORWARDER, [C_FORWARDER, str(sock.fileno()), str(out.fileno()), sink[0], str(sink[1])])
    if impl == "recvfrom":
        _fwd_recvfrom(sock, out, sink, clients)
    elif impl == "uvloop":
        _fwd_uvloop(sock, out, sink, clients)
    else:
        _fwd_mmsg(sock, out, sink, clients, impl)


# --- sink and generator --------------------------------------------------------------------


def _sink(sock: socket.socket, expect: int, want_len: int, result_w: int, deadline: float) -> None:
    _pin(OTHER_CPU)
    rx = batchio.BatchReceiver(sock, batch=64)
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    seen = bad = 0
    t_last = 0
    while seen < expect and time.monotonic() < deadline:
        n = rx.recv()
        if not n:
            poll.poll(50)
            continue
        seen += n
        t_last = time.monotonic_ns()
        bad += n - rx.lengths.count(want_len)  # every datagram is header + payload
    os.write(result_w, struct.pack("=qqq", seen, t_last, bad))
    os.close(result_w)


def _generate(clients: list[socket.socket], dest: tuple[str, int], packets: int, payload: int) -> int:
    """Send ``packets`` datagrams round-robin from the client sockets (batches of 64)."""
    senders = []
    for c in clients:
        c.connect(dest)
        senders.append(batchio.BatchSender(c, batch=64, connected=True))
    data = [bytes([0x80, 0x60]) + k.to_bytes(4, "big") * ((payload - 2) // 4) for k in range(len(clients))]
    data = [d + b"\x00" * (payload - len(d)) for d in data]
    sent = 0
    k = 0
    while sent < packets:
        s = senders[k % len(senders)]
        d = data[k % len(senders)]
        for _ in range(min(64, packets - sent)):
            s.add(None, d)
        got = s.flush()
        sent += got
        k += 1
        if got == 0:
            time.sleep(0.001)
    return sum(s.dropped_eagain for s in senders)


# --- one measurement -----------------------------------------------------------------------


def run_once(impl: str, packets: int, flows: int, payload: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    fwd_in = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fwd_in.bind(("127.0.0.1", 0))
    rcvbuf = _big_rcvbuf(fwd_in)
    fwd_out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fwd_out.bind(("127.0.0.1", 0))
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    _big_rcvbuf(sink)
    clients = []
    for _ in range(flows):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.bind(("127.0.0.1", 0))
        clients.append(c)
    client_addrs = [c.getsockname() for c in clients]
    in_port = fwd_in.getsockname()[1]
    sink_addr = sink.getsockname()
    pids: list[int] = []
    result: dict = {"impl": impl, "rcvbuf": rcvbuf}
    try:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # forwarder
            try:
                os.close(ready_r)
                sink.close()
                _forwarder(impl, fwd_in, fwd_out, sink_addr, client_addrs, ready_w, timeout)
            finally:
                os._exit(0)
        pids.append(pid)
        fwd_pid = pid
        os.close(ready_w)
        select.select([ready_r], [], [], 10)
        os.close(ready_r)
        fwd_in.close()
        fwd_out.close()
        _pin(OTHER_CPU)

        # warm-up: the path works, and the forwarder's code is warm
        warm = 2000
        _generate(clients[:1], ("127.0.0.1", in_port), warm, payload)
        sink.settimeout(2.0)
        got = 0
        try:
            while got < warm:
                sink.recv(4096)
                got += 1
        except TimeoutError:
            pass
        sink.setblocking(True)
        if got < warm * 0.9:
            raise RuntimeError(f"{impl}: warm-up: sink saw {got}/{warm}")
        time.sleep(0.05)
        while True:  # leftovers of the warm-up
            try:
                sink.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break

        os.kill(fwd_pid, signal.SIGSTOP)
        t_stop = time.monotonic() + 5
        while proc_state(fwd_pid) != "T" and time.monotonic() < t_stop:
            time.sleep(0.001)
        drops0 = _udp_stats(in_port)[1]
        gen_drop = _generate(clients, ("127.0.0.1", in_port), packets, payload)
        queued, drops1 = _udp_stats(in_port)
        result.update(queued_bytes=queued, in_drops=drops1 - drops0, gen_dropped=gen_drop)
        expect = packets - (drops1 - drops0) - gen_drop

        result_r, result_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # sink
            try:
                os.close(result_r)
                _sink(sink, expect, HEADER_LEN + payload, result_w, deadline)
            finally:
                os._exit(0)
        pids.append(pid)
        os.close(result_w)
        time.sleep(0.1)  # the sink is waiting in poll()

        cpu0, steal0 = cpu_seconds([fwd_pid]), steal_seconds()
        t0 = time.monotonic_ns()
        os.kill(fwd_pid, signal.SIGCONT)
        rl, _, _ = select.select([result_r], [], [], max(0.1, deadline - time.monotonic()))
        raw = os.read(result_r, 24) if rl else b""
        os.close(result_r)
        if len(raw) != 24:
            raise RuntimeError(f"{impl}: no result from the sink within the time limit")
        seen, t_last, bad = struct.unpack("=qqq", raw)
        result["cpu_ns_per_packet"] = (cpu_seconds([fwd_pid]) - cpu0) * 1e9 / max(1, seen)
        result["steal_ms"] = (steal_seconds() - steal0) * 1e3
        result.update(seen=seen, expected=expect, bad=bad)
        if seen < expect:
            raise RuntimeError(f"{impl}: sink saw {seen}/{expect} before the deadline")
        if bad:
            raise RuntimeError(f"{impl}: {bad} datagrams at the sink were not header + payload")
        result["ns_per_packet"] = (t_last - t0) / seen
        result["sink_drops"] = _udp_stats(sink_addr[1])[1]
        return result
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        for s in [sink, fwd_in, fwd_out, *clients]:
            s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=100_000)
    ap.add_argument("--flows", type=int, default=16)
    ap.add_argument("--payload", type=int, default=140)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per measurement")
    ap.add_argument("--batch", type=int, default=64, help="batch size of the mmsg forwarders")
    ap.add_argument(
        "--c-forwarder",
        default="",
        help="also time this binary as impl 'c' (a C reference forwarder; argv: in_fd out_fd sink_ip sink_port)",
    )
    args = ap.parse_args(argv)
    global BATCH, C_FORWARDER  # noqa: PLW0603 - the options, read by the forwarders' code
    BATCH = args.batch
    C_FORWARDER = args.c_forwarder
    impls = [i for i in args.impls.split(",") if i]
    for i in impls:
        if i not in IMPLS:
            ap.error(f"unknown impl {i}")
    if "recvfrom" not in impls:
        impls.insert(0, "recvfrom")
    if C_FORWARDER:
        impls.append("c")
    print(f"# mmsg available: {batchio.HAVE_MMSG}; {args.packets} packets x {args.payload} B, {args.flows} flows, "
          f"{args.rounds} rounds; batch {BATCH}; forwarder on CPU {FORWARDER_CPU}")
    results: dict[str, list[float]] = {i: [] for i in impls}
    cpu: dict[str, list[float]] = {i: [] for i in impls}
    for r in range(args.rounds):
        order = impls[r % len(impls):] + impls[: r % len(impls)]  # rotate: drift hits all alike
        for impl in order:
            try:
                res = run_once(impl, args.packets, args.flows, args.payload, args.timeout)
            except RuntimeError as exc:
                print(f"  round {r} {impl}: FAILED: {exc}")
                continue
            results[impl].append(res["ns_per_packet"])
            cpu[impl].append(res["cpu_ns_per_packet"])
            extra = ""
            if res["in_drops"] or res["gen_dropped"] or res.get("sink_drops"):
                extra = f" (in_drops {res['in_drops']}, gen_dropped {res['gen_dropped']}, sink_drops {res['sink_drops']})"
            print(
                f"  round {r} {impl:10s} {res['ns_per_packet']:8.0f} ns/packet  forwarder CPU {res['cpu_ns_per_packet']:6.0f} ns/packet"
                f"  queued {res['queued_bytes'] >> 20} MiB  steal {res['steal_ms']:.0f} ms{extra}",
                flush=True,
            )
    base = statistics.median(results["recvfrom"]) if results["recvfrom"] else float("nan")
    base_min = min(results["recvfrom"]) if results["recvfrom"] else float("nan")
    base_cpu = statistics.median(cpu["recvfrom"]) if cpu["recvfrom"] else float("nan")
    print(
        f"\n| forwarder | ns/packet, median of {args.rounds} | pps | ratio | best run | ratio of best "
        "| forwarder CPU ns/packet | CPU ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for impl in impls:
        if not results[impl]:
            print(f"| {impl} | failed | | | | | | |")
            continue
        med = statistics.median(results[impl])
        best = min(results[impl])
        print(
            f"| {impl} | {med:,.0f} | {1e9 / med / 1000:,.0f}k | {base / med:.2f} | {best:,.0f} | {base_min / best:.2f} "
            f"| {statistics.median(cpu[impl]):,.0f} | {base_cpu / statistics.median(cpu[impl]):.2f} |"
        )
    print("ratio: to blocking recvfrom_into/sendto in this run (higher is faster). Wall time counts from SIGCONT")
    print("to the sink's last packet; the forwarder's CPU time (utime+stime, 10 ms ticks) is the steadier figure")
    print("when other processes share the forwarder's CPU.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
