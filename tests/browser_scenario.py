"""The browser-call scenario both browser tests run (test_browser_call.py: Chromium over the
DevTools protocol; test_browser_firefox.py: Firefox over WebDriver BiDi).

The scenario: ``rtcrelay up`` (the README's main job: the multi-process relay, transceivers
and the demo page, on free ports), a headless browser on the page, ``window.__call()``, then
what :func:`check_call` asserts: connected, a data-channel echo, inbound audio with energy,
the relay's address as the only candidate of the answer and the remote side of the selected
pair, the browser's flow in the relay's table (``rtcrelay flows list --json``), and after
``window.__hangup()`` the flow gone and Ctrl-C stopping ``rtcrelay up`` cleanly.

It runs in a fresh network namespace that has only ``lo`` (``unshare --net``: as root, else in
a user namespace too): each browser gathers candidates on its other interfaces otherwise (see
test_browser_call.py), and no packet of the test can reach any interface but the loopback.
The pytest process starts the scenario (the test file run as a script, :func:`scenario_main`)
in that namespace, reads its JSON report and asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from browser_ws import tail

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCENARIO_TIMEOUT_S = 90.0  # the scenario's own deadline (it cleans up after it)
CHILD_TIMEOUT_S = 150.0  # the pytest side's last resort
MIN_INBOUND_PACKETS = 50
FLOW_GONE_TIMEOUT_S = 5.0

RTCRELAY = [sys.executable, "-m", "cli.main"]


# ---------------------------------------------------------------------------------------
# the pytest side
# ---------------------------------------------------------------------------------------


def only_loopback() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def namespace_prefix() -> list[str]:
    """How to run the scenario where only ``lo`` exists ([] when that is already so here)."""
    if only_loopback():
        return []
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("the browser test needs `unshare` (util-linux) to run the browser in a loopback-only network namespace")
    options = [["--net"]] if os.geteuid() == 0 else []
    options.append(["--user", "--map-root-user", "--net"])  # unprivileged: a user namespace too
    errors = []
    for opts in options:
        probe = subprocess.run([unshare, *opts, "--", sys.executable, "-c", "pass"], capture_output=True, text=True, timeout=10)
        if probe.returncode == 0:
            return [unshare, *opts, "--"]
        errors.append(f"unshare {' '.join(opts)}: {probe.stderr.strip() or probe.returncode}")
    pytest.fail("cannot create a network namespace for the browser test (the browser must see only the loopback):\n"
                + "\n".join(errors))


def _kill_groups(pids_file: Path) -> None:
    """Last resort after a hung scenario: the process groups it recorded (all ours)."""
    try:
        pids = json.loads(pids_file.read_text())
    except (OSError, ValueError):
        return
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def require_browser(found: str | None, name: str, env_var: str, where: str, package: str) -> str:
    """The browser's path, or the test fails (not skipped: scripts/test installs the browsers)."""
    if found is None:
        pytest.fail(f"{name} not found ({os.environ.get(env_var) or where}): the browser test needs it; scripts/test "
                    f"installs it with scripts/browser-deps.sh (apt install {package}), or set {env_var}=/path/to/it")
    return found


