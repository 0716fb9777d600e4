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

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from relayproc import RelayProcess

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


@pytest.fixture
def topology() -> Iterator[Topology]:
    require_netns()
    tag = uuid.uuid4().hex[:6]
    topo = Topology(f"rtcr-{tag}-cli", f"rtcr-{tag}-rly", f"rtcr-{tag}-trx")
    try:
        for ns in (topo.client, topo.relay, topo.transceiver):
            run(["ip", "netns", "add", ns])
            topo.made.append(ns)
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(topo.exec(ns) + ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv4.ip_forward=0"])
        # veth pairs made inside the namespaces: nothing touches the host's own network namespace
        run(["ip", "-n", topo.client, "link", "add", f"vc{tag}", "type", "veth", "peer", "name", f"vrc{tag}", "netns", topo.relay])
        run(["ip", "-n", topo.relay, "link", "add", f"vrt{tag}", "type", "veth", "peer", "name", f"vt{tag}", "netns", topo.transceiver])
        for ns, dev, addr in ((topo.client, f"vc{tag}", CLIENT_IP), (topo.relay, f"vrc{tag}", RELAY_PUBLIC_IP),
                              (topo.relay, f"vrt{tag}", RELAY_TUNNEL_IP), (topo.transceiver, f"vt{tag}", TRANSCEIVER_IP)):
            run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
        yield topo
    finally:
        for ns in topo.made:
            run(["ip", "netns", "del", ns], check=False)
        leftover = run(["ip", "netns", "list"], check=False).stdout
        assert not any(ns in leftover for ns in topo.made), f"namespaces left behind: {leftover}"


def netns_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}


def start_transceiver(topo: Topology, relay: RelayProcess, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    config = tmp_path / "transceiver.toml"
    settings = {
        "tunnel_host": TRANSCEIVER_IP,
        "tunnel_advertise_host": TRANSCEIVER_IP,
        "relay_public_addresses": [f"{RELAY_PUBLIC_IP}:{RELAY_PORT}"],
        "relay_networks": ["10.250.2.0/24"],
        "http_host": SIGNALLING.split(":")[0],
        "http_port": int(SIGNALLING.split(":")[1]),
        "route_keys_file": str(relay.keys_path),
    }
    config.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items()) + "\n")
    log_path = tmp_path / "transceiver.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(topo.exec(topo.transceiver) + [sys.executable, "-c", "from cli.main import app; app()",
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


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
