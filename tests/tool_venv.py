"""Pinned command-line tools (linters, validators) for tests, in a venv of their own.

They are tools the tests run, not libraries the project imports, so they stay out of the
project's dependencies (no version clashes); the venv is cached under ~/.cache, keyed by
the pins, so a fresh machine installs them once.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def tools_venv(requirements: tuple[str, ...]) -> Path:
    """A venv with pinned tools from the package index, cached under ~/.cache (keyed by the pins)."""
    key = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rtcrelay-deploy-tools" / key
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)  # a half-made one (venvs are not relocatable: made in place)
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    result = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q", *requirements],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not install {requirements} from the package index:\n{result.stderr[-3000:]}")
    (root / ".complete").write_text("ok\n")
    return root


YAML_TOOLS = ("PyYAML==6.0.3",)


def yaml_documents(paths: list[Path], requirements: tuple[str, ...] = YAML_TOOLS) -> dict[str, list[dict]]:
    """Every YAML document of every file (PyYAML in a tools venv: not a project dependency),
    by file path."""
    import json

    python = tools_venv(requirements) / "bin" / "python"
    code = ("import json, sys, yaml\n"
            "print(json.dumps({p: [d for d in yaml.safe_load_all(open(p)) if d is not None] for p in sys.argv[1:]}))")
    result = subprocess.run([str(python), "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
