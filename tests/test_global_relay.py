"""The global relay across namespaces: a client reaches an edge relay, which forwards its
session to the relay of the cluster its route token names, which owns the transceiver.

::

    [client]  10.251.1.1 -- 10.251.1.2  [edge relay]  10.251.2.2 -- 10.251.2.1  [cluster relay]  10.251.3.2 -- 10.251.3.1  [transceiver]
              (aiortc)      public :3478  cluster 1    tunnel        hop :3479    cluster 7          tunnel        cluster 7

No namespace forwards IP: the edge has no route to the transceiver, the transceiver none to
the client or the edge; only the relays' frames cross. The transceiver's answer names the
edge's public address (its only candidate); its tokens name cluster 7; the edge's
cluster_routes send cluster 7 to the cluster relay's hop address.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from netns import ClientCall, Topology, chain, run, start_transceiver, stop, wait_relay, wait_transceiver
from relayproc import RTCRELAY, cleanup_relay, start_relay, wait_for
from test_netns import CLIENT_SCRIPT

ROOT = Path(__file__).resolve().parents[1]
CLIENT, EDGE_PUBLIC = "10.251.1.1", "10.251.1.2"
EDGE_TUNNEL, CLUSTER_HOP = "10.251.2.2", "10.251.2.1"
CLUSTER_TUNNEL, TRANSCEIVER = "10.251.3.2", "10.251.3.1"
PORT, HOP_PORT = 3478, 3479
SECRETS = {1: b"route-secret-shared-by-every-relay!"}


def flows(relay) -> list[dict]:  # type: ignore[no-untyped-def]
    """`rtcrelay flows list --json` of a relay, as an operator runs it."""
    out = subprocess.run([*RTCRELAY, "flows", "list", "--json", "--name", relay.name, "--table-dir",
                          str(relay.table_dir)], capture_output=True, text=True, timeout=30, cwd=ROOT, check=True)
    return json.loads(out.stdout)


def test_an_aiortc_call_through_an_edge_and_a_cluster_relay(tmp_path: Path) -> None:
    roles = ["client", "edge", "cluster", "transceiver"]
    links = [("client", CLIENT, "edge", EDGE_PUBLIC), ("edge", EDGE_TUNNEL, "cluster", CLUSTER_HOP),
             ("cluster", CLUSTER_TUNNEL, "transceiver", TRANSCEIVER)]
    with chain(roles, links) as ns:
        exec_in = {role: ["ip", "netns", "exec", name] for role, name in ns.items()}
        edge = cluster = transceiver = call = None
        try:
            # The isolation the test relies on.
            for role, unreachable in (("edge", TRANSCEIVER), ("transceiver", CLIENT), ("transceiver", EDGE_PUBLIC)):
                route = run(["ip", "-n", ns[role], "route", "get", unreachable], check=False)
                assert route.returncode != 0, f"{role} can reach {unreachable}: {route.stdout}"
            cluster = start_relay(tmp_path, workers=2, prefix=exec_in["cluster"], wait=False, port=PORT,
                                  keyring_secrets=SECRETS, config={
                                      "listen": [f"127.0.0.1:{PORT}"], "cluster_id": 7, "tunnel_host": CLUSTER_TUNNEL,
                                      "transceiver_networks": ["10.251.3.0/24"], "hop_listen": [f"{CLUSTER_HOP}:{HOP_PORT}"],
                                      "peer_networks": ["10.251.2.0/24"], "admin_listen": "127.0.0.1:9478"})
            edge = start_relay(tmp_path, workers=2, prefix=exec_in["edge"], wait=False, port=PORT,
                               keyring_secrets=SECRETS, config={
                                   "listen": [f"{EDGE_PUBLIC}:{PORT}"], "cluster_id": 1, "tunnel_host": EDGE_TUNNEL,
                                   "cluster_routes": {"7": [f"{CLUSTER_HOP}:{HOP_PORT}"]},
                                   "peer_networks": ["10.251.2.0/24"], "admin_listen": "127.0.0.1:9478"})
            wait_relay(cluster, "the cluster namespace")
            wait_relay(edge, "the edge namespace")
            topo = Topology(ns["client"], ns["edge"], ns["transceiver"])
            transceiver, tx_log = start_transceiver(
                topo, cluster, tmp_path, tunnel_host=TRANSCEIVER, tunnel_advertise_host=TRANSCEIVER,
                relay_public_addresses=[f"{EDGE_PUBLIC}:{PORT}"], relay_networks=["10.251.3.0/24"], cluster_id=7)
            wait_transceiver(transceiver, tx_log)

            def logs() -> str:
                return (f"edge:\n{edge.log()[-2500:]}\ncluster:\n{cluster.log()[-2500:]}\n"  # type: ignore[union-attr]
                        f"transceiver:\n{tx_log.read_text()[-2000:]}")

            call = ClientCall(exec_in["client"], exec_in["transceiver"], CLIENT_SCRIPT, logs)
            offer, answer = call.start()
            assert CLIENT in offer
            candidates = [line for line in answer.splitlines() if line.startswith("a=candidate")]
            assert candidates and all(f"{EDGE_PUBLIC} {PORT}" in c for c in candidates), candidates
            result = json.loads(call.line("the call did not complete"))
            assert result["echo"] == "hello across three namespaces"  # (the data channel, across four)
            assert result["level"] > 1000, logs()  # the echoed tone
            assert result["remote"] == [EDGE_PUBLIC, PORT]

            # Each relay lists the call as its own client flow.
            edge_flows, cluster_flows = flows(edge), flows(cluster)
            assert [(f["client"].rsplit(":", 1)[0], f["transceiver"], f["ufrag"]) for f in edge_flows] == [
                (CLIENT, f"{CLUSTER_HOP}:{HOP_PORT}", result["ufrag"])], edge_flows
            assert [(f["client"].rsplit(":", 1)[0], f["transceiver"], f["relay"], f["ufrag"]) for f in cluster_flows] == [
                (CLIENT, f"{TRANSCEIVER}:{transceiver_port(tx_log)}", f"{CLUSTER_HOP}:{HOP_PORT}", result["ufrag"])]
            for relay in (edge, cluster):
                relay.wait_flushed(lambda rows: sum(r["client_packets"] for r in rows) > 50
                                   and sum(r["transceiver_packets"] for r in rows) > 50, what="media both ways")
            figures = {name: {k: sum(r[k] for r in relay.rows()) for k in ("client_packets", "transceiver_packets")}
                       for name, relay in (("edge", edge), ("cluster", cluster))}
            assert call.finish() == 0
            # The hang-up ends the session at the transceiver, which tells the cluster relay,
            # which tells the edge: neither keeps the flow.
            wait_for(lambda: not flows(cluster) and not flows(edge), 10, "the flows removed on both relays")
            print("\nFIGURES global_relay_two_hops: " + json.dumps({**figures, "level": round(result["level"])}))
        finally:
            stop(call.proc if call is not None else None)
            stop(transceiver)
            for relay in (edge, cluster):
                if relay is not None:
                    cleanup_relay(relay)


def transceiver_port(log_path: Path) -> int:
    """The transceiver's tunnel port, from its start-up line."""
    line = next(line for line in log_path.read_text().splitlines() if "transceiver up" in line)
    return int(line.split("tunnel (")[1].split(",")[1].split(")")[0])


