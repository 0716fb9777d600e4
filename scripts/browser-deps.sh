#!/usr/bin/env bash
# Chromium for the end-to-end browser test (tests/test_browser_call.py).
#
# Sourced by scripts/test (after bootstrap.sh); can also be run on its own. Installs Debian's
# `chromium` with apt when it is missing (apt-get update first; as root, else with sudo),
# then exports RTCRELAY_CHROMIUM=/path/to/the/real/binary. Quick and silent when installed.
# (/usr/bin/chromium is Debian's wrapper script; the real binary is /usr/lib/chromium/chromium.)

_rtcrelay_find_chromium() {
    local candidate
    for candidate in "${RTCRELAY_CHROMIUM:-}" /usr/lib/chromium/chromium /usr/bin/chromium; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

_rtcrelay_browser_deps() {
    local found
    if found="$(_rtcrelay_find_chromium)"; then
        export RTCRELAY_CHROMIUM="$found"
        return 0
    fi
    _rtcrelay_apt_install browser-deps chromium fonts-dejavu-core || return 1
    if ! found="$(_rtcrelay_find_chromium)"; then
        echo "browser-deps: apt installed chromium but no binary was found at /usr/lib/chromium/chromium" >&2
        return 1
    fi
    export RTCRELAY_CHROMIUM="$found"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    # Run directly: be strict, print the result.
    set -euo pipefail
    _rtcrelay_browser_deps
    echo "RTCRELAY_CHROMIUM=$RTCRELAY_CHROMIUM"
else
    _rtcrelay_browser_deps || { echo "browser-deps: could not provide Chromium" >&2; return 1; }
fi
