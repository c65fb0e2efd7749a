"""The .deb and its systemd unit, checked the way an operator meets them.

Static checks (any user): the unit's sandboxing score and syntax, its stop timeout against the shipped
drain timeout, and the shipped config documenting every key with its real default.

Root checks (``-m root``): build the .deb once, inspect it, then boot a bare Debian 12 with systemd in
systemd-nspawn and walk the operator's path from docs/install.md: install, start (returns only after
READY=1), status and /metrics, stop (drains, Result=success), a missing secret, a broken Whisper self-test,
an upgrade that keeps an edited conffile and restarts, and a purge that leaves nothing behind. The boot tests
share one container and run in file order; each leaves knotd installed, configured and stopped.

Set KNOTD_TEST_DEB=/path/to/knotd_X_amd64.deb to test an existing package instead of building one, and
KNOTD_PACKAGE_TIMINGS=/path.json to have the measured durations written there (benchmarks/package.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from knotd.config import Settings, load_settings, public_view
from tests.nspawn.container import Container, ensure_rootfs
from tests.nspawn.package import (
    ROOT,
    StandinProcess,
    as_root_in,
    build_deb,
    doc_commands,
    exposure_score,
    free_port,
    journal_cursor,
    journal_since,
    repack_with_version,
    unit_properties,
    upstream_version,
)

UNIT = ROOT / "packaging" / "systemd" / "knotd.service"
SHIPPED_CONFIG = ROOT / "packaging" / "deb" / "knotd.toml"
MAX_EXPOSURE = 2.0
API_KEY = "APIknotdboottest"
API_SECRET = "boot-test-secret-3b9e1c7a5f2d4e6b8a0c"
TIMINGS: dict[str, float] = {}

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def _root_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (private mount namespace for the build, systemd-nspawn for the boot test)"
    missing = [t for t in ("systemd-nspawn", "debootstrap", "nsenter", "dpkg-deb", "unshare") if not shutil.which(t)]
    if missing:
        return f"missing tools: {', '.join(missing)} (apt install systemd-container debootstrap dpkg-dev)"
    if not Path("/usr/bin/python3.11").exists():
        return "missing /usr/bin/python3.11 (the package's venv is built with it)"
    return None


needs_root = [
    pytest.mark.root,
    pytest.mark.skipif(_root_skip_reason() is not None, reason=_root_skip_reason() or ""),
    pytest.mark.timeout(900),
]


def _unit_value(key: str) -> str:
    values = re.findall(rf"^{key}=(.*)$", UNIT.read_text(), re.MULTILINE)
    assert len(values) == 1, f"{key}= appears {len(values)} times in {UNIT.name}"
    return values[0]


# -- the unit, statically ------------------------------------------------------------------------


@needs_analyze
def test_unit_exposure_is_at_most_2():
    """systemd-analyze rates the unit's sandboxing at an exposure of 2.0 or less ("OK")."""
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
                          capture_output=True, text=True, timeout=60, check=False)
    score = exposure_score(proc.stdout + proc.stderr)
    TIMINGS["exposure_offline"] = score
    assert score <= MAX_EXPOSURE, proc.stdout[-3000:]


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path):
    """The unit has no unknown or malformed directives (ExecStart points at this host's python3.11,
    since /opt/knotd/venv exists only where the package is installed)."""
    copy = tmp_path / "knotd.service"
    copy.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/usr/bin/python3.11", UNIT.read_text(), flags=re.MULTILINE))
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60,
                          check=False)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if "knotd.service" in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


def test_unit_stop_timeout_outlasts_the_shipped_drain_timeout():
    """systemd must not SIGKILL knotd while it still drains calls: TimeoutStopSec > drain_timeout_s + 30 s."""
    stop_timeout = int(_unit_value("TimeoutStopSec"))
    drain = tomllib.loads(SHIPPED_CONFIG.read_text())["worker"]["drain_timeout_s"]
    assert stop_timeout >= drain + 30


def test_unit_never_restarts_a_config_error():
    """Exit code 2 (bad configuration, knotd/cli.py) is excluded from Restart=on-failure."""
    assert _unit_value("Restart") == "on-failure"
    assert {"2", "3"} <= set(_unit_value("RestartPreventExitStatus").split())


