"""systemd/: the unit files and example configs, checked with systemd's tools and run as systemd would.

1. ``systemd-analyze verify`` on every unit, in a throw-away root (--root) that holds the units,
   the host's own unit directory and a stand-in /opt/rtcrelay/bin/rtcrelay, so the files are
   verified unmodified. ``systemd-analyze`` is installed with apt (Debian's ``systemd``
   package) when missing; if that fails the tests fail, they never skip.
2. ``systemd-analyze security --offline=yes``: each service's overall exposure is parsed,
   printed and must be at most 2.0.
3. Consistency: the socket unit against relay.toml (one ListenDatagram= per worker and
   address), the fd store size, the example configs against the real loaders and structs.
4. Each unit's ExecStart= run the way systemd runs it: its argv (install path replaced by this
   venv's rtcrelay, /etc/rtcrelay/ by a test directory), its Environment=/EnvironmentFile=,
   NOTIFY_SOCKET (a socket this test reads, SCM_CREDENTIALS and SCM_RIGHTS included),
   WATCHDOG_USEC from WatchdogSec=, LISTEN_FDS/LISTEN_FDNAMES with sockets made as the .socket
   unit says (by this process, root, as PID 1 makes them), CREDENTIALS_DIRECTORY holding the
   route keys from ``rtcrelay keys generate`` (LoadCredential=), and a sandbox built from the
   unit's own settings (see LAUNCHER): a private mount namespace (ProtectSystem=strict,
   PrivateTmp=, PrivateDevices=, ProtectHome=, ProcSubset=pid/ProtectProc=invisible), an empty
   capability bounding set, a non-root uid (User=/DynamicUser=), UMask=, LimitNOFILE=,
   NoNewPrivileges= and a seccomp filter equivalent to SystemCallFilter= (groups expanded by
   ``systemd-analyze syscall-filter``), SystemCallErrorNumber=, SystemCallArchitectures=,
   RestrictAddressFamilies= and MemoryDenyWriteExecute=. Not emulated: PrivateUsers=,
   RestrictNamespaces=, LockPersonality=, ProtectKernel*/ProtectClock/ProtectHostname beyond the
   read-only mounts, cgroup limits (MemoryMax=, TasksMax=), and the interpreter's own
   directory stays visible under the ProtectHome= tmpfs (this machine's Python lives in /root).
   Then READY=1, the watchdog, the fd store, a reload (ExecReload=), a stop (STOPPING=1, exit
   0), a restart that gets its sockets back from the fd store and its flows from the shm table
   (a packet sent while the relay was down is delivered after it is back), and a real WebRTC
   call through both sandboxed services.

Every process this module starts is stopped by its pid; all traffic is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from relayproc import Client, FakeTransceiver, rtp_like

from daemon.keys import load_keyring
from relay.config import RelayConfig, load_relay_config
from transceiver.service import TransceiverConfig, load_transceiver_config

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"
RTCRELAY = Path(sys.executable).with_name("rtcrelay")
INSTALL_PATHS = ("/opt/rtcrelay/bin/rtcrelay", "/usr/bin/rtcrelay")
SOCKET_UNIT = "rtcrelay-relay.socket"
RELAY_UNIT = "rtcrelay-relay.service"
TRANSCEIVER_TEMPLATE = "rtcrelay-transceiver@.service"
TRANSCEIVER_INSTANCE = "0"
MAX_EXPOSURE = 2.0
STATIC_UID = 65534  # stands for User=rtcrelay (a static system user)
DYNAMIC_UID = 61234  # stands for DynamicUser=yes (systemd picks from 61184..65519)
MAX_WORKERS = 256  # RelayConfig allows up to 256 workers


# -- unit files -------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file → [(key, value)] in order (repeated keys kept; '\\' continuations joined)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current, f"{path.name}: cannot parse {raw!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    """All assignments of ``key``; an empty assignment resets the list, as in systemd."""
    out: list[str] = []
    for k, v in unit.get(section, []):
        if k == key:
            out = [] if v == "" else out + [v]
    return out


def value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str | None:
    found = [v for k, v in unit.get(section, []) if k == key]
    return found[-1] if found else None


def boolean(unit: dict[str, list[tuple[str, str]]], key: str, section: str = "Service") -> bool:
    return (value(unit, section, key) or "no").lower() in ("yes", "true", "1", "on")


def unit(name: str) -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNITS / name)


def seconds(text: str) -> float:
    total = 0.0
    for number, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|us|s|min|h)?", text):
        total += float(number) * {"ms": 1e-3, "us": 1e-6, "": 1, "s": 1, "min": 60, "h": 3600}[suffix]
    return total


def size_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)", text.strip())
    assert match, text
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)]


# -- systemd-analyze --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def analyze() -> str:
    """systemd-analyze, installed from Debian's `systemd` package when it is missing."""
    path = shutil.which("systemd-analyze")
    if not path and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "systemd"],
                                env=env, capture_output=True, text=True, timeout=900)
        print(result.stdout[-2000:], result.stderr[-2000:])
        path = shutil.which("systemd-analyze")
    if not path:
        pytest.fail("systemd-analyze is not installed and `apt-get install systemd` did not provide it "
                    "(needs root and Debian's package index): the unit files cannot be verified")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    number = int(re.search(r"systemd (\d+)", version).group(1))  # type: ignore[union-attr]
    if number < 250:
        pytest.fail(f"systemd-analyze {number} is too old for `security --offline` (250+ needed)")
    return path


