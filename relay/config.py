"""The relay's settings (``/etc/rtcrelay/relay.toml``, ``RTCRELAY_RELAY_*``, flags)."""

from __future__ import annotations

import os

import msgspec

from daemon.config_file import load_config, parse_host_port
from daemon.networks import parse_networks
from relay.cluster_routes import HopTarget, parse_cluster_routes

ENV_PREFIX = "RTCRELAY_RELAY_"
HIT_PATHS = ("auto", "ebpf", "c", "python")
#: renamed keys: the old name is still read, with a warning at start (daemon.config_file)
RENAMED = {"hot_path": "hit_path"}


class RelayConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Instance name: names the shm table and its lock files, so two relays can share a host.
    name: str = "default"
    # Public UDP addresses clients send to ("0.0.0.0:3478", "[::]:3478"); one socket per worker each.
    listen: list[str] = msgspec.field(default_factory=lambda: ["0.0.0.0:3478"])
    # Worker processes; 0 = one per CPU.
    workers: int = 0
    # Where each worker's tunnel socket binds; transceivers must reach it. Port 0: ephemeral,
    # else tunnel_port + worker index.
    tunnel_host: str = "127.0.0.1"
    tunnel_port: int = 0
    # Tunnel frames are accepted only from these networks (the transceivers').
    transceiver_networks: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    route_keys_file: str = ""
    # This relay's cluster (route tokens name the cluster that owns a session). A token of
    # another cluster is forwarded to a relay of that cluster when cluster_routes has one
    # (an edge relay), else dropped (`cluster_no_route`). A token without a cluster id is this
    # relay's own (tokens issued before clusters were set up keep working).
    cluster_id: int | None = None
    # Edge relays: cluster id -> that cluster's relays' hop addresses, "ip:port" or
    # "dns.name:port" (re-resolved every cluster_dns_interval seconds).
    cluster_routes: dict[str, list[str]] = msgspec.field(default_factory=dict)
    cluster_dns_interval: float = 10.0
    # Cluster relays: where edge relays' HopData frames arrive (one SO_REUSEPORT socket per
    # worker each); [] = not a cluster relay. Keep them on the private network.
    hop_listen: list[str] = msgspec.field(default_factory=list)
    # Hop frames (and the answers to an edge's hop frames) are accepted only from these networks.
    peer_networks: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # Relays a session's datagrams may cross after the first (an edge sends hop_limit - 1);
    # a relay never forwards a frame with no hop left, so a misconfigured route cannot loop.
    hop_limit: int = 2
    # The shared route directory (Redis/Valkey; optional): "redis://host:6379/0", "rediss://..."
    # or "unix:///run/redis/redis.sock". Relays publish the flows they learn; a datagram from an
    # unknown 5-tuple that is not a STUN check (a client that another relay served until a
    # failover) is looked up, for at most directory_timeout seconds, and its flow adopted when
    # the entry checks out. "" (default): no directory.
    directory_url: str = ""
    directory_timeout: float = 0.05
    # How old a route token may be when its session is new to the relay (seconds).
    token_max_age: float = 300.0
    table_dir: str = "/dev/shm"
    flow_capacity: int = 65536  # slots per worker partition (power of two)
    session_capacity: int = 65536  # per worker partition (power of two): a session has >= 1 flow
    max_flows_per_session: int = 8
    idle_timeout: float = 30.0  # a little above ICE's consent-freshness window
    heartbeat_timeout: float = 3.0  # a transceiver silent this long loses its flows
    admin_listen: str = "127.0.0.1:9478"  # "" disables the admin HTTP endpoint
    socket_buffer: int = 8 << 20
    batch: int = 128
    # Connected tunnel sockets per worker, one per transceiver (0: only the shared socket).
    tunnel_links: int = 64
    # A warm spare process per worker takes over a crashed worker's partition in milliseconds.
    standby_workers: bool = True
    # How established flows are forwarded: "auto" (the in-kernel eBPF fast path where it loads,
    # relay/kernel_path.py; the workers' C hit path, relay._hitpath, when it was built; else
    # Python), "ebpf" (refuse to start without the kernel path), "c" (refuse to start without
    # the C extension; no kernel path), "python".
    hit_path: str = "auto"
    # The kernel path, between two loopback addresses (a client or transceiver on this host):
    # "in_place" delivers a forwarded datagram where it arrived (fastest; a capture on lo sees
    # the datagram that came in, not the relayed one), "egress" sends it out through lo again
    # (captures see it, as they see what the workers send; more CPU: see README).
    kernel_loopback: str = "in_place"

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError("`name`: use letters, digits, '-' and '_' only")
        if not self.listen:
            raise ValueError("`listen`: at least one address is needed")
        for index, text in enumerate(self.listen):
            parse_host_port(text, f"listen[{index}]")
        if self.workers < 0 or self.workers > 256:
            raise ValueError("`workers`: 0 (one per CPU) to 256")
        parse_host_port(f"{_bracket(self.tunnel_host)}:{self.tunnel_port}", "tunnel_host/tunnel_port")
        parse_networks(self.transceiver_networks, "transceiver_networks")
        if self.admin_listen:
            parse_host_port(self.admin_listen, "admin_listen")
        for key in ("flow_capacity", "session_capacity"):
            value = getattr(self, key)
            if value < 16 or value & (value - 1):
                raise ValueError(f"`{key}`: {value} is not a power of two ≥ 16")
        if not 1 <= self.max_flows_per_session <= 64:
            raise ValueError("`max_flows_per_session`: 1 to 64")
        for key in ("token_max_age", "idle_timeout", "heartbeat_timeout"):
            if getattr(self, key) <= 0:
                raise ValueError(f"`{key}`: must be > 0 seconds")
        if self.cluster_id is not None and not 0 <= self.cluster_id < 65536:
            raise ValueError("`cluster_id`: 0 to 65535")
        self.routes  # noqa: B018 - parses cluster_routes: errors name the entry
        for index, text in enumerate(self.hop_listen):
            parse_host_port(text, f"hop_listen[{index}]")
        parse_networks(self.peer_networks, "peer_networks")
        if not 1 <= self.hop_limit <= 16:
            raise ValueError("`hop_limit`: 1 to 16")
        if self.cluster_dns_interval <= 0:
            raise ValueError("`cluster_dns_interval`: must be > 0 seconds")
        if self.directory_url and not self.directory_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("`directory_url`: redis://host:port/db, rediss://... or unix:///path")
        if not 0 < self.directory_timeout <= 1:
            raise ValueError("`directory_timeout`: > 0 and <= 1 second (a lookup holds a client's datagrams)")
        if not 1 <= self.batch <= 1024:
            raise ValueError("`batch`: 1 to 1024")
        if not 0 <= self.tunnel_links <= 4096:
            raise ValueError("`tunnel_links`: 0 (none) to 4096")
        if self.kernel_loopback not in ("in_place", "egress"):
            raise ValueError(f"`kernel_loopback`: {self.kernel_loopback!r} is not one of in_place, egress")
        if self.hit_path not in HIT_PATHS:
            raise ValueError(f"`hit_path`: {self.hit_path!r} is not one of {', '.join(HIT_PATHS)}")

    @property
    def routes(self) -> dict[int, list[HopTarget]]:
        return parse_cluster_routes(self.cluster_routes)

    @property
    def worker_count(self) -> int:
        # The CPUs this process may run on (affinity, cpusets), not every CPU of the host.
        return self.workers or len(os.sched_getaffinity(0)) or 1

    @property
    def table_path(self) -> str:
        return os.path.join(self.table_dir, f"rtcrelay-{self.name}.table")

    @property
    def stats_path(self) -> str:
        return os.path.join(self.table_dir, f"rtcrelay-{self.name}.stats")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def load_relay_config(path: str | None, overrides: dict | None = None) -> RelayConfig:
    return load_config(RelayConfig, path, env_prefix=ENV_PREFIX, overrides=overrides, renamed=RENAMED)
