#!/usr/bin/env bash
# A base image for the Containerfile (BASE_IMAGE) made from Debian packages, for machines that
# reach Debian's archive but no container registry (python:3.11-slim cannot be pulled there).
# Debian 12 (bookworm): its python3 is 3.11, which rtcrelay needs. minbase + python3,
# python3-venv, ca-certificates; documentation and translations left out (dpkg path-exclude).
#
#   scripts/container-base.sh            build it once; quick and silent when the tag exists
#   scripts/container-base.sh --rebuild  build it again (newer Debian packages)
#
# Prints the tag (localhost/rtcrelay-base:bookworm, or $RTCRELAY_CONTAINER_BASE_TAG) on stdout.
# Needs podman and mmdebstrap (scripts/container-deps.sh installs both) and root (mmdebstrap's
# root mode; `--mode=unshare` would need subuids).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/scripts/containers.conf}"
TAG="${RTCRELAY_CONTAINER_BASE_TAG:-localhost/rtcrelay-base:bookworm}"

if [ "${1:-}" != "--rebuild" ] && podman image exists "$TAG"; then
    echo "$TAG"
    exit 0
fi
for tool in podman mmdebstrap; do
    command -v "$tool" >/dev/null || { echo "container-base: $tool is missing (scripts/container-deps.sh installs it)" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
started=$SECONDS
echo "container-base: building $TAG with mmdebstrap (bookworm, about 40 s) ..." >&2
if ! mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        bookworm "$work/rootfs.tar" >"$work/log" 2>&1; then
    tail -n 30 "$work/log" >&2
    echo "container-base: mmdebstrap failed (output above)" >&2
    exit 1
fi
# An imported tarball has no configuration: give it the PATH and CMD a Debian image has.
podman import --quiet \
    --change 'ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD=["/bin/bash"]' \
    "$work/rootfs.tar" "$TAG" >/dev/null
echo "container-base: $TAG built in $((SECONDS - started)) s" >&2
echo "$TAG"
