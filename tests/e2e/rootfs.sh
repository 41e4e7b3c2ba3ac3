#!/usr/bin/env bash
# Builds (once) the Debian rootfs that the end-to-end tests boot with
# systemd-nspawn, and prints its path. Cached; booted with
# --volatile=overlay so it stays pristine. The mirror is the host's own
# Debian source, read from its apt configuration.
set -euo pipefail
ROOTFS=${CRED_WATCH_E2E_ROOTFS:-/var/cache/cred-watch-e2e/bookworm}
if [ -x "$ROOTFS/lib/systemd/systemd" ] && [ -e "$ROOTFS/.cred-watch-complete" ]; then
    echo "$ROOTFS"
    exit 0
fi
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(ORIGIN)' 2>/dev/null \
    | awk '$3 == "Debian" && $2 == "bookworm" { print $1; exit }')
if [ -z "$mirror" ]; then
    mirror=$(grep -rhoE '^(URIs:|deb)[[:space:]]+[^[:space:]]+/debian/?' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | awk '{ print $2; exit }')
fi
[ -n "$mirror" ] || { echo "rootfs.sh: no Debian mirror found in the apt configuration" >&2; exit 1; }
rm -rf "$ROOTFS"
mkdir -p "$(dirname "$ROOTFS")"
debootstrap --variant=minbase --include=systemd,dbus,systemd-sysv bookworm "$ROOTFS" "$mirror" >&2
touch "$ROOTFS/.cred-watch-complete"
echo "$ROOTFS"
