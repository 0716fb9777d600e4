"""`rtcrelay up`: the relay, N transceivers and the demo call page on 127.0.0.1, in one command.

The services run as child processes started exactly as an operator would start them
(`rtcrelay relay`, `rtcrelay transceiver`, each with a config file written here), so the demo
exercises the real process model. This process serves the demo page and the signalling front
(cli/signalling_front.py: one WHIP endpoint that spreads calls over the transceivers), and
supervises: a service that dies is started again after a back-off (0.5 s, doubling to 10 s,
back to 0.5 s once it has run for 30 s), and nothing else is stopped for it: a dead
transceiver costs its own calls, never the relay or the other transceivers. Ctrl-C (or
SIGTERM) stops the transceivers (drain), then the relay, then the page.
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
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from cli.signalling_front import SignallingFront
from daemon.config_file import toml_text
from daemon.keys import generate_keys_toml, load_keyring

log = logging.getLogger("rtcrelay.up")
HOST = "127.0.0.1"
RTCRELAY = [sys.executable, "-m", "cli.main"]
READY_TIMEOUT_S = 30.0


class PortInUse(Exception):
    pass


RESTART_MIN_S = 0.5
RESTART_MAX_S = 10.0
HEALTHY_AFTER_S = 30.0  # a service that ran this long restarts at once again after a crash


@dataclass
class DemoSettings:
    http_port: int = 8080
    relay_port: int = 3478
    signalling_port: int = 8081
    admin_port: int = 9478
    workers: int = 2
    transceivers: int = 2
    name: str = "demo"
    route_keys: str | None = None
    verbose: bool = False


def check_ports(settings: DemoSettings) -> None:
    """Fail before starting anything, naming the port and the flag that moves it."""
    wanted = [
        (socket.SOCK_DGRAM, settings.relay_port, "--relay-port"),
        (socket.SOCK_STREAM, settings.http_port, "--http-port"),
        (socket.SOCK_STREAM, settings.signalling_port, "--signalling-port"),
        (socket.SOCK_STREAM, settings.admin_port, "--admin-port"),
    ]
    for kind, port, flag in wanted:
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
            except OSError:
                raise PortInUse(f"{HOST}:{port} is in use ({'UDP' if kind == socket.SOCK_DGRAM else 'TCP'}); "
                                f"choose another with {flag}") from None


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def write_configs(settings: DemoSettings, workdir: Path) -> tuple[Path, Path, list[tuple[Path, int]]]:
    """Route keys, the relay's config, and per transceiver its config and signalling port."""
    keys = Path(settings.route_keys) if settings.route_keys else workdir / "route-keys.toml"
    if not settings.route_keys:
        keys.write_text(generate_keys_toml())
        keys.chmod(0o600)
    load_keyring(str(keys))  # a bad --route-keys file stops here with its name
    relay_cfg = workdir / "relay.toml"
    relay_cfg.write_text(toml_text({
        "name": settings.name,
        "listen": [f"{HOST}:{settings.relay_port}"],
        "workers": settings.workers,
        "route_keys_file": str(keys),
        "admin_listen": f"{HOST}:{settings.admin_port}",
        "flow_capacity": 4096,
        "session_capacity": 1024,
    }))
    transceivers = []
    for index in range(settings.transceivers):
        port = free_tcp_port()  # kept across restarts: the front knows it
        config = workdir / f"transceiver-{index}.toml"
        config.write_text(toml_text({
            "tunnel_host": HOST,
            "relay_public_addresses": [f"{HOST}:{settings.relay_port}"],
            "http_host": HOST,
            "http_port": port,
            "route_keys_file": str(keys),
            "drain_deadline": 10.0,  # room for its calls to move (make-before-break) on Ctrl-C or SIGTERM
        }))
        transceivers.append((config, port))
    return keys, relay_cfg, transceivers


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Service:
    """One supervised child: how to start it, how to tell it is ready, how often it died."""

    name: str
    args: list[str]
    ready_url: str
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = RESTART_MIN_S
    restart_at: float | None = None  # when a dead service is due to start again


