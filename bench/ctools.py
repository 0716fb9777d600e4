"""The relay benchmark's C tools (bench/c/*.c: the reference forwarder fwd_ref and the load
generator loadgen), compiled with gcc into bench/.build/ when a source or the flags changed."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from bench.harness.errors import BenchError

BENCH = Path(__file__).resolve().parent
C_SRC = BENCH / "c"
BUILD = BENCH / ".build"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11", "-pthread"]  # (threads: gen -E, fwd_ref -R)
TOOLS = ("fwd_ref", "loadgen")


def build(force: bool = False) -> dict[str, Path]:
    """Compile bench/c/*.c into bench/.build/ (only when a source or the flags changed)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc not found on PATH: the relay benchmark builds its C tools with gcc "
                         "(Debian/Ubuntu: apt-get install gcc)")
    BUILD.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name in TOOLS:
        src, exe, stamp = C_SRC / f"{name}.c", BUILD / name, BUILD / f"{name}.flags"
        flags = " ".join(CFLAGS)
        fresh = (exe.exists() and stamp.exists() and stamp.read_text() == flags
                 and exe.stat().st_mtime >= src.stat().st_mtime)
        if force or not fresh:
            tmp = BUILD / f".{name}.{os.getpid()}.tmp"  # then renamed: a running copy is never rewritten
            cmd = [gcc, *CFLAGS, "-o", str(tmp), str(src)]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if r.returncode != 0:
                    raise BenchError(f"gcc failed for {src.name}:\n{r.stderr}")
                os.replace(tmp, exe)
            finally:
                tmp.unlink(missing_ok=True)
            stamp.write_text(flags)
        out[name] = exe
    return out