def test_unit_keeps_the_two_hardening_traps_off():
    """MemoryDenyWriteExecute=yes breaks CTranslate2 and ProcSubset=pid breaks psutil/onnxruntime."""
    text = UNIT.read_text()
    assert re.search(r"^MemoryDenyWriteExecute=no$", text, re.MULTILINE)
    assert not re.search(r"^ProcSubset=", text, re.MULTILINE)


# -- the shipped config --------------------------------------------------------------------------


def _uncomment_documented_keys(text: str) -> str:
    """Turn every ``# key = value`` line that is valid TOML into ``key = value``; prose stays a comment."""
    out = []
    for line in text.splitlines():
        match = re.match(r"^#\s?([a-z_]+\s*=.*)$", line)
        if match:
            try:
                tomllib.loads(match.group(1))
            except tomllib.TOMLDecodeError:
                pass
            else:
                line = match.group(1)
        out.append(line)
    return "\n".join(out) + "\n"


def test_shipped_config_loads_as_is(tmp_path):
    """/etc/knotd/knotd.toml as shipped is valid; only the LiveKit URL (and secrets) are left to the operator."""
    settings = load_settings(SHIPPED_CONFIG, env={}, require_livekit=False)
    assert settings.livekit.url == ""


def test_shipped_config_documents_every_key_with_its_default(tmp_path):
    """Uncommenting every documented key gives exactly knotd's defaults, and no key is left out."""
    uncommented = _uncomment_documented_keys(SHIPPED_CONFIG.read_text())
    raw = tomllib.loads(uncommented)
    defaults = public_view(Settings())
    defaults.pop("source")
    documented = {section: set(keys) for section, keys in raw.items()}
    expected = {section: set(keys) for section, keys in defaults.items()}
    assert documented == expected

    path = tmp_path / "knotd.toml"
    path.write_text(uncommented)
    loaded = public_view(load_settings(path, env={}, require_livekit=False))
    loaded.pop("source")
    assert loaded == defaults


# -- the package ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def debs(tmp_path_factory) -> dict[str, Path]:
    """The package (built once per session, ≈2 min) and the same package as a higher version."""
    out = tmp_path_factory.mktemp("debs")
    v1_dir, v2_dir = out / "v1", out / "v2"
    v1_dir.mkdir()
    v2_dir.mkdir()
    given = os.environ.get("KNOTD_TEST_DEB")
    started = time.monotonic()
    if given:
        v1 = v1_dir / Path(given).name
        shutil.copyfile(given, v1)
    else:
        v1, _ = build_deb(v1_dir)
        TIMINGS["build_s"] = time.monotonic() - started
    version = subprocess.run(["dpkg-deb", "-f", str(v1), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    started = time.monotonic()
    v2 = repack_with_version(v1, f"{version}+test1", v2_dir)
    TIMINGS["repack_s"] = time.monotonic() - started
    TIMINGS["deb_mb"] = v1.stat().st_size / 1e6
    for path in (out, v1_dir, v2_dir, v1, v2):  # readable for apt's unprivileged _apt user
        path.chmod(0o755 if path.is_dir() else 0o644)
    return {"v1": v1, "v2": v2, "version": version}  # type: ignore[dict-item]


def _deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True,
                          check=True).stdout.strip()


class TestPackageContents:
    pytestmark = needs_root

    def test_control_fields(self, debs):
        """Version from knotd/__init__.py, amd64, and the Debian packages knotd needs at run time."""
        deb = debs["v1"]
        if not os.environ.get("KNOTD_TEST_DEB"):
            assert _deb_field(deb, "Version") == upstream_version()
        assert _deb_field(deb, "Architecture") == "amd64"
        depends = [d.strip() for d in _deb_field(deb, "Depends").split(",")]
        # python3.11 exactly: the venv holds cp311 extensions and lib/python3.11.
        assert "python3.11" in depends
        assert "espeak-ng" in depends
        assert "adduser" in depends
        assert any(d.startswith("init-system-helpers") for d in depends)

    def test_conffiles_and_their_modes(self, debs):
        """knotd.toml and knotd.env are conffiles; knotd.env (secrets) is 0600 root."""
        deb = debs["v1"]
        conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True,
                                   check=True).stdout.split()
        assert conffiles == ["/etc/knotd/knotd.toml", "/etc/knotd/knotd.env"]
        listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
        modes = {line.split()[-1]: line.split()[0] for line in listing.splitlines() if " -> " not in line}
        assert modes["./etc/knotd/knotd.env"] == "-rw-------"
        assert modes["./etc/knotd/knotd.toml"] == "-rw-r--r--"
        for path in ("./usr/lib/systemd/system/knotd.service", "./opt/knotd/venv/pyvenv.cfg",
                     "./usr/share/knotd/models/whisper-base/model.bin",
                     "./usr/share/knotd/models/whisper-base/tokenizer.json"):
            assert path in modes, f"{path} missing from the package"
        assert all(" root/root " in line for line in listing.splitlines())

    def test_no_build_paths_in_the_package(self, debs):
        """No file in the package names the source tree or the build's scratch directory."""
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs["v1"])], stdout=subprocess.PIPE)
        grep = subprocess.run(["grep", "-caF", "-e", f"{ROOT}/", "-e", "/var/tmp/knotd-deb."],
                              stdin=tar.stdout, capture_output=True, text=True, timeout=300, check=False)
        tar.wait(60)
        assert grep.stdout.strip() == "0"
        listing = subprocess.run(["dpkg-deb", "-c", str(debs["v1"])], capture_output=True, text=True,
                                 check=True).stdout
        assert "direct_url.json" not in listing