def run_scenario(script: str, tmp_path: Path, *args: str) -> tuple[dict[str, Any], str, list[str]]:
    """Run ``script`` (a test file's scenario) in a loopback-only namespace; its report and a failure text."""
    prefix = namespace_prefix()
    out = tmp_path / "scenario"
    out.mkdir()
    cmd = [*prefix, sys.executable, str(Path(script).resolve()), "--out", str(out), *args]
    paths = [str(HERE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    started = time.monotonic()
    with open(out / "scenario.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            proc.wait(CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            _kill_groups(out / "pids.json")
            pytest.fail(f"the browser scenario did not finish in {CHILD_TIMEOUT_S} s:\n{tail(out / 'scenario.log', 30)}")
    elapsed = time.monotonic() - started

    report_path = out / "report.json"
    if not report_path.exists():
        pytest.fail(f"the browser scenario exited with {proc.returncode} and no report:\n{tail(out / 'scenario.log', 60)}")
    report: dict[str, Any] = json.loads(report_path.read_text())
    details = "\n".join(
        [
            f"scenario exit {proc.returncode}, {elapsed:.1f} s; files in {out}",
            f"report: {json.dumps({k: v for k, v in report.items() if k != 'logs'}, indent=1, default=str)}",
            *(f"--- {name} (tail) ---\n{text}" for name, text in report.get("logs", {}).items()),
        ]
    )
    print(f"\nbrowser call ({report.get('browser', {}).get('version')}): namespace "
          f"{' '.join(prefix) or '(current, loopback only)'}; timings {report.get('timings')}; "
          f"screenshot {report.get('screenshot')}")
    assert report.get("error") is None, f"the scenario failed: {report['error']}\n{details}"
    assert report["interfaces"] == ["lo"], f"the scenario ran with other interfaces: {report['interfaces']}\n{details}"
    return report, details, prefix


def _candidate_address(line: str) -> str:
    """``a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ ...`` -> address:port."""
    fields = line.split()
    return f"{fields[4]}:{fields[5]}"


def check_call(report: dict[str, Any], details: str) -> None:
    """What a call through the relay must show, whatever the browser."""
    page = report["page"]
    relay_addr = f"127.0.0.1:{report['relay_port']}"
    assert page["connectionState"] == "connected", details
    assert page["dataChannelEcho"], f"no data-channel message came back\n{details}"
    assert json.loads(page["dataChannelEcho"]).get("type") == "ping", details
    assert page["echoRttMs"] is not None, details
    assert page["inboundPackets"] >= MIN_INBOUND_PACKETS, details
    assert page["totalAudioEnergy"] > 0, f"the echoed audio is silent\n{details}"
    assert report["audio_played_s"] > 0, f"the page's <audio> element did not play the echo\n{details}"
    # the relay is the only way in: the answer's one candidate, and the pair the browser chose
    answer = report["answer_candidates"]
    assert answer and {_candidate_address(line) for line in answer} == {relay_addr}, f"answer candidates: {answer}\n{details}"
    assert page["selectedPair"]["remote"] == relay_addr, details
    assert page["selectedPair"]["local"].rpartition(":")[0] == "127.0.0.1", details

    flows = report["flows_in_call"]
    assert flows, f"the relay's flow table has no flow for the call\n{details}"
    browser_flows = [f for f in flows if f["client"] == page["selectedPair"]["local"]]
    assert browser_flows, f"no flow from the browser's {page['selectedPair']['local']}\n{details}"
    for flow in flows:
        assert flow["client"].startswith("127.0.0.1:"), f"the relay saw a non-loopback client: {flow}\n{details}"
        assert flow["relay"] == relay_addr, details
        assert flow["transceiver"] == report["transceiver_tunnel"], details
        assert flow["ufrag"] == report["server_ufrag"], details
    assert browser_flows[0]["packets_in"] > 0 and browser_flows[0]["packets_out"] > 0, details

    assert report["hangup"]["hangupStatus"] == 204, details
    assert report["flows_after_hangup"] == [], f"flows left {FLOW_GONE_TIMEOUT_S} s after hang-up\n{details}"
    assert report["up_exit"] == 0, f"rtcrelay up did not stop cleanly on Ctrl-C\n{details}"
    assert report["table_left"] is False, f"rtcrelay up left its shm table behind\n{details}"


def call_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The figures worth printing from a call's report."""
    page = report["page"]
    return {
        **report["timings"], "setup_ms": page["setupMs"], "echo_rtt_ms": page["echoRttMs"], "ice_rtt_ms": page["rttMs"],
        "inbound_packets": page["inboundPackets"], "lost": page["inboundPacketsLost"], "jitter_ms": page["jitterMs"],
        "audio_energy": round(page["totalAudioEnergy"], 4), "codec": page["codec"], "srtp": page["srtpCipher"],
    }


# ---------------------------------------------------------------------------------------
# the scenario (a test file run as a script, inside the namespace)
# ---------------------------------------------------------------------------------------


def loopback_up() -> None:
    """``ip link set lo up`` without iproute2 (a fresh namespace's lo is down)."""
    import fcntl

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, siocgifflags, req))[1]
        if not flags & iff_up:
            fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def port_below_ephemeral(kind: int, taken: set[int]) -> int:
    """A free port below the kernel's ephemeral range, for `rtcrelay up` to bind. The browser
    starts meanwhile, and every socket it (or a transceiver) binds to port 0 takes an
    ephemeral port: one of those could otherwise take a port between its choice here and
    `rtcrelay up` binding it. (In the scenario's own namespace nothing else binds ports.)"""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(10000, max(low, 10001))
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no free port below the ephemeral range ({low})")


class CallScenario:
    """``rtcrelay up``, a browser on its page, one call, hang-up, Ctrl-C. A browser's subclass
    starts the browser (:meth:`launch_browser`) and opens the page (:meth:`open_page`);
    :meth:`phases` is what happens mid-call (nothing here)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.report: dict[str, Any] = {"error": None, "timings": {}, "logs": {}}
        self.pids: dict[str, int] = {}
        self.up: subprocess.Popen[bytes] | None = None
        self.name = ""
        self.transceiver_metrics = ""
        self.browser: Any = None  # a browser_ws.BrowserProcess
        self.page: Any = None  # its browser_ws.Tab on the demo page

    def record_pid(self, name: str, pid: int) -> None:
        self.pids[name] = pid
        (self.out / "pids.json").write_text(json.dumps(self.pids))

    async def cli(self, *args: str) -> str:
        """An `rtcrelay` command, as an operator runs it; its stdout."""
        proc = await asyncio.to_thread(subprocess.run, [*RTCRELAY, *args], capture_output=True, text=True, timeout=30, cwd=ROOT)
        if proc.returncode != 0:
            raise AssertionError(f"rtcrelay {' '.join(args)} exited with {proc.returncode}: {proc.stderr}")
        return proc.stdout

    async def flows(self) -> list[dict[str, Any]]:
        return json.loads(await self.cli("flows", "list", "--json", "--name", self.name))

    async def launch_browser(self) -> None:
        """Start the browser: ``self.browser``, its pid recorded, ``report["browser"]`` (version, args)."""
        raise NotImplementedError

    async def open_page(self, url: str) -> None:
        """Load ``url`` in the browser: ``self.page``."""
        raise NotImplementedError

    async def phases(self) -> None:
        """What happens mid-call, between the checks of the call and the hang-up."""

    async def start_up(self) -> str:
        """`rtcrelay up` (relay + transceivers + demo page) on free ports, ready; the page's URL."""
        from relayproc import wait_for

        ports: dict[str, int] = {}
        for flag, kind in (("--relay-port", socket.SOCK_DGRAM), ("--http-port", socket.SOCK_STREAM),
                           ("--signalling-port", socket.SOCK_STREAM), ("--admin-port", socket.SOCK_STREAM)):
            ports[flag] = port_below_ephemeral(kind, set(ports.values()))
        self.name = f"browser{os.getpid()}"
        args = [arg for flag, port in ports.items() for arg in (flag, str(port))]
        t = time.monotonic()
        with open(self.out / "up.log", "wb") as log:
            self.up = subprocess.Popen([*RTCRELAY, "up", *args, "--name", self.name], stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, cwd=ROOT)
        self.record_pid("up", self.up.pid)
        self.report["relay_port"] = ports["--relay-port"]
        self.transceiver_metrics = f"http://127.0.0.1:{ports['--signalling-port']}/metrics"

        def up_ready() -> bool:
            if self.up is not None and self.up.poll() is not None:
                raise AssertionError(f"rtcrelay up exited with {self.up.returncode}:\n{tail(self.out / 'up.log', 30)}")
            return "rtcrelay demo is up" in (self.out / "up.log").read_text(errors="replace")

        await asyncio.to_thread(wait_for, up_ready, 45.0, "rtcrelay up to print its banner")
        self.report["timings"]["up_ready_s"] = round(time.monotonic() - t, 3)
        return f"http://127.0.0.1:{ports['--http-port']}/"

    async def run(self) -> None:
        timings = self.report["timings"]
        self.report["interfaces"] = [name for _, name in socket.if_nameindex()]
        # The browser starts while `rtcrelay up` does (both take seconds); both are waited for,
        # so that a failure of one never leaves the other starting unseen.
        results = await asyncio.gather(self.start_up(), self.launch_browser(), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        page_url = results[0]
        timings["browser_launch_s"] = round(self.browser.launch_seconds, 3)

        t = time.monotonic()
        await self.open_page(page_url)
        page = self.page
        await page.wait_for("window.__result && window.__result.phase === 'ready'", 10, what="the page to read config.json",
                            show="window.__result")
        timings["page_load_s"] = round(time.monotonic() - t, 3)

        t = time.monotonic()
        await page.evaluate("window.__call()", timeout=20)
        timings["call_to_answer_s"] = round(time.monotonic() - t, 3)
        candidates = "(sdp => (sdp || '').split(/\\r?\\n/).filter(l => l.startsWith('a=candidate:')))"
        self.report["offer_candidates"] = await page.evaluate(f"{candidates}(window.__sdp.offer)")
        self.report["answer_candidates"] = await page.evaluate(f"{candidates}(window.__sdp.answer)")
        await page.wait_for("window.__result.connectionState === 'connected' || window.__result.error", 20,
                            what="connectionState 'connected'", show="window.__result")
        timings["call_to_connected_s"] = round(time.monotonic() - t, 3)
        self.report["page"] = await page.evaluate("window.__result")
        if self.report["page"]["error"]:
            raise AssertionError(f"the page reports: {self.report['page']['error']}")
        await page.wait_for(
            f"(r => r.dataChannelEcho && r.inboundPackets >= {MIN_INBOUND_PACKETS} && r.totalAudioEnergy > 0"
            " && r.selectedPair.remote)(window.__result)",
            20, what=f"an echo, {MIN_INBOUND_PACKETS}+ audio packets with energy, a selected pair", show="window.__result",
        )
        timings["call_to_media_s"] = round(time.monotonic() - t, 3)
        # one more stats round for the screenshot; meanwhile the page's <audio> must play on
        played = "document.getElementById('remote-audio').currentTime"
        before = await page.evaluate(played)
        await asyncio.sleep(0.6)
        self.report["audio_played_s"] = round(await page.evaluate(played) - before, 3)
        self.report["page"] = await page.evaluate("window.__result")
        self.report["screenshot"] = str(await page.screenshot(self.out / "call.png"))

        # the relay's flow table, as an operator reads it: the browser's flow
        self.report["flows_in_call"] = await self.flows()
        self.report["server_ufrag"] = ufrag = self.report["page"]["serverUfrag"]
        decoded = json.loads(await self.cli("ufrag", "decode", ufrag, "--json"))
        self.report["transceiver_tunnel"] = decoded["target"]  # the route token names the transceiver

        await self.phases()

        # hang up: DELETE -> SessionClosed -> the flow leaves the table
        t = time.monotonic()
        self.report["hangup"] = await page.evaluate("window.__hangup()", timeout=15)
        timings["hangup_http_s"] = round(time.monotonic() - t, 3)
        deadline = time.monotonic() + FLOW_GONE_TIMEOUT_S
        remaining = await self.flows()
        while remaining and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            remaining = await self.flows()
        timings["hangup_to_flow_gone_s"] = round(time.monotonic() - t, 3) if not remaining else None
        self.report["flows_after_hangup"] = remaining
        self.report["page_after_hangup"] = await page.evaluate("window.__result")

    async def failure_evidence(self) -> None:
        if self.page is not None:
            with contextlib.suppress(Exception):
                self.report["page"] = await self.page.evaluate("window.__result", timeout=3)
            with contextlib.suppress(Exception):
                self.report["screenshot"] = str(await self.page.screenshot(self.out / "failure.png", timeout=5))
            with contextlib.suppress(Exception):
                self.report["sdp"] = await self.page.evaluate("window.__sdp", timeout=3)
        if self.up is not None:
            with contextlib.suppress(Exception):
                self.report["flows_at_failure"] = await self.flows()

    async def close(self) -> None:
        if self.page is not None:
            self.report["logs"]["page console"] = self.page.console_tail(40)
        if self.browser is not None:
            self.report["logs"]["browser"] = self.browser.stderr_tail(25)
            with contextlib.suppress(Exception):
                await self.browser.close()
        if self.up is not None:
            # Ctrl-C, as a person stops the demo: everything must stop cleanly, table removed.
            if self.up.poll() is None:
                self.up.send_signal(signal.SIGINT)
                try:
                    await asyncio.to_thread(self.up.wait, 20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.up.pid, signal.SIGKILL)
                    await asyncio.to_thread(self.up.wait, 5)
            self.report["up_exit"] = self.up.returncode
            self.report["table_left"] = os.path.exists(f"/dev/shm/rtcrelay-{self.name}.table")
            self.report["logs"]["up"] = tail(self.out / "up.log", 40)

    async def execute(self) -> dict[str, Any]:
        """run() within the scenario's deadline; whatever happens, the evidence and a clean-up."""
        try:
            await asyncio.wait_for(self.run(), SCENARIO_TIMEOUT_S)
        except BaseException as exc:  # everything goes into the report
            kind = "timed out" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
            self.report["error"] = f"{kind}: {exc}"
            self.report["traceback"] = traceback.format_exc()
            await self.failure_evidence()
        finally:
            await self.close()
        return self.report


def scenario_main(parser: argparse.ArgumentParser, make: Callable[[argparse.Namespace], CallScenario]) -> int:
    """The scenario process: parse (``--out`` added here), bring ``lo`` up, run, write report.json."""
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not only_loopback():
        print("warning: running with interfaces other than lo:", socket.if_nameindex(), file=sys.stderr)
    loopback_up()
    report = asyncio.run(make(args).execute())
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "logs"}, indent=1, default=str))
    return 0 if report["error"] is None else 1
