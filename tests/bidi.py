"""A small WebDriver BiDi driver for headless Firefox: no extra packages (aiohttp), no geckodriver.

    async with await Firefox.launch(tmp_dir) as firefox:
        tab = await firefox.new_tab("http://127.0.0.1:8080/")
        await tab.evaluate("window.__call()")
        result = await tab.wait_for("window.__result && window.__result.connectionState === 'connected'", 20)
        await tab.screenshot(tmp_dir / "call.png")

Firefox speaks WebDriver BiDi itself (Debian has no geckodriver): it is started headless with
a fresh profile (``--profile DIR --no-remote --new-instance``) and ``--remote-debugging-port 0``;
the port it chose is read from ``<profile>/WebDriverBiDiServer.json``, then one websocket to
``/session``: ``session.new``, ``browsingContext.navigate``, ``script.evaluate`` (promises
awaited), ``log.entryAdded`` for the console. The process runs in its own process group, which
:meth:`Firefox.close` kills by its pid — that group only (tests/browser_ws.py, shared with
tests/cdp.py).

What Firefox needs to call over the loopback with a fake microphone is in :data:`FIREFOX_PREFS`
(written to the profile's user.js; docs/BROWSERS.md says why each one).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from browser_ws import BrowserError, BrowserProcess, Tab, find_browser, fresh_profile

__all__ = ["FIREFOX_PREFS", "BiDiError", "Firefox", "FirefoxTab", "find_firefox"]

FIREFOX_CANDIDATES = ("/usr/lib/firefox-esr/firefox-esr", "/usr/bin/firefox-esr", "/usr/bin/firefox")

FIREFOX_PREFS: dict[str, bool | int | str] = {
    # the fake microphone (a steady 1 kHz tone) instead of a device
    "media.navigator.streams.fake": True,
    # The microphone allowed for every origin, as a saved permission: no prompt, and the only
    # way Firefox gathers candidates on every interface (127.0.0.1 here). Without a
    # permission a page gets only its default-route addresses (none in a loopback-only
    # namespace: the offer has no candidate). It also shows real addresses, not .local names.
    "permissions.default.microphone": 1,
    # host candidates on the loopback at all
    "media.peerconnection.ice.loopback": True,
    # No audio device here: cubeb's mock backend keeps the audio graph running; without it
    # every AudioContext stays "suspended" (the demo page's call does not need one: its
    # <audio> element plays and getStats measures the echo's energy either way).
    "media.cubeb.force_mock_context": True,
    # Nothing leaves the machine (the test runs in a loopback-only namespace besides). The remote
    # agent applies its own recommended prefs at start (remote.prefs.recommended, on by default):
    # no updates, safe browsing, captive-portal or connectivity checks; Remote Settings and
    # telemetry pointed at dummy addresses. On top of those, from the first moment:
    "network.proxy.type": 0,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "app.update.enabled": False,
    "app.update.auto": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.unified": False,
    "toolkit.telemetry.archive.enabled": False,
    "browser.newtabpage.enabled": False,
    "browser.aboutwelcome.enabled": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "app.normandy.enabled": False,
    "app.shield.optoutstudies.enabled": False,
}


class BiDiError(BrowserError):
    """What the WebDriver BiDi driver raises."""


def find_firefox() -> str | None:
    """$RTCRELAY_FIREFOX if set (None when it is not executable), else Debian's firefox-esr."""
    return find_browser("RTCRELAY_FIREFOX", FIREFOX_CANDIDATES, ("firefox-esr", "firefox"))


def write_prefs(profile: Path, prefs: dict[str, bool | int | str]) -> None:
    """user.js: read at every start, over whatever prefs.js holds."""
    lines = [f"user_pref({json.dumps(name)}, {json.dumps(value)});" for name, value in prefs.items()]
    (profile / "user.js").write_text("\n".join(lines) + "\n")


def _bidi_port(text: str) -> int | None:
    """WebDriverBiDiServer.json: {"ws_host": ..., "ws_port": N} once the server listens."""
    port = json.loads(text).get("ws_port")
    return int(port) if port else None


