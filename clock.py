"""Can the wall clock be trusted? A Raspberry Pi has no real-time clock.

Until NTP syncs, a Pi's clock shows the last saved time, i.e. it is behind by
however long the Pi was off. Readings taken meanwhile are stored with their
boot-relative time (CLOCK_BOOTTIME) and the boot id, held back from delivery,
and re-stamped once the clock syncs; readings from a boot that never synced
are quarantined rather than sent with wrong times.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TIMESYNC_FILE = Path("/run/systemd/timesync/synchronized")
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
STA_UNSYNC = 0x40
NOT_SYNCED = "the clock is not synced yet (no NTP): readings are stored and held back until it is"


def iso_ms(ms: int | None, timespec: str = "seconds", *, local: bool = False) -> str | None:
    """Epoch milliseconds as ISO-8601 text: UTC with a "Z" (or this machine's zone with `local`);
    None stays None. `timespec` as datetime.isoformat ("seconds", "milliseconds")."""
    if ms is None:
        return None
    when = dt.datetime.fromtimestamp(ms / 1000, None if local else dt.timezone.utc)
    if local:
        when = when.astimezone()
    return when.isoformat(timespec=timespec).replace("+00:00", "Z")


def now_iso(*, zulu: bool = True) -> str:
    """The wall clock now, UTC to the second ("...Z", or "+00:00" with zulu=False)."""
    text = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return text.replace("+00:00", "Z") if zulu else text


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>; only `status` is read, the rest must be the right size.
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
                ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
                ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
                ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
                ("padding", ctypes.c_int * 11)]


def adjtimex_status() -> int | None:
    """The kernel's clock status flags (read-only adjtimex call), or None where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        timex = _Timex()  # modes = 0: read only
        if libc.adjtimex(ctypes.byref(timex)) < 0:
            return None
        return timex.status
    except (OSError, AttributeError):
        return None


def timedatectl_synced() -> bool | None:
    """systemd's own answer (`timedatectl show -p NTPSynchronized`), whatever NTP client runs; None if unavailable."""
    import subprocess

    try:
        out = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True,
                             text=True, timeout=2, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError):
        return None
    answer = out.stdout.strip()
    return {"yes": True, "no": False}.get(answer) if out.returncode == 0 else None


def detect_sync(timesync_file: Path = TIMESYNC_FILE,
                status: Callable[[], int | None] = adjtimex_status,
                fallback: Callable[[], bool | None] = timedatectl_synced) -> bool | None:
    """True when NTP has synced the clock, False when it has not, None when unknown.

    The hardened service (ProtectClock=) cannot call adjtimex(); then timedatectl answers, which also
    covers chrony or ntpd where timesyncd's marker file never appears.
    """
    if timesync_file.exists():
        return True
    flags = status()
    if flags is not None:
        return not flags & STA_UNSYNC
    return fallback()


def read_boot_id(path: Path = BOOT_ID_FILE) -> str:
    """The kernel's id of this boot. If it cannot be read, a fresh id: each run then counts as its own
    boot, so readings held by an earlier run are never re-stamped with this boot's clock offset."""
    try:
        return path.read_text().strip()
    except OSError:
        import uuid

        log.warning("cannot read %s: treating this run as its own boot", path)
        return f"unknown-{uuid.uuid4()}"


def boot_ms() -> int:
    """Milliseconds since boot, counting suspend (CLOCK_BOOTTIME)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000_000


@dataclass(frozen=True)
class ClockState:
    """One look at the clocks. `offset_ms` = wall - boot time."""

    trusted: bool
    boot_id: str
    boot_ms: int
    offset_ms: int
    newly_trusted: bool = False
    jump_ms: int = 0


class ClockGuard:
    """Decides whether timestamps can be trusted now and notices clock jumps.

    `trust`: "always", "sync" (wait for NTP) or "auto" (wait for NTP only on a
    Raspberry Pi, which has no RTC). Once synced, the clock stays trusted for
    the rest of the boot. Not thread-safe: the measuring loop owns it.
    """

    def __init__(self, trust: str = "auto", *, is_pi: bool = False, jump_threshold_s: float = 2.0,
                 synced: Callable[[], bool | None] = detect_sync,
                 wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                 boot_ms: Callable[[], int] = boot_ms,
                 boot_id: Callable[[], str] = read_boot_id, recheck_s: float = 30.0) -> None:
        self.needs_sync = trust == "sync" or (trust == "auto" and is_pi)
        self._synced = synced
        self._wall_ms = wall_ms
        self._boot_ms = boot_ms
        self.boot_id = boot_id()
        self._threshold_ms = int(jump_threshold_s * 1000)
        self._trusted = not self.needs_sync
        self._last_offset: int | None = None
        self._recheck_ms = int(recheck_s * 1000)
        self._next_sync_check = 0  # boot ms; asking for sync may start a process, so not every cycle

    def check(self) -> ClockState:
        newly = False
        if not self._trusted and (asked_ms := self._boot_ms()) >= self._next_sync_check:
            self._next_sync_check = asked_ms + self._recheck_ms
            if self._synced() is True:
                self._trusted = newly = True
                log.info("the clock is synced (NTP): readings held back so far get corrected timestamps")
        # Read after the sync check, which may take a while (timedatectl): the caller stamps the cycle
        # from boot_ms against a monotonic reading it takes after this returns.
        wall, boot = self._wall_ms(), self._boot_ms()
        offset = wall - boot
        jump = 0
        if self._last_offset is not None and abs(offset - self._last_offset) > self._threshold_ms:
            jump = offset - self._last_offset
            log.warning("the wall clock jumped by %+.1f s", jump / 1000)
        self._last_offset = offset
        return ClockState(self._trusted, self.boot_id, boot, offset, newly, jump)