class Demo:
    def __init__(self, settings: DemoSettings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.services: list[Service] = []
        self.front: SignallingFront | None = None
        self.runners: list[web.AppRunner] = []

    def spawn(self, service: Service) -> None:
        verbose = ["-v"] if self.settings.verbose else []
        service.process = subprocess.Popen(RTCRELAY + service.args + verbose)
        service.started = time.monotonic()
        service.restart_at = None

    async def wait_ready(self, service: Service) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert service.process is not None
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited with {service.process.returncode} during start-up")
            if await asyncio.to_thread(http_ok, service.ready_url):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{service.name} not ready after {READY_TIMEOUT_S:.0f} s ({service.ready_url})")

    async def serve(self, app: web.Application, port: int) -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()
        self.runners.append(runner)

    async def start(self, relay_cfg: Path, transceivers: list[tuple[Path, int]]) -> None:
        s = self.settings
        relay = Service("relay", ["relay", "--config", str(relay_cfg), "--ephemeral"],
                        f"http://{HOST}:{s.admin_port}/readyz")
        self.services.append(relay)
        self.spawn(relay)
        await self.wait_ready(relay)
        started = []
        for index, (config, port) in enumerate(transceivers):
            service = Service(f"transceiver {index}", ["transceiver", "--config", str(config)],
                              f"http://{HOST}:{port}/readyz")
            self.services.append(service)
            self.spawn(service)
            started.append(service)
        await asyncio.gather(*(self.wait_ready(service) for service in started))
        from cli.demo_page import make_demo_app

        self.front = SignallingFront([f"http://{HOST}:{port}" for _, port in transceivers])
        await self.serve(self.front.app(), s.signalling_port)
        await self.serve(make_demo_app(f"http://{HOST}:{s.signalling_port}/v1/sessions", f"{HOST}:{s.relay_port}"),
                         s.http_port)

    def banner(self) -> str:
        s = self.settings
        transceivers = ", ".join(svc.ready_url.removesuffix("/readyz") for svc in self.services[1:])
        return (
            "\nrtcrelay demo is up:\n"
            f"  call page      http://{HOST}:{s.http_port}/\n"
            f"  relay (UDP)    {HOST}:{s.relay_port}   {s.workers} workers, metrics http://{HOST}:{s.admin_port}/metrics\n"
            f"  signalling     http://{HOST}:{s.signalling_port}/v1/sessions   (front for {s.transceivers} "
            f"transceivers: {transceivers})\n"
            f"  inspect        rtcrelay flows watch --name {s.name}\n"
            "Ctrl-C stops everything.\n"
        )

    def check(self, now: float) -> None:
        """One supervision pass: restart what died, after its back-off."""
        for service in self.services:
            process = service.process
            if service.restart_at is not None:
                if now >= service.restart_at:
                    service.restarts += 1
                    log.warning("%s: starting it again (restart %d)", service.name, service.restarts)
                    self.spawn(service)
                continue
            if process is None or process.poll() is None:
                continue
            if now - service.started >= HEALTHY_AFTER_S:
                service.backoff = RESTART_MIN_S
            log.error("%s exited with %d: restarting it in %.1f s (the others go on)",
                      service.name, process.returncode, service.backoff)
            service.restart_at = now + service.backoff
            service.backoff = min(RESTART_MAX_S, service.backoff * 2)

    async def watch(self, stop: asyncio.Event) -> int:
        """Supervise until a signal (exit 0)."""
        while not stop.is_set():
            self.check(time.monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
        return 0

    async def stop(self) -> None:
        # The transceivers first (they close their sessions at the relay), together; the relay last.
        async def stop_one(service: Service) -> None:
            process = service.process
            if process is None or process.poll() is not None:
                return
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 10)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within 10 s: killing it", service.name)
                process.kill()
                await asyncio.to_thread(process.wait)

        await asyncio.gather(*(stop_one(s) for s in self.services[1:]))
        for service in self.services[:1]:
            await stop_one(service)
        for runner in self.runners:
            await runner.cleanup()
        if self.front is not None:
            await self.front.close()


async def _run(settings: DemoSettings, workdir: Path) -> int:
    _keys, relay_cfg, transceivers = write_configs(settings, workdir)
    demo = Demo(settings, workdir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await demo.start(relay_cfg, transceivers)
        print(demo.banner(), flush=True)
        return await demo.watch(stop)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        await demo.stop()


def run_demo(settings: DemoSettings) -> int:
    check_ports(settings)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="rtcrelay-demo-") as tmp:
        os.chmod(tmp, 0o700)
        return uvloop.run(_run(settings, Path(tmp)))