def host_unit_dir() -> Path:
    for candidate in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if Path(candidate, "sysinit.target").exists():
            return Path(candidate)
    pytest.fail("no systemd unit directory with sysinit.target on this machine")


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory, analyze: str) -> Path:
    """A root for --root: our units in /etc/systemd/system, the host's units, kill, the install path."""
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(host_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for path in UNITS.glob("rtcrelay-*"):
        if path.is_file():  # (the kernel path's drop-in directory is opt-in: its own test)
            shutil.copy2(path, root / "etc/systemd/system" / path.name)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(shutil.which("kill") or "/bin/kill", root / "usr/bin/kill")
    for install in INSTALL_PATHS:
        target = root / install.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("#!/bin/sh\nexit 0\n")
        target.chmod(0o755)
    return root


UNIT_NAMES = [SOCKET_UNIT, RELAY_UNIT, TRANSCEIVER_TEMPLATE, TRANSCEIVER_TEMPLATE.replace("@", f"@{TRANSCEIVER_INSTANCE}")]
SERVICES = [RELAY_UNIT, TRANSCEIVER_TEMPLATE.replace("@", f"@{TRANSCEIVER_INSTANCE}")]


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_systemd_analyze_verify_passes(analyze: str, fake_root: Path, name: str) -> None:
    result = subprocess.run([analyze, "verify", f"--root={fake_root}", name], capture_output=True, text=True, timeout=120)
    output = (result.stdout + result.stderr).strip()
    print(output or f"{name}: verify clean")
    assert result.returncode == 0, output
    assert output == "", f"systemd-analyze verify {name} warned:\n{output}"


@pytest.mark.parametrize("name", SERVICES)
def test_security_exposure_is_at_most_2(analyze: str, fake_root: Path, name: str) -> None:
    result = subprocess.run([analyze, "security", "--offline=yes", f"--root={fake_root}", "--no-pager", name],
                            capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for (\S+): (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(2))
    left = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    print(f"{name}: exposure {exposure}\n" + "\n".join(left))
    assert exposure <= MAX_EXPOSURE, f"{name}: exposure {exposure} > {MAX_EXPOSURE}\n{result.stdout}"


KERNEL_PATH_DROP_IN = UNITS / f"{RELAY_UNIT}.d" / "kernel-path.conf"


def test_the_kernel_path_drop_in_verifies_and_adds_only_what_bpf_needs(analyze: str, fake_root: Path,
                                                                       tmp_path: Path) -> None:
    """systemd/rtcrelay-relay.service.d/kernel-path.conf installed over the unit: clean verify,
    the two capabilities and nothing else of the sandbox opened (its exposure is printed)."""
    root = tmp_path / "root"
    shutil.copytree(fake_root, root, symlinks=True)
    drop_in = root / "etc/systemd/system" / f"{RELAY_UNIT}.d"
    drop_in.mkdir()
    shutil.copy2(KERNEL_PATH_DROP_IN, drop_in / KERNEL_PATH_DROP_IN.name)
    result = subprocess.run([analyze, "verify", f"--root={root}", RELAY_UNIT], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and (result.stdout + result.stderr).strip() == "", result.stdout + result.stderr
    security = subprocess.run([analyze, "security", "--offline=yes", f"--root={root}", "--no-pager", RELAY_UNIT],
                              capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for (\S+): (\d+\.\d+)", security.stdout)
    assert match, security.stdout + security.stderr
    opened = [line for line in security.stdout.splitlines() if line.startswith("✗")]
    print(f"{RELAY_UNIT} + kernel-path.conf: exposure {match.group(2)}\n" + "\n".join(opened))
    settings = dict(line.split("=", 1) for line in KERNEL_PATH_DROP_IN.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings == {
        "CapabilityBoundingSet": "CAP_BPF CAP_NET_ADMIN", "AmbientCapabilities": "CAP_BPF CAP_NET_ADMIN",
        "PrivateUsers": "no", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "SystemCallFilter": "bpf",
    }, settings
    assert float(match.group(2)) <= MAX_EXPOSURE, security.stdout


# -- what the units must say --------------------------------------------------------------------


HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "LockPersonality": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
}


@pytest.mark.parametrize("name", [RELAY_UNIT, TRANSCEIVER_TEMPLATE])
def test_service_units_declare_what_operations_need(name: str) -> None:
    u = unit(name)
    assert value(u, "Service", "Type") == "notify"
    assert value(u, "Service", "NotifyAccess") == "main"
    assert value(u, "Service", "Restart") == "on-failure"
    assert seconds(value(u, "Service", "WatchdogSec") or "0") > 0 or name != RELAY_UNIT
    [exec_start] = values(u, "Service", "ExecStart")
    assert shlex.split(exec_start)[0] in INSTALL_PATHS
    assert "route-keys:/etc/rtcrelay/route-keys.toml" in values(u, "Service", "LoadCredential")
    assert value(u, "Service", "LimitNOFILE") and value(u, "Service", "MemoryMax")
    for key, expected in HARDENING.items():
        assert value(u, "Service", key) == expected, f"{name}: {key}={value(u, 'Service', key)!r}, want {expected!r}"
    assert "@system-service" in values(u, "Service", "SystemCallFilter")
    assert value(u, "Service", "User") or boolean(u, "DynamicUser")


def test_relay_unit_keeps_the_table_and_the_sockets() -> None:
    u = unit(RELAY_UNIT)
    # DynamicUser= implies RemoveIPC=yes, which deletes the user's /dev/shm files (the table)
    # whenever the service stops or restarts: a static user, RemoveIPC=no.
    assert not boolean(u, "DynamicUser") and value(u, "Service", "User") == "rtcrelay"
    assert value(u, "Service", "RemoveIPC") == "no"
    assert boolean(u, "MemoryDenyWriteExecute")  # the relay needs no W+X memory (tested below)
    assert value(u, "Service", "ExecReload") == "kill -HUP $MAINPID"
    cfg = load_relay_config(str(UNITS / "relay.toml"))
    listen = len(cfg.listen)
    assert int(value(u, "Service", "FileDescriptorStoreMax") or 0) >= MAX_WORKERS * listen + MAX_WORKERS
    sysusers = (UNITS / "rtcrelay.sysusers").read_text()
    assert re.search(r"^u\s+rtcrelay\s", sysusers, re.M)


def test_transceiver_template_picks_its_config_by_instance() -> None:
    u = unit(TRANSCEIVER_TEMPLATE)
    [exec_start] = values(u, "Service", "ExecStart")
    assert "--config /etc/rtcrelay/transceiver-%i.toml" in exec_start
    assert "-/etc/rtcrelay/transceiver-%i.env" in values(u, "Service", "EnvironmentFile")
    assert boolean(u, "DynamicUser")
    cfg = load_transceiver_config(str(UNITS / "transceiver.toml"))
    assert seconds(value(u, "Service", "TimeoutStopSec") or "90") > cfg.drain_deadline  # SIGTERM drains first


def test_socket_unit_has_one_socket_per_worker_and_listen_address() -> None:
    """PID 1 makes these sockets as root; a reuseport group admits only sockets of one user, so
    the relay (User=rtcrelay) must get every public socket from the socket unit."""
    s = unit(SOCKET_UNIT)
    cfg = load_relay_config(str(UNITS / "relay.toml"))
    assert cfg.workers > 0, "workers = 0 (one per CPU) cannot match a fixed list of ListenDatagram="
    listens = values(s, "Socket", "ListenDatagram")
    assert sorted(listens) == sorted(a for a in cfg.listen for _ in range(cfg.workers)), (listens, cfg.listen, cfg.workers)
    assert value(s, "Socket", "ReusePort") == "yes"
    assert value(s, "Socket", "FileDescriptorName") == "public"
    assert value(s, "Socket", "BindIPv6Only") == "ipv6-only"  # "[::]:3478" must not take IPv4 too
    assert value(s, "Socket", "Service") == RELAY_UNIT
    assert size_bytes(value(s, "Socket", "ReceiveBuffer") or "0") >= cfg.socket_buffer


# -- the example configs --------------------------------------------------------------------------


def documented_keys(text: str) -> dict[str, str | None]:
    """Keys set in an example file (key → raw value) and keys only shown commented out (→ None)."""
    keys: dict[str, str | None] = {}
    for line in text.splitlines():
        set_ = re.match(r"^([a-z_]+) = (.*)$", line)
        shown = re.match(r"^# ([a-z_]+) = ", line)
        if set_:
            keys[set_.group(1)] = set_.group(2)
        elif shown:
            keys.setdefault(shown.group(1), None)
    return keys


@pytest.mark.parametrize(("path", "struct", "loader", "own"), [
    ("relay.toml", RelayConfig, load_relay_config, {"workers"}),
    ("transceiver.toml", TransceiverConfig, load_transceiver_config, {"relay_public_addresses", "whip_token_keys_file"}),
])
def test_example_config_loads_and_shows_every_key_with_its_default(monkeypatch: pytest.MonkeyPatch, path: str, struct: type, loader: Callable[..., Any], own: set[str]) -> None:
    for name in list(os.environ):
        if name.startswith("RTCRELAY_"):
            monkeypatch.delenv(name)
    loaded = loader(str(UNITS / path))  # the real loader: unknown keys and wrong types fail here
    text = (UNITS / path).read_text()
    keys = documented_keys(text)
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    assert set(keys) == set(fields), f"{path}: missing {set(fields) - set(keys)}, unknown {set(keys) - set(fields)}"
    for name, f in fields.items():
        default = f.default if f.default is not msgspec.NODEFAULT else (f.default_factory() if f.default_factory is not msgspec.NODEFAULT else None)
        if name in own:
            continue
        if keys[name] is None:  # only shown commented out: the built-in default applies
            assert getattr(loaded, name) == default, name
        else:
            assert getattr(loaded, name) == default, f"{path}: {name} = {getattr(loaded, name)!r}, default {default!r}"
    # Each key has a comment just above it (its meaning).
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+ = ", line):
            above = lines[max(0, i - 12):i]
            assert any(prev.startswith("#") for prev in above), f"{path}: {line!r} has no comment"


# -- the sandbox: a unit's settings applied to a child process ----------------------------------------

LAUNCHER = r'''
import ctypes, json, os, resource, struct, sys
spec = json.loads(sys.argv[1]); argv = sys.argv[2:]
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
libc.syscall.restype = ctypes.c_long
def check(rc, what):
    if rc != 0:
        err = ctypes.get_errno(); raise OSError(err, f"{what}: {os.strerror(err)}")
def mount(src, dst, fstype, flags, data=None):
    check(libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), flags, data and data.encode()), f"mount {dst}")
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 4096, 8192, 16384, 1 << 18
class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]
def readonly(path, on):
    attr = MountAttr(1 if on else 0, 0 if on else 1, 0, 0)  # MOUNT_ATTR_RDONLY
    check(libc.syscall(442, -100, path.encode(), 0x8000, ctypes.byref(attr), ctypes.sizeof(attr)), f"mount_setattr {path}")
ns = spec["namespace"]
if ns:
    check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # The checkout stands in for /opt/rtcrelay: where it lives under /tmp (a CI clone), keep it
    # visible through the private /tmp, as /opt would be. O_PATH fds survive the tmpfs mounts.
    install_fds = [(path, os.open(path, os.O_PATH)) for path in ns["install_under_tmp"]]
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")          # PrivateTmp= (and staging)
    if os.path.isdir("/var/tmp"):
        mount("tmpfs", "/var/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for path, fd in install_fds:
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
    if ns["private_devices"]:                                                   # PrivateDevices=
        os.mkdir("/tmp/.dev")
        mount("tmpfs", "/tmp/.dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755")
        for name in ("null", "zero", "full", "random", "urandom", "tty"):
            open(f"/tmp/.dev/{name}", "w").close()
            mount(f"/dev/{name}", f"/tmp/.dev/{name}", None, MS_BIND)
        for name in ("shm", "pts"):
            os.mkdir(f"/tmp/.dev/{name}")
            mount(f"/dev/{name}", f"/tmp/.dev/{name}", None, MS_BIND | MS_REC)
        for name, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"/tmp/.dev/{name}")
    if ns["protect_home"]:                                                      # ProtectHome=yes
        keep = ns["keep"]  # the interpreter and the checkout, when they live under a home directory
        for i, path in enumerate(keep):
            os.makedirs(f"/tmp/.keep{i}"); mount(path, f"/tmp/.keep{i}", None, MS_BIND | MS_REC)
        for home in ("/root", "/home", "/run/user"):
            if os.path.isdir(home):
                visible = any((path + "/").startswith(home + "/") for path in keep)
                mount("tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755" if visible else "mode=000")
        for i, path in enumerate(keep):
            os.makedirs(path, exist_ok=True); mount(f"/tmp/.keep{i}", path, None, MS_MOVE)
    if ns["private_devices"]:
        mount("/tmp/.dev", "/dev", None, MS_MOVE)
    if ns["protect_system_strict"]:                                             # ProtectSystem=strict
        readonly("/", True)
        for path in ("/dev", "/tmp", "/var/tmp"):
            if os.path.isdir(path):
                readonly(path, False)
    if ns["proc_subset_pid"]:                                                   # ProcSubset=pid, ProtectProc=invisible
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible,subset=pid")
if spec["nofile"]:                                                              # LimitNOFILE=
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (spec["nofile"], spec["nofile"]))
    except (ValueError, OSError):  # no CAP_SYS_RESOURCE here (PID 1 has it): as far as the hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(spec["nofile"], hard), hard))
if spec["drop_caps"] and os.geteuid() == 0:                                     # CapabilityBoundingSet=
    for cap in range(int(open("/proc/sys/kernel/cap_last_cap").read()) + 1 if os.path.exists("/proc/sys/kernel/cap_last_cap") else 41):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
if spec["uid"] is not None and os.geteuid() == 0:                               # User= / DynamicUser=
    os.setgroups([]); os.setgid(spec["uid"]); os.setuid(spec["uid"])
os.umask(spec["umask"]); os.chdir("/")
# Socket activation / fd store: the passed fds become 3, 4, ... in order.
fds = spec["fds"]
high = [__import__("fcntl").fcntl(fd, 0, 200) for fd in fds]  # F_DUPFD >= 200
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True); os.close(fd)
env = dict(os.environ)
for key in ("LISTEN_PID", "WATCHDOG_PID"):
    if env.get(key) == "self":
        env[key] = str(os.getpid())
check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")                        # NoNewPrivileges=
prog = spec["seccomp"]
if prog:
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw)
    class FProg(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    check(libc.prctl(22, 2, ctypes.byref(FProg(len(prog), ctypes.addressof(buf))), 0, 0), "seccomp")
os.execve(argv[0], argv, env)
'''

LD_W_ABS, JEQ_K, AND_K, RET_K = 0x20, 0x15, 0x54, 0x06
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
ERRNO = {"EPERM": 1, "EACCES": 13, "ENOSYS": 38}
FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}


def syscall_numbers() -> dict[str, int] | None:
    if platform.machine() != "x86_64":
        return None
    for header in ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h"):
        if os.path.exists(header):
            text = Path(header).read_text()
            return {m.group(1): int(m.group(2)) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)", text)}
    return None


def syscall_groups(analyze: str) -> dict[str, list[str]]:
    text = subprocess.run([analyze, "syscall-filter", "--no-pager"], capture_output=True, text=True, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif current and line.startswith("    ") and not line.strip().startswith("#"):
            groups[current].append(line.strip())
        elif not line.strip():
            current = None
    return groups


def expand(names: list[str], groups: dict[str, list[str]], seen: set[str] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    out: set[str] = set()
    for name in names:
        if name.startswith("@"):
            if name not in seen:
                seen.add(name)
                out |= expand(groups[name], groups, seen)
        else:
            out.add(name)
    return out


def seccomp_program(u: dict[str, list[tuple[str, str]]], analyze: str, deny_wx: bool | None = None) -> list[tuple[int, int, int, int]] | None:
    """SystemCallFilter=, SystemCallErrorNumber=, SystemCallArchitectures=native, RestrictAddressFamilies=,
    MemoryDenyWriteExecute= as one classic-BPF seccomp program (x86-64), the way systemd 252 builds them."""
    numbers = syscall_numbers()
    if numbers is None:
        print(f"no x86-64 syscall table here ({platform.machine()}): the seccomp part of the sandbox is not applied")
        return None
    ins = lambda code, k, jt=0, jf=0: (code, jt, jf, k)  # noqa: E731
    errno = ERRNO[value(u, "Service", "SystemCallErrorNumber") or "EPERM"] if value(u, "Service", "SystemCallErrorNumber") else None
    deny = RET_ERRNO | errno if errno else RET_KILL_PROCESS
    prog = [ins(LD_W_ABS, 4), ins(JEQ_K, AUDIT_ARCH_X86_64, 1, 0), ins(RET_K, RET_KILL_PROCESS), ins(LD_W_ABS, 0)]
    if deny_wx if deny_wx is not None else boolean(u, "MemoryDenyWriteExecute"):
        # mmap(PROT_WRITE|PROT_EXEC) and mprotect/pkey_mprotect(PROT_EXEC) → EPERM (args[2] = prot).
        for name, mask in (("mmap", 6), ("mprotect", 4), ("pkey_mprotect", 4)):
            prog += [ins(JEQ_K, numbers[name], 0, 4), ins(LD_W_ABS, 16 + 2 * 8), ins(AND_K, mask),
                     ins(JEQ_K, mask, 0, 1), ins(RET_K, RET_ERRNO | 1), ins(LD_W_ABS, 0)]
    families = value(u, "Service", "RestrictAddressFamilies")
    if families and not families.startswith("~"):
        allowed = [FAMILIES[f] for f in families.split()]
        block = [ins(LD_W_ABS, 16)]
        for i, family in enumerate(allowed):
            block.append(ins(JEQ_K, family, len(allowed) - i, 0))  # → the "ld nr" after the errno return
        block += [ins(RET_K, RET_ERRNO | 97), ins(LD_W_ABS, 0)]  # EAFNOSUPPORT
        prog += [ins(JEQ_K, numbers["socket"], 0, len(block))] + block
    filters = values(u, "Service", "SystemCallFilter")
    if filters:
        groups = syscall_groups(analyze)
        allow: set[str] = set()
        for i, line in enumerate(filters):
            invert = line.startswith("~")
            names = expand(line.lstrip("~").split(), groups)
            if i == 0 and not invert:
                allow = names | expand(["@default"], groups)  # systemd adds @default to an allow list
            elif invert:
                allow -= names
            else:
                allow |= names
        for nr in sorted({numbers[n] for n in allow if n in numbers}):
            prog += [ins(JEQ_K, nr, 0, 1), ins(RET_K, RET_ALLOW)]
        prog.append(ins(RET_K, deny))
    else:
        prog.append(ins(RET_K, RET_ALLOW))
    assert len(prog) < 4096
    return prog


def sandbox_spec(u: dict[str, list[tuple[str, str]]], analyze: str, fds: list[int], deny_wx: bool | None = None) -> dict[str, Any]:
    root = os.geteuid() == 0
    if not root:
        print("not root: only NoNewPrivileges= and the seccomp filter are applied")
    keep = os.path.realpath(sys.base_prefix)
    umask = value(u, "Service", "UMask")
    nofile = value(u, "Service", "LimitNOFILE")
    return {
        "namespace": {
            "private_devices": boolean(u, "PrivateDevices"),
            "protect_home": value(u, "Service", "ProtectHome") == "yes",
            "keep": [path for path in dict.fromkeys([keep, str(REPO)]) if path.startswith(("/root/", "/home/"))],
            "install_under_tmp": [str(REPO)] if str(REPO).startswith(("/tmp/", "/var/tmp/")) else [],
            "protect_system_strict": value(u, "Service", "ProtectSystem") == "strict",
            "proc_subset_pid": value(u, "Service", "ProcSubset") == "pid",
        } if root and boolean(u, "PrivateTmp") else None,
        "nofile": int(nofile) if nofile else None,
        "drop_caps": value(u, "Service", "CapabilityBoundingSet") == "",
        "uid": (DYNAMIC_UID if boolean(u, "DynamicUser") else STATIC_UID) if root else None,
        "umask": int(umask, 8) if umask else 0o022,
        "fds": fds,
        "seccomp": seccomp_program(u, analyze, deny_wx),
    }


# -- sd_notify ------------------------------------------------------------------------------------


@dataclass
class Notice:
    fields: dict[str, str]
    pid: int
    fds: list[int]


class NotifySocket:
    """$NOTIFY_SOCKET: every datagram with its sender pid (SCM_CREDENTIALS) and fds (SCM_RIGHTS)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)  # the service runs as another user
        self.sock.settimeout(0.2)
        self.notices: list[Notice] = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        ancillary = socket.CMSG_SPACE(struct.calcsize("3i")) + socket.CMSG_SPACE(64 * 4)
        while self.running:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, ancillary)
            except (TimeoutError, OSError):
                continue
            pid, fds = 0, []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += list(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self.lock:
                self.notices.append(Notice(fields, pid, fds))

    def since(self, start: int) -> list[Notice]:
        with self.lock:
            return self.notices[start:]

    def mark(self) -> int:
        with self.lock:
            return len(self.notices)

    def wait(self, key: str, value: str = "1", *, start: int = 0, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> Notice:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for notice in self.since(start):
                if notice.fields.get(key) == value:
                    return notice
            if proc is not None and proc.poll() is not None:
                time.sleep(0.3)  # the reader thread may still hold the last datagrams
                for notice in self.since(start):
                    if notice.fields.get(key) == value:
                        return notice
                raise AssertionError(f"exited with {proc.returncode} before {key}={value}:\n{log.read_text() if log else ''}")
            time.sleep(0.05)
        raise AssertionError(f"no {key}={value} within {timeout} s; got {[n.fields for n in self.since(start)]}\n{log.read_text() if log else ''}")

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()
        with self.lock:
            for notice in self.notices:
                for fd in notice.fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass


# -- running a unit ----------------------------------------------------------------------------------


@dataclass
class Deployment:
    """A scratch /etc/rtcrelay, credentials directory, table directory and notify socket under /dev/shm
    (not /tmp: PrivateTmp= hides it from the service)."""

    base: Path
    analyze: str
    keys_text: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def etc(self) -> Path:
        return self.base / "etc"

    def credentials(self, uid: int | None) -> Path:
        """LoadCredential= route-keys and whip-token-keys: private copies owned by the service user."""
        directory = self.base / f"credentials-{uuid.uuid4().hex[:6]}"
        directory.mkdir()
        for name in ("route-keys", "whip-token-keys"):
            target = directory / name
            shutil.copyfile(self.etc / f"{name}.toml", target)
            target.chmod(0o400)
            if uid is not None and os.geteuid() == 0:
                os.chown(target, uid, uid)
        directory.chmod(0o500)
        if uid is not None and os.geteuid() == 0:
            os.chown(directory, uid, uid)
        return directory

    def start(self, unit_name: str, *, instance: str = "", notify: NotifySocket, fds: list[tuple[str, int]] = (), log: Path,  # type: ignore[assignment]
              deny_wx: bool | None = None) -> subprocess.Popen[bytes]:
        u = unit(unit_name)
        spec = sandbox_spec(u, self.analyze, [fd for _, fd in fds], deny_wx)
        [exec_start] = values(u, "Service", "ExecStart")

        def expand_path(text: str) -> str:
            text = text.replace("%i", instance)
            return str(self.etc) + text[len("/etc/rtcrelay"):] if text.startswith("/etc/rtcrelay/") else text

        argv = [expand_path(a) for a in shlex.split(exec_start)]
        assert argv[0] in INSTALL_PATHS
        argv[0] = str(RTCRELAY)
        home, user = ("/", "rtcrelay") if not boolean(u, "DynamicUser") else ("/", unit_name.replace("@.service", f"-{instance}"))
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": home, "USER": user, "LOGNAME": user, "SHELL": "/usr/sbin/nologin",
               "INVOCATION_ID": uuid.uuid4().hex, "NOTIFY_SOCKET": str(notify.path),
               "CREDENTIALS_DIRECTORY": str(self.credentials(spec["uid"]))}
        watchdog = value(u, "Service", "WatchdogSec")
        if watchdog:
            env |= {"WATCHDOG_USEC": str(int(seconds(watchdog) * 1e6)), "WATCHDOG_PID": "self"}
        for line in values(u, "Service", "Environment"):
            env |= dict(item.split("=", 1) for item in shlex.split(line))
        for line in values(u, "Service", "EnvironmentFile"):
            path = Path(expand_path(line.lstrip("-")))
            if path.exists():
                env |= dict(assignment.split("=", 1) for assignment in path.read_text().splitlines()
                            if "=" in assignment and not assignment.startswith("#"))
            else:
                assert line.startswith("-"), f"EnvironmentFile {line} is required and missing"
        if fds:
            env |= {"LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": ":".join(name for name, _ in fds), "LISTEN_PID": "self"}
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, json.dumps(spec), *argv], env=env, cwd="/",
                                    pass_fds=[fd for _, fd in fds], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def reload(self, unit_name: str, proc: subprocess.Popen[bytes]) -> None:
        """ExecReload=, with $MAINPID."""
        [line] = values(unit(unit_name), "Service", "ExecReload")
        argv = [a.replace("$MAINPID", str(proc.pid)) for a in shlex.split(line)]
        subprocess.run([shutil.which(argv[0]) or argv[0], *argv[1:]], check=True, timeout=10)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
        """systemctl stop with KillMode=mixed: SIGTERM to the main process; SIGKILL to the group at the end."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                raise AssertionError(f"pid {proc.pid} did not stop within {timeout} s of SIGTERM") from None
        return proc.returncode

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def deployment(analyze: str) -> Iterator[Deployment]:
    base = Path("/dev/shm") / f"rtcrelay-deploy-{uuid.uuid4().hex[:10]}"
    base.mkdir(mode=0o755)
    base.chmod(0o755)
    d = Deployment(base, analyze)
    d.etc.mkdir()
    keys = subprocess.run([str(RTCRELAY), "keys", "generate"], capture_output=True, text=True, check=True, timeout=60)
    keys_file = d.etc / "route-keys.toml"
    keys_file.write_text(keys.stdout)
    keys_file.chmod(0o600)  # root-only; the services read their credential copy
    d.keys_text = keys.stdout
    whip_keys = subprocess.run([str(RTCRELAY), "keys", "generate"], capture_output=True, text=True, check=True, timeout=60)
    (d.etc / "whip-token-keys.toml").write_text(whip_keys.stdout)
    (d.etc / "whip-token-keys.toml").chmod(0o600)
    try:
        yield d
    finally:
        d.cleanup()


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toml_dump(data: dict[str, Any]) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in data.items() if v is not None)


def loopback(address: str, ports: dict[str, int]) -> str:
    """A unit's or config's public address → a loopback address with a free port (same map for both)."""
    if address not in ports:
        ports[address] = free_port()
    return f"[::1]:{ports[address]}" if address.startswith("[") else f"127.0.0.1:{ports[address]}"


def activation_sockets(ports: dict[str, int]) -> list[socket.socket]:
    """What PID 1 makes for rtcrelay-relay.socket, in order: one socket per ListenDatagram=."""
    s = unit(SOCKET_UNIT)
    socks = []
    for address in values(s, "Socket", "ListenDatagram"):
        host, _, port = loopback(address, ports).rpartition(":")
        family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if value(s, "Socket", "ReusePort") == "yes":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(value(s, "Socket", "BindIPv6Only") == "ipv6-only"))
        for key, force, plain in (("ReceiveBuffer", 33, socket.SO_RCVBUF), ("SendBuffer", 32, socket.SO_SNDBUF)):
            if value(s, "Socket", key):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, size_bytes(value(s, "Socket", key) or "0"))
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, plain, size_bytes(value(s, "Socket", key) or "0"))
        sock.bind((host.strip("[]"), int(port)))
        socks.append(sock)
    return socks


def relay_config(d: Deployment, ports: dict[str, int], name: str) -> RelayConfig:
    """systemd/relay.toml as installed, with this machine's addresses and a private table directory."""
    data = tomllib.loads((UNITS / "relay.toml").read_text())
    table = d.base / "table"
    table.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        os.chown(table, STATIC_UID, STATIC_UID)
    data |= {"name": name, "listen": [loopback(a, ports) for a in data["listen"]], "table_dir": str(table),
             "admin_listen": f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"}
    path = d.etc / "relay.toml"
    path.write_text(toml_dump(data))
    path.chmod(0o644)
    return load_relay_config(str(path))


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def wait_http(url: str, status: int = 200, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while http_status(url) != status:
        assert time.monotonic() < deadline, f"{url} never answered {status}"
        time.sleep(0.1)


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def start_relay_unit(d: Deployment, cfg: RelayConfig, notify: NotifySocket, fds: list[tuple[str, int]], log: Path) -> tuple[subprocess.Popen[bytes], Notice]:
    mark = notify.mark()
    proc = d.start(RELAY_UNIT, notify=notify, fds=fds, log=log)
    ready = notify.wait("READY", start=mark, proc=proc, log=log)
    assert ready.pid == proc.pid, "READY=1 from another process than the main one (NotifyAccess=main)"
    wait_http(f"http://{cfg.admin_listen}/readyz")
    return proc, ready


def test_relay_unit_runs_as_systemd_runs_it(deployment: Deployment, tmp_path: Path) -> None:
    d = deployment
    ports: dict[str, int] = {}
    cfg = relay_config(d, ports, "deploy" + uuid.uuid4().hex[:8])
    public = activation_sockets(ports)
    notify = NotifySocket(d.base / "notify")
    log = tmp_path / "relay.log"
    fake = FakeTransceiver()
    host, port = cfg.listen[0].rsplit(":", 1)
    client = Client((host, int(port)))
    try:
        u = unit(RELAY_UNIT)
        proc, _ready = start_relay_unit(d, cfg, notify, [("public", s.fileno()) for s in public], log)
        # Only the main process talks to systemd (NotifyAccess=main): workers are quiet.
        assert {n.pid for n in notify.since(0)} == {proc.pid}
        # The watchdog: WatchdogSec= → WATCHDOG_USEC → WATCHDOG=1 pings.
        notify.wait("WATCHDOG", start=0, timeout=seconds(value(u, "Service", "WatchdogSec") or "10"), proc=proc, log=log)
        # The fd store: every public socket is one the socket unit made (the relay, running as
        # another user, made none), plus one tunnel socket per worker.
        stored = {n.fields["FDNAME"]: n.fds for n in notify.since(0) if n.fields.get("FDSTORE") == "1"}
        assert sorted(stored) == sorted([f"public-{w}-0" for w in range(cfg.workers)] + [f"tunnel-{w}" for w in range(cfg.workers)]), stored
        assert all(len(fds) == 1 for fds in stored.values())
        assert {inode(stored[f"public-{w}-0"][0]) for w in range(cfg.workers)} == {inode(s.fileno()) for s in public}
        assert len(stored) <= int(value(u, "Service", "FileDescriptorStoreMax") or 0)
        # Running as the unit's user, inside its sandbox.
        status = Path(f"/proc/{proc.pid}/status").read_text()
        if os.geteuid() == 0:
            assert re.search(rf"^Uid:\s+{STATIC_UID}\s", status, re.M), status
            assert re.search(r"^CapBnd:\s+0+$", status, re.M) and re.search(r"^CapEff:\s+0+$", status, re.M)
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
        if syscall_numbers():
            assert re.search(r"^Seccomp:\s+2$", status, re.M)
        if os.geteuid() == 0:
            mounts = {line.split()[4]: line for line in Path(f"/proc/{proc.pid}/mountinfo").read_text().splitlines()}
            assert " ro," in mounts["/"] or mounts["/"].split()[5].startswith("ro"), mounts["/"]  # ProtectSystem=strict
            assert "tmpfs" in mounts["/tmp"] and "subset=pid" in mounts["/proc"], (mounts["/tmp"], mounts["/proc"])
            assert mounts["/dev/shm"].split()[5].startswith("rw"), mounts["/dev/shm"]

        # A call's first STUN check creates a flow; RTP follows.
        keyring = load_keyring(str(d.etc / "route-keys.toml"))
        ufrag = fake.token(keyring)
        client.send(client.binding_request(ufrag, keyring=keyring))
        first, tunnel = fake.recv_data(timeout=5)
        fake.heartbeat(tunnel)
        client.send(rtp_like(1))
        assert fake.recv_data()[0].handle == first.handle

        # ExecReload= (kill -HUP $MAINPID): RELOADING=1, then READY=1 again.
        mark = notify.mark()
        d.reload(RELAY_UNIT, proc)
        notify.wait("RELOADING", start=mark, proc=proc, log=log)
        notify.wait("READY", start=mark, proc=proc, log=log)

        # systemctl restart: SIGTERM → STOPPING=1 → exit 0. The socket unit and the fd store
        # keep every socket, the table stays in /dev/shm.
        mark = notify.mark()
        assert d.stop(proc) == 0, log.read_text()
        notify.wait("STOPPING", start=mark, timeout=1)
        assert Path(cfg.table_path).exists(), "the flow table must outlive a restart"
        client.send(rtp_like(2))  # while the relay is down: queued in the kept socket
        fake.heartbeat(tunnel)
        restored = [("public", s.fileno()) for s in public] + [(name, fds[0]) for name, fds in stored.items()]
        proc2, _ = start_relay_unit(d, cfg, notify, restored, log)
        fake.heartbeat(tunnel)
        frame, source = fake.recv_data(timeout=5)
        assert frame.handle == first.handle and source == tunnel, "the packet sent during the restart was lost"
        assert frame.payload[2:4] == (2).to_bytes(2, "big")
        client.send(rtp_like(3))  # no new STUN check: the flow came back from the table
        frame, _ = fake.recv_data(timeout=5)
        assert frame.handle == first.handle
        fake.reply(tunnel, frame, b"\x80back")
        assert client.recv(timeout=5)[0] == b"\x80back"
        restarted = {n.fields["FDNAME"]: n.fds[0] for n in notify.since(mark) if n.fields.get("FDSTORE") == "1" and n.pid == proc2.pid}
        assert {k: inode(v) for k, v in restarted.items()} == {k: inode(v[0]) for k, v in stored.items()}, "not the same sockets"
        assert "reopened flow table" in log.read_text()

        mark = notify.mark()
        assert d.stop(proc2) == 0, log.read_text()
        notify.wait("STOPPING", start=mark, timeout=1)
        assert "Traceback" not in log.read_text(), log.read_text()
        print(log.read_text())
    finally:
        client.close()
        fake.close()
        notify.close()
        for s in public:
            s.close()


def transceiver_config(d: Deployment, relay_public: str, instance: str) -> int:
    """/etc/rtcrelay/transceiver-<instance>.toml from the example; the HTTP port from the instance's .env."""
    text = (UNITS / "transceiver.toml").read_text().replace('relay_public_addresses = ["203.0.113.10:3478"]', f'relay_public_addresses = ["{relay_public}"]')
    assert relay_public in text
    (d.etc / f"transceiver-{instance}.toml").write_text(text)
    (d.etc / f"transceiver-{instance}.toml").chmod(0o644)
    port = free_port(socket.SOCK_STREAM)
    (d.etc / f"transceiver-{instance}.env").write_text(f"RTCRELAY_TRANSCEIVER_HTTP_PORT={port}\n")
    return port


def test_transceiver_unit_runs_as_systemd_runs_it(deployment: Deployment, tmp_path: Path) -> None:
    d = deployment
    port = transceiver_config(d, f"127.0.0.1:{free_port()}", TRANSCEIVER_INSTANCE)
    notify = NotifySocket(d.base / "notify")
    log = tmp_path / "transceiver.log"
    try:
        proc = d.start(TRANSCEIVER_TEMPLATE, instance=TRANSCEIVER_INSTANCE, notify=notify, log=log)
        ready = notify.wait("READY", proc=proc, log=log, timeout=60)
        assert ready.pid == proc.pid and str(port) in ready.fields.get("STATUS", "")
        wait_http(f"http://127.0.0.1:{port}/healthz")
        wait_http(f"http://127.0.0.1:{port}/readyz")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        if os.geteuid() == 0:
            assert re.search(rf"^Uid:\s+{DYNAMIC_UID}\s", status, re.M), status
        mark = notify.mark()
        assert d.stop(proc, timeout=seconds(value(unit(TRANSCEIVER_TEMPLATE), "Service", "TimeoutStopSec") or "45")) == 0, log.read_text()
        notify.wait("STOPPING", start=mark, timeout=1)
        assert {n.pid for n in notify.since(0)} == {proc.pid}
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        notify.close()


def test_memory_deny_write_execute_is_off_only_where_needed(deployment: Deployment, tmp_path: Path) -> None:
    """Under the transceiver's sandbox with W^X forced on, pyOpenSSL's verify callback (aiortc's
    DTLS) cannot be made: that is why the transceiver unit says MemoryDenyWriteExecute=no.
    The relay runs under W^X in test_relay_unit_runs_as_systemd_runs_it."""
    assert boolean(unit(RELAY_UNIT), "MemoryDenyWriteExecute")
    assert value(unit(TRANSCEIVER_TEMPLATE), "Service", "MemoryDenyWriteExecute") == "no"
    if not syscall_numbers():
        pytest.fail("no seccomp support in this test on this architecture: W^X cannot be checked")
    probe = "from OpenSSL import SSL\nctx = SSL.Context(SSL.DTLS_METHOD)\nctx.set_verify(SSL.VERIFY_PEER, lambda *a: True)\nprint('callback ok')\n"
    u = unit(TRANSCEIVER_TEMPLATE)
    results = {}
    for deny_wx in (True, False):
        spec = sandbox_spec(u, deployment.analyze, [], deny_wx)
        spec["uid"] = None if os.geteuid() != 0 else DYNAMIC_UID
        result = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(spec), sys.executable, "-c", probe],
                                capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": "/"})
        results[deny_wx] = result
    assert results[False].returncode == 0 and "callback ok" in results[False].stdout, results[False].stderr
    assert results[True].returncode != 0 and "write+execute memory" in results[True].stderr, results[True]


def test_a_call_through_both_units(deployment: Deployment, tmp_path: Path) -> None:
    """Relay and transceiver each in its unit's sandbox; a stock aiortc client calls through them."""
    import aioice.ice
    from webrtc_peer import bearer_echo_call

    d = deployment
    ports: dict[str, int] = {}
    cfg = relay_config(d, ports, "deploy" + uuid.uuid4().hex[:8])
    public = activation_sockets(ports)
    http_port = transceiver_config(d, cfg.listen[0], TRANSCEIVER_INSTANCE)
    notify = NotifySocket(d.base / "notify")
    relay_log, tx_log = tmp_path / "relay.log", tmp_path / "transceiver.log"
    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]  # the client gathers on loopback
    try:
        relay, _ = start_relay_unit(d, cfg, notify, [("public", s.fileno()) for s in public], relay_log)
        mark = notify.mark()
        tx = d.start(TRANSCEIVER_TEMPLATE, instance=TRANSCEIVER_INSTANCE, notify=notify, log=tx_log)
        notify.wait("READY", start=mark, proc=tx, log=tx_log, timeout=60)
        base = f"http://127.0.0.1:{http_port}"

        # The example config turns WHIP authentication on: a token from the deployment's keys.
        token = subprocess.run([str(RTCRELAY), "whip-token", "issue", "--subject", "deploy-test", "--keys",
                                str(d.etc / "whip-token-keys.toml")], capture_output=True, text=True, check=True,
                               timeout=60).stdout.strip()
        asyncio.run(asyncio.wait_for(bearer_echo_call(base, token, "hello through the relay", tx_log.read_text), 60))
        mark = notify.mark()
        assert d.stop(tx, timeout=45) == 0, tx_log.read_text()
        notify.wait("STOPPING", start=mark, timeout=1)
        assert d.stop(relay) == 0, relay_log.read_text()
        for log in (relay_log, tx_log):
            assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        aioice.ice.get_host_addresses = original
        notify.close()
        for s in public:
            s.close()
