"""Release state: which release runs, whether it proved itself, and whether an update was rolled back.

The daemon's side of self-update (mark_good, rollback_notice) and what the updater's pre-start and apply
share with it: the state directory, update-state.json under its lock, the rollback marker and the pure
rollback rule. Only the standard library and clock (stdlib only) are imported: it must work when the
release's venv is broken, and the daemon imports it without the update process (git, venv, self-test).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from clock import now_iso
from smallfile import read_regular

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/solarpowerbrampton")
STATE_FILE = "update-state.json"
MARKER_FILE = "rolled-back.json"
STATE_LOCK = ".update-state.lock"
NOTICE_EXPIRES_S = 86400.0  # a day of good running on the old release clears a rollback notice

SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_MAX_STATE_BYTES = 1_000_000


def state_dir_from_env(env: Mapping[str, str] | None = None) -> Path | None:
    """The first entry of $STATE_DIRECTORY (what systemd gives the service), or None when unset or empty.
    The one place the project reads STATE_DIRECTORY."""
    env = os.environ if env is None else env
    first = env.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(first) if first else None


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """$STATE_DIRECTORY (its first entry), else /var/lib/solarpowerbrampton."""
    return state_dir_from_env(env) or DEFAULT_STATE_DIR


def fsync_dir(path: Path) -> None:
    # Power cuts are routine on the Pi: make renames durable.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def short_sha(sha: str | None) -> str:
    return sha[:12] if sha else "-"


# -- locks ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def flock(path: Path, wait_s: float) -> Iterator[bool]:
    """Hold an exclusive lock on `path` for the block; yields False if it stayed busy for `wait_s`."""
    # O_NOFOLLOW/O_NONBLOCK: the state dir belongs to the (unprivileged) daemon user, so a root
    # process must not follow a planted symlink or hang opening a planted FIFO.
    # Read-only: a lock file root created must still be lockable by the daemon's user.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        # O_EXCL: only a file this call created is ever chowned - never one the daemon's user
        # planted (a hard link to a root file, say), which root would otherwise hand to that user.
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
        created = True
    except FileExistsError:
        fd = os.open(path, flags)
        created = False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        if created and os.geteuid() == 0:
            # The service's UMask=0077 applies to the privileged ExecStartPre too: without this the
            # lock file would be root-only and the daemon's mark_good() could never take the lock.
            owner = os.stat(path.parent)
            os.fchown(fd, owner.st_uid, owner.st_gid)
            os.fchmod(fd, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        yield True
    finally:
        os.close(fd)


# -- state (update-state.json) -------------------------------------------------------------------
def empty_state() -> dict[str, Any]:
    return {"version": 1, "started": None, "releases": {}, "bad": {}}


def clean_state(raw: Any) -> dict[str, Any]:
    # The file lives in the daemon's directory, so a root process treats it as untrusted input.
    state = empty_state()
    if not isinstance(raw, dict):
        return state
    if isinstance(raw.get("started"), str) and SHA.match(raw["started"]):
        state["started"] = raw["started"]
    releases = raw.get("releases")
    if isinstance(releases, dict):
        for sha, entry in releases.items():
            if not (isinstance(sha, str) and SHA.match(sha) and isinstance(entry, dict)):
                continue
            starts = entry.get("starts", 0)
            clean: dict[str, Any] = {
                "starts": starts if isinstance(starts, int) and not isinstance(starts, bool) and starts >= 0 else 0,
                "good": entry.get("good") is True,
            }
            for key in ("installed_at", "installed_from", "good_at", "last_start"):
                if isinstance(entry.get(key), str):
                    clean[key] = entry[key][:100]
            state["releases"][sha] = clean
    bad = raw.get("bad")
    if isinstance(bad, dict):
        for sha, entry in bad.items():
            if isinstance(sha, str) and SHA.match(sha):
                entry = entry if isinstance(entry, dict) else {}
                state["bad"][sha] = {k: v[:300] for k, v in entry.items() if isinstance(k, str) and isinstance(v, str)}
    return state


def read_json(path: Path) -> Any:
    """The JSON document at `path`; None if missing. Raises OSError/ValueError."""
    try:
        data = read_regular(path, _MAX_STATE_BYTES, follow_links=False)
    except FileNotFoundError:
        return None
    return json.loads(data.decode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    """Atomically replace `path` (temp file + fsync + os.replace)."""
    # mkstemp uses O_EXCL: never writes through a planted symlink.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            if os.geteuid() == 0:
                # Written by root (pre-start, apply) but read and rewritten by the daemon's user.
                owner = os.stat(path.parent)
                os.fchown(f.fileno(), owner.st_uid, owner.st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def load_state(state_dir: Path) -> dict[str, Any]:
    """update-state.json, cleaned; an empty state if it is missing or unreadable."""
    path = Path(state_dir) / STATE_FILE
    try:
        raw = read_json(path)
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return empty_state()
    return clean_state(raw)


@contextlib.contextmanager
def locked_state(state_dir: Path, wait_s: float = 5.0) -> Iterator[dict[str, Any]]:
    """Read-modify-write update-state.json under a lock; written back when the block ends cleanly."""
    state_dir = Path(state_dir)
    with flock(state_dir / STATE_LOCK, wait_s) as held:
        if not held:
            # The writers (pre-start, the daemon, apply) do tiny updates; a lock held this long
            # is a stuck process, and losing one counter update beats blocking the daemon.
            log.warning("%s stayed locked; updating the state without the lock", state_dir / STATE_LOCK)
        state = load_state(state_dir)
        before = json.dumps(state, sort_keys=True)
        yield state
        if json.dumps(state, sort_keys=True) != before:
            write_json(state_dir / STATE_FILE, state)


def should_roll_back(entry: Mapping[str, Any], sha: str, previous: str | None, limit: int) -> bool:
    """The rollback rule, pure: roll `sha` back to `previous` when there is another release to go to,
    `sha` never proved itself (`entry`: its state, "good" and "starts" = starts since the last
    mark_good, each of which died before it) and it failed `limit` starts or more. A proven release
    that stops starting has a config or hardware problem, which old code would not fix either."""
    return bool(previous) and previous != sha and not entry["good"] and entry["starts"] >= limit


# -- the daemon's calls -------------------------------------------------------------------------------
def mark_good(state_dir: Path | str | None = None, sha: str | None = None) -> bool:
    """The release proved itself (see service.ServiceHooks.mark_good_due): reset the start counter, end the probation.

    `sha` defaults to the release the last pre-start started. Fast (no git), never raises;
    returns False when there was nothing to mark or the state could not be written.
    """
    try:
        state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        with locked_state(state_dir, wait_s=2.0) as state:
            sha = sha or state["started"]
            if not sha or not SHA.match(sha):
                return False
            entry = state["releases"].setdefault(sha, {"starts": 0, "good": False})
            if entry["starts"] == 0 and entry["good"]:
                return True
            first = not entry["good"]
            entry.update(starts=0, good=True, good_at=now_iso(zulu=False))
        if first:
            log.info("release %s is good", short_sha(sha))
        return True
    except Exception as exc:  # the daemon must not fail because of this bookkeeping
        log.warning("cannot mark the release good in %s: %s", state_dir, exc)
        return False


def rollback_notice(state_dir: Path | str | None = None, now: dt.datetime | None = None) -> str | None:
    """A one-line notice if an update was rolled back (for the LED, `status` and the log), else None.

    The notice lasts until `updater.py acknowledge`, or until the release it rolled back to has run
    well (marked good after the rollback, no failed start since) for NOTICE_EXPIRES_S.
    """
    state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
    try:
        data = read_json(state_dir / MARKER_FILE)
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return "an update was rolled back (details unreadable): see `journalctl -u solarpowerbrampton`"
    if data is None:
        return None
    if not (isinstance(data, dict) and isinstance(data.get("message"), str)):
        return "an update was rolled back: see `journalctl -u solarpowerbrampton`"
    if _healthy_since(state_dir, data, now or dt.datetime.now(dt.timezone.utc)):
        return None
    return f"{data['message'][:300]} at {str(data.get('at', '?'))[:40]}"


def _healthy_since(state_dir: Path, marker: dict[str, Any], now: dt.datetime) -> bool:
    """The rolled-back-to release was marked good after the rollback and has run NOTICE_EXPIRES_S since."""
    try:
        at = dt.datetime.fromisoformat(str(marker.get("at")))
        entry = load_state(state_dir)["releases"].get(str(marker.get("to")), {})
        good_at = dt.datetime.fromisoformat(entry["good_at"]) if entry.get("good_at") else None
    except (ValueError, TypeError):
        return False
    if at.tzinfo is None or good_at is None or good_at.tzinfo is None:
        return False
    return entry.get("good") is True and entry.get("starts") == 0 and good_at >= at \
        and (now - at).total_seconds() >= NOTICE_EXPIRES_S


def acknowledge(state_dir: Path | str | None = None) -> bool:
    """Clear the rollback notice. True if there was one."""
    path = (Path(state_dir) if state_dir is not None else default_state_dir()) / MARKER_FILE
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
