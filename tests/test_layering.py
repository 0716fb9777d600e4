"""The package layering the README draws, checked on the imports themselves (ast, no import).

relay and transceiver are siblings that never import each other; wire (the protocol) and
daemon (service plumbing) import neither; shm is the relay's table and knows no service.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"wire", "daemon", "shm", "relay", "transceiver", "cli"}
ALLOWED = {
    "wire": {"wire"},
    "daemon": {"daemon", "wire"},
    "shm": {"shm"},
    "relay": {"relay", "wire", "daemon", "shm"},
    "transceiver": {"transceiver", "wire", "daemon"},
    "cli": OURS,
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_the_layering_allows(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    wrong = {str(f.relative_to(ROOT)): sorted(imported_packages(f) - ALLOWED[package]) for f in files}
    assert {f: w for f, w in wrong.items() if w} == {}


def test_no_product_module_is_over_600_lines() -> None:
    sources = [p for pkg in ALLOWED for ext in ("*.py", "*.c", "*.h") for p in (ROOT / pkg).rglob(ext)]
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
