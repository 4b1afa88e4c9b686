"""The self-updater against real git: a local bare repository as the remote, a fake deployment root.

The project in the remote is a tiny fake (main.py with `check` and `run`, the real config.py and
updater.py), and the venv command only links a python, so a whole update takes well under a second.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

import release_build
import updater

PROJECT = Path(__file__).resolve().parent.parent

FAKE_MAIN = '''\
"""Fake daemon for the updater tests: `check` and `run --cycles N`, outcome set by MODE."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import config

MODE = {mode!r}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command")
    p.add_argument("--config")
    p.add_argument("--simulate", action="store_true")
    p.add_argument("--cycles", type=int)
    a = p.parse_args()
    try:
        if a.config and hasattr(config, "check_permissions"):  # as the real main.py does
            config.check_permissions(Path(a.config))
        cfg = config.load_config(Path(a.config) if a.config else None)
    except config.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 78
    Path(cfg.store.dir, "probe").write_text("x")  # the store must be writable
    record = {{"command": a.command, "argv": sys.argv[1:], "env": dict(os.environ), "uid": os.getuid(),
              "pid": os.getpid(), "simulation": cfg.simulation.enabled, "influx": cfg.influx.kind,
              "token_file": cfg.influx.token_file, "led": cfg.led.enabled, "interval_s": cfg.sampling.interval_s,
              "samples": cfg.sampling.samples, "store": cfg.store.dir, "update": cfg.update.enabled,
              "clock": cfg.clock.trust, "site": cfg.site.name, "mqtt": cfg.mqtt.enabled,
              "mqtt_password_file": cfg.mqtt.password_file, "web": cfg.web.enabled}}
    log = os.environ.get("SPB_TEST_ENV_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\\n")
    if MODE == "check-fails" and a.command == "check":
        print("FAIL red_house 0x40: no answer")
        return 1
    if MODE == "hang" and a.command == "check":
        time.sleep(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''

LIVE_CONFIG = '''\
[site]
name = "brampton \\"test\\" \u00e9"

[sampling]
interval_s = 10.0
window_s = 1.0
samples = 50

[led]
enabled = true

[web]
enabled = true

[mqtt]
enabled = true
host = "127.0.0.1"
password_file = "/etc/solarpowerbrampton/mqtt-password"

[store]
dir = "{live_store}"

[simulation]
enabled = false
start = 2026-06-21T06:00:00

[influx]
kind = "local"
api = "v2"
url = "http://127.0.0.1:9"
org = "o"
bucket = "b"
token_file = "/etc/solarpowerbrampton/influx-token"

[clock]
trust = "sync"

[update]
enabled = {enabled}
remote = "{remote}"
branch = "main"
require_signed = {signed}
max_failed_starts = {max_failed}

[[channel]]
name = "red_house"
address = 0x40
tags = {{ colour = "red" }}

[[channel]]
name = "power_plant"
address = "0x45"
max_current_a = 3.2
'''

GIT_ENV = {"GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.org", "GIT_COMMITTER_NAME": "Test",
           "GIT_COMMITTER_EMAIL": "test@example.org", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}


def git(*args: str, cwd: Path, env: dict | None = None) -> str:
    full = {**os.environ, **GIT_ENV, **(env or {})}
    result = subprocess.run(["git", *args], cwd=cwd, env=full, capture_output=True, text=True)
    assert result.returncode == 0, f"git {args}: {result.stdout}{result.stderr}"
    return result.stdout.strip()


def cheap_venv_cmd(python: str) -> str:
    # Stands in for `python3 -m venv && pip install`: a .venv/bin/python and a dump of our environment.
    return (f'mkdir -p "$1/.venv/bin" && ln -s {shlex.quote(python)} "$1/.venv/bin/python" '
            f'&& env >> "$SPB_TEST_VENV_ENV"')


class Site:
    """A remote, a work clone, a deployment root with release 1 installed, a state dir and a config."""

    def __init__(self, base: Path, monkeypatch, python: str = sys.executable) -> None:
        self.base = base
        self.work, self.remote = base / "work", base / "remote.git"
        self.root, self.state = base / "root", base / "state"
        self.config, self.env_log = base / "config.toml", base / "env.jsonl"
        self.venv_env, self.restarted = base / "venv-env.txt", base / "restarted"
        self.python = python
        self.state.mkdir()
        (base / "live-store").mkdir()
        monkeypatch.setenv("SPB_VENV_CMD", cheap_venv_cmd(python))
        monkeypatch.setenv("SPB_RESTART_CMD", shlex.join(["touch", str(self.restarted)]))
        monkeypatch.setenv("SPB_TEST_ENV_LOG", str(self.env_log))
        monkeypatch.setenv("SPB_TEST_VENV_ENV", str(self.venv_env))
        for name in ("SOLAR_CONFIG", "STATE_DIRECTORY", "GNUPGHOME"):
            monkeypatch.delenv(name, raising=False)
        for name in ("HOME", "PYTHONNOUSERSITE", "PIP_CONFIG_FILE", "PYTHONPATH"):
            # updater.main() isolates root's environment in place: give it back after the test.
            if name in os.environ:
                monkeypatch.setenv(name, os.environ[name])
            else:  # recorded as absent (delenv alone records nothing for a missing name)
                monkeypatch.setenv(name, "")
                monkeypatch.delenv(name)
        self.write_config()

        git("init", "-q", "--bare", "-b", "main", str(self.remote), cwd=base)
        git("init", "-q", "-b", "main", str(self.work), cwd=base)
        for module in ("config.py", "config_check.py", "updater.py", "release.py", "release_build.py", "clock.py",
                       "credentials.py", "smallfile.py",
                       "safepip.py"):  # what updater.py imports
            shutil.copy(PROJECT / module, self.work / module)
        (self.work / "requirements.txt").write_text("")
        (self.work / ".gitignore").write_text("__pycache__/\n")
        self.sha1 = self.commit("release 1")
        # Release 1 as the installer would leave it.
        release = self.root / "releases" / self.sha1
        git("clone", "-q", str(self.remote), str(release), cwd=base)
        subprocess.run(["sh", "-c", cheap_venv_cmd(python), "sh", str(release)], check=True)
        os.symlink(f"releases/{self.sha1}", self.root / "current")
        self.venv_env.unlink()  # that install ran with the test's own environment, secrets included

    def write_config(self, enabled: bool = True, signed: bool = False, max_failed: int = 3) -> None:
        self.config.write_text(LIVE_CONFIG.format(live_store=self.base / "live-store", remote=self.remote,
                                                  enabled=str(enabled).lower(), signed=str(signed).lower(),
                                                  max_failed=max_failed), encoding="utf-8")

    def commit(self, message: str, mode: str = "ok", sign: tuple[Path, str] | None = None,
               amend: bool = False) -> str:
        (self.work / "main.py").write_text(FAKE_MAIN.format(mode=mode))
        git("add", "-A", cwd=self.work)
        args = ["commit", "-q", "--allow-empty", "-m", message] + (["--amend"] if amend else [])
        env = None
        if sign:
            home, fingerprint = sign
            args = ["-c", "gpg.program=gpg", "-c", f"user.signingkey={fingerprint}"] + args + ["-S"]
            env = {"GNUPGHOME": str(home)}
        git(*args, cwd=self.work, env=env)
        git("push", "-q", "--force", str(self.remote), "main", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def cli(self, *args: str) -> int:
        return updater.main(["--root", str(self.root), "--state-dir", str(self.state), "--config", str(self.config),
                             *args])

    def apply(self, *args: str) -> int:
        return self.cli("apply", "--run-as", "", *args)

    def pre_start(self) -> int:
        return self.cli("pre-start")

    @property
    def layout(self) -> updater.Layout:
        return updater.Layout(self.root)

    @property
    def current(self) -> str | None:
        return updater.release_sha(self.layout, self.layout.current)

    @property
    def previous(self) -> str | None:
        return updater.release_sha(self.layout, self.layout.previous)

    def releases(self) -> set[str]:
        return {p.name for p in (self.root / "releases").iterdir()}

    def records(self) -> list[dict]:
        if not self.env_log.exists():
            return []
        return [json.loads(line) for line in self.env_log.read_text().splitlines()]

    def state_file(self) -> dict:
        return json.loads((self.state / updater.STATE_FILE).read_text())


@pytest.fixture
def site(tmp_path, monkeypatch) -> Site:
    monkeypatch.setenv("INFLUXDB_TOKEN", "secret-token-value")
    monkeypatch.setenv("INFLUXDB_PASSWORD", "secret-password-value")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    monkeypatch.setenv("MQTT_PASSWORD", "secret-mqtt-value")
    return Site(tmp_path, monkeypatch)


# -- apply ----------------------------------------------------------------------------------------
def test_good_update_switches_current_and_sets_previous(site, caplog):
    caplog.set_level(logging.INFO, logger="updater")
    sha2 = site.commit("release 2")
    assert site.apply() == updater.EXIT_UPDATED
    assert (site.current, site.previous) == (sha2, site.sha1)
    assert os.readlink(site.root / "current") == f"releases/{sha2}"
    assert (site.root / "releases" / sha2 / "main.py").is_file()
    assert (site.root / "releases" / sha2 / ".venv" / "bin" / "python").exists()
    assert any(p.suffix == ".pyc" for p in (site.root / "releases" / sha2 / "__pycache__").iterdir())
    assert site.restarted.exists(), "the restart command ran"
    assert f"updated {site.sha1} -> {sha2}" in caplog.text
    assert site.state_file()["releases"][sha2]["starts"] == 0
    assert [r["command"] for r in site.records()] == ["check", "run"]
    assert site.records()[1]["argv"][:4] == ["run", "--simulate", "--cycles", "2"]

    # Nothing new: nothing happens.
    site.restarted.unlink()
    assert site.apply() == updater.EXIT_OK
    assert site.current == sha2 and not site.restarted.exists()

    # A third release: the oldest one is pruned, only current and previous stay.
    sha3 = site.commit("release 3")
    assert site.apply() == updater.EXIT_UPDATED
    assert (site.current, site.previous) == (sha3, sha2)
    assert site.releases() == {sha2, sha3}


def test_selftest_runs_on_a_safe_copy_of_the_live_config(site):
    site.commit("release 2")
    assert site.apply() == updater.EXIT_UPDATED
    for record in site.records():
        assert record["simulation"] is True
        assert record["influx"] == "none" and record["token_file"] == ""
        assert record["led"] is False
        # the live daemon's broker login and its page's port are left alone
        assert record["mqtt"] is False and record["mqtt_password_file"] == "" and record["web"] is False
        assert record["interval_s"] == 0.5 and record["samples"] == 10
        assert record["update"] is False and record["clock"] == "always"
        assert record["site"] == 'brampton "test" \u00e9', "the rest of the live config is kept"
        assert not record["store"].startswith(str(site.base)), "a temp store, not the live one"
        assert record["env"]["STATE_DIRECTORY"] != str(site.state)
    assert not any((site.base / "live-store").iterdir())


def test_child_processes_never_see_the_secrets(site):
    site.commit("release 2")
    assert site.apply() == updater.EXIT_UPDATED
    records = site.records()
    assert records
    for record in records:
        for name in ("INFLUXDB_TOKEN", "INFLUXDB_PASSWORD", "MQTT_PASSWORD", "CREDENTIALS_DIRECTORY"):
            assert name not in record["env"]
        assert "SPB_TEST_ENV_LOG" in record["env"], "other variables pass through"
    venv_env = site.venv_env.read_text()
    assert "INFLUXDB" not in venv_env and "CREDENTIALS_DIRECTORY" not in venv_env and "secret-" not in venv_env
    git_env = release_build.git_env()
    assert not {"INFLUXDB_TOKEN", "INFLUXDB_PASSWORD", "MQTT_PASSWORD", "CREDENTIALS_DIRECTORY"} & set(git_env)


def test_failing_selftest_is_refused_and_cleaned_up(site, caplog):
    sha2 = site.commit("release 2: check fails", mode="check-fails")
    assert site.apply() == updater.EXIT_FAILED
    assert site.current == site.sha1 and site.previous is None
    assert sha2 not in site.releases()
    assert not site.restarted.exists()
    assert "self-test `check` failed (exit 1)" in caplog.text and "no answer" in caplog.text


def test_hanging_selftest_is_killed_and_refused(site):
    sha2 = site.commit("release 2: check hangs", mode="hang")
    began = time.monotonic()
    assert site.apply("--selftest-timeout", "1") == updater.EXIT_FAILED
    assert time.monotonic() - began < 15
    assert site.current == site.sha1 and sha2 not in site.releases()
    (hung,) = [r for r in site.records() if r["command"] == "check"]
    with pytest.raises(ProcessLookupError):
        os.kill(hung["pid"], 0)


def test_sigterm_during_the_selftest_cleans_up(site):
    sha2 = site.commit("release 2: check hangs", mode="hang")
    proc = subprocess.Popen([sys.executable, str(PROJECT / "updater.py"), "--root", str(site.root), "--state-dir",
                             str(site.state), "--config", str(site.config), "apply", "--run-as", ""],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 15
    while not any(r["command"] == "check" for r in site.records()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else "slow"
        time.sleep(0.05)
    proc.terminate()
    assert proc.wait(timeout=15) == 128 + 15
    assert site.current == site.sha1 and sha2 not in site.releases()
    (hung,) = [r for r in site.records() if r["command"] == "check"]
    with pytest.raises(ProcessLookupError):
        os.kill(hung["pid"], 0)


def test_non_fast_forward_is_refused(site, caplog):
    sha2 = site.commit("release 1, rewritten", amend=True)  # force-pushed over release 1
    assert sha2 != site.sha1
    assert site.apply() == updater.EXIT_FAILED
    assert site.current == site.sha1 and sha2 not in site.releases()
    assert "not a fast-forward" in caplog.text


def test_leftover_release_dir_is_rebuilt(site):
    sha2 = site.commit("release 2")
    leftover = site.root / "releases" / sha2
    leftover.mkdir()
    (leftover / "junk").write_text("half-made by an interrupted update")
    assert site.apply() == updater.EXIT_UPDATED
    assert site.current == sha2 and not (leftover / "junk").exists()


def test_disabled_does_nothing(site, caplog):
    caplog.set_level(logging.INFO, logger="updater")
    site.write_config(enabled=False)
    site.commit("release 2")
    assert site.apply() == updater.EXIT_OK
    assert site.current == site.sha1 and not (site.root / "repo.git").exists()
    assert "self-update is off" in caplog.text


def test_invalid_config_exits_78(site):
    site.config.write_text("[update]\nenabled = 1\n")
    assert site.apply() == updater.EXIT_CONFIG


# -- signatures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A maintainer key (trusted by the updater), a rogue key, and the updater's public keyring."""
    if shutil.which("gpg") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("gpg is missing (apt-get install gnupg)")
        pytest.skip("gpg is not installed: the signature tests need it (apt-get install gnupg)")
    base = tmp_path_factory.mktemp("gpg")
    homes = {name: base / name for name in ("maintainer", "rogue", "trusted")}
    for home in homes.values():
        home.mkdir(mode=0o700)
    fingerprints = {}
    for name in ("maintainer", "rogue"):
        gpg = ["gpg", "--homedir", str(homes[name]), "--batch", "--quiet"]
        subprocess.run(gpg + ["--pinentry-mode", "loopback", "--passphrase", "", "--quick-gen-key",
                              f"{name} <{name}@example.org>", "ed25519", "sign", "never"], check=True,
                       capture_output=True)
        listing = subprocess.run(gpg + ["--with-colons", "--list-secret-keys"], check=True, capture_output=True,
                                 text=True).stdout
        fingerprints[name] = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    public = subprocess.run(["gpg", "--homedir", str(homes["maintainer"]), "--batch", "--export", "--armor"],
                            check=True, capture_output=True).stdout
    subprocess.run(["gpg", "--homedir", str(homes["trusted"]), "--batch", "--quiet", "--import"], input=public,
                   check=True, capture_output=True)
    yield {name: (homes[name], fingerprints.get(name, "")) for name in homes}
    for home in homes.values():
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def test_require_signed(site, keys, caplog):
    site.write_config(signed=True)
    trusted = str(keys["trusted"][0])
    unsigned = site.commit("release 2, unsigned")
    assert site.apply("--gnupghome", trusted) == updater.EXIT_FAILED
    assert site.current == site.sha1 and unsigned not in site.releases()
    assert "no good signature" in caplog.text

    rogue = site.commit("release 2, signed by a stranger", sign=keys["rogue"])
    assert site.apply("--gnupghome", trusted) == updater.EXIT_FAILED
    assert site.current == site.sha1 and rogue not in site.releases()
    assert "No public key" in caplog.text or "public key not found" in caplog.text

    assert site.apply("--gnupghome", str(site.base / "no-such-keyring")) == updater.EXIT_FAILED
    assert "does not exist" in caplog.text

    signed = site.commit("release 2, signed by the maintainer", sign=keys["maintainer"])
    assert site.apply("--gnupghome", trusted) == updater.EXIT_UPDATED
    assert (site.current, site.previous) == (signed, site.sha1)


# -- pre-start, mark_good, rollback ---------------------------------------------------------------
def test_crashing_release_is_rolled_back_and_never_reapplied(site, caplog):
    sha2 = site.commit("release 2: passes the self-test, crashes at start")
    assert site.apply() == updater.EXIT_UPDATED
    for start in range(1, 4):  # max_failed_starts = 3 starts, none reaching mark_good
        assert site.pre_start() == 0
        assert site.current == sha2
        assert site.state_file()["releases"][sha2]["starts"] == start
    assert updater.rollback_notice(site.state) is None

    assert site.pre_start() == 0  # the start after the third failure starts release 1 instead
    assert site.current == site.sha1
    assert site.previous is None, "no way back to the bad release"
    assert f"rolled back from {sha2} to {site.sha1} after 3 failed starts" in caplog.text
    assert any(r.levelno == logging.ERROR and "rolled back" in r.getMessage() for r in caplog.records)
    marker = json.loads((site.state / updater.MARKER_FILE).read_text())
    assert (marker["from"], marker["to"], marker["failed_starts"]) == (sha2, site.sha1, 3)
    notice = updater.rollback_notice(site.state)
    assert notice and sha2 in notice and site.sha1 in notice
    state = site.state_file()
    assert sha2 in state["bad"] and state["started"] == site.sha1

    # The remote still offers the bad revision: a later apply leaves it alone.
    site.restarted.unlink()
    assert site.apply() == updater.EXIT_OK
    assert site.current == site.sha1 and not site.restarted.exists()
    # Release 1 has nowhere to roll back to: it keeps starting.
    for _ in range(5):
        assert site.pre_start() == 0
    assert site.current == site.sha1

    # A fix on top of the bad revision is a normal update and clears the notice.
    sha3 = site.commit("release 3: the fix")
    assert site.apply() == updater.EXIT_UPDATED
    assert (site.current, site.previous) == (sha3, site.sha1)
    assert updater.rollback_notice(site.state) is None
    assert updater.acknowledge(site.state) is False



def test_a_release_on_probation_that_exits_78_is_rolled_back_at_once_and_started_again(site, monkeypatch, caplog):
    """A release that passes the self-test but refuses what only the real start checks (its secret files, their
    permissions) exits 78, which systemd does not restart: pre-start would never run to count it. post-stop
    (ExecStopPost, as root) rolls it back and starts the service; after any other stop it does nothing."""
    started = site.base / "started"
    monkeypatch.setenv(updater.ENV_START_CMD, shlex.join(["touch", str(started)]))
    sha2 = site.commit("release 2: exits 78 at start")
    assert site.apply() == updater.EXIT_UPDATED
    assert site.pre_start() == 0
    for code, status in (("exited", "0"), ("exited", "1"), ("killed", "78"), ("dumped", "11")):
        monkeypatch.setenv("EXIT_CODE", code)
        monkeypatch.setenv("EXIT_STATUS", status)
        assert site.cli("post-stop") == 0
        assert site.current == sha2 and not started.exists(), (code, status)
    monkeypatch.setenv("EXIT_CODE", "exited")
    monkeypatch.setenv("EXIT_STATUS", "78")
    assert site.cli("post-stop") == 0
    assert site.current == site.sha1 and site.previous is None and started.exists()
    assert f"rolled back from {sha2} to {site.sha1} after exit 78 at start" in caplog.text
    assert site.state_file()["bad"][sha2]["reason"] == "exit 78 at start"
    assert sha2 in updater.rollback_notice(site.state)
    # Release 1, proven, exiting 78 too: a config problem old code would not fix; nothing to go back to anyway.
    started.unlink()
    assert site.cli("post-stop") == 0
    assert site.current == site.sha1 and not started.exists()
    unit = (PROJECT / "systemd" / "solarpowerbrampton.service").read_text()
    assert "ExecStopPost=+-/opt/solarpowerbrampton/previous/.venv/bin/python -s -E -S " \
           "/opt/solarpowerbrampton/previous/updater.py post-stop --config /etc/solarpowerbrampton/config.toml" in unit


def test_clean_stops_are_not_failed_starts_so_a_rebooted_release_on_probation_stays(site, monkeypatch):
    """Every start counts until the release proves itself; a stop the daemon ended cleanly (a reboot, a
    restart, a technician: exit 0) takes its start back in post-stop, so three reboots before the release
    stored its cycles (a full disk, say) do not roll it back. A crash, a kill or a watchdog still count."""
    sha2 = site.commit("release 2")
    assert site.apply() == updater.EXIT_UPDATED
    for _ in range(5):  # start, then a clean stop: five reboots
        assert site.pre_start() == 0
        monkeypatch.setenv("EXIT_CODE", "exited")
        monkeypatch.setenv("EXIT_STATUS", "0")
        assert site.cli("post-stop") == 0
    assert site.current == sha2 and site.state_file()["releases"][sha2]["starts"] == 0
    for code, status in (("killed", "TERM"), ("exited", "1"), ("dumped", "SEGV")):  # these are failures
        assert site.pre_start() == 0
        monkeypatch.setenv("EXIT_CODE", code)
        monkeypatch.setenv("EXIT_STATUS", status)
        assert site.cli("post-stop") == 0
    assert site.state_file()["releases"][sha2]["starts"] == 3
    assert site.pre_start() == 0 and site.current == site.sha1  # the fourth start rolls back, as before


def test_the_restart_after_an_update_starts_a_failed_service_too(tmp_path):
    """try-restart leaves a failed service alone (a crash loop that hit the start limit, an exit 78): the fix
    just installed would wait for a reboot. The restart command starts a failed service, and leaves one that
    was stopped on purpose stopped (a stand-in systemctl records what it is asked)."""
    log = tmp_path / "calls"
    systemctl = tmp_path / "systemctl"
    for failed in (True, False):
        systemctl.write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                             f'[ "$1" = is-failed ] && exit {0 if failed else 1}\nexit 0\n')
        systemctl.chmod(0o755)
        log.write_text("")
        result = subprocess.run(updater.restart_command(str(systemctl)), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        calls = log.read_text().splitlines()
        assert calls[:2] == [f"--no-block try-restart {updater.SERVICE}", f"is-failed --quiet {updater.SERVICE}"]
        assert calls[2:] == ([f"reset-failed {updater.SERVICE}", f"--no-block start {updater.SERVICE}"]
                             if failed else []), calls
    # A try-restart that fails (systemd busy, the unit unreadable) fails the command: the restart stays pending.
    systemctl.write_text(f'#!/bin/sh\necho "$*" >> {log}\n[ "$2" = try-restart ] && exit 1\nexit 1\n')
    log.write_text("")
    result = subprocess.run(updater.restart_command(str(systemctl)), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and log.read_text().splitlines() == [f"--no-block try-restart {updater.SERVICE}"]


def test_the_service_user_cannot_veto_an_update_or_clear_a_rollback_in_its_state_file(site):
    """The state file is the service user's: a logger it controls could write the next release's sha into its
    `bad` list (a security fix never applied) or delete a rolled-back one. apply goes by root's own record."""
    from release import locked_state

    sha2 = site.commit("release 2: crashes at start")
    assert site.apply() == updater.EXIT_UPDATED
    for _ in range(4):  # three failed starts, then the rollback
        site.pre_start()
    assert site.current == site.sha1 and (site.root / updater.ROLLED_BACK_DIR / sha2).is_file()
    with locked_state(site.state) as state:  # the logger wipes the rollback from its own file
        state["bad"].clear()
    assert site.apply() == updater.EXIT_OK and site.current == site.sha1  # still never applied again
    sha3 = site.commit("release 3: the security fix")
    with locked_state(site.state) as state:  # ... and vetoes the fix
        state["bad"][sha3] = {"at": "2026-11-27T00:00:00", "reason": "planted", "rolled_back_to": site.sha1}
    assert site.apply() == updater.EXIT_UPDATED and site.current == sha3

def test_mark_good_resets_the_counter(site):
    sha2 = site.commit("release 2")
    assert site.apply() == updater.EXIT_UPDATED
    for _ in range(2):  # max_failed_starts - 1 failed starts
        site.pre_start()
    assert updater.mark_good(site.state) is True  # the third start reached its first stored cycle
    entry = site.state_file()["releases"][sha2]
    assert entry["starts"] == 0 and entry["good"] is True
    site.pre_start()
    assert site.current == sha2 and site.state_file()["releases"][sha2]["starts"] == 1
    # Proven good: later failures are a config or hardware problem, not a reason to roll back.
    for _ in range(5):
        site.pre_start()
    assert site.current == sha2 and site.previous == site.sha1
    assert updater.rollback_notice(site.state) is None


def test_unconfirmed_release_never_becomes_the_rollback_target(site):
    site.pre_start()
    updater.mark_good(site.state)  # release 1 is proven
    sha2 = site.commit("release 2")
    assert site.apply() == updater.EXIT_UPDATED
    site.pre_start()  # release 2 starts but has not stored a cycle yet when release 3 arrives
    sha3 = site.commit("release 3")
    assert site.apply() == updater.EXIT_UPDATED
    assert (site.current, site.previous) == (sha3, site.sha1)
    assert sha2 in site.releases(), "kept until the next update: the running daemon may still import from it"
    site.pre_start()
    updater.mark_good(site.state)  # release 3 proves itself: it becomes the way back from release 4
    sha4 = site.commit("release 4")
    assert site.apply() == updater.EXIT_UPDATED
    assert (site.current, site.previous) == (sha4, sha3)
    assert site.releases() == {sha3, sha4}


def test_mark_good_cli_and_acknowledge(site, capsys):
    site.pre_start()
    assert site.cli("mark-good") == 0
    assert site.state_file()["releases"][site.sha1]["good"] is True
    (site.state / updater.MARKER_FILE).write_text("{not json")
    assert "rolled back" in updater.rollback_notice(site.state)
    assert site.cli("acknowledge") == 0
    assert updater.rollback_notice(site.state) is None
    assert site.cli("status") == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["current"] == site.sha1


def test_fresh_install_is_never_rolled_back(site):
    for _ in range(6):
        assert site.pre_start() == 0
    assert site.current == site.sha1
    assert site.state_file()["releases"][site.sha1]["starts"] == 6


def test_pre_start_survives_garbage(site, tmp_path):
    (site.state / updater.STATE_FILE).write_text("\x00garbage{")
    assert site.pre_start() == 0
    assert site.state_file()["releases"][site.sha1]["starts"] == 1
    (site.state / updater.STATE_FILE).write_text(json.dumps({"releases": {"x": 1, site.sha1: {"starts": "9"}},
                                                             "bad": [], "started": 5}))
    assert site.pre_start() == 0
    assert site.state_file()["releases"][site.sha1]["starts"] == 1
    # No release at all, or a state dir it cannot create: still exit 0.
    assert updater.main(["--root", str(tmp_path / "nothing"), "--state-dir", str(site.state), "pre-start"]) == 0
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert updater.main(["--root", str(site.root), "--state-dir", str(blocker / "state"), "--config",
                         str(site.config), "pre-start"]) == 0
    assert updater.mark_good(blocker / "state") is False


def test_mark_good_without_a_start_does_nothing(tmp_path):
    assert updater.mark_good(tmp_path) is False
    assert updater.rollback_notice(tmp_path) is None


# -- pieces ---------------------------------------------------------------------------------------
def test_toml_writer_round_trips():
    data = {
        "site": {"name": 'a "quoted" \\ back\tslash \u00e9 \U0001f600 del\x7f nl\n'},
        "sampling": {"interval_s": 1e-05, "window_s": 0.5, "samples": 10, "big": 1e300, "neg": -0.0},
        "simulation": {"enabled": True, "start": dt.datetime(2026, 6, 21, 6, 0),
                       "zoned": dt.datetime(2026, 6, 21, 6, 0, tzinfo=dt.timezone.utc), "day": dt.date(2026, 1, 2)},
        "weird key": {"x.y": [1, 2, [3, "4"]], "inline": {"a": {"b": False}}},
        "channel": [{"name": "red", "address": 64, "tags": {"colour": "red"}}, {"name": "blue", "address": 68}],
        "empty": [],
    }
    assert tomllib.loads(updater.toml_dumps(data)) == data


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
                    reason="switching users needs root and a python outside /root")
def test_selftest_runs_new_code_as_the_service_user(monkeypatch):
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user `nobody`")
    if not release_build.can_switch_user():
        pytest.skip("no CAP_SETUID/CAP_SETGID here")
    # pytest's tmp dirs are private to root: this site must be readable by `nobody`.
    base = Path(tempfile.mkdtemp(prefix="spb-updater-test-"))
    try:
        base.chmod(0o755)
        site = Site(base, monkeypatch, python="/usr/bin/python3")
        base.chmod(0o777)  # the fake daemon, as nobody, appends to env.jsonl here
        sha2 = site.commit("release 2")
        assert site.cli("apply", "--run-as", "nobody") == updater.EXIT_UPDATED
        assert site.current == sha2
        assert {r["uid"] for r in site.records()} == {nobody.pw_uid}
        # The real permission model: the state dir belongs to the service user, pre-start runs as
        # root, and the daemon (not root) must still be able to mark its release good.
        os.chown(site.state, nobody.pw_uid, nobody.pw_gid)
        site.state.chmod(0o700)
        assert site.pre_start() == 0
        assert (site.state / updater.STATE_FILE).stat().st_uid == nobody.pw_uid
        daemon = subprocess.run(
            ["/usr/bin/python3", "-c", "import sys, updater; sys.exit(0 if updater.mark_good(sys.argv[1]) else 1)",
             str(site.state)], cwd=site.root / "current", user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
            capture_output=True, text=True)
        assert daemon.returncode == 0, daemon.stderr
        assert site.state_file()["releases"][sha2] == {**site.state_file()["releases"][sha2], "starts": 0, "good": True}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_with_self_update_off_pre_start_never_rolls_back_a_release_switched_by_hand(site):
    sha2 = site.commit("release 2: installed by hand with install.sh")
    assert site.apply() == updater.EXIT_UPDATED  # stands in for the manual switch: current=2, previous=1
    site.write_config(enabled=False)
    for _ in range(6):
        assert site.pre_start() == 0
    assert site.current == sha2 and site.previous == site.sha1
    assert updater.rollback_notice(site.state) is None


def test_a_release_that_rejects_the_live_config_is_refused(site, caplog):
    sha1 = site.sha1
    (site.work / "config.py").write_text((site.work / "config.py").read_text().replace(
        'INFLUX_KINDS = ("none", "local", "cloud")', 'INFLUX_KINDS = ("none", "cloud")'))
    site.commit("release 2: no longer knows kind = local, which the live config uses")
    assert site.apply() == updater.EXIT_FAILED
    assert site.current == sha1
    assert "self-test `live config` failed" in caplog.text


# -- issue 10: hashed dependencies (a loopback package index) ------------------------------------
import base64  # noqa: E402
import hashlib  # noqa: E402
import zipfile  # noqa: E402

import safepip  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"


def _wheel(directory: Path, name: str, files: dict[str, str]) -> Path:
    """A minimal valid wheel `name`-1.0 holding `files` (path -> text)."""
    dist = f"{name}-1.0.dist-info"
    files = {**files, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    wheel = directory / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pip_venv(tmp_path_factory):
    """A real venv with pip, in a directory every user may traverse (the build user reads it)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is missing: the hashed-install tests need the system python")
    base = Path(tempfile.mkdtemp(prefix="spb-venv-test-"))
    base.chmod(0o755)
    venv = base / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    yield venv
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def index(pip_venv):
    """A loopback package index (a --find-links directory) and a place for requirements, readable by all."""
    base = Path(tempfile.mkdtemp(prefix="spb-index-test-"))
    base.chmod(0o755)
    (base / "wheels").mkdir(mode=0o755)
    (base / "marks").mkdir(mode=0o777)
    (base / "marks").chmod(0o777)
    yield base
    subprocess.run([str(pip_venv / "bin/python"), "-m", "pip", "uninstall", "-y", "-q", "spbevil", "spbsrc",
                    "spbextra"],
                   capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def _isolated_pip_env() -> dict[str, str]:
    # No pip.conf of this machine (its find-links and extra indexes): only the loopback index.
    return {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}


def test_a_substituted_wheel_with_a_pth_file_is_refused(pip_venv, index):
    """The index serves a wheel with a .pth file (code run at every python start, as root in pre-start)
    instead of the file the requirements pin: the install is refused and the .pth never runs."""
    mark = index / "marks" / "pth-ran"
    good_dir = index / "good"
    good_dir.mkdir()
    good = _wheel(good_dir, "spbevil", {"spbevil/__init__.py": ""})
    evil = _wheel(index / "wheels", "spbevil", {
        "spbevil/__init__.py": "",
        "spbevil.pth": f"import os; open({str(mark)!r}, 'a').write(str(os.getuid()) + chr(10))\n"})
    assert _sha(good) != _sha(evil)
    req = index / "requirements.txt"
    req.write_text(f"spbevil==1.0 \\\n    --hash=sha256:{_sha(good)}\n")
    req.chmod(0o644)
    args = ["--no-index", "--find-links", str(index / "wheels")]
    python = str(pip_venv / "bin/python")
    with pytest.raises(subprocess.CalledProcessError) as caught:
        safepip.install(python, req, extra_args=args, env=_isolated_pip_env(), timeout=300)
    assert "hash" in caught.value.output.lower(), caught.value.output
    subprocess.run([python, "-c", "pass"], check=True)  # a start of the venv's python: would run a .pth
    assert not mark.exists(), f".pth ran as uid {mark.read_text()}"
    assert not list((pip_venv / "lib").glob("python3*/site-packages/spbevil*"))

    # The attack is real: pinned to the substituted file's hash, the same .pth runs at the next start.
    req.write_text(f"spbevil==1.0 --hash=sha256:{_sha(evil)}\n")
    safepip.install(python, req, extra_args=args, env=_isolated_pip_env(), timeout=300)
    subprocess.run([python, "-c", "pass"], check=True)
    assert mark.exists()


def test_the_unprivileged_source_build_gets_no_secret_from_the_environment():
    """The sdist build as `nobody` runs code from the index: of the caller's environment it keeps only what
    a build needs, so no token or password (whatever the variable is called) reaches it."""
    caller = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PIP_INDEX_URL": "https://pypi.example/simple",
              "https_proxy": "http://proxy:3128", "INFLUXDB_TOKEN": "t", "MQTT_PASSWORD": "p",
              "GITHUB_TOKEN": "g", "CREDENTIALS_DIRECTORY": "/run/credentials/x", "HOME": "/root", "SUDO_USER": "pi"}
    assert safepip._build_env(caller) == {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8",
                                          "PIP_INDEX_URL": "https://pypi.example/simple",
                                          "https_proxy": "http://proxy:3128"}


def test_unhashed_requirements_are_refused_before_pip_runs(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# pinned, not hashed\npsutil==7.2.2\n")
    with pytest.raises(safepip.HashError, match=r"requirements.txt:2: psutil==7.2.2 has no --hash"):
        safepip.allowed_hashes(req)
    # An index option would let the file pick where code comes from; -r must be hashed too.
    req.write_text(f"--extra-index-url http://evil.example/simple\nx==1 --hash=sha256:{'0' * 64}\n")
    with pytest.raises(safepip.HashError, match="option '--extra-index-url'"):
        safepip.allowed_hashes(req)
    (tmp_path / "base.txt").write_text("y==2\n")
    req.write_text(f"-r base.txt\nx==1 --hash=sha256:{'0' * 64}\n")
    with pytest.raises(safepip.HashError, match=r"base.txt:1"):
        safepip.allowed_hashes(req)
    # pip's long spelling of -r is followed the same way, by the hash check and by the pins alike.
    (tmp_path / "base.txt").write_text(f"Y_y==2 --hash=sha256:{'1' * 64}\n--requirement requirements.txt\n")
    req.write_text(f"--requirement base.txt\nx==1 --hash=sha256:{'0' * 64}\n")
    assert safepip.allowed_hashes(req) == {"0" * 64, "1" * 64}
    assert safepip.pins(req) == {"y-y": "2", "x": "1"}


def test_the_projects_requirement_files_are_fully_hashed():
    hashes = safepip.allowed_hashes(PROJECT / "requirements-dev.txt")  # includes requirements.txt
    assert len(hashes) > 40
    for line in (PROJECT / "requirements.txt").read_text().splitlines():
        assert "==" not in line or line.lstrip().startswith("#") or line.rstrip().endswith("\\"), line


@pytest.mark.skipif(os.geteuid() != 0, reason="the build-user switch happens only as root")
def test_as_root_a_source_build_runs_as_the_unprivileged_user(pip_venv, index):
    """An sdist's setup.py runs at build time: as root it must run as `nobody`, never uid 0."""
    import tarfile

    mark = index / "marks" / "setup-ran"
    src = index / "src" / "spbsrc-1.0"
    shutil.rmtree(src, ignore_errors=True)
    (src / "spbsrc").mkdir(parents=True)
    (src / "spbsrc" / "__init__.py").write_text("")
    # An in-tree PEP 517 backend (stdlib only: no setuptools or wheel needed offline) that records
    # who runs the build, as a hostile setup.py would run its code.
    (src / "pyproject.toml").write_text('[build-system]\nrequires = []\nbuild-backend = "backend"\n'
                                        'backend-path = ["."]\n')
    (src / "backend.py").write_text(
        "import base64, hashlib, os, zipfile\n"
        "def get_requires_for_build_wheel(config_settings=None):\n    return []\n"
        "def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):\n"
        f"    open({str(mark)!r}, 'a').write(str(os.getuid()) + chr(10))\n"
        "    d = 'spbsrc-1.0.dist-info'\n"
        "    files = {'spbsrc/__init__.py': '',\n"
        "             d + '/METADATA': 'Metadata-Version: 2.1\\nName: spbsrc\\nVersion: 1.0\\n',\n"
        "             d + '/WHEEL': 'Wheel-Version: 1.0\\nGenerator: t\\nRoot-Is-Purelib: true\\n'\n"
        "                           'Tag: py3-none-any\\n'}\n"
        "    b64 = lambda t: base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()\n"
        "    rec = [p + ',sha256=' + b64(t) + ',' + str(len(t)) for p, t in files.items()] + [d + '/RECORD,,']\n"
        "    name = 'spbsrc-1.0-py3-none-any.whl'\n"
        "    with zipfile.ZipFile(os.path.join(wheel_directory, name), 'w') as z:\n"
        "        for p, t in files.items():\n            z.writestr(p, t)\n"
        "        z.writestr(d + '/RECORD', chr(10).join(rec) + chr(10))\n"
        "    return name\n")
    sdist = index / "wheels" / "spbsrc-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname="spbsrc-1.0")
    req = index / "requirements.txt"
    req.write_text(f"spbsrc==1.0 --hash=sha256:{_sha(sdist)}\n")
    req.chmod(0o644)
    try:
        safepip.install(str(pip_venv / "bin/python"), req, timeout=300, env=_isolated_pip_env(),
                        extra_args=["--no-index", "--find-links", str(index / "wheels"), "--no-build-isolation"])
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"pip failed: {exc.output}")
    uids = {int(u) for u in mark.read_text().split()}  # noqa
    assert uids and 0 not in uids, uids
    assert uids == {safepip.build_identity()[0]}
    done = subprocess.run([str(pip_venv / "bin/python"), "-c", "import spbsrc"], capture_output=True)
    assert done.returncode == 0, done.stderr



def _hostile_sdist(index: Path, mark: Path, *, tool: str | None = None, own_extra: str | None = None) -> Path:
    """spbsrc-1.0's sdist: an in-tree backend (importing the build tool `tool`, when given) that builds its
    wheel and also drops a second wheel, `spbextra`, with a .pth (code run at every start of the venv);
    `own_extra`: its own wheel carries a file of that name too, holding the .pth's code."""
    import tarfile

    src = index / "src" / "spbsrc-1.0"
    shutil.rmtree(src, ignore_errors=True)
    (src / "spbsrc").mkdir(parents=True)
    (src / "spbsrc" / "__init__.py").write_text("")
    requires = f'["{tool}"]' if tool else "[]"
    pth = f"import os; open({str(mark)!r}, 'a').write(str(os.getuid()) + chr(10))\n"
    (src / "pyproject.toml").write_text(f'[build-system]\nrequires = {requires}\nbuild-backend = "backend"\n'
                                        'backend-path = ["."]\n')
    (src / "backend.py").write_text(
        "import base64, hashlib, os, zipfile\n"
        + (f"import {tool}\n" if tool else "")
        + "def get_requires_for_build_wheel(config_settings=None):\n    return []\n"
        "def _wheel(directory, name, files):\n"
        "    d = name + '-1.0.dist-info'\n"
        "    files = dict(files, **{d + '/METADATA': 'Metadata-Version: 2.1\\nName: ' + name + '\\nVersion: 1.0\\n',\n"
        "                         d + '/WHEEL': 'Wheel-Version: 1.0\\nGenerator: t\\nRoot-Is-Purelib: true\\n'\n"
        "                                       'Tag: py3-none-any\\n'})\n"
        "    b64 = lambda t: base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()\n"
        "    rec = [p + ',sha256=' + b64(t) + ',' + str(len(t)) for p, t in files.items()] + [d + '/RECORD,,']\n"
        "    whl = name + '-1.0-py3-none-any.whl'\n"
        "    with zipfile.ZipFile(os.path.join(directory, whl), 'w') as z:\n"
        "        for p, t in files.items():\n            z.writestr(p, t)\n"
        "        z.writestr(d + '/RECORD', chr(10).join(rec) + chr(10))\n"
        "    return whl\n"
        "def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):\n"
        f"    pth = {pth!r}\n"
        "    _wheel(wheel_directory, 'spbextra', {'spbextra.pth': pth})\n"
        + (f"    return _wheel(wheel_directory, 'spbsrc', {{'spbsrc/__init__.py': '', {own_extra!r}: pth}})\n"
           if own_extra else "    return _wheel(wheel_directory, 'spbsrc', {'spbsrc/__init__.py': ''})\n"))
    sdist = index / "wheels" / "spbsrc-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname="spbsrc-1.0")
    return sdist


@pytest.mark.skipif(os.geteuid() != 0, reason="the build-user switch happens only as root")
def test_as_root_only_the_pinned_wheel_a_build_made_is_installed_and_its_tools_come_hash_checked(pip_venv, index):
    """A hostile sdist's build leaves a second wheel with a .pth beside its own: root installs only the wheel
    of the pinned name and version. Its build tool is taken from the hash-pinned build requirements only: the
    index's unpinned `spbtool` (whose import leaves a mark) is never fetched to build with (pip's build
    isolation would have); pinned by hash, the same build goes through."""
    mark = index / "marks" / "extra-pth-ran"
    tool_mark = index / "marks" / "tool-ran"
    tool = _wheel(index / "wheels", "spbtool", {
        "spbtool/__init__.py": f"import os; open({str(tool_mark)!r}, 'a').write(str(os.getuid()) + chr(10))\n"})
    sdist = _hostile_sdist(index, mark, tool="spbtool")
    req = index / "requirements.txt"
    req.write_text(f"spbsrc==1.0 --hash=sha256:{_sha(sdist)}\n")
    req.chmod(0o644)
    python = str(pip_venv / "bin/python")
    args = ["--no-index", "--find-links", str(index / "wheels")]
    with pytest.raises(subprocess.CalledProcessError):  # no spbtool in the build venv: the build fails
        safepip.install(python, req, timeout=300, env=_isolated_pip_env(), extra_args=args)
    assert not tool_mark.exists(), "an unpinned build tool from the index ran"
    build_req = index / safepip.BUILD_REQUIREMENTS
    build_req.write_text(f"spbtool==1.0 --hash=sha256:{_sha(tool)}\n")
    build_req.chmod(0o644)
    try:
        safepip.install(python, req, timeout=300, env=_isolated_pip_env(), extra_args=args)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"pip failed: {exc.output}")
    assert {int(u) for u in tool_mark.read_text().split()} == {safepip.build_identity()[0]}
    subprocess.run([python, "-c", "import spbsrc"], check=True)  # the pinned wheel is in; a start of python
    assert not mark.exists(), f"the extra wheel's .pth ran as uid {mark.read_text()}"
    assert not list((pip_venv / "lib").glob("python3*/site-packages/spbextra*"))
    assert safepip.build_identity()[0] not in (0, pwd.getpwnam("nobody").pw_uid)  # its own, not the shared nobody
    # Where install.sh made no `spb-build` (a Pi updated into this release): an id no account has.
    assert safepip.build_identity("spb-no-such-user") == (safepip.BUILD_UID, safepip.BUILD_UID)
    with pytest.raises(KeyError):
        pwd.getpwuid(safepip.BUILD_UID)

    # The pinned wheel itself carrying a .pth, or a file of another distribution (a pip/__init__.py would run
    # as root in the next pip step): refused before root installs anything of it.
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", "spbsrc"], check=True, capture_output=True)
    for extra in ("spbsrc-init.pth", "pip/__init__.py", "sitecustomize.py"):
        sdist = _hostile_sdist(index, mark, tool="spbtool", own_extra=extra)
        req.write_text(f"spbsrc==1.0 --hash=sha256:{_sha(sdist)}\n")
        with pytest.raises(safepip.HashError, match=rf"spbsrc==1.0's source holds '{re.escape(extra)}'"):
            safepip.install(python, req, timeout=300, env=_isolated_pip_env(), extra_args=args)
    subprocess.run([python, "-c", "pass"], check=True)
    assert not mark.exists(), f"the pinned wheel's .pth ran as uid {mark.read_text()}"
    assert not list((pip_venv / "lib").glob("python3*/site-packages/spbsrc*"))

def test_a_release_whose_requirements_lack_hashes_is_refused(site, caplog):
    (site.work / "requirements.txt").write_text("psutil==7.2.2\n")
    new = site.commit("release 2 with unhashed requirements")
    assert site.apply() == updater.EXIT_FAILED
    assert "not hash-pinned" in caplog.text and "psutil==7.2.2 has no --hash" in caplog.text
    assert site.current == site.sha1
    assert new not in site.releases()
    assert not site.venv_env.exists(), "the venv command ran for an unhashed release"


# -- issue 10: root steps isolated from what the service user can write -----------------------------
UNIT = PROJECT / "systemd" / "solarpowerbrampton.service"


def unit_pre_start_argv(site: Site) -> list[str]:
    """The unit's ExecStartPre line as systemd runs it, with /opt/solarpowerbrampton and /etc mapped into
    the site (and --root, which the unit leaves at its default)."""
    lines = [ln.split("=", 1)[1] for ln in UNIT.read_text().splitlines() if ln.startswith("ExecStartPre=")]
    assert len(lines) == 1
    line = lines[0].lstrip("+-")
    line = line.replace("/etc/solarpowerbrampton/config.toml", str(site.config))
    line = line.replace("/opt/solarpowerbrampton", str(site.root))
    return shlex.split(line) + ["--root", str(site.root)]


def run_unit_pre_start(site: Site, argv: list[str], home: Path) -> subprocess.CompletedProcess:
    # What systemd gives the '+' ExecStartPre: the service's User='s HOME, STATE_DIRECTORY, and the
    # unit's Environment= lines; we add a PYTHONPATH a local user could have set, to be ignored too.
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "STATE_DIRECTORY": str(site.state),
           "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(home / "pypath")}
    return subprocess.run(argv, env=env, cwd=home, capture_output=True, text=True, timeout=60)


def test_pre_start_never_imports_from_the_service_users_home(site):
    """The service user plants a .pth in its user site (its HOME is the state directory), a PYTHONPATH
    module and a ./config.toml: the root pre-start runs none of them and reads the real config."""
    sha2 = site.commit("release 2")
    assert site.apply() == updater.EXIT_UPDATED
    home = site.state  # useradd --home-dir /var/lib/solarpowerbrampton
    mark = site.base / "planted-code-ran"
    user_site = subprocess.run([site.python, "-c", "import site; print(site.getusersitepackages())"],
                               env={"HOME": str(home), "PATH": os.environ["PATH"]}, capture_output=True,
                               text=True, check=True).stdout.strip()
    assert user_site.startswith(str(home))
    Path(user_site).mkdir(parents=True)
    Path(user_site, "evil.pth").write_text(f"import os; open({str(mark)!r}, 'a').write('pth ' + str(os.getuid()))\n")
    (home / "pypath").mkdir()
    (home / "pypath" / "tomllib.py").write_text(f"open({str(mark)!r}, 'a').write('pythonpath')\n")
    (home / "config.toml").write_text("[update]\nenabled = true\nremote = '/x'\nmax_failed_starts = 1\n")

    argv = unit_pre_start_argv(site)
    assert argv[0] == str(site.root / "previous/.venv/bin/python")
    for _ in range(3):
        result = run_unit_pre_start(site, argv, home)
        assert result.returncode == 0, result.stderr
    assert not mark.exists(), f"planted code ran in the root pre-start: {mark.read_text()}"
    # It counted with the real config (max_failed_starts = 3), not ./config.toml (1): still on probation.
    assert site.current == sha2 and site.state_file()["releases"][sha2]["starts"] == 3

    # The attack is real: the same command without -s -E -S runs the planted .pth and module.
    bare = [a for a in argv if a not in ("-s", "-E", "-S")]
    run_unit_pre_start(site, bare, home)
    assert "pth" in mark.read_text() and "pythonpath" in mark.read_text()


def test_root_never_reads_config_toml_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text("[update]\nenabled = true\n")
    monkeypatch.delenv("SOLAR_CONFIG", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    found = updater.find_config()
    assert found is None or found == Path("/etc/solarpowerbrampton/config.toml")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert updater.find_config() == Path("config.toml")  # a user running it by hand still may


def test_root_env_is_isolated_from_the_service_user(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    env = {"HOME": "/var/lib/solarpowerbrampton", "PYTHONPATH": "/var/lib/solarpowerbrampton/x",
           "PYTHONSTARTUP": "/tmp/s.py", "PIP_CONFIG_FILE": "/var/lib/solarpowerbrampton/pip.conf", "PATH": "/bin"}
    updater.isolate_root_env(env)
    assert env["HOME"] == pwd.getpwuid(0).pw_dir
    assert "PYTHONPATH" not in env and "PYTHONSTARTUP" not in env
    assert env["PIP_CONFIG_FILE"] == os.devnull and env["PYTHONNOUSERSITE"] == "1" and env["PATH"] == "/bin"


@pytest.mark.skipif(os.geteuid() != 0, reason="the attack is on a process running as root")
def test_a_planted_lock_file_is_never_chowned_or_chmodded(site, tmp_path):
    """The service user owns the state directory; it links the lock file to a root-owned file. The root
    pre-start must not hand that file to the service user (nor follow a symlink)."""
    nobody = pwd.getpwnam("nobody")
    os.chown(site.state, nobody.pw_uid, nobody.pw_gid)
    victim = tmp_path / "root-secret"
    victim.write_text("secret")
    victim.chmod(0o600)
    os.link(victim, site.state / updater.STATE_LOCK)  # a hard link (same filesystem)
    site.commit("release 2")
    assert site.apply() == updater.EXIT_UPDATED
    assert site.pre_start() == 0
    info = victim.stat()
    assert (info.st_uid, stat_mode(info)) == (0, 0o600), "root chowned/chmodded a planted lock file"
    (site.state / updater.STATE_LOCK).unlink()
    (site.state / updater.STATE_LOCK).symlink_to(victim)
    assert site.pre_start() == 0  # O_NOFOLLOW: refused, logged, the start goes on
    assert (victim.stat().st_uid, stat_mode(victim.stat())) == (0, 0o600)
    # A lock file root creates itself is handed to the directory's owner, so the daemon can lock it.
    (site.state / updater.STATE_LOCK).unlink()
    assert site.pre_start() == 0
    assert (site.state / updater.STATE_LOCK).stat().st_uid == nobody.pw_uid


def stat_mode(info: os.stat_result) -> int:
    return info.st_mode & 0o7777


# -- issue 10: rollback that always brings the logger back ---------------------------------------
def test_a_release_that_breaks_its_own_pre_start_is_still_rolled_back(site, caplog):
    """Release 2 ships an updater.py whose pre-start does nothing (it would never roll itself back).
    The unit runs pre-start from `previous`, the known-good release, which rolls release 2 back."""
    text = (PROJECT / "updater.py").read_text()
    broken = text.replace("def _pre_start(layout: Layout, state_dir: Path, config_path: Path | None, limit: int | None)"
                          " -> None:\n", "def _pre_start(layout: Layout, state_dir: Path, config_path: Path | None, "
                          "limit: int | None) -> None:\n    return\n", 1)
    assert broken != text
    (site.work / "updater.py").write_text(broken)
    sha2 = site.commit("release 2: pre-start disabled, crashes at start")
    assert site.apply() == updater.EXIT_UPDATED
    current_line = [str(site.root / "current/.venv/bin/python"), "-s", "-E", str(site.root / "current/updater.py"),
                    "pre-start", "--config", str(site.config), "--root", str(site.root)]
    for _ in range(5):  # what the old unit (pre-start from `current`) did: never a rollback
        run_unit_pre_start(site, current_line, site.state)
    assert site.current == sha2
    (site.state / updater.STATE_FILE).unlink()

    argv = unit_pre_start_argv(site)
    for _ in range(4):  # 3 failed starts, then the 4th start rolls back
        result = run_unit_pre_start(site, argv, site.state)
        assert result.returncode == 0, result.stderr
    assert site.current == site.sha1
    assert "rolled back from" in result.stderr and sha2 in result.stderr


def test_with_self_update_off_an_invalid_config_never_rolls_back(site):
    sha2 = site.commit("release 2")
    assert site.apply() == updater.EXIT_UPDATED
    site.config.write_text("[update]\nenabled = false\n[sampling]\ninterval_s = -1\n")  # invalid, update off
    for _ in range(6):
        assert site.pre_start() == 0
    assert site.current == sha2 and site.previous == site.sha1
    assert updater.rollback_notice(site.state) is None


def test_a_switch_whose_restart_was_cut_off_is_restarted_by_the_next_run(site):
    site.commit("release 2")
    os.environ["SPB_RESTART_CMD"] = "false"  # the restart fails (or the run was killed before it)
    try:
        assert site.apply() == updater.EXIT_UPDATED
    finally:
        os.environ["SPB_RESTART_CMD"] = shlex.join(["touch", str(site.restarted)])
    assert (site.root / updater.RESTART_PENDING).exists() and not site.restarted.exists()
    assert site.apply() == updater.EXIT_OK  # nothing new to fetch, but the pending restart happens
    assert site.restarted.exists() and not (site.root / updater.RESTART_PENDING).exists()
    site.restarted.unlink()
    assert site.apply() == updater.EXIT_OK
    assert not site.restarted.exists(), "restarted again with nothing pending"


def test_the_updater_waits_for_the_lock_install_sh_holds(site, caplog):
    site.commit("release 2")
    site.root.mkdir(exist_ok=True)
    # What install.sh does: flock on the same file (util-linux flock, as install.sh uses).
    holder = subprocess.Popen(["flock", str(site.root / updater.ROOT_LOCK), "sleep", "30"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["flock", "-n", str(site.root / updater.ROOT_LOCK), "true"]).returncode == 0:
            assert time.monotonic() < deadline, "flock never took the lock"
            time.sleep(0.05)
        assert site.apply() == updater.EXIT_FAILED
        assert "another updater holds" in caplog.text
        assert site.releases() == {site.sha1}
    finally:
        os.killpg(holder.pid, 9)  # flock and its sleep, which holds the lock too
        holder.wait()
    assert site.apply() == updater.EXIT_UPDATED


def _mirror_bytes(site: Site) -> int:
    return sum(p.stat().st_size for p in (site.root / "repo.git" / "objects").rglob("*") if p.is_file())


def test_hostile_pushes_do_not_accumulate_in_the_mirror(site, keys):
    """Rewritten (non-fast-forward) and unsigned pushes, each with 2 MB of random data: refused, and
    the mirror keeps only accepted history."""
    maintainer, trusted = keys["maintainer"], keys["trusted"][0]
    site.write_config(signed=True)
    sha2 = site.commit("release 2, signed", sign=maintainer)
    assert site.apply("--gnupghome", str(trusted)) == updater.EXIT_UPDATED
    baseline = _mirror_bytes(site)
    hostile = []
    for i in range(4):
        (site.work / f"junk{i}.bin").write_bytes(os.urandom(2_000_000))
        # Alternately: an unsigned fast-forward, and a rewrite of history (amend, force-pushed).
        hostile.append(site.commit(f"hostile {i}", amend=bool(i % 2)))
        assert site.apply("--gnupghome", str(trusted)) == updater.EXIT_FAILED
        assert site.current == sha2
        assert _mirror_bytes(site) < baseline + 200_000, f"the mirror grew after hostile push {i}"
        (site.work / f"junk{i}.bin").unlink()
    for sha in hostile:
        assert subprocess.run(["git", "--git-dir", str(site.root / "repo.git"), "cat-file", "-e", sha]).returncode
    # Accepted history is still there: a signed fix applies.
    git("reset", "-q", "--hard", sha2, cwd=site.work)
    sha3 = site.commit("release 3, signed", sign=maintainer)
    assert site.apply("--gnupghome", str(trusted)) == updater.EXIT_UPDATED
    assert site.current == sha3



def test_a_fetch_that_fails_leaves_no_temporary_pack_behind(site):
    """A fetch cut off (its timeout, a SIM link lost mid-pack) leaves git's tmp_pack_* files in the mirror: the
    failed run prunes them, so a remote that keeps failing cannot fill the SD card day after day."""
    sha2 = site.commit("release 2")
    assert site.apply() == updater.EXIT_UPDATED
    pack_dir = site.root / "repo.git" / "objects" / "pack"
    debris = pack_dir / "tmp_pack_Xy12Ab"
    debris.write_bytes(os.urandom(100_000))  # what an interrupted index-pack leaves
    os.utime(debris, (time.time() - 60, time.time() - 60))
    site.remote.rename(site.base / "gone.git")  # the remote cannot be reached: the fetch fails
    assert site.apply() == updater.EXIT_FAILED
    assert site.current == sha2
    assert not debris.exists(), "the failed fetch's temporary pack was left behind"

def test_rollback_notice_until_acknowledged_or_a_day_of_good_running(site, capsys):
    sha2 = site.commit("release 2")
    assert site.apply() == updater.EXIT_UPDATED
    for _ in range(4):
        site.pre_start()
    assert site.current == site.sha1
    notice = updater.rollback_notice(site.state)
    assert notice and "rolled back" in notice
    capsys.readouterr()
    assert site.cli("status") == 0
    assert json.loads(capsys.readouterr().out)["rollback_notice"] == notice
    at = dt.datetime.fromisoformat(json.loads((site.state / updater.MARKER_FILE).read_text())["at"])
    later = at + dt.timedelta(days=1, seconds=1)
    # A day has passed but release 1 has not proven itself since the rollback: the notice stays.
    assert updater.rollback_notice(site.state, now=later) == notice
    assert updater.mark_good(site.state) is True
    assert updater.rollback_notice(site.state, now=at + dt.timedelta(hours=23)) == notice
    assert updater.rollback_notice(site.state, now=later) is None
    # Or a technician acknowledges it.
    assert site.cli("acknowledge") == 0
    assert updater.rollback_notice(site.state) is None
    assert sha2 in site.state_file()["bad"]


def test_hash_script_keeps_every_file_a_pi_or_a_pc_could_install():
    sys.path.insert(0, str(PROJECT / "scripts"))
    try:
        import hash_requirements as h
    finally:
        sys.path.remove(str(PROJECT / "scripts"))
    fits = h.wheel_platforms
    assert fits("psutil-7.2.2-cp36-abi3-manylinux2014_aarch64.manylinux_2_17_aarch64.manylinux_2_28_aarch64.whl") == {
        "cp311-aarch64", "cp312-aarch64", "cp313-aarch64"}
    assert fits("x-1.0-py3-none-any.whl") == {f"{py}-{m}" for py in h.PYTHONS for m in h.MACHINES}
    assert fits("greenlet-3.5.6-cp311-cp311-linux_armv7l.whl") == {"cp311-armv7l"}  # piwheels-style tag
    assert fits("psutil-7.2.2-cp313-cp313t-manylinux2014_aarch64.whl") == set()  # free-threaded: never picked
    assert fits("psutil-7.2.2-cp37-abi3-win_amd64.whl") == set()
    assert fits("psutil-7.2.2-cp36-abi3-macosx_11_0_arm64.whl") == set()
    assert fits("x-1.0-cp310-cp310-manylinux_2_17_x86_64.whl") == set()
