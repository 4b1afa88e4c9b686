"""Safe self-update of SolarPowerBrampton from a git remote, with automatic rollback.

Commands (systemd runs them as root; see ``python updater.py --help``):

  apply        fetch [update] branch from [update] remote; if it is a fast-forward of the current
               release (and signed, when require_signed), build releases/<sha> with a fresh venv,
               self-test it with its own python, then switch `current` to it and restart the service
  pre-start    before every daemon start (the unit runs it from `previous`, the known-good release):
               count the start; roll back a freshly updated release that failed to reach
               mark_good() max_failed_starts times in a row
  post-stop    after every stop (ExecStopPost, from `previous`): a clean stop does not count as a failed
               start; a release on probation that exited 78 is rolled back at once
  mark-good    what the daemon does once the release has proven itself (service.GOOD_AFTER_CYCLES stored
               cycles and a delivery attempt, or GOOD_AFTER_S of running; the daemon calls mark_good())
  status       the releases and the state as JSON
  acknowledge  clear the rollback notice

Exit codes: 0 nothing to do / done, 1 the update was refused or failed (the current release is untouched),
2 bad usage, 10 updated (the new release is current; the service was asked to restart), 78 the config is
invalid. `pre-start` and `post-stop` always exit 0: a failing one would keep the logger from starting.

Only the standard library and modules that need nothing else (`config`, `clock`, `credentials`, `release`:
the release state this process shares with the daemon, `release_build`: building and self-testing a
release, `safepip`) are imported, so rollback works even when the release's venv is broken.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import config as config_mod
import safepip
from clock import now_iso
from config import ConfigError, UpdateConfig
from release_build import (SELFTEST_TIMEOUT_S, SERVICE_USER, Git, StepFailed, child_env,  # noqa: F401 - re-exported
                           make_venv, redact, run_child, self_test, tail, toml_dumps, verify_signature)
from release import (DEFAULT_STATE_DIR, MARKER_FILE, SHA, STATE_FILE, STATE_LOCK, acknowledge,  # noqa: F401 - re-exported
                     default_state_dir, flock, fsync_dir, load_state, locked_state, mark_good, rollback_notice,
                     short_sha, should_roll_back, write_json)

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/opt/solarpowerbrampton")
DEFAULT_GNUPGHOME = Path("/etc/solarpowerbrampton/gnupg")
SERVICE = "solarpowerbrampton.service"
ROOT_LOCK = ".updater.lock"  # install.sh takes the same lock (flock) while it builds or switches a release
RESTART_PENDING = ".restart-pending"  # shared with install.sh: a switch whose restart has not happened yet
# Root's own record of the releases rolled back (an empty file per sha): the state file's `bad` list is in the
# service user's directory, and a logger it controls could write a security fix's sha there to veto it.
ROLLED_BACK_DIR = ".rolled-back"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UPDATED, EXIT_CONFIG = 0, 1, 2, 10, 78

ENV_VENV_CMD = "SPB_VENV_CMD"
ENV_RESTART_CMD = "SPB_RESTART_CMD"
ENV_START_CMD = "SPB_START_CMD"  # post-stop's start of the service after a rollback (tests: a stand-in)

FETCH_TIMEOUT_S = 600.0
INSTALL_TIMEOUT_S = 3600.0  # a Pi Zero may build wheels
RESTART_TIMEOUT_S = 120.0

_BRANCH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$")


class Busy(Exception):
    """Another updater holds the lock."""


# -- layout ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """The deployment tree shared with the installer."""

    root: Path
    releases = property(lambda self: self.root / "releases")
    current = property(lambda self: self.root / "current")  # -> releases/<sha>
    previous = property(lambda self: self.root / "previous")  # the release `current` was updated from
    repo = property(lambda self: self.root / "repo.git")
    lock = property(lambda self: self.root / ROOT_LOCK)


def find_config(env: Mapping[str, str] | None = None) -> Path | None:
    """The config when none was given: as root only $SOLAR_CONFIG or /etc/solarpowerbrampton/config.toml,
    never ./config.toml (the service's working directory belongs to its user)."""
    env = os.environ if env is None else env
    if os.geteuid() != 0:
        return config_mod.find_config(None, env)
    if env.get(config_mod.ENV_CONFIG):
        return Path(env[config_mod.ENV_CONFIG])
    return config_mod.SYSTEM_CONFIG_PATH if config_mod.SYSTEM_CONFIG_PATH.is_file() else None


def isolate_root_env(env: dict[str, str] | None = None) -> None:
    """As root, drop what the service user could have set up for us: HOME (its state directory
    under systemd: ~/.local site packages, ~/.gitconfig, pip.conf) and PYTHON* variables. Our
    children (git, pip, python) then see root's home and no user site."""
    env = os.environ if env is None else env
    if os.geteuid() != 0:
        return
    for name in list(env):
        if name.startswith("PYTHON") or name in ("PIP_CONFIG_FILE", "XDG_CONFIG_HOME", "GIT_DIR", "GIT_WORK_TREE"):
            del env[name]
    env["HOME"] = pwd.getpwuid(0).pw_dir or "/root"
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf from a directory another user owns


def release_sha(layout: Layout, link: Path) -> str | None:
    """The sha a `current`/`previous` link points at, or None if it is missing or not a release."""
    try:
        target = os.readlink(link)
    except OSError:
        return None
    sha = Path(target).name
    if not SHA.match(sha) or not (layout.releases / sha).is_dir():
        return None
    return sha


def _swap_link(link: Path, target: str) -> None:
    # A rename over the old link is atomic: a reader (systemd starting the service) sees the
    # old or the new release, never no link.
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


# -- locks ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _root_lock(layout: Layout, wait_s: float = 0.0) -> Iterator[None]:
    """Serialise everything that touches releases/ and the links. Raises Busy."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with flock(layout.lock, wait_s) as held:
        if not held:
            raise Busy(f"another updater holds {layout.lock}")
        yield


# -- apply ----------------------------------------------------------------------------------------
def _venv_cmd(venv_cmd: str | None) -> str | None:
    """The shell command making the venv, or None for the default (`make_venv`)."""
    if venv_cmd is not None:
        return venv_cmd
    return os.environ.get(ENV_VENV_CMD) or None


def _restart_cmd(restart_cmd: Sequence[str] | str | None) -> list[str]:
    if restart_cmd is None:
        restart_cmd = os.environ.get(ENV_RESTART_CMD)
    if restart_cmd is None:
        systemctl = shutil.which("systemctl")
        return restart_command(systemctl) if systemctl and os.path.isdir("/run/systemd/system") else []
    if isinstance(restart_cmd, str):
        return shlex.split(restart_cmd)
    return list(restart_cmd)


def restart_command(systemctl: str) -> list[str]:
    """Restart the service onto the new release: a running one (try-restart; --no-block: its start must not wait
    on this process) and a failed one (a crash loop, an exit 78: the fix must start, not wait for a reboot); one
    stopped on purpose stays stopped. A failed try-restart fails the command (the restart stays pending)."""
    q = shlex.quote
    return ["sh", "-c", f"{q(systemctl)} --no-block try-restart {SERVICE} || exit; if {q(systemctl)} is-failed --quiet "
                        f"{SERVICE}; then {q(systemctl)} reset-failed {SERVICE}; {q(systemctl)} --no-block start "
                        f"{SERVICE}; fi"]


def _remote_url(layout: Layout, update: UpdateConfig, current: str) -> str:
    remote = update.remote
    if not remote:
        # [update] enabled requires a remote, but an installer-made checkout knows its origin.
        release = layout.releases / current
        result = Git(layout).run("-C", str(release), "config", "--get", "remote.origin.url", git_dir=False)
        remote = result.stdout.strip() if result.returncode == 0 else ""
    if not remote:
        raise StepFailed("no [update] remote configured and the current release has no origin")
    if remote.startswith("-"):
        raise StepFailed(f"[update] remote {remote!r} looks like an option")
    return remote


def _ensure_repo(layout: Layout, git: Git, remote: str) -> None:
    if (layout.repo / "HEAD").is_file():
        return
    log.info("creating the mirror %s for %s", layout.repo, redact(remote))
    # --template=: no sample hooks (hooks are off anyway).
    git.check("git init", "init", "--quiet", "--bare", "--template=", str(layout.repo), git_dir=False)
    git.check("git config", "config", "remote.origin.url", remote)


def _build_release(layout: Layout, git: Git, new: str, live_config: Path | None, *, venv_cmd: str | None,
                   install_timeout: float, selftest_timeout: float, run_as: str | None) -> Path:
    dest = layout.releases / new
    dest.mkdir(parents=True)
    index_dir = Path(tempfile.mkdtemp(prefix="spb-index-"))
    try:
        # A private index: repo.git's own HEAD and index stay untouched; read-tree refuses
        # paths git considers unsafe (.., .git).
        git.check("checkout", "--work-tree", str(dest), "read-tree", "--reset", "-u", new,
                  env={"GIT_INDEX_FILE": str(index_dir / "index")})
    finally:
        shutil.rmtree(index_dir, ignore_errors=True)
    # Before anything is installed: pip must check every file against a hash the signed commit names.
    try:
        safepip.allowed_hashes(dest / "requirements.txt")
    except (safepip.HashError, OSError, ValueError) as exc:
        raise StepFailed(f"refusing {short_sha(new)}: its requirements are not hash-pinned: {exc}") from None
    log.info("checked out %s; creating its venv", short_sha(new))
    began = time.monotonic()
    if venv_cmd is None:
        make_venv(dest, install_timeout)
    else:
        result = run_child(["sh", "-c", venv_cmd, "sh", str(dest)], timeout=install_timeout, cwd=dest,
                      env=child_env({"SPB_RELEASE_DIR": str(dest)}))
        if result.returncode != 0:
            raise StepFailed(f"the venv command failed (exit {result.returncode}): {tail(result.stdout)}")
    log.info("venv ready (%.0f s); self-testing %s", time.monotonic() - began, short_sha(new))
    self_test(dest, live_config, timeout=selftest_timeout, run_as=run_as)
    return dest


def _remove_release(layout: Layout, sha: str) -> None:
    # Never remove what a link points at, whatever the caller thinks.
    if sha in (release_sha(layout, layout.current), release_sha(layout, layout.previous)):
        return
    shutil.rmtree(layout.releases / sha, ignore_errors=True)


def _prune(layout: Layout, keep: set[str]) -> None:
    """Remove releases that are neither current nor previous (an SD card is small)."""
    try:
        entries = list(layout.releases.iterdir())
    except OSError:
        return
    for entry in entries:
        if SHA.match(entry.name) and entry.name not in keep and entry.is_dir() and not entry.is_symlink():
            log.info("removing the old release %s", short_sha(entry.name))
            _remove_release(layout, entry.name)


def _rollback_target(layout: Layout, state_dir: Path, old: str) -> str:
    """What `previous` should be after updating from `old`: `old`, unless `old` never proved
    itself (no mark_good yet) and the existing `previous` did - then that stays the way back."""
    previous = release_sha(layout, layout.previous)
    if previous is None or previous == old or not state_dir.is_dir():
        return old
    releases = load_state(state_dir)["releases"]
    if releases.get(old, {}).get("good") or not releases.get(previous, {}).get("good"):
        return old
    log.warning("the current release %s never reached a stored cycle: keeping previous -> %s (proven good)",
                short_sha(old), short_sha(previous))
    return previous


def _apply_locked(layout: Layout, state_dir: Path, update: UpdateConfig, live_config: Path | None, *,
                  gnupghome: Path, venv_cmd: str | None, install_timeout: float, selftest_timeout: float,
                  run_as: str | None) -> tuple[str, str] | None:
    old = release_sha(layout, layout.current)
    if old is None:
        raise StepFailed(f"{layout.current} is not a link to {layout.releases}/<sha>: nothing to update from")
    if not _BRANCH.match(update.branch) or ".." in update.branch:
        raise StepFailed(f"[update] branch {update.branch!r} is not a branch name")
    git = Git(layout)
    remote = _remote_url(layout, update, old)
    _ensure_repo(layout, git, remote)
    ref = f"refs/updater/{update.branch}"
    log.info("fetching %s from %s", update.branch, redact(remote))
    fetched = False
    try:
        # fsckObjects: refuse malformed objects (e.g. tree entries like '..') before anything uses them.
        # In the try: a fetch cut off (its timeout, a lost link) leaves tmp_pack_* files the prune removes.
        git.check("git fetch", "-c", "fetch.fsckObjects=true", "fetch", "--quiet", "--no-tags",
                  "--no-recurse-submodules", "--", remote, f"+refs/heads/{update.branch}:{ref}",
                  timeout=FETCH_TIMEOUT_S)
        fetched = True
        return _apply_fetched(layout, git, state_dir, update, live_config, remote, ref, old, gnupghome=gnupghome,
                              venv_cmd=venv_cmd, install_timeout=install_timeout,
                              selftest_timeout=selftest_timeout, run_as=run_as)
    finally:
        # Whatever was fetched and not accepted (unsigned, rewritten, rolled back, failed) goes:
        # repeated hostile pushes must not fill the SD card that also holds the store.
        current = release_sha(layout, layout.current)
        if not fetched or current != _ref_sha(git, ref):
            _discard_fetch(git, ref, current)


def _ref_sha(git: Git, ref: str) -> str | None:
    result = git.run("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    return result.stdout.strip() if result.returncode == 0 else None


def _discard_fetch(git: Git, ref: str, accepted: str | None) -> None:
    """Point `ref` back at the accepted commit and drop every object no ref reaches (the mirror
    keeps only accepted history)."""
    if accepted and git.has_commit(accepted):
        git.run("update-ref", ref, accepted)
    else:
        git.run("update-ref", "-d", ref)
    git.run("reflog", "expire", "--expire=now", "--all")
    result = git.run("-c", "gc.auto=0", "gc", "--prune=now", "--quiet", timeout=FETCH_TIMEOUT_S)
    if result.returncode != 0:
        log.warning("could not prune the mirror %s: %s", git.layout.repo, tail(result.stdout))


def _apply_fetched(layout: Layout, git: Git, state_dir: Path, update: UpdateConfig, live_config: Path | None,
                   remote: str, ref: str, old: str, *, gnupghome: Path, venv_cmd: str | None,
                   install_timeout: float, selftest_timeout: float, run_as: str | None) -> tuple[str, str] | None:
    new = git.check("git rev-parse", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if not SHA.match(new):
        raise StepFailed(f"unexpected revision {new!r} for {update.branch}")
    if new == old:
        log.info("up to date at %s", short_sha(old))
        return None
    if (_rolled_back_dir(layout, state_dir) / new).is_file():
        log.warning("%s %s is %s, which was rolled back: not applying it again (push a fix)",
                    redact(remote), update.branch, short_sha(new))
        return None
    if not git.has_commit(old):
        # A repo.git made after the install may lack the installed commit: take it from the checkout.
        installed = layout.releases / old
        if (installed / ".git").exists():
            git.run("fetch", "--quiet", "--no-tags", "--", str(installed), "+HEAD:refs/updater/installed")
        if not git.has_commit(old):
            raise StepFailed(f"the current release {old} is not in the history of {redact(remote)} {update.branch}")
    is_ff = git.run("merge-base", "--is-ancestor", old, new)
    if is_ff.returncode == 1:
        raise StepFailed(f"{short_sha(new)} is not a fast-forward of the current {short_sha(old)} "
                         "(rewritten history?): refusing")
    if is_ff.returncode != 0:
        raise StepFailed(f"git merge-base failed: {tail(is_ff.stdout)}")
    if update.require_signed:
        verify_signature(git, new, gnupghome)
    else:
        log.warning("[update] require_signed = false: %s is not signature-checked", short_sha(new))
    dest = layout.releases / new
    if dest.exists() or dest.is_symlink():
        if new == release_sha(layout, layout.previous):
            raise StepFailed(f"{short_sha(new)} is the `previous` release; refusing to rebuild it")
        log.warning("removing a leftover %s (an interrupted update?)", dest)
        _remove_release(layout, new)
    try:
        _build_release(layout, git, new, live_config, venv_cmd=venv_cmd, install_timeout=install_timeout,
                       selftest_timeout=selftest_timeout, run_as=run_as)
    except BaseException:
        _remove_release(layout, new)
        raise
    fallback = _rollback_target(layout, state_dir, old)
    _swap_link(layout.previous, f"releases/{fallback}")
    # Marked before the switch, removed after the restart: a run cut off in between (power cut,
    # SIGKILL) leaves it, and the next run restarts the service (as install.sh does).
    _mark_restart_pending(layout)
    _swap_link(layout.current, f"releases/{new}")
    log.info("updated %s -> %s", old, new)
    keep = {old, new, fallback}  # `old` too: the running daemon still imports from it until restarted
    try:
        if state_dir.is_dir():
            with locked_state(state_dir) as state:
                state["releases"][new] = {"starts": 0, "good": False, "installed_at": now_iso(zulu=False), "installed_from": old}
                for sha in list(state["releases"]):
                    if sha not in keep:
                        del state["releases"][sha]
            # A newer release supersedes an earlier rollback's notice.
            with contextlib.suppress(FileNotFoundError):
                (state_dir / MARKER_FILE).unlink()
    except OSError as exc:
        log.warning("cannot record the update in %s: %s", state_dir, exc)
    _prune(layout, keep)
    with contextlib.suppress(Exception):
        git.run("worktree", "prune")  # in case the installer made releases as worktrees
    return old, new


def apply(root: Path | str = DEFAULT_ROOT, state_dir: Path | str | None = None, config_path: Path | str | None = None,
          *, gnupghome: Path | str | None = None, venv_cmd: str | None = None,
          restart_cmd: Sequence[str] | str | None = None, run_as: str | None = None,
          install_timeout: float = INSTALL_TIMEOUT_S, selftest_timeout: float = SELFTEST_TIMEOUT_S) -> int:
    """Fetch, verify, build, self-test and switch to a new release. Returns the exit code.

    venv_cmd: shell command making DIR/.venv (`$1` = DIR); default $SPB_VENV_CMD, else pip.
    restart_cmd: argv or shell-like string run after a switch ("" / [] = none); default
    $SPB_RESTART_CMD, else restart_command() under systemd (a running or a failed service).
    run_as: user for the new code in the self-test ("" = as we are; default: solarpower if root).
    """
    # Absolute: the venv command and the self-test run in other working directories.
    layout = Layout(Path(root).absolute())
    state_dir = (Path(state_dir) if state_dir is not None else default_state_dir()).absolute()
    path = Path(config_path) if config_path is not None else find_config()
    try:
        cfg = config_mod.load_config(path)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            log.error("%s", line)
        return EXIT_CONFIG
    if not cfg.update.enabled:
        log.info("self-update is off ([update] enabled = false in %s)", cfg.source)
        return EXIT_OK
    home = (Path(gnupghome) if gnupghome else Path(os.environ.get("GNUPGHOME") or DEFAULT_GNUPGHOME)).absolute()
    if (layout.root / RESTART_PENDING).exists():
        # An earlier switch (ours or install.sh's) whose restart was cut off: the service may still
        # run the old code. Restart it now, before anything else.
        log.warning("the last switch to %s was not followed by a restart: restarting %s now",
                    short_sha(release_sha(layout, layout.current)), SERVICE)
        _restart(_restart_cmd(restart_cmd), layout)
    try:
        with _root_lock(layout):
            switched = _apply_locked(layout, state_dir, cfg.update, path, gnupghome=home,
                                     venv_cmd=_venv_cmd(venv_cmd), install_timeout=install_timeout,
                                     selftest_timeout=selftest_timeout, run_as=run_as)
    except Busy as exc:
        log.warning("not updating: %s", exc)
        return EXIT_FAILED
    except StepFailed as exc:
        log.error("update refused, staying on the current release: %s", exc)
        return EXIT_FAILED
    except Exception:
        log.exception("update failed, staying on the current release")
        return EXIT_FAILED
    if switched is None:
        return EXIT_OK
    old, new = switched
    print(f"updated {old} -> {new}", flush=True)
    _restart(_restart_cmd(restart_cmd), layout)
    return EXIT_UPDATED


def _mark_restart_pending(layout: Layout) -> None:
    fd = os.open(layout.root / RESTART_PENDING, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    os.close(fd)
    fsync_dir(layout.root)


def _restart(cmd: list[str], layout: Layout | None = None) -> bool:
    """Run the restart command; on success clear layout's restart-pending mark. True if it ran and succeeded."""
    # After the lock is released: the restart runs pre-start, which takes the same lock.
    if not cmd:
        log.info("no restart command: the new release runs from the next start of %s", SERVICE)
        return False
    try:
        result = run_child(cmd, timeout=RESTART_TIMEOUT_S)
    except OSError as exc:
        log.warning("cannot run the restart command %s: %s", shlex.join(cmd), exc)
        return False
    if result.returncode != 0:
        log.warning("the restart command %s failed (exit %d): %s; the new release runs from the next start",
                    shlex.join(cmd), result.returncode, tail(result.stdout))
        return False
    if layout is not None:
        with contextlib.suppress(FileNotFoundError):
            (layout.root / RESTART_PENDING).unlink()
    return True


# -- pre-start, mark_good, the rollback notice -----------------------------------------------------
def _max_failed_starts(config_path: Path | None) -> int | None:
    """The rollback limit, or None when self-update is off (then nothing is counted or rolled back:
    releases switched by hand, e.g. with install.sh, are the user's choice)."""
    try:
        update = config_mod.load_config(config_path).update
    except ConfigError as exc:
        # The daemon will report the config itself. A rollback decision must still be possible, but
        # only when the file plainly asks for self-update: otherwise nothing is ever rolled back.
        try:
            raw = tomllib.loads(Path(config_path).read_text(encoding="utf-8")) if config_path else {}
        except (OSError, ValueError):
            raw = {}
        section = raw.get("update") if isinstance(raw, dict) else None
        if not (isinstance(section, dict) and section.get("enabled") is True):
            log.warning("config invalid (%s) and it does not say [update] enabled = true: no rollback", exc.source)
            return None
        log.warning("config invalid (%s); using max_failed_starts = %d", exc.source, UpdateConfig.max_failed_starts)
        return UpdateConfig.max_failed_starts
    return update.max_failed_starts if update.enabled else None


def pre_start(root: Path | str = DEFAULT_ROOT, state_dir: Path | str | None = None,
              config_path: Path | str | None = None, *, max_failed_starts: int | None = None) -> int:
    """Count a start of the current release; roll back after max_failed_starts unconfirmed starts.

    Always returns 0: systemd would not start the daemon at all after a failing ExecStartPre.
    """
    try:
        _pre_start(Layout(Path(root).absolute()), Path(state_dir) if state_dir is not None else default_state_dir(),
                   Path(config_path) if config_path is not None else find_config(), max_failed_starts)
    except Exception:
        log.exception("pre-start failed; starting the current release anyway")
    return EXIT_OK


def _pre_start(layout: Layout, state_dir: Path, config_path: Path | None, limit: int | None) -> None:
    sha = release_sha(layout, layout.current)
    if sha is None:
        log.warning("%s is not a link to a release: nothing to count", layout.current)
        return
    if limit is None:
        limit = _max_failed_starts(config_path)
        if limit is None:
            log.debug("self-update is off: pre-start has nothing to do")
            return
    state_dir.mkdir(parents=True, exist_ok=True)
    previous = release_sha(layout, layout.previous)
    with locked_state(state_dir) as state:
        entry = state["releases"].setdefault(sha, {"starts": 0, "good": False})
        failed = entry["starts"]  # starts since the last mark_good: each one died before it
        # Only a release still on probation (never marked good) after an update is rolled back:
        # a proven release that stops starting has a config or hardware problem, which old code
        # would not fix either.
        if should_roll_back(entry, sha, previous, limit):
            if _rollback(layout, state_dir, state, sha, previous, failed):
                return
        entry["starts"] = failed + 1
        entry["last_start"] = now_iso(zulu=False)
        state["started"] = sha
    if failed and not entry["good"]:
        log.warning("release %s: start %d; the last %d ended before it proved itself (cycles and a delivery attempt)",
                    short_sha(sha), failed + 1, failed)


def post_stop(root: Path | str = DEFAULT_ROOT, state_dir: Path | str | None = None,
              config_path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> int:
    """ExecStopPost, as root: a release on probation that exited 78 (it refused the live config or its files)
    is rolled back at once and the service started again. systemd does not restart an exit 78
    (RestartPreventExitStatus), so pre-start would never count the failed starts. Always exits 0."""
    env = os.environ if environ is None else environ
    ended = (env.get("EXIT_CODE"), env.get("EXIT_STATUS"))
    try:
        layout = Layout(Path(root).absolute())
        state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        config = Path(config_path) if config_path is not None else find_config()  # as pre-start reads it
        if ended == ("exited", "0"):
            _clean_stop(layout, state_dir, config)
        if ended != ("exited", str(EXIT_CONFIG)):
            return EXIT_OK
        bad, good = release_sha(layout, layout.current), release_sha(layout, layout.previous)
        if bad is None or good in (None, bad) or _max_failed_starts(config) is None:
            return EXIT_OK  # nothing to go back to, or self-update off (a release switched by hand stays)
        with locked_state(state_dir) as state:
            entry = state["releases"].get(bad)
            # A proven release that exits 78 has a config problem, which old code would not fix either.
            if entry is None or entry.get("good") or not _rollback(layout, state_dir, state, bad, good,
                                                                  entry.get("starts", 1), "exit 78 at start"):
                return EXIT_OK
        command = env.get(ENV_START_CMD)
        _restart(shlex.split(command) if command is not None else
                 ([shutil.which("systemctl") or "systemctl", "--no-block", "start", SERVICE]))
    except Exception:
        log.exception("post-stop failed")
    return EXIT_OK


def _clean_stop(layout: Layout, state_dir: Path, config_path: Path | None) -> None:
    """The current release stopped cleanly (SIGTERM: a reboot, a restart, a technician): the start pre-start
    counted was not a failed one, so a release still proving itself is not rolled back for being rebooted."""
    sha = release_sha(layout, layout.current)
    if sha is None or not state_dir.is_dir() or _max_failed_starts(config_path) is None:
        return
    with locked_state(state_dir) as state:
        entry = state["releases"].get(sha)
        if entry is not None and not entry.get("good") and entry.get("starts", 0) > 0:
            entry["starts"] -= 1


def _rolled_back_dir(layout: Layout, state_dir: Path) -> Path:
    """Root's own record of the releases rolled back (a file per sha). Made at first use, taking over the state
    file's list once (root wrote it, before this record existed); after that the state file's list is only shown."""
    marks = layout.root / ROLLED_BACK_DIR
    if not marks.is_dir():
        marks.mkdir(mode=0o755, exist_ok=True)
        for old in (load_state(state_dir)["bad"] if state_dir.is_dir() else {}):
            if SHA.match(old):
                (marks / old).touch()
    return marks


def _rollback(layout: Layout, state_dir: Path, state: dict[str, Any], bad: str, good: str, failed: int,
              reason: str | None = None) -> bool:
    try:
        with _root_lock(layout, wait_s=5.0):
            (_rolled_back_dir(layout, state_dir) / bad).touch()
            _swap_link(layout.current, f"releases/{good}")
            # No way back to the bad release: `previous` would point at it.
            with contextlib.suppress(FileNotFoundError):
                layout.previous.unlink()
            fsync_dir(layout.root)
    except Busy:
        log.warning("an update is running; not rolling back %s now", short_sha(bad))
        return False
    reason = reason or f"{failed} failed starts"
    message = f"rolled back from {bad} to {good} after {reason}"
    log.error("%s", message)
    at = now_iso(zulu=False)
    state["bad"][bad] = {"at": at, "reason": reason, "rolled_back_to": good}
    entry = state["releases"].setdefault(good, {"starts": 0, "good": False})
    entry["starts"] = 1
    entry["last_start"] = at
    state["started"] = good
    write_json(state_dir / MARKER_FILE, {"from": bad, "to": good, "failed_starts": failed, "at": at,
                                          "message": message})
    return True


def status(root: Path | str = DEFAULT_ROOT, state_dir: Path | str | None = None) -> dict[str, Any]:
    """The links, the releases on disk and the state, for humans and scripts."""
    layout = Layout(Path(root))
    state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
    on_disk = sorted(p.name for p in layout.releases.glob("*") if SHA.match(p.name))  # none: no directory
    return {"current": release_sha(layout, layout.current), "previous": release_sha(layout, layout.previous),
            "releases": on_disk, "state": load_state(state_dir), "rollback_notice": rollback_notice(state_dir)}


# -- CLI ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="updater.py", description=__doc__.splitlines()[0],
        epilog="Exit codes: 0 ok/nothing to do, 1 refused or failed, 2 usage, 10 updated, 78 bad config.")

    def common(p: argparse.ArgumentParser, default: Any) -> None:
        # Accepted before and after the command; the subcommand's copy only overrides when given.
        p.add_argument("--root", default=default, metavar="DIR", help=f"deployment root (default {DEFAULT_ROOT})")
        p.add_argument("--state-dir", default=default, metavar="DIR",
                       help=f"state directory (default $STATE_DIRECTORY, else {DEFAULT_STATE_DIR})")
        p.add_argument("--config", default=default, metavar="FILE",
                       help="config file (default: $SOLAR_CONFIG, /etc/solarpowerbrampton/config.toml, ./config.toml)")
        p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")

    common(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    a = sub.add_parser("apply", help="fetch, verify, build, self-test and switch to a new release")
    common(a, argparse.SUPPRESS)
    a.add_argument("--gnupghome", metavar="DIR",
                   help=f"keyring of trusted signers (default $GNUPGHOME, else {DEFAULT_GNUPGHOME})")
    a.add_argument("--venv-cmd", metavar="CMD",
                   help=f"shell command creating $1/.venv (default ${ENV_VENV_CMD}, else python3 -m venv + pip)")
    a.add_argument("--restart-cmd", metavar="CMD",
                   help=f"run after a switch; '' = none (default ${ENV_RESTART_CMD}, else systemctl: try-restart, or start a failed service)")
    a.add_argument("--run-as", metavar="USER",
                   help=f"user running the new code in the self-test; '' = as we are (default {SERVICE_USER} "
                        "when root and able to switch)")
    a.add_argument("--selftest-timeout", type=float, default=SELFTEST_TIMEOUT_S, metavar="S",
                   help="timeout of each self-test step (default %(default)s s)")
    a.add_argument("--install-timeout", type=float, default=INSTALL_TIMEOUT_S, metavar="S",
                   help="timeout of the venv command (default %(default)s s)")
    for name, text in (("pre-start", "count a start; roll back a release that keeps failing (always exits 0)"),
                       ("post-stop", "count a clean stop; roll back a release on probation that exited 78 (exits 0)"),
                       ("mark-good", "the current start reached its first stored cycle"),
                       ("status", "releases and state as JSON"), ("acknowledge", "clear the rollback notice")):
        common(sub.add_parser(name, help=text), argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    isolate_root_env()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    root = Path(args.root) if args.root else DEFAULT_ROOT
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    config_path = Path(args.config) if args.config else None
    if args.command in ("pre-start", "post-stop"):
        return (pre_start if args.command == "pre-start" else post_stop)(root, state_dir, config_path)
    if args.command == "apply":
        # systemd stops a run with SIGTERM: unwind, so the half-made release is removed.
        in_main_thread = threading.current_thread() is threading.main_thread()
        before = signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum)) if in_main_thread else None
        try:
            return apply(root, state_dir, config_path, gnupghome=args.gnupghome, venv_cmd=args.venv_cmd,
                         restart_cmd=args.restart_cmd, run_as=args.run_as, install_timeout=args.install_timeout,
                         selftest_timeout=args.selftest_timeout)
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, before)
    if args.command == "mark-good":
        return EXIT_OK if mark_good(state_dir) else EXIT_FAILED
    if args.command == "acknowledge":
        print("cleared the rollback notice" if acknowledge(state_dir) else "no rollback notice")
        return EXIT_OK
    print(json.dumps(status(root, state_dir), indent=2, sort_keys=True))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
