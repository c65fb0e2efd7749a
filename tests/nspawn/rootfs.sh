#!/usr/bin/env bash
# Make sure a bare Debian 12 rootfs (minbase + systemd, curl) for the boot test exists; print its path.
#
#   tests/nspawn/rootfs.sh [CACHE_DIR]        default CACHE_DIR: /var/cache/knotd-ci
#
# The rootfs is built once with debootstrap (≈2 min) and reused; it is rebuilt when older than
# KNOTD_CI_ROOTFS_MAX_AGE_DAYS (default 14) so its apt lists never point at files the mirror has dropped.
# The boot test runs it with --volatile=overlay, so nothing a test does is written back.
# It also holds the .debs of knotd's Debian dependencies in apt's archive cache: `apt install ./knotd.deb`
# in the container still resolves and installs them, but reads them from disk instead of the mirror.
set -euo pipefail
CACHE=${1:-/var/cache/knotd-ci}
ROOTFS=$CACHE/bookworm
STAMP=$ROOTFS/.knotd-ci-rootfs
MAX_AGE_DAYS=${KNOTD_CI_ROOTFS_MAX_AGE_DAYS:-14}
MIRROR=${KNOTD_CI_MIRROR:-http://deb.debian.org/debian}
# What knotd's control file pulls in (Depends and Recommends), pre-downloaded; keep in step with control.in.
PRELOAD=(python3.11 adduser init-system-helpers espeak-ng)
# Bump when the recipe below changes, so cached copies are rebuilt.
RECIPE=4

fresh() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$RECIPE" ] &&
        [ -z "$(find "$STAMP" -mtime +"$MAX_AGE_DAYS" -print)" ]
}

if fresh; then
    echo "$ROOTFS"
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -w 900 9
if fresh; then  # another run built it while we waited
    echo "$ROOTFS"
    exit 0
fi

tmp=$(mktemp -d "$CACHE/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "knotd-ci: debootstrap bookworm into $tmp (once; about 2 minutes)" >&2
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,curl,ca-certificates bookworm "$tmp/rootfs" "$MIRROR" \
    >"$tmp/debootstrap.log" 2>&1 || { tail -20 "$tmp/debootstrap.log" >&2; exit 1; }
cat >"$tmp/rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
cp /etc/resolv.conf "$tmp/rootfs/etc/resolv.conf" 2>/dev/null || true
echo knotd-ci >"$tmp/rootfs/etc/hostname"
# Keep downloaded .debs so the preload below stays in /var/cache/apt/archives.
echo 'Binary::apt::APT::Keep-Downloaded-Packages "true";' >"$tmp/rootfs/etc/apt/apt.conf.d/10keep-debs"
in_root() { chroot "$tmp/rootfs" env DEBIAN_FRONTEND=noninteractive "$@" >>"$tmp/apt.log" 2>&1 || {
    tail -20 "$tmp/apt.log" >&2; exit 1; }; }
in_root apt-get -q update
in_root apt-get -q -y upgrade
in_root apt-get -q -y --download-only install "${PRELOAD[@]}"
echo "$RECIPE" >"$tmp/rootfs/.knotd-ci-rootfs"
rm -rf "$ROOTFS.old"
[ -e "$ROOTFS" ] && mv "$ROOTFS" "$ROOTFS.old"
mv "$tmp/rootfs" "$ROOTFS"
rm -rf "$ROOTFS.old"
echo "$ROOTFS"
