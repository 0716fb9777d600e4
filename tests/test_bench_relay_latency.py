"""bench/relay_latency.py learns its flows, times its runs and prints the median p99."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_two_short_runs_on_the_relay_print_their_figures() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "relay_latency.py"), "--forwarder", "relay",
                           "--flows", "64", "--runs", "2", "--duration", "0.3", "--step-reference"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    runs = re.findall(r"^run \d: p50 ([\d.]+) us, p99 ([\d.]+) us", done.stdout, re.M)
    assert len(runs) == 2 and all(0 < float(p50) <= float(p99) for p50, p99 in runs), done.stdout
    assert re.search(r"64 flows: p99 median [\d.]+ us, best [\d.]+ us of 2 runs", done.stdout), done.stdout
    steps = re.search(r"^housekeeping: ([\d,]+) steps, longest (\d+) us, (\d+) over 200 us", done.stdout, re.M)
    assert steps and int(steps[1].replace(",", "")) > 0 and int(steps[2]) > 0, done.stdout
    reference = re.search(r"^fixed-work reference steps on the worker's CPU: ([\d,]+) steps, longest (\d+) us",
                          done.stdout, re.M)
    assert reference and int(reference[1].replace(",", "")) > 0 and int(reference[2]) > 0, done.stdout
