"""The relay supervisor: owns every socket and the shared table, runs and restarts the workers.

It is deliberately not on the packet path. It:

- opens (or receives from systemd) the public SO_REUSEPORT sockets, one per worker and
  listen address, and one tunnel socket per worker; hands them to the fd store so a
  restarted relay gets the very same sockets back;
- creates the shared flow table, or reopens it after a restart of the whole relay;
- starts each worker as ``python -m relay.worker`` with its sockets passed by fd, and restarts
  a dead one with the same sockets and the same partition (backoff against crash loops);
- tells systemd READY=1 once every worker serves, STATUS=, WATCHDOG=1 while every worker's
  heartbeat is fresh, STOPPING=1 on the way out; SIGHUP reloads route keys in every worker;
- serves /metrics, /healthz and /readyz on the admin address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from aiohttp import web

from daemon import systemd
from daemon.config_file import parse_host_port
from daemon.keys import load_keyring
from relay.config import RelayConfig
from relay.hit_path import describe as describe_hit_path
from relay.kernel_path import KernelPath, open_kernel_path
from relay.metrics import WORKER_COUNTERS, render_prometheus
from relay.sockets import adopt_fd, bound_address, open_udp, set_buffers
from relay.worker_spec import PublicSocket, WorkerSpec, encode_spec
from shm import FlowTable, LayoutMismatch
from shm.counters import CounterBlock

log = logging.getLogger("rtcrelay.relay")

RESTART_BACKOFF_MAX_S = 5.0
HEARTBEAT_STALE_S = 5.0  # a worker that has not flushed for this long is killed and restarted
STANDBY_DELAY_S = 1.0  # after start-up or a takeover, before a (new) standby is spawned
STARTUP_TICK_S = 0.25  # worker checks until every worker serves (READY=1)
SERVING_TICK_S = 1.0  # then: STATUS, stale heartbeats, WATCHDOG=1 (at least twice per WATCHDOG_USEC)


@dataclass
class Standby:
    """A worker process that has imported everything and attached the table, waiting for "go"."""

    process: subprocess.Popen[bytes]
    channel: socket.socket  # our end of a socketpair: it says b"r" when ready; we say b"go"; EOF = exit
    pidfd: int
    ready: bool = False


@dataclass
class WorkerSlot:
    index: int
    public: list[socket.socket]
    tunnel: socket.socket
    hop: list[socket.socket] = field(default_factory=list)  # hop_listen, one per address
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    crash_streak: int = 0
    pidfd: int | None = None
    standby: Standby | None = None


class ActivationMismatch(Exception):
    """Socket activation passed a number of sockets that does not fit the configuration."""


def check_activation(activated: dict[tuple[str, int], list[socket.socket]], listen: list[tuple[str, int]],
                     workers: int, restored: bool) -> None:
    """Refuse to start with a socket unit that does not match: fewer sockets than workers would
    make the relay bind the rest itself (impossible as non-root: the kernel only lets one user
    share a reuseport group), more would leave sockets in the group that nobody reads."""
    if restored:
        return  # the fd store gave back our own sockets; activation fds are the same ones again
    for address, socks in activated.items():
        if address not in listen:
            raise ActivationMismatch(f"socket activation passed {address[0]}:{address[1]}, "
                                     f"which is not in `listen` {listen}")
        if len(socks) != workers:
            raise ActivationMismatch(
                f"socket activation passed {len(socks)} sockets for {address[0]}:{address[1]} but workers = {workers}: "
                "give the .socket unit one ListenDatagram= line per worker, or set workers to match"
            )


class Supervisor:
    def __init__(self, config: RelayConfig, *, keep_table: bool = True) -> None:
        self.config = config
        self.keep_table = keep_table
        self.keys_path = config.route_keys_file or None
        load_keyring(self.keys_path)  # fail at start, naming the problem, not in every worker
        # and for hit_path = "c" without the extension (describe raises HitPathError)
        log.info("hit path: %s", describe_hit_path(config.hit_path))
        self.workers: list[WorkerSlot] = []
        self.table: FlowTable | None = None
        self.counters: CounterBlock | None = None
        self.ready_sent = False
        self.stopping = False
        self._stop = asyncio.Event()
        self._admin: web.AppRunner | None = None
        self.kernel: KernelPath | None = None

    # -- set-up -------------------------------------------------------------------------------

    def open_sockets(self) -> None:
        inherited = systemd.listen_fds()
        systemd.unset_listen_env()
        ours = ("public-", "tunnel-", "hop-")
        stored = {name: fds[0] for name, fds in inherited.items() if name.startswith(ours)}
        activated = [fd for name, fds in inherited.items() if not name.startswith(ours) for fd in fds]
        activated_by_addr: dict[tuple[str, int], list[socket.socket]] = {}
        for fd in activated:
            sock = adopt_fd(fd)
            set_buffers(sock, self.config.socket_buffer)
            activated_by_addr.setdefault(bound_address(sock), []).append(sock)
        listen = [parse_host_port(text, "listen") for text in self.config.listen]
        check_activation(activated_by_addr, listen, self.config.worker_count,
                         restored=any(n.startswith("public-") for n in stored))
        for index in range(self.config.worker_count):
            public = []
            for j, (host, port) in enumerate(listen):
                name = f"public-{index}-{j}"
                if name in stored:
                    public.append(adopt_fd(stored.pop(name)))
                elif activated_by_addr.get((host, port)):
                    public.append(activated_by_addr[(host, port)].pop())
                else:
                    public.append(open_udp(host, port, reuseport=True, buffer_size=self.config.socket_buffer))
            name = f"tunnel-{index}"
            if name in stored:
                tunnel = adopt_fd(stored.pop(name))
            else:
                tunnel_port = self.config.tunnel_port + index if self.config.tunnel_port else 0
                # SO_REUSEPORT: the worker's connected tunnel links bind the same address (relay/tunnel_links.py)
                tunnel = open_udp(self.config.tunnel_host, tunnel_port, reuseport=True,
                                  buffer_size=self.config.socket_buffer)
            hop = []
            for j, (host, port) in enumerate(parse_host_port(text, "hop_listen") for text in self.config.hop_listen):
                name = f"hop-{index}-{j}"
                hop.append(adopt_fd(stored.pop(name)) if name in stored else
                           open_udp(host, port, reuseport=True, buffer_size=self.config.socket_buffer))
            self.workers.append(WorkerSlot(index, public, tunnel, hop))
        for leftover in [*stored.values()]:
            os.close(leftover)  # a socket for a worker index this configuration no longer has
        for socks in activated_by_addr.values():
            for sock in socks:
                sock.close()
        self._store_fds()

    def _store_fds(self) -> None:
        """Give systemd's fd store a copy of every socket: a restarted relay gets them back."""
        for slot in self.workers:
            for j, sock in enumerate(slot.public):
                systemd.notify(f"FDSTORE=1\nFDNAME=public-{slot.index}-{j}", [sock.fileno()])
            systemd.notify(f"FDSTORE=1\nFDNAME=tunnel-{slot.index}", [slot.tunnel.fileno()])
            for j, sock in enumerate(slot.hop):
                systemd.notify(f"FDSTORE=1\nFDNAME=hop-{slot.index}-{j}", [sock.fileno()])

    def open_table(self) -> None:
        cfg = self.config
        layout = dict(
            partitions=cfg.worker_count,
            flow_capacity=cfg.flow_capacity,
            session_capacity=cfg.session_capacity,
            max_flows_per_session=cfg.max_flows_per_session,
        )
        table = None
        if os.path.exists(cfg.table_path):
            try:
                table = FlowTable.open(cfg.table_path, **layout)
                log.info("reopened flow table %s (flows kept across the restart)", cfg.table_path)
            except LayoutMismatch as exc:
                log.warning("flow table %s has another layout (%s): creating a new one", cfg.table_path, exc)
        if table is None:
            table = FlowTable.create(cfg.table_path, **layout)
        self.table = table
        self.counters = CounterBlock.create(cfg.stats_path, WORKER_COUNTERS, rows=cfg.worker_count)

    def open_kernel_path(self) -> None:
        """The in-kernel fast path (relay/kernel_path.py) for hit_path "ebpf" or "auto"."""
        cfg = self.config
        publics = sorted({bound_address(sock) for slot in self.workers for sock in slot.public})
        tunnels = [bound_address(slot.tunnel) for slot in self.workers]
        self.kernel = open_kernel_path(cfg.hit_path, publics, tunnels, cfg.worker_count, cfg.flow_capacity,
                                       loopback_egress=cfg.kernel_loopback == "egress")

    # -- workers ------------------------------------------------------------------------------

    def _popen_worker(self, slot: WorkerSlot, go_fd: int | None = None) -> subprocess.Popen[bytes]:
        spec = WorkerSpec(
            index=slot.index,
            config=self.config,
            public=[PublicSocket(sock.fileno(), *bound_address(sock)) for sock in slot.public],
            tunnel_fd=slot.tunnel.fileno(),
            supervisor_pid=os.getpid(),
            go_fd=go_fd,
            hop=[PublicSocket(sock.fileno(), *bound_address(sock)) for sock in slot.hop],
            kernel=self.kernel.maps[slot.index] if self.kernel is not None else None,
        )
        fds = [sock.fileno() for sock in (*slot.public, slot.tunnel, *slot.hop)]
        if spec.kernel is not None:
            fds += spec.kernel.fds()
        if go_fd is not None:
            fds.append(go_fd)
        env = dict(os.environ, RTCRELAY_WORKER_SPEC=encode_spec(spec))
        env.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
        return subprocess.Popen([sys.executable, "-m", "relay.worker"], pass_fds=fds, env=env)

    def _watch(self, pid: int, callback, *args: object) -> int:
        pidfd = os.pidfd_open(pid)
        asyncio.get_running_loop().add_reader(pidfd, callback, *args)
        return pidfd

    def _unwatch(self, pidfd: int) -> None:
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)

    def spawn(self, slot: WorkerSlot) -> None:
        slot.process = self._popen_worker(slot)
        slot.started_at = time.monotonic()
        slot.pidfd = self._watch(slot.process.pid, self._on_exit, slot)
        log.info("worker %d started (pid %d)", slot.index, slot.process.pid)

    def spawn_standby(self, slot: WorkerSlot) -> None:
        """A warm spare for this slot: on a crash it takes over in milliseconds, not the
        ~0.4 s (more under load) a fresh interpreter needs to import and attach."""
        if self.stopping or slot.standby is not None:
            return
        ours, theirs = socket.socketpair()
        try:
            process = self._popen_worker(slot, go_fd=theirs.fileno())
        finally:
            theirs.close()
        standby = slot.standby = Standby(process, ours, self._watch(process.pid, self._on_standby_exit, slot))
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_standby_ready, standby)

    def _on_standby_ready(self, standby: Standby) -> None:
        asyncio.get_running_loop().remove_reader(standby.channel.fileno())
        with contextlib.suppress(OSError):
            standby.ready = standby.channel.recv(1) == b"r"

    def _drop_standby(self, slot: WorkerSlot) -> Standby:
        standby = slot.standby
        assert standby is not None
        self._unwatch(standby.pidfd)
        with contextlib.suppress(ValueError, KeyError):
            asyncio.get_running_loop().remove_reader(standby.channel.fileno())
        slot.standby = None
        return standby

    def _on_standby_exit(self, slot: WorkerSlot) -> None:
        standby = self._drop_standby(slot)
        standby.channel.close()
        code = standby.process.wait()
        if not self.stopping:
            log.warning("standby of worker %d (pid %d) exited with %d; a new one in %.0f s",
                        slot.index, standby.process.pid, code, STANDBY_DELAY_S)
            asyncio.get_running_loop().call_later(STANDBY_DELAY_S, self.spawn_standby, slot)

    def _promote(self, slot: WorkerSlot) -> bool:
        """Hand the slot to its standby; False when there is none to hand it to."""
        if slot.standby is None or slot.standby.process.poll() is not None:
            return False
        standby = self._drop_standby(slot)
        try:
            standby.channel.sendall(b"go")  # not yet ready? it takes over as soon as it is
        except OSError:
            return False
        finally:
            standby.channel.close()
        slot.process = standby.process
        slot.started_at = time.monotonic()
        slot.pidfd = self._watch(slot.process.pid, self._on_exit, slot)
        log.info("worker %d: standby pid %d took over", slot.index, slot.process.pid)
        # The next spare starts later, so it does not compete for CPU with the takeover.
        asyncio.get_running_loop().call_later(STANDBY_DELAY_S, self.spawn_standby, slot)
        return True

    def _on_exit(self, slot: WorkerSlot) -> None:
        assert slot.pidfd is not None and slot.process is not None
        self._unwatch(slot.pidfd)
        slot.pidfd = None
        code = slot.process.wait()
        if self.stopping:
            return
        uptime = time.monotonic() - slot.started_at
        slot.crash_streak = slot.crash_streak + 1 if uptime < 10 else 1
        pid = slot.process.pid
        slot.process = None
        # A crash loop (a poison packet?) must not burn through spares: back off instead.
        if slot.crash_streak <= 2 and self._promote(slot):
            log.warning("worker %d (pid %d) exited with %d after %.1f s; its standby took over",
                        slot.index, pid, code, uptime)
            return
        delay = min(0.05 * 2 ** (slot.crash_streak - 1), RESTART_BACKOFF_MAX_S)
        log.warning("worker %d (pid %d) exited with %d after %.1f s; restarting in %.2f s",
                    slot.index, pid, code, uptime, delay)
        asyncio.get_running_loop().call_later(delay, self._respawn, slot)

    def _respawn(self, slot: WorkerSlot) -> None:
        if not self.stopping and slot.process is None:
            self.spawn(slot)

    def worker_rows(self) -> list[dict[str, int]]:
        assert self.counters is not None
        return [self.counters.load_row(slot.index) for slot in self.workers]

    def worker_is_serving(self, slot: WorkerSlot, row: dict[str, int]) -> bool:
        return slot.process is not None and row["pid"] == slot.process.pid and row["ready"] == 1

    # -- main loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_keys)
        self.open_sockets()
        self.open_table()
        self.open_kernel_path()
        for slot in self.workers:
            self.spawn(slot)
        await self._start_admin()
        watchdog = systemd.watchdog_interval()
        try:
            while not self._stop.is_set():
                self._check_workers(watchdog)
                # Each tick wakes this process, maybe on a worker's CPU, and a worker's datagrams
                # then wait for it (~0.5 ms, measured): tick often only until READY.
                tick = SERVING_TICK_S if self.ready_sent else STARTUP_TICK_S
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), min(tick, watchdog or tick))
        finally:
            await self.shutdown()

    def _check_workers(self, watchdog: float | None) -> None:
        rows = self.worker_rows()
        now_ms = int(time.time() * 1000)
        serving = 0
        healthy = True
        for slot, row in zip(self.workers, rows):
            if self.worker_is_serving(slot, row):
                serving += 1
                if now_ms - row["heartbeat_ms"] > HEARTBEAT_STALE_S * 1000:
                    healthy = False
                    assert slot.process is not None
                    log.error("worker %d (pid %d) stopped flushing for %.1f s: killing it",
                              slot.index, slot.process.pid, (now_ms - row["heartbeat_ms"]) / 1000)
                    with contextlib.suppress(ProcessLookupError):
                        slot.process.kill()
        flows = sum(row["flows"] for row in rows)
        if serving == len(self.workers) and not self.ready_sent:
            self.ready_sent = True
            log.info("relay ready: %d workers on %s", serving, ", ".join(self.config.listen))
            systemd.notify(f"READY=1\nSTATUS=serving: {serving} workers, {flows} flows")
            if self.config.standby_workers:
                for slot in self.workers:
                    asyncio.get_running_loop().call_later(STANDBY_DELAY_S, self.spawn_standby, slot)
        elif self.ready_sent:
            systemd.notify(f"STATUS=serving: {serving}/{len(self.workers)} workers, {flows} flows")
        if watchdog is not None and healthy:
            systemd.notify("WATCHDOG=1")

    def reload_keys(self) -> None:
        try:
            load_keyring(self.keys_path)
        except Exception as exc:  # keep serving with the old keys, say why
            log.error("SIGHUP: route keys not reloaded: %s", exc)
            return
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        for slot in self.workers:  # standbys read the keys when they take over
            if slot.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signal.SIGHUP)
        log.info("SIGHUP: route keys reloaded in %d workers", len(self.workers))
        systemd.notify("READY=1")

    async def shutdown(self) -> None:
        self.stopping = True
        systemd.notify("STOPPING=1")
        for slot in self.workers:
            if slot.standby is not None:  # EOF on its channel: it exits without touching anything
                standby = self._drop_standby(slot)
                standby.channel.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    standby.process.wait(5)
        for slot in self.workers:
            if slot.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.terminate()
        deadline = time.monotonic() + 5.0
        for slot in self.workers:
            if slot.process is None:
                continue
            try:
                slot.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                slot.process.kill()
                slot.process.wait()
        if self._admin is not None:
            await self._admin.cleanup()
        if self.kernel is not None:  # (after the workers: established flows kept moving until now)
            self.kernel.close()
        for slot in self.workers:
            for sock in (*slot.public, *slot.hop):
                sock.close()
            slot.tunnel.close()
        if self.table is not None:
            self.table.close()
            if not self.keep_table:
                self.table.unlink()
        if self.counters is not None:
            self.counters.close()
            if not self.keep_table:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.config.stats_path)
        log.info("relay stopped")

    # -- admin HTTP ---------------------------------------------------------------------------

    async def _start_admin(self) -> None:
        if not self.config.admin_listen:
            return
        host, port = parse_host_port(self.config.admin_listen, "admin_listen")
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._admin = web.AppRunner(app, access_log=None)
        await self._admin.setup()
        await web.TCPSite(self._admin, host, port).start()

    async def _metrics(self, _request: web.Request) -> web.Response:
        assert self.table is not None
        body = render_prometheus(self.worker_rows(), self.table.totals(),
                                 self.kernel.stats() if self.kernel is not None else None)
        return web.Response(text=body, content_type="text/plain", charset="utf-8")

    async def _healthz(self, _request: web.Request) -> web.Response:
        alive = sum(1 for slot in self.workers if slot.process is not None and slot.process.poll() is None)
        standbys = sum(1 for slot in self.workers if slot.standby is not None and slot.standby.ready)
        status = 200 if alive == len(self.workers) else 503
        return web.json_response({"workers": len(self.workers), "alive": alive, "standbys_ready": standbys},
                                 status=status)

    async def _readyz(self, _request: web.Request) -> web.Response:
        serving = sum(1 for slot, row in zip(self.workers, self.worker_rows()) if self.worker_is_serving(slot, row))
        status = 200 if serving == len(self.workers) and not self.stopping else 503
        return web.json_response({"workers": len(self.workers), "serving": serving}, status=status)


def run_relay(config: RelayConfig, *, keep_table: bool = True) -> None:
    """Run the relay until SIGTERM/SIGINT (the `rtcrelay relay` command)."""
    import uvloop

    uvloop.run(Supervisor(config, keep_table=keep_table).run())

