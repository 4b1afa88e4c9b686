"""Building a candidate release in isolation: git, a fresh venv and the self-test, in child processes.

Every step runs with a deadline (its whole process group killed after it), without the InfluxDB
secrets in its environment, and the new code runs only as the service user, against a safe copy of
the live config. updater.py decides what to build and when to switch; this module only builds and
tests. Only the standard library, `credentials` (the secret names), `release`, `clock` and `safepip` are
imported.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import logging
import math
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safepip
from credentials import SECRET_ENV_NAMES
from release import short_sha

log = logging.getLogger(__name__)

SERVICE_USER = "solarpower"
GIT_TIMEOUT_S = 120.0
SELFTEST_TIMEOUT_S = 300.0
_AUTO = "auto"


class StepFailed(Exception):
    """An update step failed; the message says which and why."""


# -- child processes ------------------------------------------------------------------------------
def child_env(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for git, pip and the self-test: without any secret (SECRET_ENV_NAMES, INFLUXDB_*)."""
    env = dict(os.environ if base is None else base)
    for name in list(env):
        if name in SECRET_ENV_NAMES or name.startswith("INFLUXDB_"):
            del env[name]
    env.update(extra or {})
    return env


def git_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = child_env()
    for name in list(env):
        # GIT_DIR, GIT_CONFIG_* etc. from the caller must not redirect what we fetch or check out.
        if name.startswith("GIT_"):
            del env[name]
    # No system/global config (url rewrites, hooks, helpers) and never a credential prompt.
    env.update({"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0",
                "LC_ALL": "C"})
    env.update(extra or {})
    return env


def run_child(cmd: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None, cwd: Path | None = None,
         user: pwd.struct_passwd | None = None) -> subprocess.CompletedProcess:
    """Run `cmd`, capturing stdout+stderr; on timeout kill its whole process group (returncode -9)."""
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(env) if env is not None else child_env(), cwd=cwd, text=True,
                            errors="replace", start_new_session=True, **kwargs)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            # Still alive: killing another user's process needs CAP_KILL. Do not hang with it.
            log.error("could not kill %s (pid %d) after its timeout", shlex.join(proc.args), proc.pid)
            out = ""
        return subprocess.CompletedProcess(proc.args, -signal.SIGKILL, f"{out}\n(timed out after {timeout:g} s)")
    except BaseException:  # SIGTERM/Ctrl-C: no orphan may go on writing into a release being removed
        kill_group(proc)
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def kill_group(proc: subprocess.Popen) -> None:
    # pip and the daemon start children of their own: kill the group, not just the leader.
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()


def tail(output: str, lines: int = 15) -> str:
    kept = [line[:300] for line in (output or "").strip().splitlines()[-lines:]]
    return " | ".join(kept) if kept else "(no output)"


def redact(url: str) -> str:
    return re.sub(r"//[^/@\s]*@", "//***@", url)


class Git:
    """git against repo.git, with hooks off and no outside config."""

    def __init__(self, layout) -> None:
        """`layout`: updater.Layout (its repo.git is what git runs against)."""
        self.layout = layout

    def run(self, *args: str, timeout: float = GIT_TIMEOUT_S, env: Mapping[str, str] | None = None,
            git_dir: bool = True) -> subprocess.CompletedProcess:
        cmd = ["git", "-c", "core.hooksPath=/dev/null", "-c", "protocol.ext.allow=never"]
        if git_dir:
            cmd += ["--git-dir", str(self.layout.repo)]
        return run_child(cmd + list(args), timeout=timeout, env=git_env(env))

    def check(self, what: str, *args: str, **kwargs: Any) -> str:
        result = self.run(*args, **kwargs)
        if result.returncode != 0:
            raise StepFailed(f"{what} failed (git exit {result.returncode}): {tail(result.stdout)}")
        return result.stdout.strip()

    def has_commit(self, sha: str) -> bool:
        return self.run("cat-file", "-e", f"{sha}^{{commit}}").returncode == 0


