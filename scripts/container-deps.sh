#!/usr/bin/env bash
# A container engine for the image test (tests/test_container_image.py): podman with runc
# (crun cannot run here: see scripts/containers.conf), and mmdebstrap for the base image.
#
# Sourced by scripts/test (after bootstrap.sh); can also be run on its own. Installs the
# packages with apt when one is missing (as root, else with sudo), exports CONTAINERS_CONF
# (scripts/containers.conf) unless it is set, and builds the base image once
# (scripts/container-base.sh; cached by its tag, quick when it exists).

source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

_rtcrelay_container_deps() {
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1 \
            || ! command -v mmdebstrap >/dev/null 2>&1; then
        # runc named explicitly: podman depends on crun | runc, and apt would pick crun.
        local packages=(podman runc mmdebstrap)
        if [ "$(id -u)" != 0 ]; then packages+=(uidmap); fi
        _rtcrelay_apt_install container-deps "${packages[@]}" || return 1
    fi
    export CONTAINERS_CONF="${CONTAINERS_CONF:-$root/scripts/containers.conf}"
    "$root/scripts/container-base.sh" >/dev/null
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    _rtcrelay_container_deps
    echo "CONTAINERS_CONF=$CONTAINERS_CONF"
else
    _rtcrelay_container_deps || { echo "container-deps: could not provide podman and the base image" >&2; return 1; }
fi
