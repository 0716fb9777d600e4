"""Network namespaces for end-to-end tests: a client, the relay and a transceiver, joined only
through the relay (tests/test_netns.py, tests/test_nat_rebinding.py).

::

    [client ns]  10.250.1.1 --veth-- 10.250.1.2  [relay ns]  10.250.2.2 --veth-- 10.250.2.1  [transceiver ns]

The namespaces, veth pairs and addresses exist only inside the namespaces the fixture makes
(deleted at the end, even on failure). The relay namespace does not forward IP (ip_forward 0),
the client knows only its /24 and the transceiver has no route at all to the client's network.
Where ``ip netns`` is not permitted, the fixture fails saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from relayproc import RelayProcess, wait_for

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

CLIENT_IP = "10.250.1.1"
RELAY_PUBLIC_IP = "10.250.1.2"
RELAY_TUNNEL_IP = "10.250.2.2"
TRANSCEIVER_IP = "10.250.2.1"
RELAY_PORT = 3478
SIGNALLING = "127.0.0.1:8080"  # the transceiver namespace's own loopback


def run(args: list[str], timeout: float = 20, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check, **kwargs)  # type: ignore[call-overload]


@dataclass
class Topology:
    client: str
    relay: str
    transceiver: str
    made: list[str] = field(default_factory=list)

    def exec(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


def require_netns() -> None:
    if shutil.which("ip") is None:
        pytest.fail("the `ip` command (iproute2) is missing: this test needs `ip netns`")
    probe = f"rtcr-probe-{uuid.uuid4().hex[:6]}"
    made = run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        pytest.fail(f"`ip netns add` is not permitted here (needs root / CAP_SYS_ADMIN): {made.stderr.strip()}")
    run(["ip", "netns", "del", probe], check=False)


@contextlib.contextmanager
def chain(roles: list[str], links: list[tuple[str, str, str, str]]) -> Iterator[dict[str, str]]:
    """Namespaces by role (role -> namespace name), joined by veth pairs made inside them:
    ``links`` are (role a, address a, role b, address b), each address a /24. No namespace
    forwards IP; nothing touches the host's own network namespace. Deleted at the end."""
    require_netns()
    tag = uuid.uuid4().hex[:6]
    names = {role: f"rtcr-{tag}-{i}{role[:3]}" for i, role in enumerate(roles)}
    made: list[str] = []
    try:
        for ns in names.values():
            run(["ip", "netns", "add", ns])
            made.append(ns)
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                 "net.ipv4.ip_forward=0"])
        for n, (role_a, addr_a, role_b, addr_b) in enumerate(links):
            dev_a, dev_b = f"v{n}a{tag}", f"v{n}b{tag}"
            run(["ip", "-n", names[role_a], "link", "add", dev_a, "type", "veth", "peer", "name", dev_b,
                 "netns", names[role_b]])
            for role, dev, addr in ((role_a, dev_a, addr_a), (role_b, dev_b, addr_b)):
                run(["ip", "-n", names[role], "addr", "add", f"{addr}/24", "dev", dev])
                run(["ip", "-n", names[role], "link", "set", dev, "up"])
        yield names
    finally:
        for ns in made:
            run(["ip", "netns", "del", ns], check=False)
        leftover = run(["ip", "netns", "list"], check=False).stdout
        assert not any(ns in leftover for ns in made), f"namespaces left behind: {leftover}"


@pytest.fixture
def topology() -> Iterator[Topology]:
    with chain(["client", "relay", "transceiver"],
               [("client", CLIENT_IP, "relay", RELAY_PUBLIC_IP),
                ("relay", RELAY_TUNNEL_IP, "transceiver", TRANSCEIVER_IP)]) as names:
        yield Topology(names["client"], names["relay"], names["transceiver"], list(names.values()))


def netns_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}