# -- the self-test config -------------------------------------------------------------------------
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _toml_str(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes; DEL is the one control
    # character TOML wants escaped that json leaves alone.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def toml_dumps(data: Mapping[str, Any]) -> str:
    """A TOML document for what tomllib parsed (the stdlib reads TOML but cannot write it)."""
    def is_table_array(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(i, dict) for i in v)

    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items()
             if not isinstance(v, dict) and not is_table_array(v)]
    for key, value in data.items():
        if isinstance(value, dict):
            lines += ["", f"[{_toml_key(key)}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
    for key, value in data.items():
        if is_table_array(value):
            for item in value:
                lines += ["", f"[[{_toml_key(key)}]]"]
                lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def selftest_config(live: Mapping[str, Any], store_dir: Path) -> dict[str, Any]:
    """The live config, made safe to run anywhere: simulated bus, temp store, no InfluxDB, no MQTT, no live
    page, no LED."""
    data = copy.deepcopy(dict(live))

    def table(name: str) -> dict[str, Any]:
        if not isinstance(data.get(name), dict):
            data[name] = {}
        return data[name]

    table("simulation")["enabled"] = True
    table("store")["dir"] = str(store_dir)
    # Only kind: the token/password file settings must not even be looked at.
    data["influx"] = {"kind": "none"}
    # The live daemon's broker login (its client id would push the daemon off) and its page's port stay its own.
    data["mqtt"] = {"enabled": False}
    table("web")["enabled"] = False
    table("led")["enabled"] = False
    sampling = table("sampling")
    sampling["interval_s"] = 0.5
    sampling["window_s"] = 0.1
    samples = sampling.get("samples")
    if isinstance(samples, int) and not isinstance(samples, bool) and samples > 10:
        sampling["samples"] = 10
    if "update" in data:
        table("update")["enabled"] = False
    # "auto"/"sync" wait for NTP on a Pi: the self-test must not hang on the clock.
    table("clock")["trust"] = "always"
    return data


# -- venv and self-test ------------------------------------------------------------------------
def make_venv(release: Path, timeout: float) -> None:
    """python3 -m venv + the hash-checked install of requirements.txt (safepip). Raises StepFailed.

    --system-site-packages: Raspberry Pi OS's python3-lgpio (the LED) and, on 32-bit Pis,
    python3-psutil / python3-sysv-ipc come from Debian. Every root step runs this venv's python
    with -I or -s, so the service user's site directory is never imported as root.
    """
    venv = release / ".venv"
    result = run_child(["python3", "-I", "-m", "venv", "--system-site-packages", str(venv)], timeout=timeout,
                  env=child_env(), cwd=release)
    if result.returncode != 0:
        raise StepFailed(f"python3 -m venv failed (exit {result.returncode}): {tail(result.stdout)}")
    try:
        safepip.install(str(venv / "bin" / "python"), release / "requirements.txt", timeout=timeout,
                        env=child_env())
    except safepip.HashError as exc:
        raise StepFailed(f"refusing the release: {exc}") from None
    except subprocess.CalledProcessError as exc:
        raise StepFailed(f"pip failed (exit {exc.returncode}): {exc.output}") from None
    except (OSError, KeyError, subprocess.TimeoutExpired) as exc:
        raise StepFailed(f"installing the requirements failed: {exc}") from None
    # install.sh's markers: a later install.sh run then knows this venv is complete.
    shutil.copyfile(release / "requirements.txt", venv / ".spb-installed-requirements.txt")
    (venv / ".spb-venv-complete").touch()


def can_switch_user() -> bool:
    # Under a sandbox without CAP_SETUID/CAP_SETGID (CapabilityBoundingSet=) the switch fails.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
                return bool(caps & (1 << 6)) and bool(caps & (1 << 7))
    except (OSError, ValueError, IndexError):
        pass
    return True


def selftest_user(run_as: str | None) -> pwd.struct_passwd | None:
    """Who runs the new code in the self-test: the service user when we are root and can switch."""
    if run_as == "":
        return None
    auto = run_as is None or run_as == _AUTO
    name = SERVICE_USER if auto else run_as
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        if auto:
            return None
        raise StepFailed(f"--run-as {name}: no such user") from None
    if user.pw_uid == os.geteuid():
        return None
    if os.geteuid() != 0 or not can_switch_user():
        if auto:
            log.warning("cannot switch to user %s for the self-test (not root, or no CAP_SETUID/CAP_SETGID): "
                        "it runs as uid %d", name, os.geteuid())
            return None
        raise StepFailed(f"cannot switch to user {name} for the self-test (not root, or no CAP_SETUID/CAP_SETGID)")
    return user


def self_test(release: Path, live_config: Path | None, *, timeout: float = SELFTEST_TIMEOUT_S,
              run_as: str | None = None) -> None:
    """Run the new release with its own python against a safe copy of the live config. Raises StepFailed."""
    python = release / ".venv" / "bin" / "python"
    if not os.access(python, os.X_OK):
        raise StepFailed(f"self-test: {python} is missing after the venv command")
    for name in ("main.py", "updater.py"):
        if not (release / name).is_file():
            # Without its updater.py a release could never be rolled back or updated again.
            raise StepFailed(f"self-test: the new release has no {name}")
    user = selftest_user(run_as)
    live = tomllib.loads(live_config.read_text(encoding="utf-8")) if live_config else {}
    tmp = Path(tempfile.mkdtemp(prefix="spb-selftest-"))
    try:
        store, state, home = tmp / "store", tmp / "state", tmp / "home"
        for d in (store, state, home):
            d.mkdir()
        data = selftest_config(live, store)
        text = toml_dumps(data)
        if tomllib.loads(text) != data:  # never test against a config other than the one meant
            raise StepFailed("self-test: the temporary config did not round-trip through TOML")
        cfg = tmp / "config.toml"
        cfg.write_text(text, encoding="utf-8")
        cfg.chmod(0o600)  # the daemon refuses a config others can read, as it may name secret files
        if user is not None:
            for path in (tmp, store, state, home, cfg):
                os.chown(path, user.pw_uid, user.pw_gid)
        env = child_env({"HOME": str(home), "STATE_DIRECTORY": str(state), "TMPDIR": str(tmp)})
        for name in ("SOLAR_CONFIG", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONINSPECT", "NOTIFY_SOCKET",
                     "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            env.pop(name, None)  # nothing may point the new code at the live service's files or sockets
        # Precompiled as root because the service's code tree is read-only (PYTHONDONTWRITEBYTECODE).
        # -I -S: compileall from the stdlib, never a compileall.py planted in the release, and no
        # site-packages .pth code: compiling does not run anything of the new release.
        steps: list[tuple[str, list[str], pwd.struct_passwd | None]] = [
            ("compile", [str(python), "-I", "-S", "-m", "compileall", "-q", "-x", r"[/\\]\.venv[/\\]",
                         str(release)], None),
            ("updater", [str(python), str(release / "updater.py"), "--help"], user),
        ]
        if live_config is not None:
            # The new code must accept the live config as it is: the copy above replaces [influx] and
            # [store], so a release that rejects them would pass, then exit 78 at every start, which
            # systemd does not retry (RestartPreventExitStatus=78) and the rollback would never see.
            check = ("import pathlib, sys; sys.path.insert(0, sys.argv[2]); import config; "
                     "config.load_config(pathlib.Path(sys.argv[1]))")
            steps.append(("live config", [str(python), "-c", check, str(live_config), str(release)], user))
        steps += [
            ("check", [str(python), str(release / "main.py"), "check", "--simulate", "--config", str(cfg)], user),
            ("run", [str(python), str(release / "main.py"), "run", "--simulate", "--cycles", "2",
                     "--config", str(cfg)], user),
        ]
        for name, cmd, who in steps:
            began = time.monotonic()
            result = run_child(cmd, timeout=timeout, env=env, cwd=tmp, user=who)
            if result.returncode != 0:
                raise StepFailed(f"self-test `{name}` failed (exit {result.returncode}): {tail(result.stdout)}")
            log.info("self-test %s passed (%.1f s)", name, time.monotonic() - began)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_gnupghome(source: Path) -> Path:
    """A private copy of the trusted keyring: gpg writes into its home (locks, trustdb), and
    the real one may be read-only (ProtectSystem=strict) and must not change."""
    if not source.is_dir():
        raise StepFailed(f"require_signed is on but the updater's keyring {source} does not exist "
                         "(import the maintainers' public keys there, or pass --gnupghome)")
    home = Path(tempfile.mkdtemp(prefix="spb-gnupg-"))
    for item in source.iterdir():
        # Public keyrings and trust only: no private keys, sockets or stale lock files.
        if item.is_file() and not item.name.endswith(".lock") and not item.name.startswith("S."):
            shutil.copy2(item, home / item.name)
    return home


def verify_signature(git: Git, sha: str, gnupghome: Path) -> None:
    home = prepare_gnupghome(gnupghome)
    try:
        result = git.run("-c", "gpg.program=gpg", "verify-commit", "--verbose", sha, env={"GNUPGHOME": str(home)})
        # --verbose also prints the commit itself: only gpg's lines say why.
        said = [ln for ln in result.stdout.splitlines() if ln.startswith("gpg:")]
        signer = [ln for ln in said if "Good signature" in ln]
        if result.returncode != 0:
            raise StepFailed(f"{sha} has no good signature from a key in {gnupghome}: "
                             f"{tail(chr(10).join(said), 4) if said else 'the commit is not signed'}")
        log.info("signature of %s: %s", short_sha(sha), signer[0].strip() if signer else "good")
    finally:
        if shutil.which("gpgconf"):
            run_child(["gpgconf", "--kill", "all"], timeout=10, env=child_env({"GNUPGHOME": str(home)}))
        shutil.rmtree(home, ignore_errors=True)
