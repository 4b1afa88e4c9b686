"""Error tiers, the exception tree and the status LED that shows them.

A technician without programming background reads one LED: the number of
blinks between pauses says which kind of problem is active (see
``blink_table_markdown()``).  ``ErrorHandler`` tracks active conditions,
drives the LED from the most severe one and keeps the log short when a fault
lasts for hours.

Importing this module never touches GPIO: gpiozero is imported lazily.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
import types
import warnings
from collections.abc import Callable, Mapping
from typing import NamedTuple

log = logging.getLogger(__name__)


class Tier(enum.IntEnum):
    """Severity of a condition; a higher value wins the LED."""

    SILENT = 0      # logged only
    SHORT = 1       # minor, e.g. a cycle overran
    ROLLBACK = 2    # a self-update failed and was undone; shown until acknowledged
    MEASURING = 3   # a sensor read failed
    SENDING = 4     # a write was refused
    CONNECTION = 5  # network or database unreachable, data kept on the Pi
    CRITICAL = 6    # cannot run until fixed


class SolarError(Exception):
    """Base of the project's exceptions.

    ``key`` names the condition (e.g. ``"measure:red_house"``) so repeats of
    the same fault are counted, not logged again; it defaults to the class
    name.
    """

    # Raising the base directly is a bug; keep it visible but mild.
    tier: Tier = Tier.SHORT

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key or type(self).__name__


class CriticalError(SolarError):
    """The logger cannot run until this is fixed (e.g. bad configuration)."""

    tier = Tier.CRITICAL


class ConnectionFailedError(SolarError):
    """Network or database unreachable; data is kept on the Pi."""

    tier = Tier.CONNECTION


class SendingError(SolarError):
    """The database refused a write."""

    tier = Tier.SENDING


class MeasuringError(SolarError):
    """A sensor read failed."""

    tier = Tier.MEASURING


class ShortError(SolarError):
    """A minor problem, e.g. a measuring cycle overran."""

    tier = Tier.SHORT


class RollbackNotice(SolarError):
    """A self-update was rolled back: the logger runs the previous release. Any real fault outranks it."""

    tier = Tier.ROLLBACK


class SilentError(SolarError):
    """Logged only; never changes the LED."""

    tier = Tier.SILENT


# What a writer raises for one write, one class per outcome. The delivery
# policy (split, back off, wait, quarantine) acts on the class; `status` is the
# HTTP status where there was one. Messages never contain credentials.
class RefusedError(SendingError):
    """The server refused the write as a whole; keep everything and retry slowly.

    `bytes_sent`: the request body that went out anyway (it counts against an upload cap).
    """

    bytes_sent: int = 0

    def __init__(self, message: str, *, status: int | None = None, key: str | None = None) -> None:
        super().__init__(message, key=key)
        self.status = status


class AuthError(RefusedError):
    """401/403: the token or password is wrong or lacks permission."""


class NotFoundError(RefusedError):
    """404: the bucket, database or org does not exist."""


class RejectedError(RefusedError):
    """400/422: the server refused some lines of the batch (malformed, type conflict). `dropped`: how many
    lines InfluxDB 1.x says it dropped for a type conflict ("partial write: ... dropped=N"), None if unsaid."""

    dropped: int | None = None


class TooLargeError(RefusedError):
    """413: the request body is too large for the server."""


class UnreachableError(ConnectionFailedError):
    """5xx, timeout, refused connection, DNS failure: try again later."""

    def __init__(self, message: str, *, status: int | None = None, key: str | None = None) -> None:
        super().__init__(message, key=key)
        self.status = status


class ThrottledError(UnreachableError):
    """429/503: the server asks us to wait `retry_after_s` seconds (None: it did not say)."""

    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None,
                 key: str | None = None) -> None:
        super().__init__(message, status=status, key=key)
        self.retry_after_s = retry_after_s


@dataclasses.dataclass(frozen=True)
class BlinkPattern:
    """A blink code; times in seconds.

    One repetition is ``blinks`` x (on ``on_s``, off ``off_s``), then
    ``pause_s`` off.  ``meaning`` and ``action`` are plain-English text
    for the technician's table.
    """

    blinks: int
    on_s: float
    off_s: float
    pause_s: float
    meaning: str
    action: str = ""

    @property
    def period_s(self) -> float:
        """One repetition, in seconds."""
        return self.blinks * (self.on_s + self.off_s) + self.pause_s

    @property
    def appearance(self) -> str:
        """What the LED looks like, in words, the count first."""
        if self.on_s > self.off_s + self.pause_s:
            # Mostly on: nothing a technician could count as an error code.
            return f"On, with a brief dip every {self.period_s:g} s"
        if self.blinks == 1:
            return "1 quick blink, then a pause"
        return f"{self.blinks} blinks, then a pause"


# All well: the LED is mostly on with a brief dip, so it cannot be mistaken for
# any counted code (each of those is mostly off) nor for "not running" (off).
_HEARTBEAT = BlinkPattern(
    1, 4.8, 0.2, 0.0,
    "All well: measuring and storing normally (and sending, where a database is set).",
    "Nothing to do.")


def _counted(blinks: int, meaning: str, action: str) -> BlinkPattern:
    # Long, evenly spaced blinks and a clear pause make counting easy.
    return BlinkPattern(blinks, 0.4, 0.4, 2.0, meaning, action)


# The 2023 codes technicians were taught: Short = one quick blink, Sending = 2,
# Measuring = 3, Critical = 4; Connection (no 2023 code) takes 5.
BLINK_CODES: Mapping[Tier | None, BlinkPattern] = types.MappingProxyType({
    None: _HEARTBEAT,
    Tier.SILENT: dataclasses.replace(
        _HEARTBEAT,
        meaning="Same as all well: a minor note was written to the log only.",
        action="Nothing to do."),
    Tier.SHORT: BlinkPattern(
        1, 0.1, 0.4, 2.0,
        "A minor problem: a measuring cycle ran late, the clock is not set "
        "yet, the disk is nearly full, or the "
        "Pi's power supply is too weak (under-voltage).",
        "Usually clears by itself. Under-voltage: power the Pi from a 5 V "
        "supply of at least 2.5 A (or a better 12 V to 5 V converter) with a "
        "short, thick cable. If it lasts more than a day, tell the "
        "maintainer."),
    Tier.SENDING: _counted(
        2, "The database refused data. The data is kept on the Pi.",
        "Tell the maintainer: the database settings (token, bucket or "
        "database name) need checking."),
    Tier.MEASURING: _counted(
        3, "A sensor did not answer or gave a bad reading.",
        "Check the sensor's wires and plugs. The Pi keeps trying."),
    Tier.CRITICAL: _counted(
        4, "The logger cannot run until this is fixed "
        "(e.g. the store cannot be written).",
        "Restart the Pi. If it still blinks 4, tell the maintainer: "
        "the log says what is wrong."),
    Tier.ROLLBACK: _counted(
        6, "An automatic update failed and was undone: the logger runs the "
        "previous version and keeps measuring and sending.",
        "Tell the maintainer. When they have looked, clear it with "
        "`sudo /opt/solarpowerbrampton/current/.venv/bin/python "
        "/opt/solarpowerbrampton/current/updater.py acknowledge` "
        "(it also clears after a day of good running)."),
    Tier.CONNECTION: _counted(
        5, "The network or the database cannot be reached. "
        "The data is kept on the Pi and sent later.",
        "Check the network cable, Wi-Fi or SIM, and that the database "
        "server is on."),
})

_NOT_RUNNING_ROW = ("Off", "The logger is not running.",
                    "Check the Pi has power; "
                    "`sudo systemctl status solarpowerbrampton`.")


def blink_table_markdown() -> str:
    """The README's LED table, generated from ``BLINK_CODES``.

    One row per distinct code (SILENT looks like all well and has no row of
    its own): all well first, then the codes by blink count, then "Off".
    """
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    codes = [BLINK_CODES[None]] + sorted(
        (p for t, p in BLINK_CODES.items() if t not in (None, Tier.SILENT)),
        key=lambda p: p.blinks)
    rows = [(p.appearance, p.meaning, p.action) for p in codes]
    rows.append(_NOT_RUNNING_ROW)
    lines = ["| LED shows | Meaning | What to do |", "|---|---|---|"]
    lines += [f"| {cell(a)} | {cell(m)} | {cell(d)} |" for a, m, d in rows]
    return "\n".join(lines) + "\n"


def pattern_steps(pattern: BlinkPattern) -> list[tuple[bool, float]]:
    """One repetition as ``(led_on, seconds)`` steps, strictly alternating.

    The last off period and the pause are merged into one step.
    """
    steps: list[tuple[bool, float]] = []
    for _ in range(pattern.blinks):
        steps += [(True, pattern.on_s), (False, pattern.off_s)]
    if steps:
        steps[-1] = (False, steps[-1][1] + pattern.pause_s)
    return steps


class StatusLED:
    """Plays the pattern of one tier on an LED in a background thread.

    ``led`` is any object with ``on()``/``off()`` (a gpiozero LED).
    ``time_scale`` < 1 speeds patterns up (tests).  Never blocks the caller;
    all methods are thread-safe.
    """

    def __init__(self, led, *, time_scale: float = 1.0,
                 wait: Callable[[threading.Event, float], bool] | None = None) -> None:
        self._led = led
        self._scale = time_scale
        self._lock = threading.Lock()
        self._changed = threading.Event()
        # wait(event, seconds) -> True when `event` was set: holds each step (event.wait by default;
        # tests pass one that also records the steps, so they never infer a pause from timing).
        self._wait = wait or (lambda event, seconds: event.wait(seconds))
        self._tier: Tier | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="status-led", daemon=True)
        self._thread.start()

    @property
    def showing(self) -> Tier | None:
        """The tier whose pattern is playing (None = all well)."""
        with self._lock:
            return self._tier

    def show(self, tier: Tier | None) -> None:
        """Switch to ``tier``'s pattern at once; same tier again: no-op."""
        with self._lock:
            if tier == self._tier or self._closed:
                return
            self._tier = tier
            self._changed.set()

    def close(self) -> None:
        """Stop the thread and turn the LED off; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._changed.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        try:
            self._led.off()
        except Exception:  # noqa: BLE001 - the LED may already be closed
            log.debug("status LED: off() failed on close", exc_info=True)

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    tier = self._tier
                    # Cleared under the lock so a show() racing with this
                    # read is never lost.
                    self._changed.clear()
                for led_on, seconds in pattern_steps(BLINK_CODES[tier]):
                    if led_on:
                        self._led.on()
                    else:
                        self._led.off()
                    if self._wait(self._changed, seconds * self._scale):
                        break  # restart with the new pattern at once
        except Exception:  # noqa: BLE001 - e.g. gpiozero closed it at exit
            log.warning("status LED stopped", exc_info=True)


def make_led(pin: int, *, log_fallback: bool = True):
    """A gpiozero LED on BCM ``pin``; simulated when no GPIO is available.

    Off a Pi (no pin factory loads) ``Device.pin_factory`` becomes gpiozero's
    MockFactory and one line says the LED is simulated (INFO, or DEBUG when
    ``log_fallback`` is false; WARNING if this looks like a Pi, where it means
    a broken GPIO setup).  gpiozero's PinFactoryFallback warnings are
    suppressed.  Raises gpiozero's errors for a bad or busy pin.  Not
    thread-safe (changes warning filters and the global pin factory): call it
    at start-up.
    """
    from gpiozero import LED, Device
    from gpiozero.exc import PinWarning
    from gpiozero.pins.mock import MockFactory

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PinWarning)
        try:
            Device.ensure_pin_factory()
            reason = None
        except Exception as exc:  # noqa: BLE001 - any factory failure
            reason = f"{type(exc).__name__}: {exc}"
    for warning in caught:
        if issubclass(warning.category, PinWarning):
            log.debug("gpiozero: %s", warning.message)
        else:
            warnings.warn_explicit(warning.message, warning.category,
                                   warning.filename, warning.lineno)
    if reason is not None:
        Device.pin_factory = MockFactory()
        level = logging.INFO if log_fallback else logging.DEBUG
        if is_raspberry_pi():
            level = logging.WARNING
        log.log(level, "status LED on GPIO %d is simulated (no GPIO: %s)",
                pin, reason)
    return LED(pin)


def is_raspberry_pi(model_path: str = "/proc/device-tree/model") -> bool:
    """True on a Raspberry Pi (reads the device-tree model string)."""
    try:
        with open(model_path, encoding="ascii", errors="replace") as model:
            return "raspberry pi" in model.read().lower()
    except OSError:
        return False


class Condition(NamedTuple):
    """An active condition; ``since`` is in clock seconds."""

    tier: Tier
    message: str
    count: int
    since: float


@dataclasses.dataclass
class _State:
    tier: Tier
    message: str
    count: int
    since: float
    last_log: float
    recent: int = 0  # occurrences since last_log


class ErrorHandler:
    """Tracks active conditions by key and drives the LED from the worst one.

    Logs each condition once when it starts, a summary at most every
    ``summary_s`` seconds of the injected ``clock`` while it lasts (from
    ``tick()``), and once when it clears.  SILENT conditions are only logged
    (at most once per ``summary_s`` per key) and never kept active.  All
    methods are thread-safe.
    """

    def __init__(self, led: StatusLED | None, *,
                 clock: Callable[[], float] = time.monotonic,
                 summary_s: float = 300.0) -> None:
        self._led = led
        self._clock = clock
        self._summary_s = summary_s
        self._lock = threading.Lock()
        self._active: dict[str, _State] = {}
        # SILENT key -> (when last logged, reports skipped since)
        self._silent: dict[str, tuple[float, int]] = {}

    def report(self, error: SolarError) -> None:
        """Record one occurrence of ``error`` (``error.key`` names it)."""
        tier, key, message = error.tier, error.key, str(error)
        now = self._clock()
        with self._lock:
            if tier == Tier.SILENT:
                self._report_silent(key, message, now)
                return
            state = self._active.get(key)
            if state is not None:
                # Latest tier and message win: the summary shows what is
                # happening now, without a log line per repeat.
                state.tier, state.message = tier, message
                state.count += 1
                state.recent += 1
            else:
                self._active[key] = _State(tier, message, 1, now, now)
                level = (logging.ERROR if tier == Tier.CRITICAL
                         else logging.WARNING)
                log.log(level, "%s [%s]: %s", tier.name, key, message)
            self._update_led()

    def _report_silent(self, key: str, message: str, now: float) -> None:
        logged, skipped = self._silent.get(key, (None, 0))
        if logged is not None and now - logged < self._summary_s:
            self._silent[key] = (logged, skipped + 1)
            return
        more = (f" (+{skipped} similar in the last {now - logged:.0f} s)"
                if skipped else "")
        log.info("SILENT [%s]: %s%s", key, message, more)
        self._silent[key] = (now, 0)

    def clear(self, key: str) -> None:
        """End condition ``key`` and log it once; no-op if it is not active."""
        if key not in self._active:
            return  # the common case, several times a cycle (a report racing this one lands after it)
        now = self._clock()
        with self._lock:
            self._clear(key, now)
            self._update_led()

    def clear_prefix(self, prefix: str) -> None:
        """End every active condition whose key starts with ``prefix``."""
        now = self._clock()
        with self._lock:
            for key in [k for k in self._active if k.startswith(prefix)]:
                self._clear(key, now)
            self._update_led()

    def _clear(self, key: str, now: float) -> None:
        state = self._active.pop(key, None)
        if state is not None:
            log.info("%s [%s] cleared after %d occurrences over %.0f s",
                     state.tier.name, key, state.count, now - state.since)

    def tick(self) -> None:
        """Log due periodic summaries; call once per main-loop cycle."""
        now = self._clock()
        with self._lock:
            for key, state in self._active.items():
                elapsed = now - state.last_log
                if elapsed >= self._summary_s:
                    log.info("%s [%s] still active, %d times in the last"
                             " %.0f s: %s", state.tier.name, key,
                             state.recent, elapsed, state.message)
                    state.last_log, state.recent = now, 0

    @property
    def active(self) -> dict[str, Condition]:
        """A copy: key -> Condition(tier, message, count, since)."""
        with self._lock:
            return {k: Condition(s.tier, s.message, s.count, s.since)
                    for k, s in self._active.items()}

    @property
    def top_tier(self) -> Tier | None:
        """The most severe active tier, or None when all is well."""
        with self._lock:
            return self._top()

    def summary(self) -> str:
        """One line: ``"all well"`` or the worst condition (+N more)."""
        with self._lock:
            if not self._active:
                return "all well"
            # Most severe first; among equals the oldest.
            worst = max(self._active.values(),
                        key=lambda s: (s.tier, -s.since))
            more = len(self._active) - 1
            tail = f" (+{more} more)" if more else ""
            return f"{worst.tier.name}: {worst.message}{tail}"

    def _top(self) -> Tier | None:
        return max((s.tier for s in self._active.values()), default=None)

    def _update_led(self) -> None:
        # Called under the lock so two threads cannot show stale tiers out
        # of order; StatusLED.show() never blocks.
        if self._led is not None:
            self._led.show(self._top())
