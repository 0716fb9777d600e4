#!/usr/bin/env bash
# The kernel NAT tools for the NAT-rebinding test (tests/test_nat_rebinding.py): nft (nftables)
# to masquerade the client's namespace and conntrack to move its mapping mid-call.
#
# Sourced by scripts/test (after bootstrap.sh); can also be run on its own. Installs Debian's
# nftables and conntrack with apt when one is missing (as root, else with sudo).

_rtcrelay_net_deps() {
    if command -v nft >/dev/null 2>&1 && command -v conntrack >/dev/null 2>&1; then
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "net-deps: nft or conntrack is missing and there is no apt-get" >&2
        return 1
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        sudo="sudo"
    fi
    echo "net-deps: installing Debian's nftables and conntrack (apt) for the NAT test ..." >&2
    local aptlog
    aptlog="$(mktemp)"
    if ! { $sudo apt-get update -qq \
           && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                  nftables conntrack; } >"$aptlog" 2>&1; then
        tail -n 30 "$aptlog" >&2
        rm -f "$aptlog"
        echo "net-deps: apt-get could not install nftables/conntrack (output above)" >&2
        return 1
    fi
    rm -f "$aptlog"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    _rtcrelay_net_deps
else
    _rtcrelay_net_deps || { echo "net-deps: could not provide nft/conntrack" >&2; return 1; }
fi