class Firefox(BrowserProcess):
    """A headless Firefox process and one WebDriver BiDi session over a websocket."""

    name = "Firefox"
    error = BiDiError

    def __init__(self, proc: Any, work_dir: Path, log_path: Path, own_work_dir: bool) -> None:
        super().__init__(proc, work_dir, log_path, own_work_dir)
        self.tabs: list[FirefoxTab] = []
        self.capabilities: dict[str, Any] = {}

    @property
    def version(self) -> str:
        return f"{self.capabilities.get('browserName', 'firefox')} {self.capabilities.get('browserVersion', '?')}"

    @classmethod
    async def launch(
        cls,
        work_dir: Path | None = None,
        *,
        executable: str | None = None,
        prefs: dict[str, bool | int | str] | None = None,
        extra_args: Iterable[str] = (),
        window_size: tuple[int, int] = (1280, 900),
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> Firefox:
        """Start Firefox with a fresh profile under ``work_dir`` (default: a new temp dir), the
        prefs of :data:`FIREFOX_PREFS` updated by ``prefs``, and open a BiDi session."""
        executable = executable or find_firefox()
        if not executable:
            raise BiDiError("Firefox not found: run scripts/browser-deps.sh (apt install firefox-esr) or set RTCRELAY_FIREFOX")
        work_dir, own, profile = fresh_profile(work_dir, "rtcrelay-bidi-")
        write_prefs(profile, {**FIREFOX_PREFS, **(prefs or {})})
        log_path = work_dir / "firefox.log"
        args = [
            executable, "--headless", "--no-remote", "--new-instance", "--profile", str(profile),
            "--remote-debugging-port", "0", "--remote-allow-hosts", "127.0.0.1",
            "--window-size", f"{window_size[0]},{window_size[1]}", *extra_args, "about:blank",
        ]
        started = time.monotonic()
        firefox = cls(cls.start(args, log_path, {"MOZ_CRASHREPORTER_DISABLE": "1", **(env or {})}), work_dir, log_path, own)
        firefox.args = args
        try:
            port = await firefox.wait_file(profile / "WebDriverBiDiServer.json", _bidi_port, timeout, "WebDriver BiDi")
            await firefox.connect(f"ws://127.0.0.1:{port}/session", timeout)
            session = await firefox.send("session.new", {"capabilities": {}}, timeout=timeout)
            firefox.capabilities = session.get("capabilities", {})
            firefox.add_listener(firefox._on_event)
            await firefox.send("session.subscribe", {"events": ["log.entryAdded"]}, timeout=timeout)
        except BaseException:
            await firefox.close()
            raise
        firefox.launch_seconds = time.monotonic() - started
        return firefox

    async def send(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 10.0) -> dict[str, Any]:
        """One command; its ``result``, or BiDiError (protocol error, timeout, dead browser)."""
        reply = await self.exchange({"method": method, "params": params or {}}, timeout)
        if reply.get("type") == "error":
            raise BiDiError(f"{method}: {reply.get('error')}: {reply.get('message')}")
        return reply.get("result", {})

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("method") != "log.entryAdded":
            return
        params = event.get("params", {})
        context = params.get("source", {}).get("context")
        line = (f"console.{params.get('method', params.get('level'))}: {params.get('text')}" if params.get("type") == "console"
                else f"{params.get('type')} {params.get('level')}: {params.get('text')}")
        for tab in self.tabs:
            if tab.context == context:
                tab.note_console(line)

    async def new_tab(self, url: str | None = None, *, timeout: float = 15.0) -> FirefoxTab:
        """The first top-level browsing context (the window Firefox opened), navigated to ``url``."""
        tree = await self.send("browsingContext.getTree", {"maxDepth": 0}, timeout=timeout)
        contexts = tree.get("contexts", [])
        if self.tabs or not contexts:
            created = await self.send("browsingContext.create", {"type": "tab"}, timeout=timeout)
            context = created["context"]
        else:
            context = contexts[0]["context"]
        tab = FirefoxTab(self, context)
        self.tabs.append(tab)
        if url is not None:
            await tab.goto(url, timeout=timeout)
        return tab

    async def say_goodbye(self) -> None:
        await self.send("browser.close", timeout=2.0)


class FirefoxTab(Tab):
    """One browsing context: evaluate JavaScript, poll a condition, screenshot; its console is kept."""

    error = BiDiError

    def __init__(self, firefox: Firefox, context: str) -> None:
        super().__init__()
        self.firefox = firefox
        self.context = context

    async def goto(self, url: str, *, timeout: float = 15.0) -> None:
        await self.firefox.send("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"},
                                timeout=timeout)

    async def evaluate(self, expression: str, *, timeout: float = 10.0) -> Any:
        """The value of ``expression`` (a promise is awaited) as JSON makes it; page exceptions raise BiDiError."""
        wrapped = f"(async () => JSON.stringify(await ({expression})))()"
        result = await self.firefox.send(
            "script.evaluate",
            {"expression": wrapped, "target": {"context": self.context}, "awaitPromise": True,
             "resultOwnership": "none", "userActivation": True},
            timeout=timeout,
        )
        if result.get("type") == "exception":
            details = result.get("exceptionDetails", {})
            raise BiDiError(f"evaluating {expression[:80]!r} threw: {details.get('text')}\nconsole:\n{self.console_tail()}")
        value = result.get("result", {})
        return json.loads(value["value"]) if value.get("type") == "string" else None

    async def screenshot(self, path: Path, *, timeout: float = 10.0) -> Path:
        data = await self.firefox.send("browsingContext.captureScreenshot", {"context": self.context, "origin": "document"},
                                       timeout=timeout)
        path = Path(path)
        path.write_bytes(base64.b64decode(data["data"]))
        return path
