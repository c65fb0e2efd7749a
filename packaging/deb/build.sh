#!/usr/bin/env bash
# Build knotd's Debian packages from a clean copy of this tree with dpkg-buildpackage (what `./dev.sh deb`
# runs). The packaging itself is debian/ at the top of the tree.
#
#   packaging/deb/build.sh [--release bookworm|trixie] [--arch-only | --indep-only]
#
#   --release    the Debian release to build for (default: this machine's). The virtualenv is bound to
#                that release's python3, so each release gets its own knotd_<version>+debNN_amd64.deb.
#                Another release than this machine's is built in a cached rootfs of it with the
#                Build-Depends installed (tests/nspawn/rootfs.sh), run by systemd-nspawn (needs root).
#   --arch-only  only knotd (dpkg-buildpackage -B), not knotd-model-whisper-base (Architecture: all; it
#                is the same for every release, so build it once).
#   --indep-only only knotd-model-whisper-base (dpkg-buildpackage -A).
#
# Environment:
#   KNOTD_DIST_DIR      where the packages go (default: dist/)
#   KNOTD_CI_CACHE      where the build rootfs is cached (default: /var/cache/knotd-ci)
#   KNOTD_DEB_XZ_LEVEL  xz level for dh_builddeb (default 1, see debian/rules)
set -euo pipefail
umask 022
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. /etc/os-release
HOST_RELEASE=$VERSION_CODENAME
RELEASE=$HOST_RELEASE
SCOPE=-b
while [ $# -gt 0 ]; do
    case "$1" in
        --release) RELEASE=${2:?}; shift 2 ;;
        --arch-only) SCOPE=-B; shift ;;
        --indep-only) SCOPE=-A; shift ;;
        *) echo "build.sh: unknown argument $1 (see the comment at the top)" >&2; exit 2 ;;
    esac
done
OUT_DIR=${KNOTD_DIST_DIR:-$ROOT/dist}
CACHE=${KNOTD_CI_CACHE:-/var/cache/knotd-ci}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

WORK=$(mktemp -d /var/tmp/knotd-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
SRC=$WORK/knotd
mkdir -p "$SRC"
# The files a clean clone has (plus new, not ignored ones): no .venv, .cache, dist or __pycache__.
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - -cf -) | tar -xf - -C "$SRC"
else
    tar -C "$ROOT" --exclude=.git --exclude=.venv --exclude=.cache --exclude=dist --exclude=build \
        --exclude=__pycache__ --exclude='*.egg-info' -cf - . | tar -xf - -C "$SRC"
fi

started=$SECONDS
build_cmd="cd /build/knotd && dpkg-buildpackage $SCOPE -us -uc --no-sign"
if [ "$RELEASE" = "$HOST_RELEASE" ]; then
    (cd "$SRC" && dpkg-buildpackage "$SCOPE" -us -uc --no-sign) >"$WORK/build.log" 2>&1 || {
        tail -40 "$WORK/build.log" >&2; echo "build.sh: dpkg-buildpackage failed (log above)" >&2; exit 1; }
else
    [ "$(id -u)" = 0 ] || { echo "build.sh: building for $RELEASE needs root (systemd-nspawn)" >&2; exit 1; }
    rootfs=$("$ROOT/tests/nspawn/rootfs.sh" "$CACHE" "$RELEASE" build)
    pip_cache=${PIP_CACHE_DIR:-$HOME/.cache/pip}
    mkdir -p "$pip_cache"
    # The host's CA bundle: PyPI may be reached through an egress proxy whose CA only the host trusts.
    systemd-nspawn --quiet --register=no --keep-unit --volatile=overlay -D "$rootfs" \
        --bind="$WORK:/build" --bind="$pip_cache:/root/.cache/pip" \
        --bind-ro=/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/host-ca.crt \
        --setenv=PIP_CERT=/etc/ssl/certs/host-ca.crt --setenv=LANG=C.UTF-8 --setenv=HOME=/root \
        --setenv=KNOTD_DEB_XZ_LEVEL="${KNOTD_DEB_XZ_LEVEL:-}" \
        sh -c "$build_cmd" >"$WORK/build.log" 2>&1 </dev/null || {
        tail -40 "$WORK/build.log" >&2; echo "build.sh: dpkg-buildpackage in $RELEASE failed (log above)" >&2
        exit 1; }
fi
cp "$WORK"/*.deb "$OUT_DIR/"
for deb in "$WORK"/*.deb; do
    echo "$OUT_DIR/$(basename "$deb") ($(du -m "$deb" | cut -f1) MB)"
done
echo "built for $RELEASE in $((SECONDS - started)) s"
