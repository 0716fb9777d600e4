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
(``start_new_session``), which :meth:`Browser.close` kills — that group only.

Every wait is bounded; errors name what was awaited and carry the tail of the browser's
stderr and the page's console.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp

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


class CDPError(RuntimeError):
    """A protocol error, a page exception, a timeout or a dead browser; the text says which."""


def find_chromium() -> str | None:
    """$RTCRELAY_CHROMIUM if set (None when it is not executable), else Debian's real binary or its wrapper."""
    env = os.environ.get("RTCRELAY_CHROMIUM")
    candidates = [env] if env else list(CHROMIUM_CANDIDATES)  # an explicit choice is not second-guessed
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None if env else shutil.which("chromium")


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


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no browser log)"
    return "\n".join(text.splitlines()[-lines:]) or "(browser log empty)"


class Browser:
    """A headless Chromium process and one DevTools websocket to it."""

    def __init__(self, proc: subprocess.Popen[bytes], work_dir: Path, log_path: Path, own_work_dir: bool) -> None:
        self.proc = proc
        self.work_dir = work_dir
        self.log_path = log_path
        self._own_work_dir = own_work_dir
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._closed_reason: str | None = None
        self.pages: list[Page] = []
        self.launch_seconds: float | None = None
        self.version: dict[str, Any] = {}
        self.args: list[str] = []

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
        own = work_dir is None
        work_dir = Path(tempfile.mkdtemp(prefix="rtcrelay-cdp-")) if work_dir is None else Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        profile = Path(tempfile.mkdtemp(prefix="profile-", dir=work_dir))  # never reused
        log_path = work_dir / "chromium.log"
        args = [executable, *chromium_flags(profile, fake_audio_file=fake_audio_file), *extra_args, "about:blank"]
        started = time.monotonic()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: close() kills exactly that
                env={**os.environ, **(env or {})},
            )
        browser = cls(proc, work_dir, log_path, own)
        browser.args = args
        try:
            port, path = await browser._wait_port_file(profile / "DevToolsActivePort", timeout)
            await browser._connect(f"ws://127.0.0.1:{port}{path}", timeout)
            browser.version = await browser.send("Browser.getVersion", timeout=timeout)
        except BaseException:
            await browser.close()
            raise
        browser.launch_seconds = time.monotonic() - started
        return browser

    async def _wait_port_file(self, path: Path, timeout: float) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f"Chromium exited with {self.proc.returncode} before DevTools was up:\n{_tail(self.log_path)}")
            try:
                lines = path.read_text().split()
            except FileNotFoundError:
                lines = []
            if len(lines) >= 2:
                return int(lines[0]), lines[1]
            await asyncio.sleep(0.02)
        raise CDPError(f"no {path.name} after {timeout} s (Chromium did not open DevTools):\n{_tail(self.log_path)}")

    async def _connect(self, url: str, timeout: float) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        try:
            self._ws = await self._http.ws_connect(url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=2.0))
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise CDPError(f"cannot open the DevTools websocket {url}: {exc!r}\n{_tail(self.log_path)}") from None
        self._reader = asyncio.create_task(self._read_loop())

    async def _read_loop(self) -> None:
        assert self._ws is not None
        reason = "DevTools websocket closed"
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if "id" in data:
                    fut = self._pending.pop(data["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(data)
                else:
                    for listener in list(self._listeners):
                        listener(data)
        except Exception as exc:  # reported to every waiter below
            reason = f"DevTools websocket failed: {exc!r}"
        finally:
            self._closed_reason = reason
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(CDPError(f"{reason}\n{_tail(self.log_path)}"))
            self._pending.clear()

    # -- protocol ---------------------------------------------------------------------------

    async def send(self, method: str, params: dict[str, Any] | None = None, *, session_id: str | None = None,
                   timeout: float = 10.0) -> dict[str, Any]:
        """One command; its ``result``, or CDPError (protocol error, timeout, dead browser)."""
        if self._ws is None or self._closed_reason is not None:
            raise CDPError(f"{method}: {self._closed_reason or 'not connected'}\n{_tail(self.log_path)}")
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            await self._ws.send_str(json.dumps(message))
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            alive = "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
            raise CDPError(f"{method}: no answer within {timeout} s (browser {alive})\n{_tail(self.log_path)}") from None
        finally:
            self._pending.pop(msg_id, None)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error'].get('message')} ({reply['error'].get('data', '')})")
        return reply.get("result", {})

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        self._listeners.append(listener)

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

    def stderr_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    # -- shutdown -------------------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """Close the websocket and kill the browser's process group (ours only). Idempotent."""
        if self._ws is not None and self._closed_reason is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.send("Browser.close", timeout=2.0), 2.5)
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), 2.0)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.close()
        self._ws = self._http = self._reader = None
        await asyncio.to_thread(self._kill_group, timeout)
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _kill_group(self, timeout: float) -> None:
        pgid = self.proc.pid  # start_new_session: the group id is the browser's pid
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            # the leader is gone; its children (renderer, GPU, utility) may linger briefly
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            return

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Page:
    """One tab: evaluate JavaScript, poll a condition, screenshot; its console is kept."""

    def __init__(self, browser: Browser, target_id: str, session_id: str) -> None:
        self.browser = browser
        self.target_id = target_id
        self.session_id = session_id
        self.console: list[str] = []
        browser.add_listener(self._on_event)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("sessionId") != self.session_id:
            return
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exc = details.get("exception", {})
            self.console.append(f"uncaught: {exc.get('description') or details.get('text')}")
        if len(self.console) > 500:
            del self.console[:100]

    def console_tail(self, lines: int = 30) -> str:
        return "\n".join(self.console[-lines:]) or "(no console output)"

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

    async def wait_for(self, expression: str, timeout: float, *, what: str | None = None, interval: float = 0.1,
                       show: str | None = None) -> Any:
        """Poll ``expression`` until it is truthy; its value, or CDPError naming ``what`` and the last
        value (or the value of the ``show`` expression, e.g. the page's state)."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            value = await self.evaluate(expression, timeout=max(1.0, min(5.0, remaining)))
            if value:
                return value
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        seen = value
        if show is not None:
            try:
                seen = await self.evaluate(show, timeout=3.0)
            except CDPError as exc:
                seen = f"({show} failed: {exc})"
        raise CDPError(f"timed out after {timeout} s waiting for {what or expression}; last: {seen!r}\n"
                       f"console:\n{self.console_tail()}")

    async def screenshot(self, path: Path, *, timeout: float = 10.0) -> Path:
        data = await self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, timeout=timeout)
        path = Path(path)
        path.write_bytes(base64.b64decode(data["data"]))
        return path
