"""End to end with a real browser: headless Chromium calls the echo transceiver through the relay.

The scenario: ``rtcrelay up`` (the README's main job: the multi-process relay, a transceiver
and the demo page, on free ports), and Chromium driven over the DevTools protocol
(tests/cdp.py) to the page; ``window.__call()``, then checks that

- the connection is ``connected``, a data-channel message comes back, inbound audio has
  ≥ 50 packets and ``totalAudioEnergy > 0`` (the fake microphone's tone, echoed);
- the selected candidate pair is 127.0.0.1 ↔ the relay's 127.0.0.1:port;
- ``rtcrelay flows list --json`` shows the browser's flow (client = the browser's side of the
  pair, transceiver = what ``rtcrelay ufrag decode`` reads in the server ufrag);
- after ``window.__hangup()`` (DELETE → the transceiver's ``SessionClosed``) the flow is gone
  from the table within a few seconds; Ctrl-C stops ``rtcrelay up`` with exit 0 and no table left.

Why a network namespace: Chromium gathers a host candidate on every interface, and may pick
its non-loopback host address (here eth0's 192.0.2.x) as the local side of the pair; the
kernel still carries those packets over ``lo``, but the relay then sees a 192.0.2.x source.
No Chromium switch restricts gathering to the loopback (``--force-webrtc-ip-handling-policy``
only offers the default-route interface, which is eth0). So the whole scenario runs in a
fresh network namespace that has only ``lo`` (``unshare --net``: as root, else in a user
namespace too): Chromium's only candidate is 127.0.0.1 (``--allow-loopback-in-peer-connection``),
and no packet of the test can reach any other interface — the namespace has none.

The pytest process starts the scenario (this file run as a script) in that namespace, reads
its JSON report and asserts on it; the scenario and the checks of a call are
tests/browser_scenario.py, shared with the Firefox test (test_browser_firefox.py). A missing
Chromium is a failure, not a skip: ``scripts/test`` installs it (scripts/browser-deps.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import pytest
from browser_scenario import ROOT, CallScenario, call_figures, check_call, require_browser, run_scenario, scenario_main
from relayproc import metric_sum

REBIND_WATCH_S = 10.0  # after the NAT forgets the call's mapping
REBIND_MAX_GAP_S = 4.0
RESTART_WATCH_S = 8.0  # after window.__restartIce()
RESTART_MAX_GAP_S = 1.0
KILL_LEARN_MAX_S = 3.0  # Chromium checks a working pair every ~2.5 s: the error answers the next one
KILL_BACK_MAX_S = 4.0
DRAIN_WATCH_S = 6.0  # after SIGTERM to the call's transceiver: the page moves the call meanwhile
DRAIN_GAP_MAX_S = 0.4  # the longest stretch without new audio on the page's current call


# ---------------------------------------------------------------------------------------
# the pytest side
# ---------------------------------------------------------------------------------------


def _run_scenario(tmp_path: Path, *extra: str) -> tuple[dict[str, Any], str, list[str]]:
    """Run this file as the scenario in a loopback-only namespace; its report and a failure text."""
    from cdp import find_chromium

    chromium = require_browser(find_chromium(), "Chromium", "RTCRELAY_CHROMIUM", "/usr/lib/chromium/chromium, /usr/bin/chromium",
                               "chromium")
    return run_scenario(__file__, tmp_path, "--chromium", chromium, *extra)


@pytest.mark.browser
def test_browser_call(tmp_path: Path) -> None:
    report, details, _ = _run_scenario(tmp_path)
    check_call(report, details)
    print("\nFIGURES browser_call chromium: " + json.dumps(call_figures(report)))


@pytest.mark.browser
def test_browser_call_survives_a_nat_rebinding(tmp_path: Path) -> None:
    """Chromium behind the kernel's NAT (SNAT on lo to a random port, in the scenario's own
    namespace); the mapping is flushed mid-call. Chromium does not notice (its own address
    is unchanged); the relay and the transceiver must follow it to its new port."""
    report, details, _ = _run_scenario(tmp_path, "--rebind")
    rebind = report["rebind"]
    relay_addr = f"127.0.0.1:{report['relay_port']}"
    ufrag = report["server_ufrag"]
    before = {f["client"] for f in report["flows_in_call"] if f["ufrag"] == ufrag}
    after = {f["client"] for f in rebind["flows"] if f["ufrag"] == ufrag and f["relay"] == relay_addr}
    assert len(before) == 1 and after - before, f"the relay never saw the client's new port\n{details}"
    assert rebind["connection_state"] == "connected", details
    # The transceiver moved the media itself, on the first check from the new port: without
    # that, aioice follows Chromium only one check later (its USE-CANDIDATE on a pair whose
    # triggered check succeeded), ~2.5 s more of one-way audio.
    assert rebind["path_moves"] == 1, details
    # Chromium checks a working pair every ~2.5 s: the move comes with its next check.
    assert rebind["audio_gap_s"] <= REBIND_MAX_GAP_S, details
    assert rebind["audio_rate_end"] > 40, details  # 50 packets/s of Opus
    assert rebind["echoes_end"] >= 2, details  # the page pings once a second
    print("\nFIGURES browser_nat_rebinding: " + json.dumps({k: v for k, v in rebind.items() if k != "flows"}))


@pytest.mark.browser
def test_browser_ice_restart_over_whip_patch(tmp_path: Path) -> None:
    """pc.restartIce() + PATCH (RFC 9725 section 4.3.2) mid-call: the same session goes on with
    a new server ufrag (a new route token for the same transceiver); DTLS and SRTP go on; the
    relay learns flows for the new ufrag and drops the old ufrag's."""
    report, details, _ = _run_scenario(tmp_path, "--restart-ice")
    restart = report["restart"]
    assert restart["status"] == 200 and restart["etag"], details
    assert restart["new_ufrag"] != restart["old_ufrag"] and restart["same_session"], details
    assert restart["states"] == ["connected"], details  # never disconnected meanwhile
    assert restart["audio_gap_s"] <= RESTART_MAX_GAP_S, details
    assert restart["audio_rate_end"] > 40 and restart["echoes_end"] >= 2, details
    assert restart["dtls"] == ["connected", "connected"] and restart["srtp"][0] == restart["srtp"][1], details
    assert (restart["ice_restarts"], restart["sessions_created"], restart["sessions_connected"]) == (1, 1, 1), details
    ufrags = {f["ufrag"] for f in restart["flows"]}
    assert restart["new_ufrag"] in ufrags and restart["old_ufrag"] not in ufrags, details
    # hanging up closes the new ufrag's flows too
    assert report["hangup"]["hangupStatus"] == 204 and report["flows_after_hangup"] == [], details
    print("\nFIGURES browser_ice_restart: " + json.dumps({k: v for k, v in restart.items() if k != "flows"}))


