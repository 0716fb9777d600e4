"""The transceiver process: configuration, start-up, drain on SIGTERM, systemd notifications.

``run_transceiver(config)`` binds the tunnel socket and the signalling HTTP server, says
``READY=1`` to systemd, and runs until SIGTERM or SIGINT. The first signal drains: no new
sessions (503, /readyz 503), ``Drain`` to the relays, calls end by themselves until
``drain_deadline``, then the rest are closed (``SessionClosed`` each) and the process exits.
A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal

import msgspec
from aiohttp import web

from daemon.config_file import load_config, parse_host_port
from daemon.networks import parse_networks
from daemon.systemd import notify, watchdog_interval
from transceiver import inline_executor
from transceiver.admission import AdmissionLimits, LoadAdmission
from transceiver.bearer import BearerVerifier, load_tokens_file
from transceiver.ice_links import IceServer, link_values
from transceiver.load_monitor import LoadMonitor
from transceiver.pipeline import EchoPipeline, PipelineFactory
from transceiver.session import SessionManager
from transceiver.signalling import make_app
from transceiver.tunnel import TunnelEndpoint, open_tunnel
from wire.route_token import MIN_SECRET_LEN, RouteKeyring

__all__ = ["TransceiverConfig", "Transceiver", "load_transceiver_config", "run_transceiver", "serve"]

log = logging.getLogger("rtcrelay.transceiver")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class TransceiverConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The tunnel socket (private). Port 0: any free port (its real port goes in the tokens).
    # Prefer a specific address: the relay accepts a flow's frames only from the address it
    # sends them to, and a wildcard socket on a multi-homed host may answer from another one.
    tunnel_host: str = "127.0.0.1"
    tunnel_port: int = 0
    # The address relays send tunnel frames to, written into every route token. Default:
    # tunnel_host, which must then be a specific address (not 0.0.0.0 / ::).
    tunnel_advertise_host: str = ""
    # The relay's public address(es) clients reach, "ip:port" / "[ip6]:port": the only ICE
    # candidate of every answer. At most one per address family.
    relay_public_addresses: list[str] = msgspec.field(default_factory=list)
    # Relay tunnel sockets to heartbeat even before they have sent anything (optional: any
    # relay that forwards a frame is heartbeated from then on).
    relay_tunnel_addresses: list[str] = msgspec.field(default_factory=list)
    # Tunnel frames are accepted from these networks only.
    relay_networks: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # Route secrets by key id (TOML/JSON: base64 strings) and the id that signs new tokens.
    # Empty: read them from route_keys_file (or the systemd credential), like the relay.
    route_secrets: dict[int, bytes] = msgspec.field(default_factory=dict)
    route_key_id: int = 1
    route_keys_file: str = ""
    # The cluster this transceiver belongs to (0..65535), written into every route token: edge
    # relays near clients forward its sessions to a relay of this cluster (relay cluster_routes).
    cluster_id: int | None = None
    max_sessions: int = 50  # an upper bound; admission_* refuse earlier when the process is busy
    # WHIP bearer-token authentication (transceiver/bearer.py): on when either is set. Signed
    # tokens verified with the keys in whip_token_keys_file (route-keys format, its own file;
    # the systemd credential `whip-token-keys` when "credential"), and/or static
    # `subject token` lines in whip_tokens_file. A subject holds at most
    # max_sessions_per_subject sessions (0: no limit).
    whip_token_keys_file: str = ""
    whip_tokens_file: str = ""
    max_sessions_per_subject: int = 10
    # ICE servers offered to WHIP clients in Link headers (RFC 9725 section 4.6): TURN for
    # clients that cannot send UDP to the relay. [{urls = ["turn:..."], username, credential}]
    ice_servers: list[IceServer] = msgspec.field(default_factory=list)
    # Admission by load (transceiver/admission.py): a new offer is refused (503, Retry-After)
    # when the process's CPU with one more call would pass admission_cpu_budget (cores), or
    # when its event loop runs admission_max_loop_lag (s) late; 0 turns either check off.
    # admission_call_cpu: the cost of a call (cores) until a few calls are measured.
    admission_cpu_budget: float = 0.8
    admission_max_loop_lag: float = 0.05
    admission_call_cpu: float = 0.03
    connect_timeout: float = 20.0  # offer -> connected, else the watchdog closes the session
    drain_deadline: float = 30.0  # SIGTERM -> remaining calls closed
    # On drain, calls are asked to move at this many per second (all within half the deadline):
    # each move is a new call on another transceiver, and a burst delays everyone's audio there.
    drain_move_rate: float = 20.0
    heartbeat_interval: float = 1.0
    # Encode audio on the event loop instead of aiortc's thread pool (cheaper: see
    # transceiver/inline_executor.py). Turn off for a pipeline that blocks in executors.
    inline_codec_work: bool = True

    def __post_init__(self) -> None:
        parse_host_port(f"{_bracket(self.tunnel_host)}:{self.tunnel_port}", "tunnel_host/tunnel_port")
        advertise = ipaddress.ip_address(self.tunnel_advertise_host or self.tunnel_host)
        if advertise.is_unspecified:
            raise ValueError("`tunnel_advertise_host`: needed when tunnel_host is a wildcard address")
        if not self.relay_public_addresses:
            raise ValueError("`relay_public_addresses`: at least one relay public address (ip:port) is needed")
        families = [ipaddress.ip_address(h).version for h, _ in self.relay_public]
        if len(set(families)) != len(families):
            raise ValueError("`relay_public_addresses`: at most one address per family (IPv4, IPv6)")
        for index, text in enumerate(self.relay_tunnel_addresses):
            parse_host_port(text, f"relay_tunnel_addresses[{index}]")
        parse_networks(self.relay_networks, "relay_networks")
        parse_host_port(f"{_bracket(self.http_host)}:{self.http_port}", "http_host/http_port")
        for key_id, secret in self.route_secrets.items():
            if not 0 <= key_id <= 255 or len(secret) < MIN_SECRET_LEN:
                raise ValueError(f"`route_secrets.{key_id}`: key ids 0..255, secrets of {MIN_SECRET_LEN}+ bytes")
        if self.route_secrets and self.route_key_id not in self.route_secrets:
            raise ValueError(f"`route_key_id`: {self.route_key_id} has no secret in route_secrets")
        if self.max_sessions < 1:
            raise ValueError("`max_sessions`: at least 1")
        if self.cluster_id is not None and not 0 <= self.cluster_id < 65536:
            raise ValueError("`cluster_id`: 0 to 65535")
        if self.max_sessions_per_subject < 0:
            raise ValueError("`max_sessions_per_subject`: >= 0 (0: no limit)")
        for key in ("connect_timeout", "heartbeat_interval"):
            if getattr(self, key) <= 0:
                raise ValueError(f"`{key}`: must be > 0 seconds")
        if self.drain_deadline < 0:
            raise ValueError("`drain_deadline`: must be >= 0 seconds")
        if self.drain_move_rate <= 0:
            raise ValueError("`drain_move_rate`: calls per second, > 0")
        for key in ("admission_cpu_budget", "admission_max_loop_lag"):
            if getattr(self, key) < 0:
                raise ValueError(f"`{key}`: must be >= 0 (0 turns the check off)")
        if not 0 < self.admission_call_cpu <= 1:
            raise ValueError("`admission_call_cpu`: the cores one call costs, > 0 and <= 1")

    def bearer_verifier(self) -> BearerVerifier | None:
        """WHIP authentication as configured (None: off); ConfigError names a bad file."""
        if not self.whip_token_keys_file and not self.whip_tokens_file:
            return None
        from daemon.keys import WHIP_KEYS, load_keyring

        keys = self.whip_token_keys_file
        keyring = load_keyring(None if keys == "credential" else keys, WHIP_KEYS) if keys else None
        static = load_tokens_file(self.whip_tokens_file) if self.whip_tokens_file else {}
        return BearerVerifier(keyring, static)

    def admission_limits(self) -> AdmissionLimits:
        return AdmissionLimits(self.admission_cpu_budget, self.admission_max_loop_lag, self.admission_call_cpu)

    @property
    def relay_public(self) -> list[tuple[str, int]]:
        return [parse_host_port(t, f"relay_public_addresses[{i}]") for i, t in enumerate(self.relay_public_addresses)]

    @property
    def relay_tunnels(self) -> list[tuple[str, int]]:
        return [parse_host_port(t, "relay_tunnel_addresses") for t in self.relay_tunnel_addresses]

    def keyring(self) -> RouteKeyring:
        if self.route_secrets:
            return RouteKeyring(self.route_secrets, self.route_key_id)
        from daemon.keys import load_keyring  # raises ConfigError naming the file

        return load_keyring(self.route_keys_file or None)


ENV_PREFIX = "RTCRELAY_TRANSCEIVER_"


def load_transceiver_config(path: str | None, overrides: dict | None = None) -> TransceiverConfig:
    """TOML file < RTCRELAY_TRANSCEIVER_* environment < ``overrides`` (flags); ConfigError names the key."""
    return load_config(TransceiverConfig, path, env_prefix=ENV_PREFIX, overrides=overrides)


class Transceiver:
    """The running pieces; ``run_transceiver`` drives it, tests use it directly."""

    def __init__(self, config: TransceiverConfig, pipeline_factory: PipelineFactory = EchoPipeline) -> None:
        self.config = config
        self.pipeline_factory = pipeline_factory
        self.tunnel: TunnelEndpoint | None = None
        self.manager: SessionManager | None = None
        self._runner: web.AppRunner | None = None
        self._load_monitor: LoadMonitor | None = None
        self.http_address: tuple[str, int] | None = None

    async def start(self) -> None:
        cfg = self.config
        if cfg.inline_codec_work:
            inline_executor.install(asyncio.get_running_loop())
        keyring = cfg.keyring()
        self.tunnel = await open_tunnel(
            cfg.tunnel_host,
            cfg.tunnel_port,
            allowed_networks=cfg.relay_networks,
            relay_addresses=cfg.relay_tunnels,
            heartbeat_interval=cfg.heartbeat_interval,
        )
        assert self.tunnel.local_address is not None
        advertise = ipaddress.ip_address(cfg.tunnel_advertise_host or cfg.tunnel_host)
        self.manager = SessionManager(
            tunnel=self.tunnel,
            keyring=keyring,
            route_target=(advertise.packed, self.tunnel.local_address[1]),
            relay_public=cfg.relay_public,
            max_sessions=cfg.max_sessions,
            connect_timeout=cfg.connect_timeout,
            pipeline_factory=self.pipeline_factory,
            admission=LoadAdmission(cfg.admission_limits()),
            max_sessions_per_subject=cfg.max_sessions_per_subject,
            cluster_id=cfg.cluster_id,
        )
        assert self.manager.admission is not None
        self._load_monitor = LoadMonitor(self.manager.admission, self.manager.connected_calls)
        self._load_monitor.start()
        verifier = cfg.bearer_verifier()
        app = make_app(self.manager, verifier, link_values(cfg.ice_servers))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.http_host, cfg.http_port)
        await site.start()
        sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
        name = sockets[0].getsockname() if sockets else (cfg.http_host, cfg.http_port)
        self.http_address = (name[0], name[1])
        log.info("transceiver up: http %s, tunnel %s, relay %s, WHIP authentication %s", self.http_address,
                 self.tunnel.local_address, cfg.relay_public_addresses, "on" if verifier else "off")

    async def drain(self) -> None:
        assert self.manager is not None
        log.info("draining: %d sessions, deadline %.0f s", len(self.manager.sessions), self.config.drain_deadline)
        await self.manager.drain(self.config.drain_deadline, self.config.drain_move_rate)

    async def stop(self) -> None:
        if self._load_monitor is not None:
            await self._load_monitor.stop()
        if self.manager is not None:
            self.manager.draining = True
            await self.manager.close_all("shutdown")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.tunnel is not None:
            self.tunnel.close()


async def run_transceiver(config: TransceiverConfig, pipeline_factory: PipelineFactory = EchoPipeline) -> None:
    """Run until SIGTERM/SIGINT, then drain and exit (see the module doc)."""
    loop = asyncio.get_running_loop()
    transceiver = Transceiver(config, pipeline_factory)
    signals = asyncio.Queue[int]()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    watchdog: asyncio.Task[None] | None = None
    try:
        await transceiver.start()
        assert transceiver.http_address is not None
        host, port = transceiver.http_address
        notify(f"READY=1\nSTATUS=accepting sessions on http://{_bracket(host)}:{port}")
        interval = watchdog_interval()
        if interval:
            watchdog = asyncio.create_task(_watchdog(interval))
        signum = await signals.get()
        log.info("%s: draining (again to stop now)", signal.Signals(signum).name)
        notify("STOPPING=1\nSTATUS=draining")
        drain = asyncio.create_task(transceiver.drain())
        second = asyncio.create_task(signals.get())
        await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
        second.cancel()
        if not drain.done():
            log.info("second signal: closing every session now")
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
    finally:
        if watchdog is not None:
            watchdog.cancel()
        await transceiver.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _watchdog(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def serve(config: TransceiverConfig, pipeline_factory: PipelineFactory = EchoPipeline) -> None:
    """Blocking entry point for the CLI: ``run_transceiver`` on uvloop."""
    import uvloop

    uvloop.run(run_transceiver(config, pipeline_factory))
