"""A whole aiortc call across three network namespaces, where only the relay connects the two sides.

::

    [client ns]  10.250.1.1 --veth-- 10.250.1.2  [relay ns]  10.250.2.2 --veth-- 10.250.2.1  [transceiver ns]
                 (stock aiortc)       public :3478  (rtcrelay relay,  tunnel           (rtcrelay transceiver,
                                                     2 workers)                         tunnel + HTTP)

(tests/netns.py makes the namespaces.) Signalling (the SDP offer and answer) is carried out of
band by the test, as an HTTP POST made inside the transceiver's namespace. Each party is a
subprocess under ``ip netns exec``; every wait is bounded.
"""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

from netns import (
    CLIENT_IP,
    CLIENT_PROLOGUE,
    RELAY_PORT,
    RELAY_PUBLIC_IP,
    RELAY_TUNNEL_IP,
    TRANSCEIVER_IP,
    ClientCall,
    Topology,
    run,
    start_transceiver,
    stop,
    wait_relay,
    wait_transceiver,
)
from relayproc import cleanup_relay, start_relay, wait_for

from shm.layout import ip16

CLIENT_SCRIPT = CLIENT_PROLOGUE + r"""
async def main():
    client, loop = await connected()
    echo = await client.roundtrip("hello across three namespaces", timeout=10)
    level = await client.hears_echo(timeout=15)
    print(json.dumps({"echo": echo, "level": level, "remote": list(client.selected_remote()),
                      "ufrag": client.server_ufrag}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # the test looks at the relay meanwhile
    await client.close()

asyncio.run(asyncio.wait_for(main(), 75))
"""


UNREACHABLE_PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b"x", (sys.argv[1], 9))
except OSError as exc:
    print(exc.errno)
else:
    print("sent")
