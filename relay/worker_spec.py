"""What the supervisor tells a worker process it starts: its index, config and inherited fds."""

from __future__ import annotations

import msgspec

from relay.config import RelayConfig
from relay.kernel_path import KernelMapFds


class PublicSocket(msgspec.Struct, array_like=True):
    fd: int
    host: str
    port: int


class WorkerSpec(msgspec.Struct):
    index: int
    config: RelayConfig
    public: list[PublicSocket]
    tunnel_fd: int
    supervisor_pid: int
    go_fd: int | None = None  # a standby's socketpair end: say ready, wait for "go" before taking over
    hop: list[PublicSocket] = msgspec.field(default_factory=list)  # hop_listen sockets (a cluster relay)
    kernel: KernelMapFds | None = None  # the kernel fast path's maps, when it serves


def encode_spec(spec: WorkerSpec) -> str:
    return msgspec.json.encode(spec).decode()


def decode_spec(text: str) -> WorkerSpec:
    return msgspec.json.decode(text, type=WorkerSpec)
