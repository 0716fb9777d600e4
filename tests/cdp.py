"""A small Chrome DevTools Protocol driver for the browser test: no extra packages (aiohttp).

    async with await Browser.launch(tmp_dir) as browser:
        page = await browser.new_page("http://127.0.0.1:8080/")
        await page.evaluate("window.__call()")
        result = await page.wait_for("window.__result && window.__result.connectionState === 'connected'", 20)
        await page.screenshot(tmp_dir / "call.png")

Headless Chromium is started with the flags of docs BROWSER-TESTING.md (nothing leaves the
machine: no background networking, every host name but 127.0.0.1 unresolvable, no proxy, no
mDNS candidates), a fresh ``--user-data-dir`` each time and ``--remote-debugging-port=0``; the
port is read from ``<user-data-dir>/DevToolsActivePort``. One websocket to the browser target,
pages attached with ``flatten`` sessions. The browser runs in its own process group
(``start_new_session``), which :meth:`Browser.close` kills — that group only (the process and
websocket plumbing is tests/browser_ws.py, shared with the Firefox driver tests/bidi.py).

Every wait is bounded; errors name what was awaited and carry the tail of the browser's
stderr and the page's console.
"""

from __future__ import annotations

import base64
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from browser_ws import BrowserError, BrowserProcess, Tab, find_browser, fresh_profile

__all__ = ["Browser", "CDPError", "Page", "chromium_flags", "find_chromium"]

CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")

# Merged into ONE --disable-features flag: Chromium only honours the last one given.
DISABLED_FEATURES = (
    "WebRtcHideLocalIpsWithMdns",  # real host candidates, no .local names / mDNS multicast
    "MediaRouter",  # no cast discovery (SSDP/mDNS)
    "DialMediaRouteProvider",
    "OptimizationHints",
    "Translate",
    "AutofillServerCommunication",
    "CertificateTransparencyComponentUpdater",
    "InterestFeedContentSuggestions",
)


class CDPError(BrowserError):
    """What the DevTools driver raises."""


def find_chromium() -> str | None:
    """$RTCRELAY_CHROMIUM if set (None when it is not executable), else Debian's real binary or its wrapper."""
    return find_browser("RTCRELAY_CHROMIUM", CHROMIUM_CANDIDATES, ("chromium",))


def chromium_flags(user_data_dir: Path, *, fake_audio_file: Path | None = None, window_size: tuple[int, int] = (1280, 900)) -> list[str]:
    flags = [
        "--headless=new",
        "--no-sandbox",  # root needs it
        f"--user-data-dir={user_data_dir}",
        "--remote-debugging-port=0",
        # media: a fake microphone, no permission prompt, play without a gesture
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        "--autoplay-policy=no-user-gesture-required",
        # WebRTC on the loopback (a namespace with only lo would otherwise gather nothing)
        "--allow-loopback-in-peer-connection",
        "--disable-features=" + ",".join(DISABLED_FEATURES),
        # nothing leaves the machine
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--no-proxy-server",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-breakpad",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--metrics-recording-only",
        "--no-pings",
        "--password-store=basic",
        "--use-mock-keychain",
        # quiet, quick, headless
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-dev-shm-usage",
        "--disable-renderer-backgrounding",
        "--disable-background-timer-throttling",
        "--disable-backgrounding-occluded-windows",
        f"--window-size={window_size[0]},{window_size[1]}",
    ]
    if fake_audio_file is not None:
        flags.append(f"--use-file-for-fake-audio-capture={fake_audio_file}")
    return flags


