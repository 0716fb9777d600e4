#!/usr/bin/env bash
# Sourced by the set-up scripts: install Debian packages quietly, as root or with sudo, and show
# apt's last lines only when it fails. Usage: _rtcrelay_apt_install WHO PACKAGE...
_rtcrelay_apt_install() {
    local who="$1"
    shift
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$who: $* missing and there is no apt-get" >&2
        return 1
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "$who: installing $* needs root or sudo" >&2
            return 1
        fi
        sudo="sudo"
    fi
    echo "$who: installing $* (apt) ..." >&2
    local aptlog
    aptlog="$(mktemp)"
    if ! { $sudo apt-get update -qq \
           && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; } \
           >"$aptlog" 2>&1; then
        tail -n 30 "$aptlog" >&2
        rm -f "$aptlog"
        echo "$who: apt-get could not install $* (output above)" >&2
        return 1
    fi
    rm -f "$aptlog"
}
