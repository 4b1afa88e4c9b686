"""The systemd units: hardening score, `systemd-analyze verify`, and the names the daemon relies on.

`verify` checks that every Exec*= binary exists. The real paths live under /opt/solarpowerbrampton,
so the units are verified with `--root=` pointing at a fake tree in tmp_path: the host's system unit
directory (sysinit.target and friends), our units in etc/systemd/system, an executable
opt/solarpowerbrampton/releases/<sha>/.venv/bin/python behind the `current` symlink, and an
etc/passwd / etc/group that know the solarpower user and the i2c and gpio groups.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = ROOT / "systemd"
MAIN = "solarpowerbrampton.service"
UPDATE = "solarpowerbrampton-update.service"
TIMER = "solarpowerbrampton-update.timer"
UNITS = (MAIN, UPDATE, TIMER)
MAX_EXPOSURE = 1.5
PY = "/opt/solarpowerbrampton/current/.venv/bin/python"


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing (apt-get install systemd); these tests must run in CI")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd): unit checks skipped")
    return exe


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", LC_ALL="C.UTF-8")
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)


def _entries(name: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment in the unit file, in order (keys may repeat)."""
    out, section = [], ""
    for raw in (UNIT_DIR / name).read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def _values(name: str, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in _entries(name) if s == section and k == key]


def _system_unit_dir() -> Path:
    for candidate in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if (Path(candidate) / "sysinit.target").exists():
            return Path(candidate)
    pytest.fail("no system unit directory with sysinit.target on this machine")


@pytest.fixture
def fake_root(tmp_path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(_system_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    etc_units = root / "etc/systemd/system"
    etc_units.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(UNIT_DIR / unit, etc_units / unit)
    release = root / "opt/solarpowerbrampton/releases/0123456789abcdef0123456789abcdef01234567"
    python = release / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o755)
    (release / "main.py").write_text("")
    (release / "updater.py").write_text("")
    (root / "opt/solarpowerbrampton/current").symlink_to(f"releases/{release.name}")
    (root / "opt/solarpowerbrampton/previous").symlink_to(f"releases/{release.name}")
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\n"
        "solarpower:x:998:998:SolarPowerBrampton:/var/lib/solarpowerbrampton:/usr/sbin/nologin\n")
    (root / "etc/group").write_text("root:x:0:\ni2c:x:997:solarpower\ngpio:x:996:solarpower\nsolarpower:x:998:\n")
    (root / "etc/solarpowerbrampton").mkdir()
    (root / "etc/solarpowerbrampton/config.toml").write_text("")
    (root / "etc/solarpowerbrampton/influx-token").write_text("")
    return root


def _verify(exe: str, root: Path, *units: str) -> subprocess.CompletedProcess:
    return _run(exe, "verify", f"--root={root}", "--man=no", "--generators=no", *units)


# --- the score --------------------------------------------------------------------------------------------

def test_security_exposure_of_main_unit():
    exe = _systemd_analyze()
    result = _run(exe, "security", "--offline=true", "--no-pager", str(UNIT_DIR / MAIN))
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no 'Overall exposure level' line:\n{result.stdout}\n{result.stderr}"
    exposure = float(match.group(1))
    failing = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}; not hardened:\n" + "\n".join(failing)


def test_security_exposure_of_update_unit():
    """The updater runs as root and writes /opt/solarpowerbrampton: hardened as far as that allows."""
    exe = _systemd_analyze()
    result = _run(exe, "security", "--offline=true", "--no-pager", str(UNIT_DIR / UPDATE))
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.0


# --- verify -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("unit", UNITS)
def test_verify_is_clean(unit, fake_root):
    exe = _systemd_analyze()
    result = _verify(exe, fake_root, unit)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        f"systemd-analyze verify {unit}: rc={result.returncode}\n{result.stdout}{result.stderr}")


def test_verify_all_units_together(fake_root):
    exe = _systemd_analyze()
    result = _verify(exe, fake_root, *UNITS)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_verify_really_looks_into_the_fake_root(fake_root):
    """Without the fake executable, verify must complain: the clean result above is not vacuous."""
    exe = _systemd_analyze()
    python = fake_root / "opt/solarpowerbrampton/current/.venv/bin/python"
    python.unlink()
    result = _verify(exe, fake_root, MAIN)
    assert result.returncode != 0
    assert "is not executable" in result.stdout + result.stderr


def test_verify_reports_unknown_keys(fake_root):
    """verify only *warns* (rc 0) about an unknown key: the clean test must check the output too."""
    exe = _systemd_analyze()
    unit = fake_root / "etc/systemd/system" / MAIN
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nPrivateDevics=yes\n", 1))
    result = _verify(exe, fake_root, MAIN)
    assert "PrivateDevics" in result.stdout + result.stderr


