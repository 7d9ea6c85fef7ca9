#!/bin/bash
# Build (once) the Debian root file system that the systemd end-to-end test
# boots with systemd-nspawn, and cache it.
#
# Usage: build_rootfs.sh [ROOTFS]   (default $FORKSERVER_E2E_ROOTFS or
#                                    /var/tmp/forkserver-e2e/rootfs)
#
# The directory is the cache; a tarball beside it (ROOTFS.tar) lets CI
# restore it without the network.  A stamp file records the package list,
# so changing PACKAGES below rebuilds.  Building takes one to two minutes
# (most of it downloading from the mirror) and about 200 MB, plus as much
# again for the tarball; restoring the tarball takes a few seconds.  Needs
# root, debootstrap and a Debian mirror (read from the host's apt sources).
set -euo pipefail

ROOTFS=${1:-${FORKSERVER_E2E_ROOTFS:-/var/tmp/forkserver-e2e/rootfs}}
# procps: ps, pgrep and kill for the test; python3-venv: the install route
# of systemd/README.md (a virtualenv in /opt, whose pip brings forkserver's
# own dependencies from PyPI).
PACKAGES=systemd,systemd-sysv,dbus,procps,python3,python3-venv
SUITE=bookworm
STAMP="$SUITE $PACKAGES"
TARBALL="$ROOTFS.tar"

if [ -f "$ROOTFS/.forkserver-e2e" ] && [ "$(cat "$ROOTFS/.forkserver-e2e")" = "$STAMP" ]; then
    echo "rootfs ready: $ROOTFS"
    exit 0
fi

mkdir -p "$(dirname "$ROOTFS")"
exec 9>"$ROOTFS.lock"
flock -w 600 9 || { echo "timed out waiting for $ROOTFS.lock" >&2; exit 1; }
# Another builder may have finished while we waited for the lock.
if [ -f "$ROOTFS/.forkserver-e2e" ] && [ "$(cat "$ROOTFS/.forkserver-e2e")" = "$STAMP" ]; then
    echo "rootfs ready: $ROOTFS"
    exit 0
fi

work="$ROOTFS.partial"
rm -rf "$work" "$ROOTFS"
if [ -f "$TARBALL" ] && tar -xOf "$TARBALL" ./.forkserver-e2e 2>/dev/null | grep -qxF "$STAMP"; then
    mkdir -p "$work"
    tar -xf "$TARBALL" -C "$work"
else
    mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
    mirror=${mirror:-http://deb.debian.org/debian}
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$work" "$mirror"
    # The end-to-end test needs none of these; they only slow the boot.
    rm -rf "$work"/var/cache/apt/archives/*.deb "$work"/var/lib/apt/lists/*
    echo "$STAMP" > "$work/.forkserver-e2e"
    tar -cf "$TARBALL.partial" -C "$work" .
    mv "$TARBALL.partial" "$TARBALL"
fi
mv "$work" "$ROOTFS"
echo "rootfs ready: $ROOTFS"