@pytest.mark.browser
def test_browser_call_survives_its_transceiver_dying(tmp_path: Path) -> None:
    """kill -9 of the transceiver that owns the call (rtcrelay up runs two): the relay sees the
    tunnel refused, answers the call's next check with a signed Binding error, Chromium's ICE
    fails at once, the page calls again and the front sends it to the other transceiver."""
    report, details, _ = _run_scenario(tmp_path, "--kill-transceiver")
    kill = report["kill"]
    assert kill["reconnects"] == 1, details
    assert kill["learned_s"] is not None and kill["learned_s"] <= KILL_LEARN_MAX_S, details
    assert kill["audio_back_s"] is not None and kill["audio_back_s"] <= KILL_BACK_MAX_S, details
    port = f":{kill['killed_tunnel_port']}"
    assert not [f for f in kill["relay_flows"] if f["transceiver"].endswith(port)], details  # no state for the dead one
    print("\nFIGURES browser_transceiver_killed: " + json.dumps({k: v for k, v in kill.items() if k != "relay_flows"}))


@pytest.mark.browser
def test_browser_call_moves_when_its_transceiver_drains(tmp_path: Path) -> None:
    """SIGTERM to the transceiver that owns the call (a rolling upgrade): it asks the page to
    move on the control channel; the page calls again (the front skips the draining one),
    switches once the new call plays and hangs up the old: not lost, audio on throughout."""
    report, details, _ = _run_scenario(tmp_path, "--drain-transceiver")
    drain = report["drain"]
    assert drain["migrations"] == 1 and drain["reconnects"] == 0, details
    assert drain["new_ufrag"] != drain["old_ufrag"] and drain["connection_state"] == "connected", details
    assert drain["new_transceiver"] != report["transceiver_tunnel"], details
    assert drain["audio_gap_ms"] <= DRAIN_GAP_MAX_S * 1000, details
    assert report["hangup"]["hangupStatus"] == 204, details  # the new session, hung up at the end
    print("\nFIGURES browser_transceiver_drained: " + json.dumps(drain))


