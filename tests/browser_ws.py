"""What the two browser drivers share (tests/cdp.py for Chromium, tests/bidi.py for Firefox).

Both run a headless browser as a process of its own (its own process group, killed by its pid
at the end: that group only), with a fresh profile, and speak JSON commands over one websocket
(aiohttp): a command carries an ``id`` and its answer names it; anything without an ``id`` is
an event, handed to the listeners. Every wait is bounded; errors carry the tail of the
browser's own output. A tab's ``wait_for`` polls an expression the same way in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["BrowserError", "BrowserProcess", "Tab", "find_browser", "fresh_profile", "tail"]


class BrowserError(RuntimeError):
    """A protocol error, a page exception, a timeout or a dead browser; the text says which."""


def find_browser(env_var: str, candidates: tuple[str, ...], names: tuple[str, ...]) -> str | None:
    """$env_var if set (None when it is not executable: an explicit choice is not second-guessed),
    else the first executable of ``candidates``, else the first of ``names`` on the PATH."""
    env = os.environ.get(env_var)
    for candidate in [env] if env else candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    if env:
        return None
    return next(filter(None, map(shutil.which, names)), None)


def fresh_profile(work_dir: Path | None, prefix: str) -> tuple[Path, bool, Path]:
    """(work dir, whether it is ours to remove at close, a new profile dir in it): ``work_dir``,
    or a new temporary one when None. A profile is never reused."""
    own = work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix=prefix)) if work_dir is None else Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir, own, Path(tempfile.mkdtemp(prefix="profile-", dir=work_dir))


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` of a log file, or what is wrong with it."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path.name})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path.name} is empty)"


class BrowserProcess:
    """A browser process and one websocket of JSON commands to it."""

    name = "the browser"
    error: type[BrowserError] = BrowserError

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
        self.launch_seconds: float | None = None
        self.args: list[str] = []

    @staticmethod
    def start(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """The browser process, its output into ``log_path``, in a process group of its own."""
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: close() kills exactly that
                env={**os.environ, **(env or {})},
            )

    async def wait_file(self, path: Path, parse: Callable[[str], Any], timeout: float, what: str) -> Any:
        """Poll for a file the browser writes (its debugging port); ``parse`` returns None until it is complete."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.error(f"{self.name} exited with {self.proc.returncode} before {what} was up:\n"
                                 f"{self.stderr_tail()}")
            try:
                value = parse(path.read_text())
            except (FileNotFoundError, ValueError):
                value = None
            if value is not None:
                return value
            await asyncio.sleep(0.02)
        raise self.error(f"no {path.name} after {timeout} s ({self.name} did not open {what}):\n{self.stderr_tail()}")

    async def connect(self, url: str, timeout: float) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        try:
            self._ws = await self._http.ws_connect(url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=2.0))
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self.error(f"cannot open the websocket {url}: {exc!r}\n{self.stderr_tail()}") from None
        self._reader = asyncio.create_task(self._read_loop())

    async def _read_loop(self) -> None:
        assert self._ws is not None
        reason = "the websocket closed"
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
            reason = f"the websocket failed: {exc!r}"
        finally:
            self._closed_reason = reason
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(self.error(f"{reason}\n{self.stderr_tail()}"))
            self._pending.clear()

    async def exchange(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one command (``message`` without its id) and return the raw answer."""
        method = message.get("method")
        if self._ws is None or self._closed_reason is not None:
            raise self.error(f"{method}: {self._closed_reason or 'not connected'}\n{self.stderr_tail()}")
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            await self._ws.send_str(json.dumps({"id": msg_id, **message}))
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            alive = "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
            raise self.error(f"{method}: no answer within {timeout} s ({self.name} {alive})\n{self.stderr_tail()}") from None
        finally:
            self._pending.pop(msg_id, None)

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        self._listeners.append(listener)

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._closed_reason is None

    def stderr_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    # -- shutdown -------------------------------------------------------------------------

    async def say_goodbye(self) -> None:
        """The protocol's own way to close the browser (best effort, bounded)."""

    async def close(self, timeout: float = 5.0) -> None:
        """Close the websocket and kill the browser's process group (ours only). Idempotent."""
        if self.connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.say_goodbye(), 2.5)
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
            # the leader is gone; its children (renderer, GPU, utility, content) may linger briefly
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            return

    async def __aenter__(self) -> BrowserProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Tab:
    """One page: its console is kept; ``evaluate`` is the driver's, ``wait_for`` polls it."""

    error: type[BrowserError] = BrowserError

    def __init__(self) -> None:
        self.console: list[str] = []

    def note_console(self, line: str) -> None:
        self.console.append(line)
        if len(self.console) > 500:
            del self.console[:100]

    def console_tail(self, lines: int = 30) -> str:
        return "\n".join(self.console[-lines:]) or "(no console output)"

    async def evaluate(self, expression: str, *, timeout: float = 10.0) -> Any:
        raise NotImplementedError

    async def wait_for(self, expression: str, timeout: float, *, what: str | None = None, interval: float = 0.1,
                       show: str | None = None) -> Any:
        """Poll ``expression`` until it is truthy; its value, or an error naming ``what`` and the last
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
            except BrowserError as exc:
                seen = f"({show} failed: {exc})"
        raise self.error(f"timed out after {timeout} s waiting for {what or expression}; last: {seen!r}\n"
                         f"console:\n{self.console_tail()}")