class Browser(BrowserProcess):
    """A headless Chromium process and one DevTools websocket to it."""

    name = "Chromium"
    error = CDPError

    def __init__(self, proc: subprocess.Popen[bytes], work_dir: Path, log_path: Path, own_work_dir: bool) -> None:
        super().__init__(proc, work_dir, log_path, own_work_dir)
        self.pages: list[Page] = []
        self.version: dict[str, Any] = {}

    # -- launch ---------------------------------------------------------------------------

    @classmethod
    async def launch(
        cls,
        work_dir: Path | None = None,
        *,
        executable: str | None = None,
        extra_args: Iterable[str] = (),
        fake_audio_file: Path | None = None,
        timeout: float = 20.0,
        env: dict[str, str] | None = None,
    ) -> Browser:
        """Start Chromium with a fresh profile under ``work_dir`` (default: a new temp dir)."""
        executable = executable or find_chromium()
        if not executable:
            raise CDPError("Chromium not found: run scripts/browser-deps.sh (apt install chromium) or set RTCRELAY_CHROMIUM")
        work_dir, own, profile = fresh_profile(work_dir, "rtcrelay-cdp-")
        log_path = work_dir / "chromium.log"
        args = [executable, *chromium_flags(profile, fake_audio_file=fake_audio_file), *extra_args, "about:blank"]
        started = time.monotonic()
        browser = cls(cls.start(args, log_path, env), work_dir, log_path, own)
        browser.args = args
        try:
            port, path = await browser.wait_file(profile / "DevToolsActivePort", _port_and_path, timeout, "DevTools")
            await browser.connect(f"ws://127.0.0.1:{port}{path}", timeout)
            browser.version = await browser.send("Browser.getVersion", timeout=timeout)
        except BaseException:
            await browser.close()
            raise
        browser.launch_seconds = time.monotonic() - started
        return browser

    # -- protocol ---------------------------------------------------------------------------

    async def send(self, method: str, params: dict[str, Any] | None = None, *, session_id: str | None = None,
                   timeout: float = 10.0) -> dict[str, Any]:
        """One command; its ``result``, or CDPError (protocol error, timeout, dead browser)."""
        message: dict[str, Any] = {"method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        reply = await self.exchange(message, timeout)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error'].get('message')} ({reply['error'].get('data', '')})")
        return reply.get("result", {})

    async def new_page(self, url: str = "about:blank", *, timeout: float = 15.0) -> Page:
        """A new tab, attached; navigated to ``url`` and loaded (document.readyState complete)."""
        target = await self.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, timeout=timeout)
        page = Page(self, target["targetId"], attached["sessionId"])
        self.pages.append(page)
        await page.send("Runtime.enable")
        await page.send("Page.enable")
        if url != "about:blank":
            await page.goto(url, timeout=timeout)
        return page

    async def say_goodbye(self) -> None:
        await self.send("Browser.close", timeout=2.0)


def _port_and_path(text: str) -> tuple[int, str] | None:
    """DevToolsActivePort: the port, then the browser target's path (None until both are written)."""
    lines = text.split()
    return (int(lines[0]), lines[1]) if len(lines) >= 2 else None


class Page(Tab):
    """One tab: evaluate JavaScript, poll a condition, screenshot; its console is kept."""

    error = CDPError

    def __init__(self, browser: Browser, target_id: str, session_id: str) -> None:
        super().__init__()
        self.browser = browser
        self.target_id = target_id
        self.session_id = session_id
        browser.add_listener(self._on_event)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("sessionId") != self.session_id:
            return
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.note_console(f"console.{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exc = details.get("exception", {})
            self.note_console(f"uncaught: {exc.get('description') or details.get('text')}")

    async def send(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 10.0) -> dict[str, Any]:
        return await self.browser.send(method, params, session_id=self.session_id, timeout=timeout)

    async def goto(self, url: str, *, timeout: float = 15.0) -> None:
        result = await self.send("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise CDPError(f"cannot load {url}: {result['errorText']}")
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", timeout,
                            what=f"{url} to load")

    async def evaluate(self, expression: str, *, timeout: float = 10.0, await_promise: bool = True) -> Any:
        """The value of ``expression`` (a promise is awaited); page exceptions raise CDPError."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": await_promise, "returnByValue": True, "userGesture": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"evaluating {expression[:80]!r} threw: {text}\nconsole:\n{self.console_tail()}")
        return result.get("result", {}).get("value")

    async def screenshot(self, path: Path, *, timeout: float = 10.0) -> Path:
        data = await self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, timeout=timeout)
        path = Path(path)
        path.write_bytes(base64.b64decode(data["data"]))
        return path
