#!/usr/bin/env bash
# The browsers of the end-to-end browser tests: Chromium (tests/test_browser_call.py) and
# Firefox ESR (tests/test_browser_firefox.py).
#
# Sourced by scripts/test (after bootstrap.sh); can also be run on its own. Installs Debian's
# `chromium` and `firefox-esr` with apt when missing (apt-get update first; as root, else with
# sudo), then exports RTCRELAY_CHROMIUM and RTCRELAY_FIREFOX=/path/to/the/real/binary. Quick
# and silent when installed.
# (/usr/bin/chromium is Debian's wrapper script; the real binary is /usr/lib/chromium/chromium.
# /usr/bin/firefox-esr is a link to /usr/lib/firefox-esr/firefox-esr.)

# The first executable of the arguments (empty ones are passed over).
_rtcrelay_first_executable() {
    local candidate
    for candidate in "$@"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

_rtcrelay_find_chromium() {
    _rtcrelay_first_executable "${RTCRELAY_CHROMIUM:-}" /usr/lib/chromium/chromium /usr/bin/chromium
}

_rtcrelay_find_firefox() {
    _rtcrelay_first_executable "${RTCRELAY_FIREFOX:-}" /usr/lib/firefox-esr/firefox-esr /usr/bin/firefox-esr
}

source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

_rtcrelay_browser_deps() {
    local missing=() chromium firefox
    _rtcrelay_find_chromium >/dev/null || missing+=(chromium)
    _rtcrelay_find_firefox >/dev/null || missing+=(firefox-esr)
    if [ "${#missing[@]}" -gt 0 ]; then
        _rtcrelay_apt_install browser-deps "${missing[@]}" fonts-dejavu-core || return 1
    fi
    if ! chromium="$(_rtcrelay_find_chromium)"; then
        echo "browser-deps: apt installed chromium but no binary was found at /usr/lib/chromium/chromium" >&2
        return 1
    fi
    if ! firefox="$(_rtcrelay_find_firefox)"; then
        echo "browser-deps: apt installed firefox-esr but no binary was found at /usr/lib/firefox-esr/firefox-esr" >&2
        return 1
    fi
    export RTCRELAY_CHROMIUM="$chromium" RTCRELAY_FIREFOX="$firefox"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    # Run directly: be strict, print the result.
    set -euo pipefail
    _rtcrelay_browser_deps
    echo "RTCRELAY_CHROMIUM=$RTCRELAY_CHROMIUM"
    echo "RTCRELAY_FIREFOX=$RTCRELAY_FIREFOX"
else
    _rtcrelay_browser_deps || { echo "browser-deps: could not provide Chromium and Firefox" >&2; return 1; }
fi