"""




def test_a_call_works_only_through_the_relay_across_namespaces(topology: Topology, tmp_path: Path) -> None:
    topo = topology
    relay = transceiver = call = None
    try:
        # The isolation this test relies on, checked first.
        route = run(["ip", "-n", topo.transceiver, "route", "get", CLIENT_IP], check=False)
        assert route.returncode != 0 and "unreachable" in route.stderr.lower(), route
        probe = run(topo.exec(topo.transceiver) + [sys.executable, "-c", UNREACHABLE_PROBE, CLIENT_IP])
        assert probe.stdout.strip() == "101", probe  # ENETUNREACH
        assert run(topo.exec(topo.relay) + ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"

        relay = start_relay(tmp_path, workers=2, prefix=topo.exec(topo.relay), wait=False, port=RELAY_PORT, config={
            "listen": [f"{RELAY_PUBLIC_IP}:{RELAY_PORT}"], "tunnel_host": RELAY_TUNNEL_IP,
            "transceiver_networks": ["10.250.2.0/24"], "admin_listen": "127.0.0.1:9478", "heartbeat_timeout": 5.0,
            # the kernel path, routed: each way out through the other veth (bpf_fib_lookup + redirect)
            "hit_path": "ebpf"})

        wait_relay(relay, "its namespace")
        transceiver, tx_log = start_transceiver(topo, relay, tmp_path)
        wait_transceiver(transceiver, tx_log)
        call = ClientCall(topo.exec(topo.client), topo.exec(topo.transceiver), CLIENT_SCRIPT,
                          lambda: f"relay:\n{relay.log()[-2000:]}\ntransceiver:\n{tx_log.read_text()[-2000:]}")
        offer, answer = call.start()
        assert CLIENT_IP in offer  # the client offers its own address, which the transceiver cannot reach
        candidates = [line for line in answer.splitlines() if line.startswith("a=candidate")]
        assert candidates and all(f"{RELAY_PUBLIC_IP} {RELAY_PORT}" in c for c in candidates), candidates
        result = json.loads(call.line("the call did not complete"))
        assert result["echo"] == "hello across three namespaces"
        assert result["level"] > 1000  # the echoed tone, not silence
        assert result["remote"] == [RELAY_PUBLIC_IP, RELAY_PORT]  # the relay's public address, the only candidate

        # The relay carries the live call: one flow from the client's address to the transceiver's tunnel.
        assert [(f.client_ip, f.target_ip, f.ufrag.decode()) for f in relay.table_flows()] == [
            (ip16(socket.inet_aton(CLIENT_IP)), ip16(socket.inet_aton(TRANSCEIVER_IP)), result["ufrag"])]
        relay.wait_flushed(lambda rows: sum(r["client_packets"] for r in rows) > 50
                           and sum(r["transceiver_packets"] for r in rows) > 50, what="media counted both ways")
        rows = relay.rows()
        # ... by the kernel, both ways (the call's media after its first checks)
        kernel = {k: sum(r[k] for r in rows) for k in ("client_packets", "transceiver_packets", "kernel_to_transceiver",
                                                       "kernel_to_client")}
        # ... all but the first few by the kernel, both ways (the workers send until both sides were seen)
        assert kernel["kernel_to_transceiver"] >= kernel["client_packets"] - 5, kernel
        assert kernel["kernel_to_client"] >= kernel["transceiver_packets"] - 5, kernel
        assert call.finish() == 0
        # Hanging up ends the session: the transceiver tells the relay, which forgets the flow.
        wait_for(lambda: relay.table_flows() == [], 10, "the flow removed after the hang-up")
        print("\nFIGURES netns: " + json.dumps({
            "client_packets": sum(r["client_packets"] for r in rows),
            "kernel_to_transceiver": sum(r["kernel_to_transceiver"] for r in rows),
            "kernel_to_client": sum(r["kernel_to_client"] for r in rows),
            "transceiver_packets": sum(r["transceiver_packets"] for r in rows),
            "level": round(result["level"]), "remote": result["remote"]}))
    finally:
        stop(call.proc if call is not None else None)
        stop(transceiver)
        if relay is not None:
            cleanup_relay(relay)


def test_a_firewall_refusing_the_relays_sends_is_counted_and_costs_only_those_datagrams(
        topology: Topology, tmp_path: Path) -> None:
    """An nftables rule in the relay's namespace drops its sends to the client (sendto fails:
    EPERM) in the middle of a call through the C packet paths: each refused datagram is counted
    (drop_send_failed, rtcrelay_drops_total{reason="send_failed"}), the workers and the flow
    stay, and the client hears the call again once the rule goes."""
    topo = topology
    relay = transceiver = call = None
    try:
        relay = start_relay(tmp_path, workers=1, prefix=topo.exec(topo.relay), wait=False, port=RELAY_PORT, config={
            "listen": [f"{RELAY_PUBLIC_IP}:{RELAY_PORT}"], "tunnel_host": RELAY_TUNNEL_IP,
            "transceiver_networks": ["10.250.2.0/24"], "heartbeat_timeout": 5.0, "hit_path": "c"})
        wait_relay(relay, "its namespace")
        transceiver, tx_log = start_transceiver(topo, relay, tmp_path)
        wait_transceiver(transceiver, tx_log)
        call = ClientCall(topo.exec(topo.client), topo.exec(topo.transceiver), CLIENT_SCRIPT,
                          lambda: f"relay:\n{relay.log()[-2000:]}\ntransceiver:\n{tx_log.read_text()[-2000:]}")
        call.start()
        assert json.loads(call.line("the call did not complete"))["level"] > 1000
        (flow,) = relay.table_flows()
        assert relay.total("drop_send_failed") == 0
        nft = topo.exec(topo.relay) + ["nft"]
        run(nft + ["add", "table", "inet", "refuse"])
        run(nft + ["add chain inet refuse out { type filter hook output priority 0 ; }"])
        run(nft + ["add", "rule", "inet", "refuse", "out", "ip", "daddr", CLIENT_IP, "udp", "dport",
                   str(flow.client_port), "drop"])
        relay.wait_flushed(lambda rows: sum(r["drop_send_failed"] for r in rows) > 25, timeout=5,
                           what="the refused sends counted")
        run(nft + ["delete", "table", "inet", "refuse"])
        refused = relay.total("drop_send_failed")
        sent = relay.total("transceiver_packets")
        relay.wait_flushed(lambda rows: sum(r["transceiver_packets"] for r in rows) > sent + 25, timeout=5,
                           what="the call carried again")
        assert relay.total("drop_send_failed") - refused <= 2  # (what was in flight as the rule went)
        assert [f.client_port for f in relay.table_flows()] == [flow.client_port]
        assert relay.proc.poll() is None and all(r["ready"] for r in relay.rows())
        assert call.finish() == 0
    finally:
        stop(call.proc if call is not None else None)
        stop(transceiver)
        if relay is not None:
            cleanup_relay(relay)