# -- booting Debian 12 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    log = tmp_path_factory.mktemp("standin") / "standin.log"
    server = StandinProcess(API_KEY, API_SECRET, log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def box(debs, tmp_path_factory):
    """A booted bare Debian 12 (systemd) with the two packages at /pkgs/v1 and /pkgs/v2."""
    started = time.monotonic()
    rootfs = ensure_rootfs()
    TIMINGS["rootfs_s"] = time.monotonic() - started
    log = tmp_path_factory.mktemp("nspawn") / "console.log"
    container = Container(rootfs, {debs["v1"].parent: "/pkgs/v1", debs["v2"].parent: "/pkgs/v2"}, log)
    try:
        TIMINGS["boot_s"] = container.boot()
        yield container
    finally:
        container.poweroff()
        _write_timings()


@pytest.fixture(scope="module")
def status_port() -> int:
    return free_port()


def _in_box(debs: dict, which: str) -> Path:
    return Path(f"/pkgs/{which}") / debs[which].name


def _substitutions(standin: StandinProcess, status_port: int) -> dict[str, str]:
    return {
        "wss://livekit.example.com": standin.url,
        "YOUR_LIVEKIT_API_KEY": API_KEY,
        "YOUR_LIVEKIT_API_SECRET": API_SECRET,
        "127.0.0.1:9464": f"127.0.0.1:{status_port}",
    }


def _write_timings() -> None:
    target = os.environ.get("KNOTD_PACKAGE_TIMINGS")
    print("\npackage timings:", json.dumps({k: round(v, 2) for k, v in TIMINGS.items()}))
    if target:
        Path(target).write_text(json.dumps(TIMINGS, indent=2))


def _stop_and_reset(box: Container) -> None:
    box.sh("systemctl stop knotd; systemctl reset-failed knotd 2>/dev/null || true", timeout=120)


class TestBootDebian12:
    pytestmark = needs_root

    def test_documented_install_commands_bring_knotd_up(self, box, debs, standin, status_port):
        """1. Run the "Install and start" commands of docs/install.md as root in the container.

        Result: apt installs the package with its Debian dependencies; `systemctl start knotd` returns
        only after READY=1 (LiveKit already registered the worker, the unit is active, STATUS= says
        ready); `systemctl status` shows that STATUS; /metrics answers with knotd_ready 1.
        """
        subs = _substitutions(standin, status_port)
        outputs = {}
        for line in doc_commands("install"):
            command = as_root_in(line, subs, _in_box(debs, "v1"))
            started = time.monotonic()
            result = box.run(command, timeout=600)
            elapsed = time.monotonic() - started
            assert result.returncode == 0, f"`{command}` exited {result.returncode}:\n{result.output[-3000:]}"
            outputs[line] = result.output
            if "apt install" in line:
                TIMINGS["apt_install_s"] = elapsed
                assert "knotd is installed and enabled, but not started" in result.output
                assert unit_properties(box, "ActiveState")["ActiveState"] == "inactive"
                # Test-only: the status server on a free port instead of 9464 (the host network is shared).
                box.sh(f"sed -i 's|^# listen = \"127.0.0.1:9464\"|listen = \"127.0.0.1:{status_port}\"|' "
                       "/etc/knotd/knotd.toml")
            if line.startswith("sudo systemctl start"):
                TIMINGS["systemctl_start_s"] = elapsed
                props = unit_properties(box, "ActiveState", "SubState", "StatusText", "MainPID")
                assert props["ActiveState"] == "active", props
                assert props["StatusText"].startswith("ready: worker "), props
                registrations = standin.state()["registrations"]
                assert registrations and props["StatusText"].startswith(
                    f"ready: worker {registrations[-1]['worker_id']}")
        status = next(out for line, out in outputs.items() if line.startswith("systemctl status"))
        metrics = next(out for line, out in outputs.items() if line.startswith("curl"))
        assert 'Status: "ready: worker ' in status
        assert re.search(r"^knotd_ready 1(\.0)?$", metrics, re.MULTILINE), metrics

    def test_service_runs_sandboxed_as_knotd(self, box):
        """The main process runs as the knotd user; `knotd --version` matches the package; inside the
        container the unit verifies and scores ≤ 2.0; every bundled shared library finds its dependencies."""
        pid = unit_properties(box, "MainPID")["MainPID"]
        assert box.sh(f"stat -c %U /proc/{pid}").strip() == "knotd"
        package_version = box.sh("dpkg-query -W -f='${Version}' knotd").strip()
        assert box.sh("knotd --version").strip() == f"knotd {re.split(r'[+~-]', package_version)[0]}"
        assert box.sh("stat -c '%a %U' /etc/knotd/credentials").strip() == "700 root"
        assert box.sh("stat -c '%a %U' /etc/knotd/knotd.env").strip() == "600 root"
        box.sh("systemd-analyze verify knotd.service")
        score = exposure_score(box.sh("systemd-analyze security --no-pager knotd.service"))
        TIMINGS["exposure_container"] = score
        assert score <= MAX_EXPOSURE
        missing = box.sh("find /opt/knotd/venv -name '*.so*' -type f -exec ldd {} + 2>/dev/null "
                         "| grep 'not found' | sort -u || true", timeout=180)
        assert missing.strip() == "", f"shared libraries the Depends do not bring:\n{missing}"

    def test_stop_drains_and_ends_with_success(self, box):
        """`systemctl stop knotd` sends SIGTERM; knotd drains (STOPPING=1) and exits 0: Result=success."""
        cursor = journal_cursor(box)
        started = time.monotonic()
        box.sh("systemctl stop knotd", timeout=700)
        TIMINGS["systemctl_stop_s"] = time.monotonic() - started
        props = unit_properties(box, "ActiveState", "Result", "ExecMainStatus")
        assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
        journal = journal_since(box, cursor)
        assert "draining" in journal
        assert "Deactivated successfully" in journal

    def test_missing_secret_fails_once_with_a_clear_line(self, box):
        """1. Move the credential files away (nothing in knotd.env either). 2. Start.

        Result: the start fails; the journal names the missing secret and where to put it; exit code 2
        means no restart loop (the unit is failed, not auto-restarting).
        """
        box.sh("mkdir -p /root/creds && mv /etc/knotd/credentials/* /root/creds/")
        try:
            cursor = journal_cursor(box)
            result = box.run("systemctl start knotd", timeout=120)
            assert result.returncode != 0
            props = unit_properties(box, "ActiveState", "SubState", "ExecMainStatus", "StatusText")
            assert props["ActiveState"] == "failed", props
            assert props["ExecMainStatus"] == "2", props
            journal = journal_since(box, cursor)
            assert "config error at livekit.api_key: missing secret" in journal, journal
            assert "livekit-api-key" in journal
            assert "Failed to set up credentials" not in journal
            assert API_SECRET not in journal
        finally:
            box.sh("mv /root/creds/* /etc/knotd/credentials/")
            _stop_and_reset(box)

    def test_secrets_from_the_environment_file_work_without_credential_files(self, box):
        """With no credential files, LIVEKIT_API_KEY/SECRET in /etc/knotd/knotd.env are used."""
        box.sh("mkdir -p /root/creds && mv /etc/knotd/credentials/* /root/creds/ && cp /etc/knotd/knotd.env /root/")
        try:
            box.sh(f"printf 'LIVEKIT_API_KEY={API_KEY}\\nLIVEKIT_API_SECRET={API_SECRET}\\n' >> /etc/knotd/knotd.env")
            result = box.run("systemctl start knotd", timeout=320)
            assert result.returncode == 0, box.sh("journalctl -u knotd -n 20 --no-pager -o cat")
            assert unit_properties(box, "ActiveState")["ActiveState"] == "active"
        finally:
            box.sh("mv /root/creds/* /etc/knotd/credentials/ && cp /root/knotd.env /etc/knotd/knotd.env")
            _stop_and_reset(box)

    def test_broken_inference_fails_the_start_with_the_self_test_line(self, box):
        """1. A drop-in sets MemoryDenyWriteExecute=yes (the hardening that breaks CTranslate2's JIT). 2. Start.

        Result: the Whisper self-test fails the start, and the journal says so and names the likely cause.
        """
        box.sh("mkdir -p /etc/systemd/system/knotd.service.d && printf '[Service]\\nMemoryDenyWriteExecute=yes\\n'"
               " > /etc/systemd/system/knotd.service.d/mdwe.conf && systemctl daemon-reload")
        try:
            cursor = journal_cursor(box)
            result = box.run("systemctl start knotd", timeout=320)
            assert result.returncode != 0
            journal = journal_since(box, cursor)
            assert "Whisper self-test failed" in journal, journal[-3000:]
            assert "MemoryDenyWriteExecute" in journal
        finally:
            box.sh("rm -rf /etc/systemd/system/knotd.service.d && systemctl daemon-reload")
            _stop_and_reset(box)

    def test_upgrade_keeps_the_edited_config_and_restarts(self, box, debs, standin, status_port):
        """1. knotd runs; the admin has edited knotd.toml. 2. Run the documented upgrade command (v+test1).

        Result: the new version is installed, the edited knotd.toml is kept, and knotd runs again in a new
        process (prerm stopped it before unpacking; postinst started it because it had been running).
        """
        box.sh("systemctl start knotd", timeout=320)
        before = unit_properties(box, "MainPID")["MainPID"]
        box.sh("echo '# edited by the boot test' >> /etc/knotd/knotd.toml")
        (line,) = doc_commands("upgrade")
        started = time.monotonic()
        box.sh(as_root_in(line, _substitutions(standin, status_port), _in_box(debs, "v2")), timeout=900)
        TIMINGS["apt_upgrade_s"] = time.monotonic() - started
        assert box.sh("dpkg-query -W -f='${Version}' knotd").strip() == f"{debs['version']}+test1"
        config = box.sh("cat /etc/knotd/knotd.toml")
        assert "# edited by the boot test" in config
        assert f'url = "{standin.url}"' in config
        after = unit_properties(box, "ActiveState", "MainPID")
        assert after["ActiveState"] == "active"
        assert after["MainPID"] not in ("0", before)
        _stop_and_reset(box)

    def test_purge_leaves_nothing_behind_but_the_user(self, box):
        """The documented purge removes the venv, config, credentials, state, cache and the unit; the
        knotd user stays (Debian practice)."""
        box.sh("systemctl start knotd", timeout=320)  # purging a running knotd must stop it too
        (line,) = doc_commands("remove")
        started = time.monotonic()
        box.sh(as_root_in(line, {}), timeout=600)
        TIMINGS["apt_purge_s"] = time.monotonic() - started
        left = box.sh("for p in /opt/knotd /etc/knotd /var/lib/knotd /var/cache/knotd /run/knotd /usr/share/knotd "
                      "/usr/lib/systemd/system/knotd.service /etc/systemd/system/multi-user.target.wants/knotd.service"
                      " /usr/bin/knotd; do [ -e $p ] || [ -L $p ] && echo $p; done; true")
        assert left.strip() == ""
        owners = box.sh("stat -c %U /proc/[0-9]* 2>/dev/null || true").split()
        assert "knotd" not in owners  # no process of the user survives
        assert box.run("getent passwd knotd").returncode == 0
        assert box.run("dpkg -s knotd").returncode != 0  # not even "config-files" is left
