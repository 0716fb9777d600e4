"""The container image built and run by a real engine (podman).

tests/test_deploy_container.py reads the Containerfile and replays its steps without an engine;
here the image is built and its containers run:

- ``podman build --format docker`` (docker format: OCI drops HEALTHCHECK) of the Containerfile
  with ``BASE_IMAGE`` = a base made from Debian packages by scripts/container-base.sh (no
  registry is reachable here; $RTCRELAY_CONTAINER_BASE names another, e.g. python:3.11-slim),
  this machine's pip settings and CA bundle as build secrets. Layers are cached between runs:
  a run with unchanged sources rebuilds nothing, a source change rebuilds the last builder
  step and the final stage only.
- the image as built: non-root, HEALTHCHECK kept, the C hit path compiled, no compiler and
  no pip settings left in it.
- a relay container and a transceiver container as docs/DEPLOYMENT.md runs them (host network,
  loopback addresses only, route keys and WHIP token keys as podman secrets), each passing its
  HEALTHCHECK (``podman healthcheck run``: no systemd here to schedule it), a stock aiortc call
  through both (data channel echo, with a bearer token; 401 without), then ``podman stop``
  (SIGTERM) and exit code 0.

podman reads $CONTAINERS_CONF, scripts/containers.conf when unset (why: that file). Skipped only
where podman is not installed (scripts/test installs it: scripts/container-deps.sh).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTAINERFILE = REPO / "Containerfile"
IMAGE = "localhost/rtcrelay-test:latest"
PODMAN = shutil.which("podman")
ENV = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF") or str(REPO / "scripts" / "containers.conf")}

pytestmark = [
    pytest.mark.skipif(PODMAN is None,
                       reason="no container engine: podman is not installed (scripts/test installs it, scripts/container-deps.sh)"),
    # A cold build (no cached layers: the base from mmdebstrap, apt, every dependency from the
    # index) takes about 2.5 minutes on 2 busy cores; a warm one seconds.
    pytest.mark.timeout(1500),
]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert PODMAN is not None
    result = subprocess.run([PODMAN, *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}: exit {result.returncode}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the build --------------------------------------------------------------------------------


def pip_build_secrets(work: Path) -> list[str]:
    """``--secret`` flags giving the build this machine's pip settings, never baked into a layer.

    The index settings pip uses here (web URLs only: a file:// index or a local path does not
    exist inside the build) go into a pip.conf (secret ``pip-conf``, the builder's
    PIP_CONFIG_FILE), and the CA bundle pip trusts (a proxy's CA may be in it) into ``pip-cert``.
    """
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60).stdout
    settings: dict[str, str] = {}
    for from_env in (False, True):  # pip's precedence: the environment over the files
        for line in listed.splitlines():
            match = re.match(r"^([^.]*)\.([\w-]+)='(.*)'$", line)
            if match and (match.group(1) == ":env:") == from_env:
                settings[match.group(2)] = match.group(3)
    lines = ["[global]"]
    for key in ("index-url", "extra-index-url", "trusted-host", "proxy", "timeout", "default-timeout", "retries"):
        value = settings.get(key, "")
        if key.endswith("index-url"):
            value = " ".join(url for url in value.split() if url.startswith(("http://", "https://")))
        if value:
            lines.append(f"{key} = {value}")
    flags = []
    cert = next((c for c in (settings.get("cert"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt")
                 if c and Path(c).is_file()), None)
    if cert:
        lines.append("cert = /run/secrets/pip-cert")
        flags += ["--secret", f"id=pip-cert,src={cert}"]
    conf = work / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    return ["--secret", f"id=pip-conf,src={conf}", *flags]


def image_id(ref: str) -> str | None:
    result = podman("image", "inspect", "--format", "{{.Id}}", ref, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    work = tmp_path_factory.mktemp("container")
    base = os.environ.get("RTCRELAY_CONTAINER_BASE")
    if not base:
        made = subprocess.run([str(REPO / "scripts" / "container-base.sh")], capture_output=True, text=True, env=ENV, timeout=900)
        assert made.returncode == 0, f"scripts/container-base.sh:\n{made.stderr[-3000:]}"
        base = made.stdout.strip()
    previous = image_id(IMAGE)
    log = work / "build.log"
    started = time.monotonic()
    with open(log, "w") as out:
        build = subprocess.run([str(PODMAN), "build", "--format", "docker", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
                                *pip_build_secrets(work), "-t", IMAGE, "-f", str(CONTAINERFILE), str(REPO)],
                               stdout=out, stderr=subprocess.STDOUT, env=ENV, timeout=1200)
    text = log.read_text()
    assert build.returncode == 0, f"podman build: exit {build.returncode}\n{text[-5000:]}"
    print(f"podman build ({base}): {time.monotonic() - started:.0f} s, {text.count('Using cache')} cached steps")
    current = image_id(IMAGE)
    assert current
    if previous and previous != current:
        # The last build's image, now untagged: its venv layer is ~290 MB; drop it (only if no
        # container uses it) so that runs do not pile them up.
        podman("rmi", previous, check=False)
    return IMAGE


def test_the_image_as_built(image: str) -> None:
    [info] = json.loads(podman("image", "inspect", image).stdout)
    config = info["Config"]
    assert config["User"] == "10001:10001", config
    assert config["Entrypoint"] == ["rtcrelay"], config
    assert config.get("StopSignal") == "SIGTERM", config
    health = info.get("Healthcheck") or config.get("Healthcheck") or {}
    assert "RTCRELAY_HEALTH_URL" in " ".join(health.get("Test", [])), f"HEALTHCHECK lost (built without --format docker?): {info}"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert not [key for key in env if key.startswith("PIP_")], f"build-time pip settings in the image: {env}"
    assert env["CREDENTIALS_DIRECTORY"] == "/run/secrets"
    probe = ("import json, os, shutil, relay._hitpath as h; print(json.dumps({'uid': os.getuid(), 'hitpath': h.__file__, "
             "'compilers': [c for c in ('gcc', 'cc', 'x86_64-linux-gnu-gcc-12') if shutil.which(c)], "
             "'pip_conf': [p for p in ('/etc/pip.conf', '/run/secrets/pip-conf', '/run/secrets/pip-cert') if os.path.exists(p)], "
             "'configs': sorted(os.listdir('/etc/rtcrelay'))}))")
    result = podman("run", "--rm", "--network", "none", "--entrypoint", "python", image, "-I", "-c", probe)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["uid"] == 10001, seen
    assert seen["hitpath"].startswith("/opt/rtcrelay/lib/python3.11/site-packages/relay/_hitpath."), seen
    assert seen["compilers"] == [] and seen["pip_conf"] == [], seen
    assert seen["configs"] == ["relay.toml", "transceiver.toml"], seen
    version = podman("run", "--rm", "--network", "none", image, "--version")
    assert version.stdout.startswith("rtcrelay "), version
    sizes = podman("images", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}").stdout
    print(sizes)


# -- relay and transceiver containers -----------------------------------------------------------


class Containers:
    """Containers and secrets this test made, by name; removed at the end (and only those)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.containers: list[str] = []
        self.secrets: list[str] = []

    def secret(self, name: str, path: Path) -> str:
        full = f"{self.prefix}-{name}"
        podman("secret", "create", full, str(path))
        self.secrets.append(full)
        return f"{full},target={name}"

    def run(self, name: str, *args: str) -> str:
        full = f"{self.prefix}-{name}"
        self.containers.append(full)
        podman("run", "-d", "--name", full, *args)
        return full

    def state(self, name: str) -> dict:
        return json.loads(podman("inspect", "--format", "{{json .State}}", name).stdout)

    def logs(self, name: str) -> str:
        result = podman("logs", name, check=False)
        return result.stdout + result.stderr

    def wait_healthy(self, name: str, timeout: float = 60) -> None:
        """The image's HEALTHCHECK, run by podman in the container, until it passes."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(name)
            assert state["Running"], f"{name} exited ({state.get('ExitCode')}):\n{self.logs(name)}"
            check = podman("healthcheck", "run", name, check=False)
            if check.returncode == 0:
                break
            assert time.monotonic() < deadline, f"{name}: HEALTHCHECK never passed: {check.stdout}{check.stderr}\n{self.logs(name)}"
            time.sleep(0.5)
        health = self.state(name).get("Health") or self.state(name).get("Healthcheck") or {}
        assert health.get("Status") == "healthy", health

    def stop(self, name: str, timeout: int) -> int:
        """``podman stop``: the image's STOPSIGNAL (SIGTERM), SIGKILL after ``timeout`` s."""
        podman("stop", "-t", str(timeout), name, timeout=timeout + 30)
        state = self.state(name)
        assert not state["Running"], state
        return state["ExitCode"]

    def remove(self) -> None:
        for name in self.containers:
            podman("rm", "-f", "-t", "0", name, check=False)
        for name in self.secrets:
            podman("secret", "rm", name, check=False)


@pytest.fixture
def containers() -> Iterator[Containers]:
    made = Containers("rtcrelay-test-" + uuid.uuid4().hex[:8])
    try:
        yield made
    finally:
        made.remove()


def test_relay_and_transceiver_containers_carry_a_call_and_stop_cleanly(image: str, containers: Containers, tmp_path: Path) -> None:
    import aioice.ice
    from webrtc_peer import bearer_echo_call

    started = time.monotonic()
    c = containers
    # Keys made by the image's own rtcrelay, handed to the containers as podman secrets.
    for name in ("route-keys", "whip-token-keys"):
        (tmp_path / name).write_text(podman("run", "--rm", "--network", "none", image, "keys", "generate").stdout)
    route_keys = c.secret("route-keys", tmp_path / "route-keys")
    whip_keys = c.secret("whip-token-keys", tmp_path / "whip-token-keys")
    token = podman("run", "--rm", "--network", "none", "--secret", whip_keys, image, "whip-token", "issue",
                   "--subject", "container-test", "--keys", "/run/secrets/whip-token-keys").stdout.strip()
    assert token

    # Loopback only: the relay's public port, its admin port and the transceiver's HTTP port.
    public = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    admin = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    http_port = free_port(socket.SOCK_STREAM)
    relay = c.run("relay", "--network", "host", "--shm-size", "256m", "--secret", route_keys,
                  "-e", f"RTCRELAY_RELAY_NAME={c.prefix}", "-e", f"RTCRELAY_RELAY_LISTEN={public}",
                  "-e", f"RTCRELAY_RELAY_ADMIN_LISTEN={admin}", "-e", f"RTCRELAY_HEALTH_URL=http://{admin}/healthz",
                  image, "relay", "--config", "/etc/rtcrelay/relay.toml")
    tx = c.run("tx0", "--network", "host", "--secret", route_keys, "--secret", whip_keys,
               "-e", f"RTCRELAY_TRANSCEIVER_RELAY_PUBLIC_ADDRESSES={public}",
               "-e", f"RTCRELAY_TRANSCEIVER_HTTP_PORT={http_port}",
               "-e", f"RTCRELAY_HEALTH_URL=http://127.0.0.1:{http_port}/healthz",
               image, "transceiver", "--config", "/etc/rtcrelay/transceiver.toml")
    c.wait_healthy(relay)
    c.wait_healthy(tx)
    healthy_after = time.monotonic() - started

    def ready(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    deadline = time.monotonic() + 30
    while not (ready(f"http://{admin}/readyz") and ready(f"http://127.0.0.1:{http_port}/readyz")):
        assert time.monotonic() < deadline, f"not ready:\n{c.logs(relay)}\n{c.logs(tx)}"
        time.sleep(0.2)
    assert "hit path: C (relay._hitpath)" in c.logs(relay), c.logs(relay)

    base = f"http://127.0.0.1:{http_port}"

    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]  # the client gathers on loopback
    try:
        # (the image's transceiver.toml turns WHIP authentication on)
        asyncio.run(asyncio.wait_for(bearer_echo_call(base, token, "hello through the containers",
                                                      lambda: c.logs(tx), public), 60))
    finally:
        aioice.ice.get_host_addresses = original

    # SIGTERM: the transceiver drains (no calls left), the relay stops; both exit 0.
    assert c.stop(tx, timeout=45) == 0, c.logs(tx)
    assert c.stop(relay, timeout=20) == 0, c.logs(relay)
    for name in (relay, tx):
        assert "Traceback" not in c.logs(name), c.logs(name)
    print(f"containers healthy after {healthy_after:.1f} s; whole run {time.monotonic() - started:.1f} s")
