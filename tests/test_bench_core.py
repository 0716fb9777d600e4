"""bench/core.py --quick runs to the end and prints every row (it is not run otherwise: an
import it lost went unseen for a day)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_prints_every_row() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "core.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for row in ("reference: dict hit", "route token decode + MAC", "miss path: full authentication",
                "decide (all checks, shm reads)", "learn (shm insert, local dicts)"):
        line = next((x for x in lines if x.startswith(row)), None)
        assert line is not None, f"no {row!r} row in:\n{done.stdout}"
        assert float(line.split()[-2]) > 0  # ns per operation
