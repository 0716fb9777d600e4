"""A call survives its client's NAT moving it to a new source port (the kernel's own NAT).

The client's namespace masquerades its traffic to the relay with nftables, to a random port
(``masquerade to :20000-60000 random``). Four seconds into a call the test flushes the
namespace's conntrack table: the client's next datagram gets a new mapping, a new source
port, exactly what a home router does when its UDP mapping times out or it reboots, and what
a phone's carrier NAT does on a handover. Datagrams to the old port are dropped by the NAT.

Before the fix, the relay learned the new 5-tuple but the transceiver went on sending to the
old one: a one-way call, for ever. Now the transceiver follows the client's authenticated
check from the new address (transceiver/path_moves.py) and the call goes on: measured here
as the longest silence of the echoed audio and the data-channel echo rate after the move.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from netns import (
    CLIENT_PROLOGUE,
    POST_OFFER,
    RELAY_PORT,
    RELAY_PUBLIC_IP,
    RELAY_TUNNEL_IP,
    ROOT,
    SIGNALLING,
    Topology,
    netns_env,
    run,
    start_transceiver,
    stop,
)
from relayproc import cleanup_relay, metric_sum, start_relay, wait_for

CALL_BEFORE_S = 4.0
CALL_AFTER_S = 14.0
CONSENT_INTERVAL_S = 5.0  # aioice's checks: every 4-6 s (0.8-1.2 x 5 s)

CLIENT_SCRIPT = CLIENT_PROLOGUE + r"""
async def main():
    client, loop = await connected()
    await client.roundtrip("first", timeout=10)
    await client.hears_echo(timeout=15)
    echoes = []

    async def ping():
        for i in range(10_000):
            client.dc.send(f"ping {i}")
            await asyncio.sleep(0.1)

    async def collect():
        while True:
            await client.messages.get()
            echoes.append(time.monotonic())

    tasks = [asyncio.ensure_future(ping()), asyncio.ensure_future(collect())]
    start = time.monotonic()
    await asyncio.sleep(BEFORE)
    print(json.dumps({"rebind": True, "ufrag": client.server_ufrag}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # the test moved the NAT mapping
    moved = time.monotonic()
    await asyncio.sleep(AFTER)
    end = time.monotonic()

    def rate(times, a, b):
        return sum(1 for t in times if a <= t <= b) / (b - a)

    after = [t for t in echoes if t > moved]
    print(json.dumps({
        "echo_rate_before": rate(echoes, start, moved),
        "audio_rate_before": rate(client.arrivals, start, moved),
        "echo_rate_end": rate(echoes, end - 5, end),
        "audio_rate_end": rate(client.arrivals, end - 5, end),
        "audio_gap_s": client.longest_gap(moved, end),
        "first_echo_after_s": (after[0] - moved) if after else None,
        "state": client.pc.connectionState,
    }), flush=True)
    for task in tasks:
        task.cancel()
    await loop.run_in_executor(None, sys.stdin.readline)  # the test looks at the relay meanwhile
    await client.close()

asyncio.run(asyncio.wait_for(main(), 90))
""".replace("BEFORE", str(CALL_BEFORE_S)).replace("AFTER", str(CALL_AFTER_S))


def masquerade(topo: Topology) -> None:
    """The client namespace's NAT: its traffic to the relay leaves from a random port."""
    dev = run(["ip", "-n", topo.client, "-o", "link", "show", "type", "veth"]).stdout.split(":")[1].strip().split("@")[0]
    nft = topo.exec(topo.client) + ["nft"]
    run(nft + ["add", "table", "ip", "rtcnat"])
    run(nft + ["add", "chain", "ip", "rtcnat", "post", "{ type nat hook postrouting priority srcnat; }"])
    run(nft + ["add", "rule", "ip", "rtcnat", "post", "oifname", dev, "udp", "dport", str(RELAY_PORT),
               "masquerade", "to", ":20000-60000", "random"])


def client_ports(topo: Topology) -> set[int]:
    """The NAT's current source ports towards the relay (conntrack's reply direction)."""
    out = run(topo.exec(topo.client) + ["conntrack", "-L", "-p", "udp", "--dport", str(RELAY_PORT)], check=False).stdout
    ports = set()
    for line in out.splitlines():
        fields = [f for f in line.split() if f.startswith("dport=")]
        if len(fields) == 2:  # original dport (the relay), reply dport (the mapped port)
            ports.add(int(fields[1].split("=")[1]))
    return ports


def test_call_survives_a_nat_rebinding(topology: Topology, tmp_path: Path) -> None:
    topo = topology
    relay = transceiver = client = None
    try:
        masquerade(topo)
        relay = start_relay(tmp_path, workers=2, prefix=topo.exec(topo.relay), wait=False, port=RELAY_PORT, config={
            "listen": [f"{RELAY_PUBLIC_IP}:{RELAY_PORT}"], "tunnel_host": RELAY_TUNNEL_IP,
            "transceiver_networks": ["10.250.2.0/24"], "admin_listen": "127.0.0.1:9478", "heartbeat_timeout": 5.0})
        wait_for(lambda: relay.proc.poll() is None and _relay_ready(relay), 20, "the relay in its namespace")
        transceiver, tx_log = start_transceiver(topo, relay, tmp_path)
        wait_for(lambda: "transceiver up" in tx_log.read_text(errors="replace"), 20, "the transceiver")

        client = subprocess.Popen(topo.exec(topo.client) + [sys.executable, "-c", CLIENT_SCRIPT], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=netns_env(), cwd=ROOT,
                                  start_new_session=True)
        assert client.stdin is not None and client.stdout is not None

        def read_line(what: str) -> dict:
            line = client.stdout.readline()  # bounded by the client's own 90 s timeout
            if not line:
                stop(client)
                raise AssertionError(f"client: {what}\n{client.stderr.read()[-4000:]}\n"
                                     f"transceiver:\n{tx_log.read_text()[-3000:]}")
            return json.loads(line)

        offer = read_line("no offer")["offer"]
        answer = run(topo.exec(topo.transceiver) + [sys.executable, "-c", POST_OFFER, SIGNALLING], input=offer,
                     timeout=30).stdout
        client.stdin.write(json.dumps({"answer": answer}) + "\n")
        client.stdin.flush()
        ufrag = read_line("the call did not start")["ufrag"]
        before = client_ports(topo)
        assert len(before) == 1, before
        run(topo.exec(topo.client) + ["conntrack", "-F"])  # the NAT forgets: the next datagram gets a new port
        client.stdin.write("moved\n")
        client.stdin.flush()
        result = read_line("the call did not finish")
        after = client_ports(topo)
        assert after and after.isdisjoint(before), (before, after)  # the client really moved
        new_port = after.pop()

        # The relay learned the new 5-tuple for the session (the old flow idles out).
        flows = [(f.client_port, f.ufrag.decode()) for f in relay.table_flows()]
        assert (new_port, ufrag) in flows, flows
        # Both directions flow again, at the rates of before the move.
        assert result["state"] == "connected", result
        assert result["audio_rate_before"] > 40 and result["echo_rate_before"] > 7, result
        assert result["audio_rate_end"] > 40, result
        assert result["echo_rate_end"] > 7, result
        # Within one consent interval of the move (the client's next check), plus a second.
        assert result["audio_gap_s"] < 1.2 * CONSENT_INTERVAL_S + 1.0, result
        metrics = _get(f"http://{SIGNALLING}/metrics", topo)
        assert metric_sum(metrics, "rtcrelay_transceiver_path_moves_total") == 1, metrics
        client.stdin.write("bye\n")
        client.stdin.flush()
        print("\nFIGURES nat_rebinding: " + json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                                         for k, v in result.items()}))
    finally:
        stop(client)
        stop(transceiver)
        if relay is not None:
            cleanup_relay(relay)


def _relay_ready(relay) -> bool:
    try:
        rows = relay.rows()
    except (OSError, ValueError):
        return False
    return len(rows) == 2 and all(r["ready"] == 1 and r["pid"] for r in rows)


GET = r"""
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as resp:
    sys.stdout.write(resp.read().decode())
"""


def _get(url: str, topo: Topology) -> str:
    return run(topo.exec(topo.transceiver) + [sys.executable, "-c", GET, url]).stdout
