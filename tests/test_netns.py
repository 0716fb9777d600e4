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
import subprocess
import sys
from pathlib import Path

from netns import (
    CLIENT_IP,
    CLIENT_PROLOGUE,
    POST_OFFER,
    RELAY_PORT,
    RELAY_PUBLIC_IP,
    RELAY_TUNNEL_IP,
    ROOT,
    SIGNALLING,
    TRANSCEIVER_IP,
    Topology,
    netns_env,
    run,
    start_transceiver,
    stop,
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
    relay = transceiver = client = None
    try:
        # The isolation this test relies on, checked first.
        route = run(["ip", "-n", topo.transceiver, "route", "get", CLIENT_IP], check=False)
        assert route.returncode != 0 and "unreachable" in route.stderr.lower(), route
        probe = run(topo.exec(topo.transceiver) + [sys.executable, "-c", UNREACHABLE_PROBE, CLIENT_IP])
        assert probe.stdout.strip() == "101", probe  # ENETUNREACH
        assert run(topo.exec(topo.relay) + ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"

        relay = start_relay(tmp_path, workers=2, prefix=topo.exec(topo.relay), wait=False, port=RELAY_PORT, config={
            "listen": [f"{RELAY_PUBLIC_IP}:{RELAY_PORT}"], "tunnel_host": RELAY_TUNNEL_IP,
            "transceiver_networks": ["10.250.2.0/24"], "admin_listen": "127.0.0.1:9478", "heartbeat_timeout": 5.0})

        def relay_ready() -> bool:
            if relay.proc.poll() is not None:
                raise AssertionError(f"relay exited with {relay.proc.returncode}:\n{relay.log()}")
            try:
                rows = relay.rows()
            except (OSError, ValueError):
                return False
            return len(rows) == 2 and all(r["ready"] == 1 and r["pid"] for r in rows)

        wait_for(relay_ready, 20, "the relay in its namespace")
        transceiver, tx_log = start_transceiver(topo, relay, tmp_path)

        def transceiver_up() -> bool:
            if transceiver.poll() is not None:
                raise AssertionError(f"transceiver exited with {transceiver.returncode}:\n{tx_log.read_text()}")
            return "transceiver up" in tx_log.read_text(errors="replace")

        wait_for(transceiver_up, 20, "the transceiver in its namespace")

        client = subprocess.Popen(topo.exec(topo.client) + [sys.executable, "-c", CLIENT_SCRIPT], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=netns_env(), cwd=ROOT,
                                  start_new_session=True)
        assert client.stdin is not None and client.stdout is not None

        def client_failed(what: str) -> AssertionError:
            stop(client)
            err = client.stderr.read() if client.stderr else ""
            return AssertionError(f"client: {what}\n{err[-4000:]}\nrelay:\n{relay.log()[-2000:]}\n"
                                  f"transceiver:\n{tx_log.read_text()[-2000:]}")

        offer_line = client.stdout.readline()  # bounded: the client's own 75 s timeout
        if not offer_line:
            raise client_failed("no offer")
        offer = json.loads(offer_line)["offer"]
        assert CLIENT_IP in offer  # the client offers its own address, which the transceiver cannot reach
        answer = run(topo.exec(topo.transceiver) + [sys.executable, "-c", POST_OFFER, SIGNALLING], input=offer, timeout=30).stdout
        candidates = [line for line in answer.splitlines() if line.startswith("a=candidate")]
        assert candidates and all(f"{RELAY_PUBLIC_IP} {RELAY_PORT}" in c for c in candidates), candidates
        client.stdin.write(json.dumps({"answer": answer}) + "\n")
        client.stdin.flush()
        line = client.stdout.readline()
        if not line:
            raise client_failed("the call did not complete")
        result = json.loads(line)
        assert result["echo"] == "hello across three namespaces"
        assert result["level"] > 1000  # the echoed tone, not silence
        assert result["remote"] == [RELAY_PUBLIC_IP, RELAY_PORT]  # the relay's public address, the only candidate

        # The relay carries the live call: one flow from the client's address to the transceiver's tunnel.
        assert [(f.client_ip, f.target_ip, f.ufrag.decode()) for f in relay.table_flows()] == [
            (ip16(socket.inet_aton(CLIENT_IP)), ip16(socket.inet_aton(TRANSCEIVER_IP)), result["ufrag"])]
        relay.wait_flushed(lambda rows: sum(r["client_packets"] for r in rows) > 50
                           and sum(r["transceiver_packets"] for r in rows) > 50, what="media counted both ways")
        rows = relay.rows()
        client.stdin.write("bye\n")
        client.stdin.flush()
        client.communicate(timeout=30)
        assert client.returncode == 0
        # Hanging up ends the session: the transceiver tells the relay, which forgets the flow.
        wait_for(lambda: relay.table_flows() == [], 10, "the flow removed after the hang-up")
        print("\nFIGURES netns: " + json.dumps({
            "client_packets": sum(r["client_packets"] for r in rows),
            "transceiver_packets": sum(r["transceiver_packets"] for r in rows),
            "level": round(result["level"]), "remote": result["remote"]}))
    finally:
        stop(client)
        stop(transceiver)
        if relay is not None:
            cleanup_relay(relay)
