#!/usr/bin/env bash
# Shared set-up for scripts/demo and scripts/test: a project venv in .venv with rtcrelay
# installed editable. Idempotent and quick when nothing changed (keyed on pyproject.toml).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
    # apt only when something is missing; 'update' once per call.
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@"
}

if ! "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
    echo "rtcrelay needs Python 3.11 (found: $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PY" -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        apt_install python3-venv
        "$PY" -m venv "$VENV"
    fi
fi

# gcc and Python's headers: relay._hitpath (the C hit path) is built at install; without
# them the install succeeds and the relay runs its Python hit path.
headers="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h"
if ! command -v gcc >/dev/null 2>&1 || [ ! -f "$headers" ]; then
    ver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    apt_install gcc "python$ver-dev" \
        || echo "bootstrap: no gcc/python$ver-dev: relay._hitpath is not built, the relay runs its Python hit path" >&2
fi

# clang and libbpf's headers: relay/ebpf/fastpath.bpf.o (the in-kernel fast path) is built at
# install; without them the relay forwards every datagram in its workers (libbpf1, the runtime
# library, comes with them).
if ! command -v clang >/dev/null 2>&1 || [ ! -f /usr/include/bpf/bpf_helpers.h ]; then
    apt_install clang libbpf-dev \
        || echo "bootstrap: no clang/libbpf-dev: the in-kernel fast path is not built" >&2
fi

stamp="$VENV/.rtcrelay-installed"
extras="${RTCRELAY_EXTRAS:-test}"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT"/relay/_*.[ch] "$ROOT"/relay/ebpf/*.c | sha256sum | cut -c1-16)-$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$ROOT[$extras]"
    echo "$want" > "$stamp"
fi
