"""install.sh in a fake root: DESTDIR in tmp_path, stub system commands first on PATH.

The stubs (systemctl, useradd, groupadd, usermod, userdel, groupdel, getent, chown, raspi-config,
sudo, python3) append their argv to a log and succeed. getent/useradd/groupadd/userdel/groupdel
share a tiny user database of marker files, so getent reports the user missing on the first run
and present after useradd. `python3 -m venv DIR` makes DIR/bin/python a symlink to the Python
running the tests. The installer runs from a fresh git repository holding the project's files
(committed, as a real checkout would be), with SPB_SKIP_PIP=1.
"""
from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ("solarpowerbrampton.service", "solarpowerbrampton-update.service", "solarpowerbrampton-update.timer")
OPT = "opt/solarpowerbrampton"
ETC = "etc/solarpowerbrampton"
STATE = "var/lib/solarpowerbrampton"

STUB = r"""#!/usr/bin/env bash
# Records its argv (shell-quoted, one call per line) and plays a tiny user database.
name=$(basename "$0")
{ printf '%s' "$name"; printf ' %q' "$@"; printf '\n'; } >>"$SPB_STUB_LOG"
db=$SPB_STUB_DB
last=${!#}
case "$name" in
  getent) [ -e "$db/$1.$2" ] && { echo "$2:x:999:"; exit 0; }; exit 2 ;;
  groupadd) touch "$db/group.$last" ;;
  useradd) touch "$db/passwd.$last" ;;
  userdel) rm -f "$db/passwd.$last" ;;
  groupdel) rm -f "$db/group.$last" ;;
  python3)
    if [ "$1" = -m ] && [ "$2" = venv ]; then
      mkdir -p "$last/bin" && ln -s "$SPB_REAL_PYTHON" "$last/bin/python"
    fi ;;
  sudo) exit "${SPB_STUB_SUDO_RC:-0}" ;;
  systemctl)
    [ "$1" = try-restart ] && [ -n "${SPB_STUB_RESTART_RC:-}" ] && exit "$SPB_STUB_RESTART_RC"
    [ "$1" = is-failed ] && exit "${SPB_STUB_FAILED_RC:-1}" ;;
esac
exit 0
"""
STUBS = ("systemctl", "useradd", "groupadd", "usermod", "userdel", "groupdel", "getent", "chown",
         "raspi-config", "sudo", "python3")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false",
         "-c", f"safe.directory={repo}", "-C", str(repo), *args],
        check=True, capture_output=True, text=True).stdout.strip()


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.dest = tmp / "dest"
        self.dest.mkdir()
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.db = tmp / "userdb"
        self.db.mkdir()
        (self.db / "group.i2c").touch()  # Raspberry Pi OS has i2c; this fake system lacks gpio
        self.log = tmp / "calls.log"
        for name in STUBS:
            path = self.bin / name
            path.write_text(STUB)
            path.chmod(0o755)
        self.repo = tmp / "checkout"
        self._make_checkout()

    def _make_checkout(self) -> None:
        """A git repository with the project's files as they are now (tracked and new), committed."""
        files = subprocess.run(["git", "-c", f"safe.directory={ROOT}", "-C", str(ROOT), "ls-files", "-z",
                                "--cached", "--others", "--exclude-standard"],
                               check=True, capture_output=True, text=True).stdout.split("\0")
        for rel in filter(None, files):
            src = ROOT / rel
            if src.is_file():
                dst = self.repo / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        _git(self.repo, "init", "-q")
        _git(self.repo, "add", "-A")
        _git(self.repo, "commit", "-q", "-m", "release")
        self.sha = _git(self.repo, "rev-parse", "HEAD")

    def new_commit(self) -> str:
        news = self.repo / "NEWS"
        news.write_text((news.read_text() if news.exists() else "") + "a change\n")
        _git(self.repo, "add", "NEWS")
        _git(self.repo, "commit", "-q", "-m", "next")
        return _git(self.repo, "rev-parse", "HEAD")

    def run(self, *args: str, sudo_rc: int = 0, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        self.log.write_text("")
        env = {
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "HOME": str(self.tmp),
            "LANG": "C.UTF-8",
            "DESTDIR": str(self.dest),
            "SPB_SKIP_PIP": "1",
            "SPB_STUB_LOG": str(self.log),
            "SPB_STUB_DB": str(self.db),
            "SPB_STUB_SUDO_RC": str(sudo_rc),
            "SPB_STUB_RESTART_RC": os.environ.get("SPB_STUB_RESTART_RC", ""),
            "SPB_REAL_PYTHON": sys.executable,
            **(extra_env or {}),
        }
        return subprocess.run(["bash", str(self.repo / "install.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=60)

    def calls(self, name: str | None = None) -> list[list[str]]:
        out = [shlex.split(line) for line in self.log.read_text().splitlines()]
        return [c for c in out if name is None or c[0] == name]

    def path(self, rel: str) -> Path:
        return self.dest / rel


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"rc={result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    return result.stdout


@pytest.fixture
def env(tmp_path) -> Env:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    return Env(tmp_path)


def test_install_twice_then_uninstall_and_purge(env):
    # ---- first run
    out = _ok(env.run())
    assert "==> " in out and env.sha in out
    release = env.path(f"{OPT}/releases/{env.sha}")
    assert (release / "main.py").is_file()
    assert (release / "sdnotify.py").is_file()
    assert not (release / ".git").exists()
    assert _mode(release) == 0o755 and _mode(release / "main.py") == 0o644 and _mode(release / "install.sh") == 0o755
    assert _mode(release / "systemd") == 0o755
    assert os.readlink(env.path(f"{OPT}/current")) == f"releases/{env.sha}"
    assert env.path(f"{OPT}/current/main.py").is_file()
    assert not env.path(f"{OPT}/previous").exists()
    assert os.access(release / ".venv/bin/python", os.X_OK)
    assert list((release).glob("__pycache__/main.*.pyc")), "the release is precompiled"

    cfg, tok = env.path(f"{ETC}/config.toml"), env.path(f"{ETC}/influx-token")
    assert _mode(cfg) == 0o640 and _mode(tok) == 0o600 and _mode(env.path(ETC)) == 0o750
    assert tok.read_text() == ""
    config = tomllib.loads(cfg.read_text())
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    assert config["simulation"]["enabled"] is False
    assert config["store"]["dir"] == "/var/lib/solarpowerbrampton"
    assert config["led"] == example["led"]  # only [simulation] enabled and [store] dir differ
    assert config["channel"] == example["channel"]
    assert not list(env.path(ETC).glob(".config.toml.*")), "no temp file left behind"

    for unit in UNITS:
        installed = env.path(f"etc/systemd/system/{unit}")
        assert _mode(installed) == 0o644
        assert installed.read_text() == (ROOT / "systemd" / unit).read_text()

    chowns = [c[1:] for c in env.calls("chown")]
    assert ["root:solarpower", str(cfg)] in chowns
    assert ["root:root", str(tok)] in chowns
    assert ["root:solarpower", str(env.path(ETC))] in chowns

    assert [c[-1] for c in env.calls("groupadd")] == ["gpio", "solarpower"]  # i2c existed
    useradd, build_user = env.calls("useradd")
    assert build_user[-1] == "spb-build" and "--system" in build_user and "/usr/sbin/nologin" in build_user
    assert useradd[-1] == "solarpower" and "--system" in useradd
    assert useradd[useradd.index("--groups") + 1] == "i2c,gpio"
    assert useradd[useradd.index("--gid") + 1] == "solarpower"
    assert not env.calls("usermod")

    venv_calls = env.calls("python3")
    assert venv_calls == [["python3", "-m", "venv", "--system-site-packages", str(release / ".venv")]]
    assert ["raspi-config", "nonint", "do_i2c", "0"] in env.calls()
    systemctl = env.calls("systemctl")
    assert ["systemctl", "daemon-reload"] in systemctl
    assert ["systemctl", "enable", "--now", "solarpowerbrampton.service", "solarpowerbrampton-update.timer"] in systemctl
    assert not [c for c in systemctl if "try-restart" in c], "a first install has nothing to restart"
    assert systemctl.index(["systemctl", "daemon-reload"]) < systemctl.index(
        ["systemctl", "enable", "--now", "solarpowerbrampton.service", "solarpowerbrampton-update.timer"])
    (check,) = env.calls("sudo")
    # In test mode the check reads a copy of the config whose store is under DESTDIR (removed afterwards).
    assert check[:-1] == [
        "sudo", "-u", "solarpower", str(env.path(f"{OPT}/current/.venv/bin/python")),
        str(env.path(f"{OPT}/current/main.py")), "check", "--config"]
    assert Path(check[-1]).parent == cfg.parent and Path(check[-1]).name.startswith(".config-check")
    assert "check passed" in out

    # ---- the technician edits config and token; the second run keeps them and duplicates nothing
    cfg.write_text(cfg.read_text() + "\n# edited by hand\n")
    tok.write_text("my-secret-token\n")
    cfg_text, tok_text = cfg.read_text(), tok.read_text()
    out = _ok(env.run())
    assert cfg.read_text() == cfg_text and tok.read_text() == tok_text
    assert _mode(cfg) == 0o640 and _mode(tok) == 0o600
    assert "kept" in out
    assert sorted(p.name for p in env.path(f"{OPT}/releases").iterdir()) == [env.sha]
    assert os.readlink(env.path(f"{OPT}/current")) == f"releases/{env.sha}"
    assert not env.path(f"{OPT}/previous").exists()
    assert sorted(p.name for p in env.path("etc/systemd/system").iterdir()) == sorted(UNITS)
    assert sorted(p.name for p in env.path(ETC).iterdir()) == ["config.toml", "gnupg", "influx-token"]
    assert stat.S_IMODE(env.path(ETC + "/gnupg").stat().st_mode) == 0o700
    assert not env.calls("useradd") and not env.calls("groupadd")
    assert env.calls("usermod") == [["usermod", "--append", "--groups", "i2c,gpio", "solarpower"]]
    assert not env.calls("python3"), "the release's .venv is reused"
    systemctl = env.calls("systemctl")
    assert ["systemctl", "enable", "--now", "solarpowerbrampton.service", "solarpowerbrampton-update.timer"] in systemctl
    assert not [c for c in systemctl if "try-restart" in c], "nothing changed: no restart"

    # ---- uninstall keeps /etc and /var/lib
    env.path(STATE).mkdir(parents=True)
    env.path(f"{STATE}/outbox.db").write_text("readings")
    _ok(env.run("--uninstall"))
    assert ["systemctl", "disable", "--now", "solarpowerbrampton-update.timer", "solarpowerbrampton.service"] \
        in env.calls("systemctl")
    assert not any(env.path(f"etc/systemd/system/{u}").exists() for u in UNITS)
    assert not env.path(OPT).exists()
    assert env.calls("userdel") == [["userdel", "solarpower"], ["userdel", "spb-build"]]
    assert env.calls("groupdel") == [["groupdel", "solarpower"]]
    assert cfg.read_text() == cfg_text and tok.read_text() == tok_text
    assert env.path(f"{STATE}/outbox.db").read_text() == "readings"
    # the kept files no longer belong to the deleted user's uid
    assert ["chown", "-R", "root:root", str(env.path(ETC))] in env.calls("chown")
    assert ["chown", "-R", "root:root", str(env.path(STATE))] in env.calls("chown")

    # ---- a second uninstall is harmless; --purge removes config, token and data
    _ok(env.run("--uninstall", "--purge"))
    assert not env.calls("userdel")
    assert not env.path(ETC).exists() and not env.path(STATE).exists()
    assert env.path("etc/systemd/system").exists()


def test_upgrade_to_a_new_commit_switches_current_and_keeps_previous(env):
    _ok(env.run())
    old = env.sha
    new = env.new_commit()
    out = _ok(env.run())
    assert os.readlink(env.path(f"{OPT}/current")) == f"releases/{new}"
    assert os.readlink(env.path(f"{OPT}/previous")) == f"releases/{old}"
    assert sorted(p.name for p in env.path(f"{OPT}/releases").iterdir()) == sorted([old, new])
    assert ["systemctl", "try-restart", "solarpowerbrampton.service"] in env.calls("systemctl")
    assert new in out
    newest = env.new_commit()  # a third release: the oldest goes, so upgrades never fill the SD card
    out = _ok(env.run())
    assert sorted(p.name for p in env.path(f"{OPT}/releases").iterdir()) == sorted([new, newest])
    assert f"removed the old release {old}" in out



def test_a_half_made_release_directory_no_link_uses_is_copied_afresh(env):
    """A self-update's build of a commit cut off by a power cut leaves releases/<sha> half made (its checkout
    stopped part-way). Installing that commit by hand must not take the half tree as the release."""
    _ok(env.run())
    old = env.sha
    new = env.new_commit()
    half = env.path(f"{OPT}/releases/{new}")
    half.mkdir()
    (half / "README.md").write_text("half a checkout")  # and no main.py: the power went
    out = _ok(env.run())
    assert "a release directory no link uses was left: copied afresh" in out
    assert os.readlink(env.path(f"{OPT}/current")) == f"releases/{new}"
    assert (half / "main.py").is_file() and (half / "README.md").read_text() != "half a checkout"
    # The release in use is reused as it is (a second run on the same commit).
    out = _ok(env.run())
    assert "exists (current): reused" in out and os.readlink(env.path(f"{OPT}/previous")) == f"releases/{old}"

def test_an_upgrade_whose_restart_did_not_happen_restarts_on_the_next_run(env, monkeypatch):
    _ok(env.run())
    env.new_commit()
    monkeypatch.setenv("SPB_STUB_RESTART_RC", "1")  # the run is cut off before the daemon restarted
    env.run()
    assert env.path(f"{OPT}/.restart-pending").exists()
    monkeypatch.delenv("SPB_STUB_RESTART_RC")
    _ok(env.run())  # nothing new to install, but the daemon still runs the old code: restart it
    assert ["systemctl", "try-restart", "solarpowerbrampton.service"] in env.calls("systemctl")
    assert not env.path(f"{OPT}/.restart-pending").exists()


def test_a_failed_service_is_reset_and_started_by_the_next_install(env):
    """A crash loop past systemd's start limit (or an exit 78) leaves the unit failed, and `enable --now`
    alone would not start it: the run that brings the fix resets the failure first. A unit that has not
    failed is left as it is."""
    _ok(env.run())
    assert not [c for c in env.calls("systemctl") if "reset-failed" in c]
    out = _ok(env.run(extra_env={"SPB_STUB_FAILED_RC": "0"}))  # `systemctl is-failed` answers: failed
    systemctl = env.calls("systemctl")
    reset = ["systemctl", "reset-failed", "solarpowerbrampton.service"]
    enable = ["systemctl", "enable", "--now", "solarpowerbrampton.service", "solarpowerbrampton-update.timer"]
    assert reset in systemctl and systemctl.index(reset) < systemctl.index(enable), systemctl
    assert "solarpowerbrampton.service had failed: starting it again" in out


@pytest.mark.parametrize("example", [
    # no [simulation] or [store] section at all
    '[site]\nname = "x"\n\n[[channel]]\nname = "a"\naddress = 0x40\n',
    # [simulation] without `enabled`, followed by another table; [store] last, without `dir`
    '[simulation]  # the model\nscenario = "day"\n[led]\nenabled = true\n[store]\nmax_mb = 5.0\n',
    # `enabled` in other tables must stay as it is
    '[led]\nenabled = true\n[simulation]\n  enabled=true\n[update]\nenabled = false\n[store]\ndir = "data"\n',
])
def test_config_is_derived_from_any_example(env, example):
    (env.repo / "config.example.toml").write_text(example)
    _git(env.repo, "commit", "-q", "-am", "another example")
    _ok(env.run())
    config = tomllib.loads(env.path(f"{ETC}/config.toml").read_text())
    expected = tomllib.loads(example)
    expected.setdefault("simulation", {})["enabled"] = False
    expected.setdefault("store", {})["dir"] = "/var/lib/solarpowerbrampton"
    assert config == expected


def test_a_failing_check_does_not_fail_the_install(env):
    result = env.run(sudo_rc=1)
    out = _ok(result)
    assert "check FAILED (exit 1)" in out
    assert env.path(f"{OPT}/current/main.py").is_file()


def test_uncommitted_changes_are_not_installed_and_said_so(env):
    (env.repo / "main.py").write_text((env.repo / "main.py").read_text() + "\n# local edit\n")
    result = env.run()
    _ok(result)
    assert "uncommitted changes" in result.stderr
    assert "# local edit" not in env.path(f"{OPT}/current/main.py").read_text()


def test_bad_arguments(env):
    result = env.run("--purge")
    assert result.returncode == 2 and "--purge only goes with --uninstall" in result.stderr
    result = env.run("--frobnicate")
    assert result.returncode == 2 and "unknown argument" in result.stderr
    assert not env.path(OPT).exists()


REAL_STATE = Path("/var/lib/solarpowerbrampton")


def _tree_state(path: Path):
    """What a path looks like now (None: absent): enough to tell whether a run created or changed it."""
    if not path.exists():
        return None
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in [path, *path.rglob("*")])


def test_test_mode_touches_nothing_outside_destdir_even_when_the_check_really_runs(env):
    # A sudo that really runs the command (as the test's user): the installer's final `main.py check`
    # then opens the store named in the installed config, which is /var/lib/solarpowerbrampton.
    (env.bin / "sudo").write_text('#!/usr/bin/env bash\n[ "$1" = -u ] && shift 2\nexec "$@"\n')
    before = _tree_state(REAL_STATE)
    result = env.run()
    out = _ok(result) + result.stderr
    assert _tree_state(REAL_STATE) == before  # not created, not changed
    # (the release's .venv here is a bare symlink to the test's Python, without the drivers: the check's
    # readings may fail, but by then it has opened its store)
    assert f"OK    store: {env.path(STATE)}/outbox.db is writable" in out, out[-2000:]
    assert (env.path(STATE) / "outbox.db").is_file()  # the check's store went under DESTDIR instead
    cfg = tomllib.loads(env.path(f"{ETC}/config.toml").read_text())
    assert cfg["store"]["dir"] == "/var/lib/solarpowerbrampton"  # the installed config itself is untouched
    assert not list(env.path(ETC).glob(".config-check*"))


def test_install_sh_takes_the_updaters_lock(env):
    """install.sh and updater.py flock the same file: neither removes a release the other is building."""
    lock = env.path(f"{OPT}/.updater.lock")
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(["flock", str(lock), "sleep", "30"], start_new_session=True)  # the updater
    try:
        while subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0:
            pass  # until the holder has it
        result = env.run(extra_env={"SPB_LOCK_WAIT_S": "1"})
        assert result.returncode != 0
        assert "the self-updater holds /opt/solarpowerbrampton/.updater.lock" in result.stderr
        assert not env.path(f"{OPT}/releases").exists() or not any(env.path(f"{OPT}/releases").iterdir())
        assert not env.path(f"{OPT}/current").exists()
    finally:
        os.killpg(holder.pid, 9)
        holder.wait()
    _ok(env.run(extra_env={"SPB_LOCK_WAIT_S": "1"}))
    assert os.readlink(env.path(f"{OPT}/current")) == f"releases/{env.sha}"


def test_install_sh_never_runs_the_checkouts_fsmonitor_or_hooks(env):
    """The checkout belongs to someone else; its .git/config names programs (fsmonitor, hooks) that
    git would run as root. install.sh runs none of them."""
    mark = env.tmp / "ran-as-root"
    script = env.tmp / "fsmonitor.sh"
    script.write_text(f"#!/bin/sh\necho \"$0\" >> {mark}\nexit 1\n")
    script.chmod(0o755)
    hooks = env.repo / ".git" / "hooks"
    hooks.mkdir(exist_ok=True)
    for hook in ("post-checkout", "pre-commit", "post-index-change", "reference-transaction"):
        (hooks / hook).write_text(f"#!/bin/sh\necho {hook} >> {mark}\n")
        (hooks / hook).chmod(0o755)
    _git(env.repo, "config", "core.fsmonitor", str(script))
    _git(env.repo, "config", "core.hooksPath", str(hooks))
    # The attack is real: an ordinary `git status` there runs the fsmonitor program.
    subprocess.run(["git", "-c", f"safe.directory={env.repo}", "-C", str(env.repo), "status", "--porcelain"],
                   capture_output=True)
    assert mark.exists()
    mark.unlink()
    _ok(env.run())
    assert not mark.exists(), f"install.sh ran the checkout's programs: {mark.read_text()}"
