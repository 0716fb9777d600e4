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

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from netns import (
    SIGNALLING,
    ClientCall,
    Topology,
    chain,
    netns_env,
    run,
    start_transceiver,
    stop,
    wait_relay,
    wait_transceiver,
)
from relayproc import RTCRELAY, RelayProcess, cleanup_relay, start_relay, wait_for
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


@dataclass
class TwoHops:
    ns: dict[str, str]  # role -> namespace
    edge: RelayProcess
    cluster: RelayProcess
    tx_log: Path

    def exec(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[role]]

    def logs(self) -> str:
        return (f"edge:\n{self.edge.log()[-2500:]}\ncluster:\n{self.cluster.log()[-2500:]}\n"
                f"transceiver:\n{self.tx_log.read_text()[-2000:]}")


@contextlib.contextmanager
def two_hops(tmp_path: Path) -> Iterator[TwoHops]:
    """The four namespaces, both relays and the transceiver, running; all stopped at the end."""
    roles = ["client", "edge", "cluster", "transceiver"]
    links = [("client", CLIENT, "edge", EDGE_PUBLIC), ("edge", EDGE_TUNNEL, "cluster", CLUSTER_HOP),
             ("cluster", CLUSTER_TUNNEL, "transceiver", TRANSCEIVER)]
    with chain(roles, links) as ns:
        relays: list[RelayProcess] = []
        transceiver = None
        try:
            # The isolation the test relies on.
            for role, unreachable in (("edge", TRANSCEIVER), ("transceiver", CLIENT), ("transceiver", EDGE_PUBLIC)):
                route = run(["ip", "-n", ns[role], "route", "get", unreachable], check=False)
                assert route.returncode != 0, f"{role} can reach {unreachable}: {route.stdout}"
            relays.append(start_relay(tmp_path, workers=2, prefix=["ip", "netns", "exec", ns["cluster"]], wait=False,
                                      port=PORT, keyring_secrets=SECRETS, config={
                "listen": [f"127.0.0.1:{PORT}"], "cluster_id": 7, "tunnel_host": CLUSTER_TUNNEL,
                "transceiver_networks": ["10.251.3.0/24"], "hop_listen": [f"{CLUSTER_HOP}:{HOP_PORT}"],
                "peer_networks": ["10.251.2.0/24"], "admin_listen": "127.0.0.1:9478"}))
            relays.append(start_relay(tmp_path, workers=2, prefix=["ip", "netns", "exec", ns["edge"]], wait=False,
                                      port=PORT, keyring_secrets=SECRETS, config={
                "listen": [f"{EDGE_PUBLIC}:{PORT}"], "cluster_id": 1, "tunnel_host": EDGE_TUNNEL,
                "cluster_routes": {"7": [f"{CLUSTER_HOP}:{HOP_PORT}"]},
                "peer_networks": ["10.251.2.0/24"], "admin_listen": "127.0.0.1:9478"}))
            cluster, edge = relays
            wait_relay(cluster, "the cluster namespace")
            wait_relay(edge, "the edge namespace")
            topo = Topology(ns["client"], ns["edge"], ns["transceiver"])
            transceiver, tx_log = start_transceiver(
                topo, cluster, tmp_path, tunnel_host=TRANSCEIVER, tunnel_advertise_host=TRANSCEIVER,
                relay_public_addresses=[f"{EDGE_PUBLIC}:{PORT}"], relay_networks=["10.251.3.0/24"], cluster_id=7)
            wait_transceiver(transceiver, tx_log)
            yield TwoHops(ns, edge, cluster, tx_log)
        finally:
            stop(transceiver)
            for relay in relays:
                cleanup_relay(relay)


def check_relays_carried(hops: TwoHops, ufrag: str) -> dict[str, dict[str, int]]:
    """Each relay lists the call as its own client flow (rtcrelay flows) and counted media
    both ways; their counters."""
    edge_flows, cluster_flows = flows(hops.edge), flows(hops.cluster)
    assert [(f["client"].rsplit(":", 1)[0], f["transceiver"], f["ufrag"]) for f in edge_flows] == [
        (CLIENT, f"{CLUSTER_HOP}:{HOP_PORT}", ufrag)], edge_flows
    assert [(f["client"].rsplit(":", 1)[0], f["transceiver"], f["relay"], f["ufrag"]) for f in cluster_flows] == [
        (CLIENT, f"{TRANSCEIVER}:{transceiver_port(hops.tx_log)}", f"{CLUSTER_HOP}:{HOP_PORT}", ufrag)]
    for relay in (hops.edge, hops.cluster):
        relay.wait_flushed(lambda rows: sum(r["client_packets"] for r in rows) > 50
                           and sum(r["transceiver_packets"] for r in rows) > 50, what="media both ways")
    return {name: {k: sum(r[k] for r in relay.rows()) for k in ("client_packets", "transceiver_packets")}
            for name, relay in (("edge", hops.edge), ("cluster", hops.cluster))}


