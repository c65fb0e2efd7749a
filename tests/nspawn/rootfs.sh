#!/usr/bin/env bash
# Make sure a bare Debian rootfs (minbase + systemd, curl) exists for the boot test; print its path.
#
#   tests/nspawn/rootfs.sh [CACHE_DIR] [SUITE] [FLAVOUR]
#       CACHE_DIR  default /var/cache/knotd-ci
#       SUITE      bookworm (Debian 12, default) or trixie (Debian 13)
#       FLAVOUR    boot (default): what a fresh VM has, for install/start/upgrade/purge tests
#                  build: the boot rootfs plus the source package's Build-Depends, for dpkg-buildpackage
#
# The rootfs is built once with debootstrap (≈2 min) and reused; it is rebuilt when older than
# KNOTD_CI_ROOTFS_MAX_AGE_DAYS (default 14) so its apt lists never point at files the mirror has dropped.
# The boot test runs it with --volatile=overlay, so nothing a test does is written back.
# The boot flavour also holds the .debs of knotd's Debian dependencies in apt's archive cache: `apt install
# ./knotd.deb` in the container still resolves and installs them, but reads them from disk, not the mirror.
set -euo pipefail
CACHE=${1:-/var/cache/knotd-ci}
SUITE=${2:-bookworm}
FLAVOUR=${3:-boot}
MAX_AGE_DAYS=${KNOTD_CI_ROOTFS_MAX_AGE_DAYS:-14}
MIRROR=${KNOTD_CI_MIRROR:-http://deb.debian.org/debian}
case "$SUITE" in bookworm|trixie) ;; *) echo "rootfs.sh: unknown suite $SUITE" >&2; exit 2 ;; esac
# What knotd's packages pull in at run time (Depends and Recommends), pre-downloaded.
PRELOAD=(python3 libpython3-stdlib adduser espeak-ng libstdc++6 libgomp1 systemd)
# debian/control's Build-Depends (plus build-essential, which dpkg-buildpackage assumes).
BUILD_DEPS=(build-essential debhelper dh-virtualenv python3 python3-venv python3-dev git)
# Bump when the recipe below changes, so cached copies are rebuilt.
RECIPE=5
case "$FLAVOUR" in
    boot) ROOTFS=$CACHE/$SUITE ;;
    build) ROOTFS=$CACHE/$SUITE-build ;;
    *) echo "rootfs.sh: unknown flavour $FLAVOUR" >&2; exit 2 ;;
esac
STAMP=$ROOTFS/.knotd-ci-rootfs

fresh() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$RECIPE" ] &&
        [ -z "$(find "$STAMP" -mtime +"$MAX_AGE_DAYS" -print)" ]
}

if fresh; then
    echo "$ROOTFS"
    exit 0
fi

if [ "$FLAVOUR" = build ]; then
    # The build rootfs starts as a copy of the boot rootfs (one debootstrap per suite).
    BOOT=$("$0" "$CACHE" "$SUITE" boot)
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock-$SUITE-$FLAVOUR"
flock -w 900 9
if fresh; then  # another run built it while we waited
    echo "$ROOTFS"
    exit 0
fi

tmp=$(mktemp -d "$CACHE/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
in_root() { chroot "$tmp/rootfs" env DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@" >>"$tmp/apt.log" 2>&1 || {
    tail -20 "$tmp/apt.log" >&2; exit 1; }; }

if [ "$FLAVOUR" = build ]; then
    echo "knotd-ci: $SUITE build rootfs: installing ${BUILD_DEPS[*]} (once)" >&2
    cp -a "$BOOT" "$tmp/rootfs"
    rm -f "$tmp/rootfs/.knotd-ci-rootfs" "$tmp/rootfs/etc/apt/apt.conf.d/10keep-debs"
    in_root apt-get -q update
    in_root apt-get -q -y --no-install-recommends install "${BUILD_DEPS[@]}"
    in_root apt-get clean
else
    echo "knotd-ci: debootstrap $SUITE into $tmp (once; about 2 minutes)" >&2
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,curl,ca-certificates "$SUITE" \
        "$tmp/rootfs" "$MIRROR" >"$tmp/debootstrap.log" 2>&1 || { tail -20 "$tmp/debootstrap.log" >&2; exit 1; }
    cat >"$tmp/rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
SOURCES
    cp /etc/resolv.conf "$tmp/rootfs/etc/resolv.conf" 2>/dev/null || true
    echo knotd-ci >"$tmp/rootfs/etc/hostname"
    # Keep downloaded .debs so the preload below stays in /var/cache/apt/archives.
    echo 'Binary::apt::APT::Keep-Downloaded-Packages "true";' >"$tmp/rootfs/etc/apt/apt.conf.d/10keep-debs"
    in_root apt-get -q update
    in_root apt-get -q -y upgrade
    in_root apt-get -q -y --download-only install "${PRELOAD[@]}"
fi
echo "$RECIPE" >"$tmp/rootfs/.knotd-ci-rootfs"
rm -rf "$ROOTFS.old"
[ -e "$ROOTFS" ] && mv "$ROOTFS" "$ROOTFS.old"
mv "$tmp/rootfs" "$ROOTFS"
rm -rf "$ROOTFS.old"
echo "$ROOTFS"
