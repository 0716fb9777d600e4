"""Plays systemd for a test: a NOTIFY_SOCKET that records notifications and keeps the file
descriptors a service stores with FDSTORE=1, and starts the service again with them passed as
LISTEN_FDS / LISTEN_FDNAMES, as systemd does after a restart of a unit with
FileDescriptorStoreMax=."""
from __future__ import annotations

import array
import os
import socket
import subprocess
import threading
import time
from pathlib import Path


class FdStore:
    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.fds: dict[str, int] = {}  # FDNAME → our own dup of the service's fd
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            except TimeoutError:
                continue
            except OSError:
                return
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            text = data.decode(errors="replace")
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            with self._lock:
                self.messages.append(text)
                if fields.get("FDSTORE") == "1" and fds:
                    name = fields.get("FDNAME", "stored")
                    old = self.fds.pop(name, None)
                    if old is not None:
                        os.close(old)
                    self.fds[name] = fds[0]
                    for extra in fds[1:]:
                        os.close(extra)
                else:
                    for fd in fds:
                        os.close(fd)

    def seen(self, needle: str) -> bool:
        with self._lock:
            return any(needle in m for m in self.messages)

    def wait(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.seen(needle):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} from the service within {timeout} s; got {self.messages}")
            time.sleep(0.05)

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    def popen(self, args: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen[bytes]:
        """Start the service with the stored fds at 3.. and LISTEN_* describing them."""
        with self._lock:
            names = list(self.fds)
            sources = [self.fds[n] for n in names]
        env = {**env, "NOTIFY_SOCKET": self.path}
        if names:
            env.update(LISTEN_FDS=str(len(names)), LISTEN_FDNAMES=":".join(names))
        count = len(sources)

        def place_fds() -> None:  # in the child, before exec: stage high, then move to 3..
            staged = [os.dup2(fd, 200 + i) for i, fd in enumerate(sources)]
            for i, fd in enumerate(staged):
                os.dup2(fd, 3 + i)
                os.close(fd)

        # LISTEN_PID must name the service itself: bash learns its pid, then execs the service.
        wrapper = ["bash", "-c", 'LISTEN_PID=$$ exec "$@"', "bash"] if count else []
        # preexec_fn though this process has threads: place_fds only calls os.dup2 and os.close, no lock to inherit.
        return subprocess.Popen(wrapper + args, env={**os.environ, **env}, preexec_fn=place_fds,  # noqa: PLW1509
                                pass_fds=tuple(range(3, 3 + count)), **kwargs)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        Path(self.path).unlink(missing_ok=True)