def test_an_aiortc_call_through_an_edge_and_a_cluster_relay(tmp_path: Path) -> None:
    with two_hops(tmp_path) as hops:
        call = ClientCall(hops.exec("client"), hops.exec("transceiver"), CLIENT_SCRIPT, hops.logs)
        try:
            offer, answer = call.start()
            assert CLIENT in offer
            candidates = [line for line in answer.splitlines() if line.startswith("a=candidate")]
            assert candidates and all(f"{EDGE_PUBLIC} {PORT}" in c for c in candidates), candidates
            result = json.loads(call.line("the call did not complete"))
            assert result["echo"] == "hello across three namespaces"  # (the data channel, across four)
            assert result["level"] > 1000, hops.logs()  # the echoed tone
            assert result["remote"] == [EDGE_PUBLIC, PORT]
            figures = check_relays_carried(hops, result["ufrag"])
            assert call.finish() == 0
            # The hang-up ends the session at the transceiver, which tells the cluster relay,
            # which tells the edge: neither keeps the flow.
            wait_for(lambda: not flows(hops.cluster) and not flows(hops.edge), 10, "the flows removed on both relays")
            print("\nFIGURES global_relay_two_hops: " + json.dumps({**figures, "level": round(result["level"])}))
        finally:
            stop(call.proc)


def transceiver_port(log_path: Path) -> int:
    """The transceiver's tunnel port, from its start-up line."""
    line = next(line for line in log_path.read_text().splitlines() if "transceiver up" in line)
    return int(line.split("tunnel (")[1].split(",")[1].split(")")[0])




# -- Chromium through two hops ---------------------------------------------------------------------

PAGE_PORT, FRONT_PORT = 8080, 8081
IN_CALL_S = 60.0  # the scenario waits this long at most for the test to look at the relays


async def chromium_call(out: Path, chromium: str) -> dict:
    """In the client's namespace: the demo page in headless Chromium, a call, the page's
    figures; then it waits (bounded) for the test's go, and hangs up."""
    from cdp import Browser
    from test_browser_call import _write_tone

    tone = out / "tone.wav"
    _write_tone(tone)
    browser = await Browser.launch(out / "browser", executable=chromium, fake_audio_file=tone)
    try:
        page = await browser.new_page(f"http://127.0.0.1:{PAGE_PORT}/")
        await page.wait_for("window.__result && window.__result.phase === 'ready'", 15, what="the page")
        await page.evaluate("window.__call()", timeout=20)
        await page.wait_for("(r => r.connectionState === 'connected' && r.dataChannelEcho && r.inboundPackets >= 50"
                            " && r.totalAudioEnergy > 0 && r.selectedPair.remote)(window.__result)", 30,
                            what="connected, an echo, 50+ audio packets with energy", show="window.__result")
        report = {"page": await page.evaluate("window.__result"), "offer": await page.evaluate("window.__sdp.offer")}
        (out / "in-call.json").write_text(json.dumps(report))
        for _ in range(int(IN_CALL_S / 0.1)):
            if (out / "go").exists():
                break
            await asyncio.sleep(0.1)
        report["hangup"] = await page.evaluate("window.__hangup()", timeout=15)
        return report
    finally:
        await browser.close()


def test_a_chromium_call_through_an_edge_and_a_cluster_relay(tmp_path: Path) -> None:
    from cdp import find_chromium

    chromium = find_chromium()
    assert chromium, "Chromium not found: scripts/browser-deps.sh installs it (or set RTCRELAY_CHROMIUM)"
    out = tmp_path / "scenario"
    out.mkdir()
    with two_hops(tmp_path) as hops:
        bridge = subprocess.Popen(hops.exec("transceiver") + [
            sys.executable, str(ROOT / "tests" / "netns_bridge.py"), "--into", hops.ns["client"],
            "--page", str(PAGE_PORT), "--front", str(FRONT_PORT), "--backend", f"http://{SIGNALLING}",
            "--relay", f"{EDGE_PUBLIC}:{PORT}"], stdout=subprocess.PIPE, text=True, env=netns_env(), cwd=ROOT)
        scenario = None
        try:
            assert bridge.stdout is not None and bridge.stdout.readline().strip() == "READY"
            with open(out / "scenario.log", "wb") as log:
                scenario = subprocess.Popen(hops.exec("client") + [sys.executable, __file__, "--out", str(out),
                                            "--chromium", chromium], stdout=log, stderr=subprocess.STDOUT,
                                            env=netns_env(), cwd=ROOT, start_new_session=True)

            def in_call() -> bool:
                if scenario.poll() is not None:
                    raise AssertionError(f"the scenario exited: {(out / 'scenario.log').read_text()[-3000:]}\n{hops.logs()}")
                return (out / "in-call.json").exists()

            wait_for(in_call, 60, "Chromium in a call")
            page = json.loads((out / "in-call.json").read_text())["page"]
            assert page["selectedPair"]["remote"] == f"{EDGE_PUBLIC}:{PORT}"  # the edge: its only candidate
            assert page["dataChannelEcho"] and page["totalAudioEnergy"] > 0
            figures = check_relays_carried(hops, page["serverUfrag"])
            (out / "go").write_text("go")
            scenario.wait(60)
            report = json.loads((out / "report.json").read_text())
            assert report["hangup"]["hangupStatus"] == 204
            wait_for(lambda: not flows(hops.cluster) and not flows(hops.edge), 10, "the flows removed on both relays")
            print("\nFIGURES global_relay_chromium: " + json.dumps({
                **figures, "setup_ms": page["setupMs"], "echo_rtt_ms": page["echoRttMs"],
                "inbound_packets": page["inboundPackets"]}))
        finally:
            stop(scenario)
            stop(bridge)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="the Chromium side of the two-hop test (run by it)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--chromium", required=True)
    args = parser.parse_args()
    report = asyncio.run(asyncio.wait_for(chromium_call(args.out, args.chromium), IN_CALL_S + 60))
    (args.out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
