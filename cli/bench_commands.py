"""`rtcrelay bench …`: run the scripts in bench/ (they live in the source tree, not the wheel)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.app import bench_app, fail

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
EXTRA = Annotated[list[str] | None,
                  typer.Argument(help="Arguments passed to the script (after --).", show_default=False)]


def run_script(name: str, extra: list[str] | None) -> None:
    script = BENCH_DIR / f"{name}.py"
    if not script.exists():
        fail(f"{script} not found: benchmarks run from a source checkout")
    raise typer.Exit(subprocess.call([sys.executable, str(script), *(extra or [])]))


@bench_app.command("core")
def bench_core(extra: EXTRA = None) -> None:
    """ns/op of the sans-IO core (STUN, token, frames, decision)."""
    run_script("core", extra)


@bench_app.command("shm")
def bench_shm(extra: EXTRA = None) -> None:
    """ns/op of the shared-memory flow table, takeover time, bytes per flow."""
    run_script("shm", extra)


@bench_app.command("relay")
def bench_relay(extra: EXTRA = None) -> None:
    """pps per core and latency of the relay vs a C reference forwarder (same run)."""
    run_script("relay", extra)


@bench_app.command("transceiver")
def bench_transceiver(extra: EXTRA = None) -> None:
    """Concurrent echo calls per core and offer→connected time vs stock aiortc."""
    run_script("transceiver", extra)


@bench_app.command("mmsg")
def bench_mmsg(extra: EXTRA = None) -> None:
    """Batched recvmmsg/sendmmsg forwarding vs recvfrom/sendto vs uvloop."""
    run_script("mmsg", extra)


@bench_app.command("table-fill")
def bench_table_fill(extra: EXTRA = None) -> None:
    """New sessions at a fixed rate into a relay table: when it refuses, how expiry frees it."""
    run_script("table_fill", extra)
