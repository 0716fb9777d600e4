"""`rtcrelay up`: the relay, a transceiver and the demo call page on 127.0.0.1, in one command.

The two services run as child processes started exactly as an operator would start them
(`rtcrelay relay`, `rtcrelay transceiver`, each with a config file written here), so the demo
exercises the real process model. The demo page is served from this process. Ctrl-C (or
SIGTERM) stops the transceiver (drain), then the relay, then the page; if a service dies,
the others are stopped and the exit code says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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

from daemon.keys import generate_keys_toml, load_keyring

log = logging.getLogger("rtcrelay.up")
HOST = "127.0.0.1"
RTCRELAY = [sys.executable, "-m", "cli.main"]
READY_TIMEOUT_S = 30.0


class PortInUse(Exception):
    pass


@dataclass
class DemoSettings:
    http_port: int = 8080
    relay_port: int = 3478
    signalling_port: int = 8081
    admin_port: int = 9478
    workers: int = 2
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


def toml_lines(values: dict[str, object]) -> str:
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


def write_configs(settings: DemoSettings, workdir: Path) -> tuple[Path, Path, Path]:
    keys = Path(settings.route_keys) if settings.route_keys else workdir / "route-keys.toml"
    if not settings.route_keys:
        keys.write_text(generate_keys_toml())
        keys.chmod(0o600)
    load_keyring(str(keys))  # a bad --route-keys file stops here with its name
    relay_cfg = workdir / "relay.toml"
    relay_cfg.write_text(toml_lines({
        "name": settings.name,
        "listen": [f"{HOST}:{settings.relay_port}"],
        "workers": settings.workers,
        "route_keys_file": str(keys),
        "admin_listen": f"{HOST}:{settings.admin_port}",
        "flow_capacity": 4096,
        "session_capacity": 1024,
    }))
    transceiver_cfg = workdir / "transceiver.toml"
    transceiver_cfg.write_text(toml_lines({
        "tunnel_host": HOST,
        "relay_public_addresses": [f"{HOST}:{settings.relay_port}"],
        "http_host": HOST,
        "http_port": settings.signalling_port,
        "route_keys_file": str(keys),
        "drain_deadline": 2.0,
    }))
    return keys, relay_cfg, transceiver_cfg


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Demo:
    def __init__(self, settings: DemoSettings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.runner: web.AppRunner | None = None

    def start_child(self, name: str, args: list[str]) -> None:
        verbose = ["-v"] if self.settings.verbose else []
        self.children[name] = subprocess.Popen(RTCRELAY + args + verbose)

    async def wait_ready(self, name: str, url: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.children[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.children[name].returncode} during start-up")
            if await asyncio.to_thread(http_ok, url):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{name} not ready after {READY_TIMEOUT_S:.0f} s ({url})")

    async def start(self, relay_cfg: Path, transceiver_cfg: Path) -> None:
        s = self.settings
        self.start_child("relay", ["relay", "--config", str(relay_cfg), "--ephemeral"])
        await self.wait_ready("relay", f"http://{HOST}:{s.admin_port}/readyz")
        self.start_child("transceiver", ["transceiver", "--config", str(transceiver_cfg)])
        await self.wait_ready("transceiver", f"http://{HOST}:{s.signalling_port}/readyz")
        from cli.demo_page import make_demo_app

        app = make_demo_app(f"http://{HOST}:{s.signalling_port}/v1/sessions", f"{HOST}:{s.relay_port}")
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, HOST, s.http_port).start()

    def banner(self) -> str:
        s = self.settings
        return (
            "\nrtcrelay demo is up:\n"
            f"  call page      http://{HOST}:{s.http_port}/\n"
            f"  relay (UDP)    {HOST}:{s.relay_port}   {s.workers} workers, metrics http://{HOST}:{s.admin_port}/metrics\n"
            f"  signalling     http://{HOST}:{s.signalling_port}/v1/sessions\n"
            f"  inspect        rtcrelay flows watch --name {s.name}\n"
            "Ctrl-C stops everything.\n"
        )

    async def watch(self, stop: asyncio.Event) -> int:
        """Until a signal (exit 0) or a service dying on its own (exit 1)."""
        while not stop.is_set():
            for name, child in self.children.items():
                if child.poll() is not None:
                    log.error("%s exited with %d: stopping the demo", name, child.returncode)
                    return 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        return 0

    async def stop(self) -> None:
        for name in ("transceiver", "relay"):  # the transceiver first: it closes its sessions at the relay
            child = self.children.get(name)
            if child is None or child.poll() is not None:
                continue
            child.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(child.wait, 10)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within 10 s: killing it", name)
                child.kill()
                await asyncio.to_thread(child.wait)
        if self.runner is not None:
            await self.runner.cleanup()


async def _run(settings: DemoSettings, workdir: Path) -> int:
    _keys, relay_cfg, transceiver_cfg = write_configs(settings, workdir)
    demo = Demo(settings, workdir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await demo.start(relay_cfg, transceiver_cfg)
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
