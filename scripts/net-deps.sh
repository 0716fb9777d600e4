#!/usr/bin/env bash
# The kernel NAT tools for the NAT-rebinding test (tests/test_nat_rebinding.py): nft (nftables)
# to masquerade the client's namespace and conntrack to move its mapping mid-call; Debian's
# redis-server, which the relay failover test starts itself (tests/test_directory_failover.py);
# and bpftool, which reads the fast path's BTF (tests/test_kernel_path.py) and its run stats
# (bench/relay_cpu.py).
#
# Sourced by scripts/test (after bootstrap.sh); can also be run on its own. Installs Debian's
# nftables, conntrack, redis-server and bpftool with apt when one is missing (as root, else
# with sudo).

source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

_rtcrelay_net_deps() {
    if command -v nft >/dev/null 2>&1 && command -v conntrack >/dev/null 2>&1 \
            && command -v redis-server >/dev/null 2>&1 \
            && { command -v bpftool >/dev/null 2>&1 || [ -x /usr/sbin/bpftool ]; }; then
        return 0
    fi
    _rtcrelay_apt_install net-deps nftables conntrack redis-server bpftool
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    _rtcrelay_net_deps
else
    _rtcrelay_net_deps || { echo "net-deps: could not provide nft/conntrack/redis-server/bpftool" >&2; return 1; }
fi