def start_transceiver(topo: Topology, relay: RelayProcess, tmp_path: Path, namespace: str | None = None,
                      **overrides: object) -> tuple[subprocess.Popen[bytes], Path]:
    """`rtcrelay transceiver` in the topology's transceiver namespace (or ``namespace``), with
    the relay's keys; ``overrides``: config keys of its own."""
    config = tmp_path / "transceiver.toml"
    settings = {
        "tunnel_host": TRANSCEIVER_IP,
        "tunnel_advertise_host": TRANSCEIVER_IP,
        "relay_public_addresses": [f"{RELAY_PUBLIC_IP}:{RELAY_PORT}"],
        "relay_networks": ["10.250.2.0/24"],
        "http_host": SIGNALLING.split(":")[0],
        "http_port": int(SIGNALLING.split(":")[1]),
        "route_keys_file": str(relay.keys_path),
        **overrides,
    }
    config.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items()) + "\n")
    log_path = tmp_path / "transceiver.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(topo.exec(namespace or topo.transceiver) + [sys.executable, "-c", "from cli.main import app; app()",
                                "transceiver", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                env=netns_env(), cwd=ROOT, start_new_session=True)
    return proc, log_path


# The start of a client script run in the client namespace: `connected()` prints the offer,
# reads {"answer": ...} from stdin and returns the connected client and the loop.
CLIENT_PROLOGUE = r"""
import asyncio, json, sys, time
from webrtc_peer import Client, wait_for

async def connected():
    client = Client()
    print(json.dumps({"offer": await client.offer()}), flush=True)
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    await client.accept(json.loads(line)["answer"])
    await wait_for(lambda: client.pc.connectionState == "connected", 25, "the call to connect")
    return client, loop
"""

POST_OFFER = r"""
import sys, urllib.request
req = urllib.request.Request("http://" + sys.argv[1] + "/v1/sessions", data=sys.stdin.buffer.read(),
                             headers={"Content-Type": "application/sdp"}, method="POST")
with urllib.request.urlopen(req, timeout=15) as resp:
    sys.stdout.write(resp.read().decode())
"""


def wait_relay(relay: RelayProcess, where: str) -> None:
    """Until every worker of ``relay`` (started with wait=False) serves."""
    def ready() -> bool:
        if relay.proc.poll() is not None:
            raise AssertionError(f"relay exited with {relay.proc.returncode}:\n{relay.log()}")
        try:
            rows = relay.rows()
        except (OSError, ValueError):
            return False
        return len(rows) == relay.workers and all(r["ready"] == 1 and r["pid"] for r in rows)

    wait_for(ready, 20, f"the relay in {where}")


def wait_transceiver(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"transceiver exited with {proc.returncode}:\n{log_path.read_text()}")
        return "transceiver up" in log_path.read_text(errors="replace")

    wait_for(up, 20, "the transceiver in its namespace")


@dataclass
class ClientCall:
    """A client script (CLIENT_PROLOGUE + its main) in the client namespace, its offer POSTed
    from the transceiver's namespace (signalling out of band), the answer handed back."""

    client_ns: list[str]
    transceiver_ns: list[str]
    script: str
    diagnostics: Callable[[], str] = lambda: ""
    proc: subprocess.Popen[str] | None = None

    def start(self) -> tuple[str, str]:
        """Run it: (its offer, the transceiver's answer)."""
        self.proc = subprocess.Popen(self.client_ns + [sys.executable, "-c", self.script], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=netns_env(),
                                     cwd=ROOT, start_new_session=True)
        offer = json.loads(self.line("no offer"))["offer"]
        answer = run(self.transceiver_ns + [sys.executable, "-c", POST_OFFER, SIGNALLING], input=offer, timeout=30).stdout
        self.say(json.dumps({"answer": answer}))
        return offer, answer

    def line(self, what: str) -> str:
        """The script's next line (bounded by its own timeout), or AssertionError with its stderr."""
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            stop(self.proc)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"client: {what}\n{err[-4000:]}\n{self.diagnostics()}")
        return line

    def say(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        assert self.proc is not None
        self.say("bye")
        self.proc.communicate(timeout=30)
        return self.proc.returncode


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
