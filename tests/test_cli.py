"""The rtcrelay CLI: typer's runner for quick paths, real subprocesses against a live relay."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import RTCRELAY, Client, FakeTransceiver, RelayProcess, cleanup_relay, start_relay, wait_for, write_keys
from typer.testing import CliRunner

from cli.main import app
from wire.route_token import RouteKeyring

runner = CliRunner()


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(RTCRELAY + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RelayProcess, list[Client], FakeTransceiver, str]]:
    """A relay with two clients of one session flowing through it."""
    relay = start_relay(tmp_path_factory.mktemp("cli"), workers=2, config={"heartbeat_timeout": 60.0, "idle_timeout": 120.0})
    transceiver = FakeTransceiver()
    ufrag = transceiver.token(relay.keyring)
    clients = []
    for _ in range(2):
        client = Client(relay.address)
        client.send(client.binding_request(ufrag, keyring=relay.keyring))
        _frame, tunnel = transceiver.recv_data()
        transceiver.heartbeat(tunnel)
        client.send(b"\x80" + bytes(99))
        transceiver.recv_data()
        clients.append(client)
    wait_for(lambda: sum(r["flows"] for r in relay.rows()) == 2, 5, "flows published")
    yield relay, clients, transceiver, ufrag
    for client in clients:
        client.close()
    transceiver.close()
    cleanup_relay(relay)


def where(relay: RelayProcess) -> list[str]:
    return ["--name", relay.name, "--table-dir", str(relay.table_dir)]


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("rtcrelay ")


def test_flows_list_json_shows_live_flows(live) -> None:
    relay, clients, transceiver, ufrag = live
    wait_for(lambda: all(r["packets_in"] >= 2 for r in json.loads(run_cli("flows", "list", "--json", *where(relay)).stdout)), 5,
             "counters flushed")
    rows = json.loads(run_cli("flows", "list", "--json", *where(relay)).stdout)
    assert sorted(r["client"] for r in rows) == sorted(f"{h}:{p}" for h, p in (c.address for c in clients))
    for row in rows:
        assert row["ufrag"] == ufrag
        assert row["transceiver"] == f"127.0.0.1:{transceiver.address[1]}"
        assert row["relay"] == f"127.0.0.1:{relay.port}"
        assert row["packets_in"] == 2 and row["bytes_in"] > 100 and row["worker"] in (0, 1)
    filtered = json.loads(run_cli("flows", "list", "--json", "--ufrag", "nope", *where(relay)).stdout)
    assert filtered == []
    by_worker = [json.loads(run_cli("flows", "list", "--json", "--worker", str(w), *where(relay)).stdout) for w in (0, 1)]
    assert sum(len(x) for x in by_worker) == 2


def test_flows_show_and_human_table(live) -> None:
    relay, clients, _t, ufrag = live
    client = "{}:{:d}".format(*clients[0].address)
    shown = json.loads(run_cli("flows", "show", client, "--json", *where(relay)).stdout)
    assert shown["client"] == client and shown["ufrag"] == ufrag
    human = run_cli("flows", "list", *where(relay))
    assert human.returncode == 0 and "2 flows" in human.stdout and client in human.stdout
    missing = run_cli("flows", "show", "127.0.0.1:1", *where(relay))
    assert missing.returncode == 1 and "no flow for client 127.0.0.1:1" in missing.stderr


def test_sessions_and_stats(live) -> None:
    relay, _clients, _transceiver, ufrag = live
    sessions = json.loads(run_cli("sessions", "--json", *where(relay)).stdout)
    assert len(sessions) == 1 and sessions[0]["ufrag"] == ufrag and sessions[0]["flows"] == 2
    stats = json.loads(run_cli("stats", "--json", *where(relay)).stdout)
    assert stats["table"]["flows"] == 2 and stats["packets_to_transceivers"] >= 4
    assert len(stats["workers"]) == 2 and all(w["alive"] and w["rss_bytes"] > 0 for w in stats["workers"])
    human = run_cli("stats", *where(relay))
    assert human.returncode == 0 and "workers" in human.stdout


def test_watch_renders_in_a_terminal_and_exits(live) -> None:
    relay, *_ = live
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on a 160x50 pseudo-terminal, as a person would run it
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        os.execve(sys.executable, RTCRELAY + ["flows", "watch", "--frames", "3", "--interval", "0.2", *where(relay)],
                  {**os.environ, "COLUMNS": "160", "LINES": "50"})
    output = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    text = output.decode(errors="replace")
    assert "2 flows" in text and "pps in/out" in text


def test_ufrag_decode_verifies_with_keys(live, tmp_path: Path) -> None:
    relay, _c, _t, ufrag = live
    good = run_cli("ufrag", "decode", ufrag, "--route-keys", str(relay.keys_path), "--json")
    decoded = json.loads(good.stdout)
    assert good.returncode == 0 and decoded["verified"] is True and decoded["check"] == "valid"
    wrong = tmp_path / "wrong.toml"
    write_keys(wrong, {1: b"w" * 32}, 1)
    bad = run_cli("ufrag", "decode", ufrag, "--route-keys", str(wrong))
    assert bad.returncode == 2 and "token_bad_mac" in bad.stdout
    unverified = json.loads(run_cli("ufrag", "decode", ufrag, "--json").stdout)
    assert unverified["verified"] is False and unverified["target"].startswith("127.0.0.1:")


def test_missing_table_is_one_clear_line() -> None:
    result = run_cli("flows", "list", "--name", "does-not-exist")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "no flow table at" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_key_is_named(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('workers = "many"\n')
    result = run_cli("relay", "--config", str(config))
    assert result.returncode == 1 and "$.workers" in result.stderr and "Traceback" not in result.stderr
    config.write_text("bogus_key = 1\n")
    result = run_cli("relay", "--config", str(config))
    assert result.returncode == 1 and "bogus_key" in result.stderr


def test_missing_route_keys_is_named(tmp_path: Path) -> None:
    result = run_cli("relay", "--route-keys", str(tmp_path / "absent.toml"), "--listen", "127.0.0.1:0", "--admin", "")
    assert result.returncode == 1 and "absent.toml" in result.stderr and "Traceback" not in result.stderr


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    write_keys(keys, {1: b"k" * 32}, 1)
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: the relay cannot share it
    try:
        port = holder.getsockname()[1]
        result = run_cli("relay", "--route-keys", str(keys), "--listen", f"127.0.0.1:{port}", "--admin", "",
                         "--name", f"portclash{os.getpid()}")
        assert result.returncode == 1 and "Address already in use" in result.stderr
        assert "Traceback" not in result.stderr
        up = run_cli("up", "--relay-port", str(port))
        assert up.returncode == 1 and f"127.0.0.1:{port} is in use (UDP)" in up.stderr and "--relay-port" in up.stderr
    finally:
        holder.close()


def test_keys_generate_makes_a_loadable_file(tmp_path: Path) -> None:
    from daemon.keys import load_keyring

    result = runner.invoke(app, ["keys", "generate", "--key-id", "7"])
    assert result.exit_code == 0
    path = tmp_path / "k.toml"
    path.write_text(result.stdout)
    keyring = load_keyring(str(path))
    assert isinstance(keyring, RouteKeyring) and keyring.active_key_id == 7
    assert runner.invoke(app, ["keys", "generate", "--key-id", "300"]).exit_code == 1


def test_inspection_yields_the_cpu_to_the_relay() -> None:
    """A reader of a big table must not take a worker's time slices: flows/sessions run at
    SCHED_IDLE, so any worker wakeup preempts them."""
    probe = ("import os; from cli.inspect import yield_to_the_relay; yield_to_the_relay(); "
             "print(os.sched_getscheduler(0) == os.SCHED_IDLE)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
