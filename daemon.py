"""The measuring loop: one cycle every interval on a fixed grid, stored, and handed to its listeners.

`Daemon` measures (through a reader), stamps the cycle by the trusted clock, stores its points
(holding them in memory while the store cannot be written) and gives each listener a `CycleReport`.
Outputs that act on each cycle (systemd, LED notice, live page, console, later MQTT) are listeners:
they read the report, never the loop.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from clock import NOT_SYNCED, iso_ms
from config import Config
from outbox import Outbox, StoreError
from rpi_errors import CriticalError, ErrorHandler, ShortError, SilentError
from schema import ELECTRICITY, ELECTRICITY_FIELDS, SYSTEM, Point, line_prefix, typed_fields

log = logging.getLogger(__name__)

UNDERVOLTAGE = ("the Pi's own supply is too weak (the firmware reports under-voltage): "
                "use a 5 V supply of at least 2.5 A or a better converter, with a short, thick cable")
_MAX_UNSTORED_CYCLES = 360  # cycles kept in memory while the store cannot be written
_HOUSEKEEPING_CYCLES = 30  # retention and size cap are applied every this many cycles
_REOPEN_EVERY_FAILURES = 6  # while the store fails, its connection is opened anew every this many cycles


@dataclasses.dataclass(frozen=True)
class CycleReport:
    """What one finished cycle did, for the loop's listeners (read-only; built in the measuring thread).

    `cycle`: the readings (tools.Cycle), stamped by the trusted clock; `system`: the Pi's own reading
    (health.SystemReading) or None without a monitor; `stored`: the cycle's points are in the store;
    `queue_depth`: unsent points after this cycle (approximate: the sender drains meanwhile);
    `cycles_done`: cycles finished since the start, this one included; `stats`: the store's counts
    (outbox.QueueStats: quarantined, dropped) as stored in this cycle's `system` point, None when the store
    could not say; `duration_s`: how long the cycle took (measuring, storing), by the loop's clock.
    """

    cycle: object
    system: object | None
    stored: bool
    queue_depth: int
    cycles_done: int
    stats: object | None = None
    duration_s: float = 0.0


Listener = Callable[[CycleReport], None]


# -- points -------------------------------------------------------------------
def cycle_points(config: Config, cycle, system=None, stats=None) -> list[Point]:
    """The `electricity` and `system` points of one cycle (failed channels publish nothing)."""
    site = config.site.name
    by_name = {c.name: c for c in config.channels}
    points = []
    for reading in cycle.channels:
        if not reading.ok:
            continue
        channel = by_name[reading.name]
        values = {k: getattr(reading, k) for k in ELECTRICITY_FIELDS}
        # `channel`: which sensor; `unit`: which part of the model (house, plant) it sits on.
        tags = {**channel.tags, "site": site, "channel": channel.name, "unit": channel.unit_name}
        points.append(Point(ELECTRICITY, tags, typed_fields(ELECTRICITY, values), cycle.time_ms))
    if system is not None:
        values = dict(vars(system))  # a flat dataclass: asdict's deep copy would cost more than the rest
        values["channels_ok"] = sum(1 for r in cycle.channels if r.ok)
        values["channels_failed"] = len(cycle.channels) - values["channels_ok"]
        if stats is not None:
            values["outbox_depth"] = stats.queue_depth
            values["dropped_points"] = stats.dropped
            values["quarantined_points"] = stats.quarantined
        points.append(Point(SYSTEM, {"site": site}, typed_fields(SYSTEM, values), cycle.time_ms))
    return points


def energy_state(energy: dict[str, tuple[float, float]]) -> dict[str, str]:
    """The store's `energy:<channel>` values: JSON {"in_wh": .., "out_wh": ..} (written every cycle: formatted
    directly, as json.dumps writes a finite float: its repr)."""
    return {f"energy:{name}": _energy_json(e[0], e[1]) for name, e in energy.items()}


def _energy_json(in_wh: float, out_wh: float) -> str:
    if math.isfinite(in_wh) and math.isfinite(out_wh):
        return f'{{"in_wh": {float(in_wh)!r}, "out_wh": {float(out_wh)!r}}}'
    return json.dumps({"in_wh": in_wh, "out_wh": out_wh})


def load_energy(outbox: Outbox) -> dict[str, tuple[float, float]]:
    result = {}
    for key, value in outbox.state("energy:").items():
        try:
            data = json.loads(value)
            result[key.removeprefix("energy:")] = (float(data["in_wh"]), float(data["out_wh"]))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable energy counter %r in the store", key)
    return result


# -- the daemon ---------------------------------------------------------------
SHORT_SLEEP_S = 0.5  # StopFlag.sleep: the longest pause that is a plain sleep (a stop may wait that long)


class StopFlag:
    """A stop request the measuring loop waits on: set() from any thread ends a wait at once, and every wait
    after it. Its wait is one timed lock acquire: threading.Event.wait goes through a Condition (a new lock
    and several more lock operations a call), which costs a wake-up about 40 us more CPU on the benchmark's
    machine, once every cycle. Thread-safe."""

    def __init__(self) -> None:
        self._closed = threading.Lock()
        self._closed.acquire()  # held until set(): a wait on it times out
        self._guard = threading.Lock()
        self._set = False

    def set(self) -> None:
        with self._guard:
            if not self._set:
                self._set = True
                self._closed.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` seconds (0 or less: not at all); True once set() was called."""
        if timeout_s > 0 and self._closed.acquire(True, min(timeout_s, threading.TIMEOUT_MAX)):
            self._closed.release()  # left open: every later wait returns at once
        return self._set

    def sleep(self, seconds: float) -> None:
        """A pause between a cycle's samples (read_data's `sleep`): none once set(), so a stop reads the rest
        of the window at once and stores the cycle. Up to SHORT_SLEEP_S a plain time.sleep, whose wake-up
        costs less than the lock's (ten a cycle) and which a stop waits out at most; longer, the stoppable
        wait (a window may last an hour)."""
        if self._set:
            seconds = 0.0  # still time.sleep(0): a wait for the bus's lock yields
        if seconds > SHORT_SLEEP_S:
            self.wait(seconds)
        else:
            time.sleep(seconds)