# --- what the daemon, the installer and the updater rely on ----------------------------------------------

def test_main_unit_contract():
    text = (UNIT_DIR / MAIN).read_text()
    for needle in (
        "LoadCredential=influx-token:/etc/solarpowerbrampton/influx-token",
        "StateDirectory=solarpowerbrampton",
        "RuntimeDirectory=solarpowerbrampton",
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=",
        "RestartPreventExitStatus=78",
        "DeviceAllow=char-i2c rw",
        "DeviceAllow=char-gpiochip rw",
        "LG_WD=/run/solarpowerbrampton",
        "PYTHONUNBUFFERED=1",
    ):
        assert needle in text, needle
    assert _values(MAIN, "Type") == ["notify"]
    assert _values(MAIN, "WatchdogSec") == ["300"]
    assert _values(MAIN, "Restart") == ["on-failure"]
    assert _values(MAIN, "RestartSec") == ["10"]
    assert _values(MAIN, "User") == ["solarpower"]
    assert _values(MAIN, "Group") == ["solarpower"]
    assert _values(MAIN, "SupplementaryGroups") == ["i2c gpio"]
    assert _values(MAIN, "StateDirectoryMode") == ["0700"]
    assert _values(MAIN, "UMask") == ["0077"]
    assert _values(MAIN, "DevicePolicy") == ["closed"]
    assert _values(MAIN, "ProtectSystem") == ["strict"]
    assert _values(MAIN, "CapabilityBoundingSet") == [""]
    assert _values(MAIN, "RestrictAddressFamilies") == ["AF_UNIX AF_INET AF_INET6"]
    assert "@system-service" in _values(MAIN, "SystemCallFilter")
    # From `previous` (a new release cannot break its own rollback), isolated from the service user's
    # site packages and environment, with the config named (never ./config.toml); "-": never blocks the start.
    prev = "/opt/solarpowerbrampton/previous"
    assert _values(MAIN, "ExecStartPre") == [
        f"+-{prev}/.venv/bin/python -s -E -S {prev}/updater.py pre-start --config /etc/solarpowerbrampton/config.toml"]
    assert _values(MAIN, "Environment").count("PYTHONNOUSERSITE=1") == 1
    assert _values(MAIN, "ExecStart") == [
        f"{PY} /opt/solarpowerbrampton/current/main.py run --config /etc/solarpowerbrampton/config.toml"]
    assert _values(MAIN, "StartLimitIntervalSec", "Unit") and _values(MAIN, "StartLimitBurst", "Unit")
    assert "modprobe@i2c_dev.service" in " ".join(_values(MAIN, "Wants", "Unit"))
    assert "modprobe@i2c_dev.service" in " ".join(_values(MAIN, "After", "Unit"))
    assert _values(MAIN, "WantedBy", "Install") == ["multi-user.target"]


def test_main_unit_keeps_i2c_and_gpio_working():
    """PrivateDevices=yes hides /dev/i2c-*; ProcSubset=pid hides /proc/cpuinfo and /proc/device-tree (board detection)."""
    entries = _entries(MAIN)
    for _, key, value in entries:
        assert not (key == "PrivateDevices" and value.lower() in ("yes", "true", "on", "1")), "PrivateDevices=yes"
        assert not (key == "ProcSubset" and value == "pid"), "ProcSubset=pid"
    # psutil.net_io_counters() reads /proc/net/dev: no AF_NETLINK needed.
    assert "AF_NETLINK" not in " ".join(_values(MAIN, "RestrictAddressFamilies"))


def test_update_units():
    assert _values(UPDATE, "Type") == ["oneshot"]
    assert _values(UPDATE, "ExecStart") == [
        f"{PY} -s -E -S -u /opt/solarpowerbrampton/current/updater.py apply --config /etc/solarpowerbrampton/config.toml"]
    assert not _values(UPDATE, "User"), "the updater runs as root"
    assert _values(UPDATE, "ProtectSystem") == ["strict"]
    assert "/opt/solarpowerbrampton" in " ".join(_values(UPDATE, "ReadWritePaths")).split()
    assert "network-online.target" in " ".join(_values(UPDATE, "After", "Unit"))
    assert _values(TIMER, "OnCalendar", "Timer") == ["daily"]
    assert _values(TIMER, "Persistent", "Timer") == ["true"]
    assert _values(TIMER, "Unit", "Timer") == [UPDATE]
    assert _values(TIMER, "WantedBy", "Install") == ["timers.target"]
