"""bench/step_reference.py: fixed work in the relay's own steps, summarised like a worker's row."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from bench import step_reference
from relay.housekeeping_steps import STEP_BUCKET_COUNTERS

ROOT = Path(__file__).resolve().parent.parent


def test_summary_counts_steps_over_200us_from_the_histogram() -> None:
    buckets = dict(zip(STEP_BUCKET_COUNTERS, (5, 4, 3, 2, 1, 7)))  # le 25, 50, 100, 200, 400, over 400
    row = {"housekeeping_step_max_us": 950, "housekeeping_step_us_total": 12_345, **buckets}
    assert step_reference.summary(row) == {"steps": 22, "max_us": 950, "over_200us": 8, "cpu_ms": 12.345}


def test_a_unit_is_fixed_work_and_a_tick_is_bounded() -> None:
    table = [[n, 0, n + 1] for n in range(100)]
    units = list(step_reference.fixed_units(table, random.Random(1)))
    assert len(units) == step_reference.UNITS_PER_STEP_AT_MOST
    touched = [e for e in table if e[1]]
    assert touched and all(e[1] == 2 * e[0] + 1 for e in touched)


def test_it_steps_until_a_line_on_stdin_then_prints_its_summary() -> None:
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "step_reference.py"), "--interval", "0.002",
                             "--entries", "1000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate("stop\n", timeout=30)  # (it steps once before it looks at stdin)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 0 and summary["steps"] >= 1 and summary["max_us"] > 0 and summary["cpu_ms"] > 0
