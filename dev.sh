#!/usr/bin/env bash
# Set up and run knotd from a source checkout on Debian 12. Every command does its own set-up
# (Debian packages, the virtualenv in .venv, the Whisper model in .cache/models) and is safe to re-run.
#
#   ./dev.sh demo     set up, then run one local Knotencheck session with the status page live
#   ./dev.sh test     set up, then run the whole test suite (what CI runs)
#   ./dev.sh deb      build the Debian packages (debian/) into dist/: knotd_<version>+deb12_amd64.deb and
#                     knotd-model-whisper-base_<version>_all.deb; `./dev.sh deb --release trixie --arch-only`
#                     builds knotd for Debian 13 in a cached trixie rootfs (see packaging/deb/build.sh)
#   ./dev.sh bench    run the benchmarks and print their tables
#   ./dev.sh mutate   mutation testing (mutmut) of the promise-carrying modules with their fast tests; report in
#                     .cache/mutation/report.md (`./dev.sh mutate guardrails` runs one module of mutation/modules.toml)
#   ./dev.sh livekit-server   build the pinned livekit-server the room tests run on loopback
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv
MODEL_DIR=$ROOT/.cache/models/whisper-base
# The real LiveKit server the room tests and benchmarks run on loopback, built from its Go module.
LIVEKIT_SERVER_VERSION=v1.13.5
LIVEKIT_SERVER=$ROOT/.cache/livekit-server/$LIVEKIT_SERVER_VERSION/livekit-server
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

APT_RUNTIME=(python3.11 python3-venv espeak-ng sox)
# The Debian source package's Build-Depends (debian/control), to build it with dpkg-buildpackage.
APT_DEB=(dpkg-dev debhelper dh-virtualenv python3-venv)
APT_TEST=(prometheus chromium debootstrap systemd-container "${APT_DEB[@]}" lintian iproute2 procps)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "dev.sh: need root (or sudo) to install Debian packages: $*" >&2; exit 1
    fi
}

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

python_bin() {
    if [ -x /usr/bin/python3.11 ]; then echo /usr/bin/python3.11; else command -v python3.11 || command -v python3; fi
}

venv() {
    local extras=$1 stamp="$VENV/.knotd-$1"
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating virtualenv in .venv"
        "$(python_bin)" -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        say "installing knotd[$extras] into .venv"
        "$VENV/bin/pip" install -q --upgrade pip >/dev/null
        "$VENV/bin/pip" install -q -e ".[$extras]"
        touch "$stamp"
    fi
}

model() {
    if [ ! -f "$MODEL_DIR/model.bin" ]; then
        say "preparing the Whisper base model in .cache/models"
    fi
    "$VENV/bin/knotd" models --dest "$MODEL_DIR" >/dev/null
}

go_bin() {
    local go
    for go in "$(command -v go || true)" /usr/local/go/bin/go /usr/lib/go/bin/go; do
        [ -n "$go" ] && [ -x "$go" ] && { echo "$go"; return 0; }
    done
    # Debian's golang is older than livekit-server's go.mod asks for: with GOTOOLCHAIN=auto the go
    # command fetches the right toolchain from the Go module proxy.
    apt_install golang-go ca-certificates
    command -v go
}

livekit_server() {
    if [ ! -x "$LIVEKIT_SERVER" ]; then
        say "building livekit-server $LIVEKIT_SERVER_VERSION from its Go module (once; cached in .cache/livekit-server)"
        local gobin
        gobin=$(dirname "$LIVEKIT_SERVER")
        mkdir -p "$gobin"
        GOTOOLCHAIN=auto GOFLAGS=-mod=mod GOBIN=$gobin "$(go_bin)" install \
            "github.com/livekit/livekit-server/cmd/server@$LIVEKIT_SERVER_VERSION"
        mv "$gobin/server" "$LIVEKIT_SERVER"
    fi
    export KNOTD_LIVEKIT_SERVER=$LIVEKIT_SERVER
}

cmd=${1:-help}
shift || true
case "$cmd" in
    demo)
        apt_install "${APT_RUNTIME[@]}"
        venv models
        model
        say "running the demo session (status page stays open; Ctrl-C to stop)"
        exec "$VENV/bin/knotd" demo --config examples/demo.toml --serve "$@"
        ;;
    test)
        apt_install "${APT_RUNTIME[@]}" "${APT_TEST[@]}"
        venv "test,models"
        model
        livekit_server
        say "running the test suite"
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    deb)
        apt_install "${APT_RUNTIME[@]}" "${APT_DEB[@]}"
        as_root packaging/deb/build.sh "$@"
        ;;
    bench)
        apt_install "${APT_RUNTIME[@]}"
        venv "test,models"
        model
        livekit_server
        # soak.py (an hour by default) and package.py (root, builds packages) run only when asked for.
        for script in benchmarks/[!_]*.py; do
            case "$script" in */soak.py|*/package.py) continue ;; esac
            say "$script"; "$VENV/bin/python" "$script"
        done
        ;;
    mutate)
        apt_install "${APT_RUNTIME[@]}"
        venv "test,models,mutate"
        model
        say "mutation testing (mutation/modules.toml; survivors explained in mutation/equivalent.md)"
        exec "$VENV/bin/python" mutation/run.py "$@"
        ;;
    livekit-server)
        livekit_server
        echo "$LIVEKIT_SERVER"
        ;;
    *)
        sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
        [ "$cmd" = help ] || exit 2
        ;;
esac