def test_demo_page_app() -> None:
    """The page, its static files and config.json; no browser needed."""
    from aiohttp.test_utils import TestClient, TestServer

    from cli.demo_page import make_demo_app

    async def main() -> None:
        app = make_demo_app("http://127.0.0.1:9999/v1/sessions", "127.0.0.1:3478")
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            resp = await client.get("/")
            assert resp.status == 200 and resp.content_type == "text/html"
            assert "<title>rtcrelay demo call</title>" in await resp.text()
            csp = resp.headers["Content-Security-Policy"]
            assert "connect-src 'self' http://127.0.0.1:9999" in csp and "script-src 'self'" in csp
            resp = await client.get("/config.json")
            assert await resp.json() == {"signalling_url": "http://127.0.0.1:9999/v1/sessions", "relay": "127.0.0.1:3478"}
            assert resp.headers["Cache-Control"] == "no-store"
            for name in ("call.js", "style.css"):
                assert (await client.get(f"/static/{name}")).status == 200
            assert (await client.get("/static/../demo_page.py")).status in (403, 404)
            assert (await client.get("/nope")).status == 404
            # no external URL anywhere in the page
            for name in ("index.html", "call.js", "style.css"):
                text = (ROOT / "cli" / "static" / name).read_text()
                assert "https://" not in text and "//cdn" not in text, name

    asyncio.run(asyncio.wait_for(main(), 30))


# ---------------------------------------------------------------------------------------
# the scenario (this file run as a script, inside the namespace)
# ---------------------------------------------------------------------------------------


def _media_figures(gap: float, samples: list[tuple[float, int, int, str]]) -> dict[str, Any]:
    """What a watch_media() saw: the longest audio gap, the last 3 s's rates, the states."""
    end = [x for x in samples if x[0] >= samples[-1][0] - 3.0]
    return {
        "audio_gap_s": round(gap, 2),  # (the page's stats tick is 0.5 s)
        "audio_rate_end": round((end[-1][1] - end[0][1]) / max(end[-1][0] - end[0][0], 0.1), 1),
        "echoes_end": end[-1][2] - end[0][2],
        "connection_state": samples[-1][3],
        "states": sorted({x[3] for x in samples}),
    }


def _http_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def _nat_to_random_ports(relay_port: int) -> None:
    """The kernel's NAT in this namespace: datagrams to the relay leave from a random port
    (SNAT on lo; masquerade needs an interface address of a routable kind)."""
    rules = ("add table ip rtcnat\n"
             "add chain ip rtcnat post { type nat hook postrouting priority srcnat; }\n"
             f"add rule ip rtcnat post oifname lo udp dport {relay_port} snat to 127.0.0.1:20000-60000 random\n")
    subprocess.run(["nft", "-f", "-"], input=rules.encode(), capture_output=True, timeout=10, check=True)


def _write_tone(path: Path, seconds: float = 2.0, freq: float = 440.0, rate: int = 48000) -> None:
    """A 440 Hz tone (about -12 dBFS) for the fake microphone (Chromium loops the file)."""
    frames = bytearray()
    for i in range(int(seconds * rate)):
        frames += struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * i / rate)))
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(bytes(frames))