class Daemon:
    """The measuring loop: cycles on a fixed grid of the monotonic clock.

    After each cycle every listener gets its CycleReport (in the measuring thread: keep it cheap).
    `wait(s)` sleeps up to s seconds and returns True when asked to stop
    (StopFlag.wait in production, a fake in tests). A reader with a `lead_s` (read_data) is woken
    at its first sample, `lead_s` into the slot, and told the slot's start (`measure(window_start_s)`):
    one wake-up a cycle fewer. `stored_state()` (optional) gives more state values to commit with every
    cycle, in its transaction (an output's status for `main.py status`). Runs in one thread.
    """

    def __init__(self, config: Config, reader, outbox: Outbox, handler: ErrorHandler, *,
                 monitor=None, clock: Callable[[], float] = time.monotonic,
                 wait: Callable[[float], bool] | None = None, listeners: Iterable[Listener] = (),
                 sender=None, clock_guard=None, stored_state: Callable[[], Mapping[str, str]] | None = None,
                 stop_event: StopFlag | None = None) -> None:
        self.config = config
        self.reader = reader
        self.outbox = outbox
        self.handler = handler
        self.monitor = monitor
        self.clock = clock
        self.stop_event = stop_event or StopFlag()  # shared with a reader whose long window waits on it
        self.wait = wait or self.stop_event.wait
        self.listeners: list[Listener] = list(listeners)  # each gets every cycle's CycleReport, in order
        self.sender = sender
        self.clock_guard = clock_guard
        self.stored_state = stored_state  # more state values committed with every cycle (an output's status)
        self.cycles_done = 0
        self.overruns = 0
        self.last_store_ok = False
        self.last_system = None
        self._may_hold = True  # held readings of this boot may be in the store (e.g. from an earlier run)
        self._evicted_lines = 0  # lines of held-in-memory cycles evicted while the store could not be written
        self.lost_cycles = 0  # cycles evicted from memory unstored since the start (each one logged)
        self._failed_attempts = 0  # consecutive cycles whose store attempt failed
        self.queue_depth = 0  # unsent points after the last cycle (approximate: the sender drains meanwhile)
        self._prefixes: dict[tuple[str, str | None], str] = {}  # (measurement, channel) -> line_prefix()
        self._unstored: deque[tuple[list[tuple[int, str]], dict]] = deque()

    def _prefix(self, point: Point) -> str:
        """The point's escaped measurement and tags, kept per channel (the config, so the tags, are fixed)."""
        key = (point.measurement, point.tags.get("channel"))
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = self._prefixes[key] = line_prefix(point.measurement, point.tags)
        return prefix

    @property
    def held_cycles(self) -> int:
        """Cycles held in memory because the store could not be written (bounded, oldest evicted first)."""
        return len(self._unstored)

    def run_cycle(self, window_start_s: float | None = None):
        """Measure, store, report. Returns the Cycle (stamped by the trusted clock where there is one).
        `window_start_s`: the slot run() woke this cycle for (the reader's window keeps it); None: begin now."""
        began = self.clock()
        cycle = self.reader.measure() if window_start_s is None else self.reader.measure(window_start_s)
        for reading in cycle.channels:
            if reading.ok:
                self.handler.clear(f"measure:{reading.name}")
        if not cycle.bus_error:
            self.handler.clear("measure:bus")
        for error in cycle.errors:
            self.handler.report(error)
        cycle, when, clock_state = self._clock_check(cycle)
        system = self.last_system = self._health()
        self._power_check(system)
        try:
            stats = self.outbox.queue_stats()
        except StoreError:
            stats = None  # _store below reports the store's trouble; the cycle is kept in memory
        lines = [(p.time_ms, p.to_line(self._prefix(p))) for p in cycle_points(self.config, cycle, system, stats)]
        self.last_store_ok = self._store(lines, when)
        if self.last_store_ok:
            self._release_held(clock_state)
        self.queue_depth = (stats.queue_depth if stats else 0) + (len(lines) if self.last_store_ok else 0)
        if self.last_store_ok and self.sender is not None:
            self.sender.notify(len(lines))
        if self.cycles_done % _HOUSEKEEPING_CYCLES == 0:
            self._housekeeping()
        self.handler.tick()
        self.cycles_done += 1
        report = CycleReport(cycle, system, self.last_store_ok, self.queue_depth, self.cycles_done, stats,
                             self.clock() - began)
        for listener in self.listeners:
            listener(report)
        return cycle

    def _health(self):
        """The Pi's health reading, or None when it cannot be read (the store's directory gone, say): the
        cycle's readings are still stored, or held, without their `system` point."""
        if self.monitor is None:
            return None
        try:
            system = self.monitor.read()
        except OSError as exc:
            self.handler.report(SilentError(f"the Pi's health could not be read: {exc}", key="health"))
            return None
        return system

    def _power_check(self, system) -> None:
        """An under-voltage on the Pi's own supply is a Short error while it lasts."""
        if system is None or system.undervoltage is None:
            return
        if system.undervoltage:
            self.handler.report(ShortError(UNDERVOLTAGE, key="power"))
        else:
            self.handler.clear("power")

    def _clock_check(self, cycle):
        """(cycle, store arguments, clock state): where the cycle sits relative to boot and whether its
        time can be trusted. With a clock guard the cycle is stamped from boot time plus the current
        offset, so an NTP step during the sampling window cannot leave it with the old time."""
        if self.clock_guard is None:
            return cycle, {}, None
        state = self.clock_guard.check()
        if state.jump_ms:
            self.handler.report(SilentError(f"the wall clock jumped by {state.jump_ms / 1000:+.1f} s",
                                            key="clock:jump"))
        if state.trusted:
            self.handler.clear("clock")
        else:
            self.handler.report(ShortError(NOT_SYNCED, key="clock"))
        mid_boot_ms = state.boot_ms - round((self.clock() - cycle.monotonic_s) * 1000)
        # A new Cycle directly: dataclasses.replace looks up the fields every call.
        cycle = type(cycle)(mid_boot_ms + state.offset_ms, cycle.monotonic_s, cycle.channels, cycle.bus_error)
        if not state.trusted:
            self._may_hold = True
        return cycle, {"boot_id": state.boot_id, "boot_ms": mid_boot_ms, "held": not state.trusted}, state

    def _release_held(self, state) -> None:
        """Once the clock is trusted, re-stamp this boot's held readings (also those held in memory while
        the store failed, and those of an earlier run of this boot) and let them go."""
        if state is None or not state.trusted or not self._may_hold:
            return
        try:
            released = self.outbox.release_held(state.boot_id, state.offset_ms)
        except StoreError as exc:
            log.warning("cannot correct held readings yet: %s", exc)
            return
        self._may_hold = False
        if released:
            log.info("clock synced: corrected the timestamps of %d held readings", released)

    def _housekeeping(self) -> None:
        from autostart import disk_finding

        try:
            self.outbox.enforce_limits()
            self.outbox.checkpoint()  # pruned pages become free space in the file
            disk = disk_finding(self.outbox.directory)
        except (StoreError, OSError) as exc:
            log.warning("store housekeeping failed: %s", exc)
            return
        if disk.error:
            self.handler.report(disk.error)
        else:
            self.handler.clear("disk")

    def _store(self, lines: list[tuple[int, str]], when: dict) -> bool:
        """Commit this cycle (and any held back). False when the store cannot be written."""
        self._unstored.append((lines, when))
        try:
            self._store_held()
            self._failed_attempts = 0
            self.handler.clear("store")
            return True
        except StoreError as exc:
            self._failed_attempts += 1
            while len(self._unstored) > _MAX_UNSTORED_CYCLES:
                # Memory is bounded: the oldest held cycle makes room, and is counted as dropped.
                evicted = self._unstored.popleft()[0]
                self._evicted_lines += len(evicted)
                self.lost_cycles += 1
                log.error("store still failing after %d held cycles: lost the oldest held cycle (%d points, "
                          "measured at %s); %d cycles lost so far", _MAX_UNSTORED_CYCLES, len(evicted),
                          iso_ms(evicted[0][0]) if evicted else "?", self.lost_cycles)
            self.handler.report(CriticalError(
                f"cannot store readings ({len(self._unstored)} cycles held in memory): {exc}", key="store"))
            return False

    def _store_held(self) -> None:
        """Commit the held cycles oldest first, one transaction each. Raises StoreError (the cycle that
        failed and those after it stay held)."""
        backlog = len(self._unstored) > 1
        if backlog and self._failed_attempts % _REOPEN_EVERY_FAILURES == 0:
            # The store keeps failing: now and then a new connection, which sees a file system
            # mounted again or a replaced card where the old one keeps its dead file handle.
            self.outbox.reopen()
        while self._unstored:
            # Energy counters commit with the points they produced, so a crash
            # can neither double-count nor lose a cycle's energy.
            pending_lines, pending_when = self._unstored[0]
            state = energy_state(self.reader.energy)
            if self.stored_state is not None:
                state.update(self.stored_state())
            self.outbox.append(pending_lines, state, dropped=self._evicted_lines,
                               **pending_when)
            self._evicted_lines = 0
            self._unstored.popleft()
        if backlog:
            log.info("the store can be written again: every held cycle is stored")
            self.outbox.checkpoint(truncate=True)  # give the space the backlog's WAL took back at once

    def store_held_at_exit(self) -> int:
        """At shutdown: one more try to store the cycles held in memory. Logs and returns how many
        cycles could not be stored (they are lost with the process)."""
        if not self._unstored:
            return 0
        held = len(self._unstored)
        try:
            self._store_held()
        except StoreError as exc:
            lost = len(self._unstored)
            points = sum(len(lines) for lines, _ in self._unstored)
            log.error("stopping with %d of %d held cycles (%d points) that could not be stored: %s",
                      lost, held, points, exc)
            return lost
        log.info("stored the %d held cycles before stopping", held)
        return 0

    def run(self, cycles: int | None = None) -> None:
        """Run until stopped or `cycles` cycles are done."""
        interval = self.config.sampling.interval_s
        lead = getattr(self.reader, "lead_s", 0.0)  # a reader without one begins its window when called
        start = self.clock()
        slot = 0
        while cycles is None or self.cycles_done < cycles:
            slot_s = start + slot * interval
            delay = slot_s + lead - self.clock()
            if delay > 0 and self.wait(delay):
                break
            if self.stop_event.is_set():
                break
            began = self.clock()
            # Woken in time for the first sample: the window keeps the slot's start. Woken late (a busy
            # machine): the window begins now, so its samples stay spread rather than taken back to back.
            window_start_s = slot_s if lead and began - slot_s < 2 * lead else None
            done_before = self.cycles_done
            try:
                self.run_cycle(window_start_s)
            except Exception as exc:  # noqa: BLE001 - one bad cycle must not stop measuring
                log.exception("a measuring cycle failed")
                self.cycles_done = done_before + 1
                self.handler.report(CriticalError(f"a measuring cycle failed: {type(exc).__name__}: {exc}",
                                                  key="cycle:error"))
            else:
                self.handler.clear("cycle:error")
            slot += 1
            late = self.clock() - (start + slot * interval)
            if late > 0:
                # Overran into the next slot: skip to the next free one rather than
                # run late, so the grid (and the points' spacing) never drifts.
                skipped = int(late // interval) + 1
                slot += skipped
                self.overruns += 1
                self.handler.report(ShortError(
                    f"a cycle took {self.clock() - began:.2f} s, longer than the {interval:g} s interval: "
                    f"skipped {skipped} slot(s)", key="cycle:overrun"))
            else:
                self.handler.clear("cycle:overrun")

    def stop(self) -> None:
        """Ask the loop to stop after the current cycle. Thread-safe; a signal handler calls it from another
        thread (StopFlag.set takes a lock, which a handler run in the main thread could find held by that
        thread: a second signal arriving during the first one's set())."""
        self.stop_event.set()
