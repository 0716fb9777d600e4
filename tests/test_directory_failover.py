"""Relay failover with the shared route directory (#19): two relays on one service address,
in namespaces of their own; mid-call the client's route moves from one to the other (what an
anycast or ECMP change does). The second relay has never seen the client: without a directory
it drops its media until the client's next connectivity check re-teaches it; with one it looks
the 5-tuple up in Redis (Debian's redis-server, started here on a unix socket) and adopts the
flow at once. With Redis stopped mid-call the relays go on without it.

::

    [client] 10.252.9.9 (lo) ─┬─ 10.252.1.1 ── 10.252.1.2 [relay A] 10.252.2.2 ── 10.252.2.1 [transceiver]
                              └─ 10.252.4.1 ── 10.252.4.2 [relay B] 10.252.3.2 ── 10.252.3.1 ┘
    both relays listen on the service address 10.252.0.10:3478 (on their lo)
"""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import (
    CLIENT_PROLOGUE,
    ClientCall,
    Topology,
    chain,
    run,
    start_transceiver,
    stop,
    wait_relay,
    wait_transceiver,
)
from relayproc import RelayProcess, cleanup_relay, start_relay, wait_for

SERVICE, CLIENT = "10.252.0.10", "10.252.9.9"
PORT = 3478
SECRETS = {1: b"route-secret-of-the-failover-test!!"}
WATCH_S = 8.0  # after the route moved: longer than aiortc's consent check interval (~5 s)

CLIENT_SCRIPT = CLIENT_PROLOGUE + r"""
async def main():
    client, loop = await connected()
    await client.hears_echo(timeout=15)
    print(json.dumps({"ufrag": client.server_ufrag}), flush=True)
    for _ in range(2):  # two moves: the test says when each happened
        await loop.run_in_executor(None, sys.stdin.readline)
        moved = time.monotonic()
        await asyncio.sleep(""" + str(WATCH_S) + r""")
        print(json.dumps({"gap": client.longest_gap(moved, time.monotonic()),
                          "frames": len([t for t in client.arrivals if t > moved])}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    await client.close()

asyncio.run(asyncio.wait_for(main(), 90))
"""