class ChromiumScenario(CallScenario):
    """The call from Chromium (tests/cdp.py), with one of the mid-call phases when asked."""

    def __init__(self, out: Path, chromium: str, chromium_args: list[str], rebind: bool = False,
                 restart_ice: bool = False, kill_transceiver: bool = False, drain_transceiver: bool = False) -> None:
        super().__init__(out)
        self.drain_transceiver = drain_transceiver
        self.rebind = rebind
        self.restart_ice = restart_ice
        self.kill_transceiver = kill_transceiver
        self.chromium = chromium
        self.chromium_args = chromium_args

    async def start_up(self) -> str:
        page_url = await super().start_up()
        if self.rebind:
            _nat_to_random_ports(self.report["relay_port"])
        return page_url

    async def launch_browser(self) -> None:
        from cdp import Browser

        tone = self.out / "tone.wav"
        _write_tone(tone)
        self.browser = await Browser.launch(self.out / "browser", executable=self.chromium, fake_audio_file=tone,
                                            extra_args=self.chromium_args)
        self.record_pid("chromium", self.browser.proc.pid)
        self.report["browser"] = {"version": self.browser.version.get("product"), "args": self.browser.args[1:]}

    async def open_page(self, url: str) -> None:
        self.page = await self.browser.new_page(url)

    async def phases(self) -> None:
        if self.rebind:
            await self.rebind_phase()
        if self.restart_ice:
            await self.restart_ice_phase()
        if self.kill_transceiver:
            await self.kill_transceiver_phase()
        if self.drain_transceiver:
            await self.drain_transceiver_phase()

    async def rebind_phase(self) -> None:
        """Flush the NAT's mapping mid-call; watch inbound audio and the data channel."""
        subprocess.run(["conntrack", "-F"], capture_output=True, timeout=10, check=True)
        gap, samples = await self.watch_media(REBIND_WATCH_S)
        self.report["rebind"] = {
            **_media_figures(gap, samples),
            "flows": await self.flows(),
            "path_moves": metric_sum(await asyncio.to_thread(_http_get, self.transceiver_metrics),
                                  "rtcrelay_transceiver_path_moves_total"),
        }

    async def watch_media(self, seconds: float) -> tuple[float, list[tuple[float, int, int, str]]]:
        """Sample the page for ``seconds``: (longest time without new inbound audio, samples)."""
        probe = "(r => [r.inboundPackets, r.echoCount, r.connectionState])(window.__result)"
        start = time.monotonic()
        samples: list[tuple[float, int, int, str]] = []
        while time.monotonic() - start < seconds:
            packets, echoes, state = await self.page.evaluate(probe)
            samples.append((time.monotonic() - start, packets, echoes, state))
            await asyncio.sleep(0.1)
        gap, last_change, last_packets = 0.0, 0.0, samples[0][1]
        for t, packets, _, _ in samples:
            if packets != last_packets:
                gap, last_change, last_packets = max(gap, t - last_change), t, packets
        return max(gap, samples[-1][0] - last_change), samples

    async def restart_ice_phase(self) -> None:
        """window.__restartIce(): WHIP PATCH, new credentials; watch media and the relay's flows."""
        page = self.page
        before = await page.evaluate("window.__result")
        old_ufrag = before["serverUfrag"]
        answer, (gap, samples) = await asyncio.gather(page.evaluate("window.__restartIce()", timeout=15),
                                                      self.watch_media(RESTART_WATCH_S))
        after = await page.evaluate("window.__result")
        # The old ufrag's flows end once media has left them (the transceiver looks every 0.25 s).
        deadline = time.monotonic() + 10.0
        flows = await self.flows()
        while any(f["ufrag"] == old_ufrag for f in flows) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            flows = await self.flows()
        metrics = await asyncio.to_thread(_http_get, self.transceiver_metrics)
        self.report["restart"] = {
            "status": answer["status"], "etag": answer["etag"], "old_ufrag": old_ufrag,
            "new_ufrag": answer["serverUfrag"],
            "same_session": before["sessionUrl"] == after["sessionUrl"],
            **_media_figures(gap, samples),
            "dtls": [before["dtlsState"], after["dtlsState"]], "srtp": [before["srtpCipher"], after["srtpCipher"]],
            "pair_changes": after["pairChanges"] - before["pairChanges"],
            "flows": flows,
            "ice_restarts": metric_sum(metrics, "rtcrelay_transceiver_ice_restarts_total"),
            "sessions_created": metric_sum(metrics, "rtcrelay_transceiver_sessions_created_total"),
            "sessions_connected": metric_sum(metrics, "rtcrelay_transceiver_sessions_connected_total"),
        }

    def _call_transceiver_pid(self) -> int:
        """The pid of the transceiver the call's route token names (the one holding its tunnel port)."""
        import psutil

        assert self.up is not None
        port = int(self.report["transceiver_tunnel"].rpartition(":")[2])
        return next(p.pid for p in psutil.Process(self.up.pid).children()
                    if any(c.laddr.port == port for c in p.net_connections(kind="udp")))

    async def drain_transceiver_phase(self) -> None:
        """SIGTERM the transceiver that owns the call (a rolling upgrade): it asks the page to
        move; the page calls again, switches once the new call plays, hangs up the old one.
        The page's current call's inbound audio is sampled every 50 ms throughout."""
        page = self.page
        before = await page.evaluate("window.__result")
        sent_at = await page.evaluate("performance.now()")
        os.kill(self._call_transceiver_pid(), signal.SIGTERM)
        start = time.monotonic()
        samples: list[tuple[float, int]] = []
        while time.monotonic() - start < DRAIN_WATCH_S:
            samples.append((time.monotonic() - start, await page.evaluate("window.__audioPackets()")))
            await asyncio.sleep(0.05)
        gap, last_change, last = 0.0, 0.0, samples[0][1]
        for t, packets in samples:
            if packets != last:
                gap, last_change, last = max(gap, t - last_change), t, packets
        gap = max(gap, samples[-1][0] - last_change)
        after = await page.evaluate("window.__result")
        self.report["drain"] = {
            "migrations": after["migrations"], "reconnects": after["reconnects"],
            "moved_after_s": round((after["migratedAtMs"] - sent_at) / 1000, 2) if after["migratedAtMs"] else None,
            "audio_gap_ms": round(gap * 1000), "samples": len(samples),
            "connection_state": after["connectionState"], "old_ufrag": before["serverUfrag"],
            "new_ufrag": after["serverUfrag"], "echoes": after["echoCount"],
            "new_transceiver": json.loads(await self.cli("ufrag", "decode", after["serverUfrag"], "--json"))["target"],
        }
        self.report["server_ufrag"] = after["serverUfrag"]

    async def kill_transceiver_phase(self) -> None:
        """kill -9 the transceiver that owns the call; time how fast the page learns and is
        back on the other one with echoed audio."""
        port = int(self.report["transceiver_tunnel"].rpartition(":")[2])
        owner_pid = self._call_transceiver_pid()
        page = self.page
        killed_at = await page.evaluate("performance.now()")
        os.kill(owner_pid, signal.SIGKILL)
        probe = ("(r => [r.reconnects, r.failedAtMs, r.connectionState, r.connectedAtMs, r.inboundPackets,"
                 " r.echoCount, r.totalAudioEnergy, performance.now()])(window.__result)")
        back_at = None
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline and back_at is None:
            reconnects, failed_at, state, connected_at, packets, echoes, energy, now = await page.evaluate(probe)
            if reconnects and state == "connected" and packets >= 25 and echoes and energy > 0:
                back_at = now
            await asyncio.sleep(0.05)
        self.report["kill"] = {
            "reconnects": reconnects,
            "learned_s": round((failed_at - killed_at) / 1000, 2) if failed_at else None,
            "reconnected_s": round((connected_at - killed_at) / 1000, 2) if reconnects and connected_at else None,
            "audio_back_s": round((back_at - killed_at) / 1000, 2) if back_at else None,
            "relay_flows": await self.flows(),
            "killed_tunnel_port": port,
        }
        self.report["server_ufrag"] = (await page.evaluate("window.__result"))["serverUfrag"]

def main() -> int:
    parser = argparse.ArgumentParser(description="the browser-call scenario (run by test_browser_call)")
    parser.add_argument("--chromium", required=True)
    parser.add_argument("--chromium-arg", action="append", default=[], help="an extra Chromium switch (debugging)")
    parser.add_argument("--rebind", action="store_true", help="NAT the call and move its mapping mid-call")
    parser.add_argument("--restart-ice", action="store_true", help="restart ICE mid-call (WHIP PATCH)")
    parser.add_argument("--kill-transceiver", action="store_true", help="kill -9 the call's transceiver mid-call")
    parser.add_argument("--drain-transceiver", action="store_true", help="SIGTERM the call's transceiver mid-call")
    return scenario_main(parser, lambda args: ChromiumScenario(
        args.out, args.chromium, args.chromium_arg, args.rebind, args.restart_ice, args.kill_transceiver,
        args.drain_transceiver))


if __name__ == "__main__":
    sys.exit(main())