@contextlib.contextmanager
def redis_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    server = shutil.which("redis-server")
    assert server, "redis-server not found: scripts/net-deps.sh installs Debian's (apt install redis-server)"
    sock = Path("/tmp") / f"rtcr-redis-{uuid.uuid4().hex[:8]}.sock"  # (a short path: sun_path is 108 bytes)
    proc = subprocess.Popen([server, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 10, "redis-server's socket")
        yield f"unix://{sock}", proc
    finally:
        stop(proc)
        sock.unlink(missing_ok=True)


def move_route(ns: dict[str, str], to: str) -> None:
    """The service address is reached through ``to``'s link now (on-link: no next hop)."""
    run(["ip", "-n", ns["client"], "route", "replace", f"{SERVICE}/32", "dev", CLIENT_LINKS[to], "src", CLIENT])


CLIENT_LINKS: dict[str, str] = {}


@pytest.mark.parametrize("directory", [True, False], ids=["with-directory", "without-directory"])
def test_a_call_moves_to_another_relay_of_the_service_address(tmp_path: Path, directory: bool) -> None:
    roles = ["client", "relay_a", "relay_b", "transceiver"]
    links = [("client", "10.252.1.1", "relay_a", "10.252.1.2"), ("client", "10.252.4.1", "relay_b", "10.252.4.2"),
             ("relay_a", "10.252.2.2", "transceiver", "10.252.2.1"),
             ("relay_b", "10.252.3.2", "transceiver", "10.252.3.1")]
    with chain(roles, links) as ns, redis_server(tmp_path) as (url, redis):  # (stopped mid-test)
        # The client has one address (the one host candidate its ICE gathers), the same whichever
        # relay it reaches, on its first link; its links carry no other address.
        client_links = [line.split(": ")[1].split("@")[0] for line in
                        run(["ip", "-n", ns["client"], "-o", "link", "show", "type", "veth"]).stdout.splitlines()]
        for dev in client_links:
            run(["ip", "-n", ns["client"], "addr", "flush", "dev", dev])
        CLIENT_LINKS.update(zip(("relay_a", "relay_b"), sorted(client_links)))  # chain() numbers its links in order
        run(["ip", "-n", ns["client"], "addr", "add", f"{CLIENT}/32", "dev", CLIENT_LINKS["relay_a"]])
        move_route(ns, "relay_a")
        for relay in ("relay_a", "relay_b"):
            run(["ip", "-n", ns[relay], "addr", "add", f"{SERVICE}/32", "dev", "lo"])
            relay_link = next(line.split()[1] for line in
                              run(["ip", "-n", ns[relay], "-o", "addr", "show"]).stdout.splitlines()
                              if " 10.252.1.2/" in line or " 10.252.4.2/" in line)
            run(["ip", "-n", ns[relay], "route", "add", f"{CLIENT}/32", "dev", relay_link])
        run(["ip", "-n", ns["relay_b"], "route", "add", "10.252.2.1/32", "via", "10.252.3.1"])  # the token's address
        relays: list[RelayProcess] = []
        transceiver = call = None
        try:
            for role, tunnel in (("relay_a", "10.252.2.2"), ("relay_b", "10.252.3.2")):
                # idle_timeout 3 s: relay A forgets the client while B serves it, before it comes back
                config = {"listen": [f"{SERVICE}:{PORT}"], "tunnel_host": tunnel, "heartbeat_timeout": 30.0,
                          "idle_timeout": 3.0,
                          "transceiver_networks": ["10.252.2.0/24"], "admin_listen": "127.0.0.1:9478",
                          **({"directory_url": url} if directory else {})}
                relays.append(start_relay(tmp_path, workers=2, prefix=["ip", "netns", "exec", ns[role]], wait=False,
                                          port=PORT, keyring_secrets=SECRETS, config=config))
            for relay in relays:
                wait_relay(relay, "its namespace")
            relay_a, relay_b = relays
            topo = Topology(ns["client"], ns["relay_a"], ns["transceiver"])
            transceiver, tx_log = start_transceiver(
                topo, relay_a, tmp_path, tunnel_host="10.252.2.1", tunnel_advertise_host="10.252.2.1",
                relay_public_addresses=[f"{SERVICE}:{PORT}"], relay_networks=["10.252.2.0/24", "10.252.3.0/24"])
            wait_transceiver(transceiver, tx_log)

            def logs() -> str:
                return f"A:\n{relay_a.log()[-2000:]}\nB:\n{relay_b.log()[-2000:]}\ntransceiver:\n{tx_log.read_text()[-2000:]}"

            call = ClientCall(["ip", "netns", "exec", ns["client"]], ["ip", "netns", "exec", ns["transceiver"]],
                              CLIENT_SCRIPT, logs)
            call.start()
            ufrag = json.loads(call.line("no echo"))["ufrag"]
            if directory:  # relay A published the flow it learned
                relay_a.wait_flushed(lambda rows: sum(r["directory_published"] for r in rows) >= 1,
                                     what="the flow in the directory")
            move_route(ns, "relay_b")  # the service address is relay B's now
            call.say("moved")
            first = json.loads(call.line("no figures after the first move"))
            # Then back to relay A, with the directory gone (a Redis failure mid-call), once A
            # has forgotten the client (idle_timeout): it must learn it again.
            stop(redis)
            wait_for(lambda: not relay_a.table_flows(), 15, "relay A to forget the client")
            move_route(ns, "relay_a")
            call.say("moved")
            second = json.loads(call.line("no figures after the second move"))
            rows_b, rows_a = relay_b.rows(), relay_a.rows()
            assert call.finish() == 0
            for move in (first, second):
                assert move["frames"] > 100, logs()  # audio back at full rate within the window
            # B never knew the client: it adopted the flow from the directory (its media went on,
            # nothing dropped), or dropped the media until the client's next check taught it.
            assert sum(r["flows_learned"] for r in rows_b) == 1
            if directory:
                assert first["gap"] < 0.5, (first, logs())
                assert sum(r["directory_hits"] for r in rows_b) == 1
                assert sum(r["drop_unknown_flow"] for r in rows_b) == 0
                # A, back in charge while Redis is down: its lookup failed, counted; it learned
                # the client again from its next check, as without a directory.
                assert sum(r["directory_errors"] + r["directory_skipped"] for r in rows_a) >= 1
            else:
                assert sum(r["drop_unknown_flow"] for r in rows_b) > 0
            assert sum(r["flows_learned"] for r in rows_a) == 2  # (it had forgotten the client)
            assert all(r["internal_errors"] == 0 for r in (*rows_a, *rows_b))
            print("\nFIGURES directory_failover: " + json.dumps({
                "directory": directory, "ufrag": ufrag[:12], "first_move_gap_s": round(first["gap"], 3),
                "redis_stopped_move_gap_s": round(second["gap"], 3),
                "published_a_b": [sum(r["directory_published"] for r in rows) for rows in (rows_a, rows_b)]}))
        finally:
            stop(call.proc if call is not None else None)
            stop(transceiver)
            for relay in relays:
                cleanup_relay(relay)


