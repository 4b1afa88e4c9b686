"""SolarPowerBrampton: measure the Brampton2Zero solar model, store every reading, deliver it.

Commands: run, once, check, status, export (``python main.py --help``).
This module wires the parts together and owns the exit codes; the parts never
import it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import config as config_mod
from clock import NOT_SYNCED
from config import Config, ConfigError
from outbox import Outbox, StoreError, format_mb
from rpi_errors import (BLINK_CODES, CriticalError, ErrorHandler, MeasuringError, RollbackNotice, ShortError,
                        SilentError, SolarError, StatusLED, Tier, is_raspberry_pi, make_led)
from schema import ELECTRICITY, ELECTRICITY_FIELDS, SYSTEM, Point, typed_fields

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h: systemd and shell scripts know it
UNDERVOLTAGE = ("the Pi's own supply is too weak (the firmware reports under-voltage): "
                "use a 5 V supply of at least 2.5 A or a better converter, with a short, thick cable")
_MAX_UNSTORED_CYCLES = 360  # cycles kept in memory while the store cannot be written
_HOUSEKEEPING_CYCLES = 30  # retention and size cap are applied every this many cycles
_REOPEN_EVERY_FAILURES = 6  # while the store fails, its connection is opened anew every this many cycles


# -- the bus ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BusChoice:
    bus: object
    simulated: bool
    note: str


def open_bus(config: Config, simulate: bool, clock: Callable[[], float] = time.monotonic) -> BusChoice:
    """The Pi's I2C bus, or the simulated model when asked for or when this is no Pi.

    Raises CriticalError on a Pi whose I2C bus is missing (I2C not enabled).
    """
    from simulator import build_simulated_bus

    if simulate or config.simulation.enabled:
        why = "--simulate" if simulate else f"[simulation] enabled in {config.source}"
        return BusChoice(build_simulated_bus(config, clock), True,
                         f"using the simulated model ({config.simulation.scenario} scenario, {why})")
    device = Path(f"/dev/i2c-{config.i2c.bus}")
    if device.exists():
        try:
            from adafruit_extended_bus import ExtendedI2C  # Blinka: only loaded where a real bus exists

            return BusChoice(ExtendedI2C(config.i2c.bus, frequency=None), False, f"using I2C bus {device}")
        except Exception as exc:  # noqa: BLE001 - Blinka's board detection raises several kinds
            raise CriticalError(f"cannot open I2C bus {device}: {type(exc).__name__}: {exc}", key="i2c") from None
    if not is_raspberry_pi():
        return BusChoice(build_simulated_bus(config, clock), True,
                         f"no {device} and this is not a Raspberry Pi: using the simulated model")
    raise CriticalError(
        f"I2C bus {device} is missing: enable I2C (sudo raspi-config nonint do_i2c 0) and reboot",
        key="i2c",
    )


def bus_reopener(config: Config, choice: BusChoice) -> Callable[[object], object]:
    """How the measuring loop re-opens a stuck bus: the Pi's /dev/i2c-N is closed and opened again;
    the simulated bus is the same emulated wire (its devices and injected faults stay, as a real
    bus's would), handed back as it is."""
    if choice.simulated:
        return lambda old: old

    def reopen(old):
        from adafruit_extended_bus import ExtendedI2C

        try:
            old.deinit()
        except Exception:  # noqa: BLE001 - closing a broken handle may fail; a new one is opened anyway
            log.debug("closing the stuck I2C bus failed", exc_info=True)
        return ExtendedI2C(config.i2c.bus, frequency=None)

    return reopen


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
        values = dataclasses.asdict(system)
        values["channels_ok"] = sum(1 for r in cycle.channels if r.ok)
        values["channels_failed"] = len(cycle.channels) - values["channels_ok"]
        if stats is not None:
            values["outbox_depth"] = stats.queue_depth
            values["dropped_points"] = stats.dropped
            values["quarantined_points"] = stats.quarantined
        points.append(Point(SYSTEM, {"site": site}, typed_fields(SYSTEM, values), cycle.time_ms))
    return points


def energy_state(energy: dict[str, tuple[float, float]]) -> dict[str, str]:
    return {f"energy:{name}": json.dumps({"in_wh": e[0], "out_wh": e[1]}) for name, e in energy.items()}


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
class Daemon:
    """The measuring loop: cycles on a fixed grid of the monotonic clock.

    `wait(s)` sleeps up to s seconds and returns True when asked to stop
    (threading.Event.wait in production, a fake in tests). Runs in one thread.
    """

    def __init__(self, config: Config, reader, outbox: Outbox, handler: ErrorHandler, *,
                 monitor=None, clock: Callable[[], float] = time.monotonic,
                 wait: Callable[[float], bool] | None = None, on_cycle: Callable | None = None,
                 sender=None, clock_guard=None) -> None:
        self.config = config
        self.reader = reader
        self.outbox = outbox
        self.handler = handler
        self.monitor = monitor
        self.clock = clock
        self.stop_event = threading.Event()
        self.wait = wait or self.stop_event.wait
        self.on_cycle = on_cycle
        self.sender = sender
        self.clock_guard = clock_guard
        self.cycles_done = 0
        self.overruns = 0
        self.last_store_ok = False
        self.last_system = None
        self._may_hold = True  # held readings of this boot may be in the store (e.g. from an earlier run)
        self._evicted_lines = 0  # lines of held-in-memory cycles evicted while the store could not be written
        self.lost_cycles = 0  # cycles evicted from memory unstored since the start (each one logged)
        self._failed_attempts = 0  # consecutive cycles whose store attempt failed
        self.queue_depth = 0  # unsent points after the last cycle (approximate: the sender drains meanwhile)
        self._unstored: deque[tuple[list[tuple[int, str]], dict]] = deque()

    def run_cycle(self):
        """Measure, store, report. Returns the Cycle (stamped by the trusted clock where there is one)."""
        cycle = self.reader.measure()
        for reading in cycle.channels:
            if reading.ok:
                self.handler.clear(f"measure:{reading.name}")
        if not cycle.bus_error:
            self.handler.clear("measure:bus")
        for error in cycle.errors:
            self.handler.report(error)
        cycle, when, clock_state = self._clock_check(cycle)
        system = self.last_system = self.monitor.read() if self.monitor else None
        self._power_check(system)
        try:
            stats = self.outbox.queue_stats()
        except StoreError:
            stats = None  # _store below reports the store's trouble; the cycle is kept in memory
        lines = [(p.time_ms, p.to_line()) for p in cycle_points(self.config, cycle, system, stats)]
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
        if self.on_cycle:
            self.on_cycle(cycle)
        return cycle

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
        cycle = dataclasses.replace(cycle, time_ms=mid_boot_ms + state.offset_ms)
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
            self.outbox.checkpoint()  # pruned pages become free space in the file, and the WAL goes to 0
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
                          _iso(evicted[0][0]) if evicted else "?", self.lost_cycles)
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
            self.outbox.append(pending_lines, energy_state(self.reader.energy), dropped=self._evicted_lines,
                               **pending_when)
            self._evicted_lines = 0
            self._unstored.popleft()
        if backlog:
            log.info("the store can be written again: every held cycle is stored")
            self.outbox.checkpoint()  # give the space the backlog's WAL took back at once

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
        start = self.clock()
        slot = 0
        while cycles is None or self.cycles_done < cycles:
            delay = start + slot * interval - self.clock()
            if delay > 0 and self.wait(delay):
                break
            if self.stop_event.is_set():
                break
            began = self.clock()
            done_before = self.cycles_done
            try:
                self.run_cycle()
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
        """Ask the loop to stop after the current cycle (safe from a signal handler)."""
        self.stop_event.set()


# -- wiring -------------------------------------------------------------------
def setup_logging(level: str = "INFO", log_config=None, store_dir: str | None = None) -> None:
    """Log to stderr (under systemd the journal adds its own timestamps), and optionally to a
    rotating file in the store directory for technicians who pull the SD card."""
    stamped = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else stamped
    logging.basicConfig(level=getattr(logging, level, logging.INFO), format=fmt, stream=sys.stderr, force=True)
    if log_config is not None and log_config.file and store_dir:
        from logging.handlers import RotatingFileHandler

        try:
            Path(store_dir).mkdir(parents=True, exist_ok=True)
            handler = RotatingFileHandler(Path(store_dir) / "solarpowerbrampton.log", maxBytes=log_config.file_max_bytes,
                                          backupCount=log_config.file_backups, encoding="utf-8")
        except OSError as exc:
            log.warning("cannot write the log file in %s: %s", store_dir, exc.strerror)
            return
        handler.setFormatter(logging.Formatter(stamped))
        logging.getLogger().addHandler(handler)


def load(args) -> Config:
    """The config the command runs with. Raises ConfigError (also for a file others can read)."""
    path = config_mod.find_config(getattr(args, "config", None))
    if path is not None:
        config_mod.check_permissions(path)
    return config_mod.load_config(path)


def open_store(config: Config, check_integrity: bool = True) -> Outbox:
    return Outbox(config.store.dir, max_mb=config.store.max_mb, retention_days=config.store.retention_days,
                  check_integrity=check_integrity, local_only=config.influx.kind == "none")


def make_clock_guard(config: Config):
    from clock import ClockGuard

    return ClockGuard(config.clock.trust, is_pi=is_raspberry_pi(), jump_threshold_s=config.clock.jump_threshold_s)


def make_reader(config: Config, bus, outbox: Outbox | None, *, window_s: float | None = None,
                reopen_bus: Callable[[object], object] | None = None):
    from tools import read_data

    sampling = config.sampling
    if window_s is not None:
        sampling = dataclasses.replace(sampling, window_s=window_s)
    energy = load_energy(outbox) if outbox else None
    return read_data(bus, config.channels, sampling, energy=energy, reopen_bus=reopen_bus)


def build_writer(config: Config):
    """The writer object for `[influx] kind` (None for "none"); touches no network and no secret."""
    if config.influx.kind == "none":
        return None
    if config.influx.kind == "cloud":
        import cloud_solution as solution
    else:
        import local_solution as solution
    return solution.make_writer(config.influx)


def make_writer(config: Config):
    """The writer `[influx] kind` asks for, or None for "none".

    Raises ConfigError for a secret file that is missing or readable by others.
    """
    writer = build_writer(config)
    if writer is None:
        return None
    if writer.secret is not None:
        from credentials import SecretError

        try:
            writer.secret.value()
        except SecretError as exc:
            key = "influx.password_file" if writer.secret.env_name == "INFLUXDB_PASSWORD" else "influx.token_file"
            raise ConfigError(config.source, [f"at '{key}': {exc}"]) from None
    return writer


def make_sender(config: Config, writer, handler: ErrorHandler):
    from sender import Policy, Sender

    influx = config.influx
    policy = Policy(flush_interval_s=influx.flush_interval_s, batch_lines=influx.batch_lines,
                    batch_bytes=influx.batch_bytes, max_upload_bytes_per_s=influx.max_upload_bytes_per_s)
    # The sender gets its own connection: SQLite connections are not shared between threads here.
    return Sender(writer, open_store(config, check_integrity=False), handler, policy)


def cmd_run(args, config: Config) -> int:
    from tools import SystemMonitor

    try:
        writer = make_writer(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    handler_led = None
    if config.led.enabled:
        try:
            handler_led = StatusLED(make_led(config.led.pin))
        except Exception as exc:  # noqa: BLE001 - gpiozero raises many kinds; the LED is optional
            log.warning("no status LED on GPIO %d (%s: %s): measuring without it",
                        config.led.pin, type(exc).__name__, exc)
    handler = ErrorHandler(handler_led)
    try:
        choice = open_bus(config, args.simulate)
        log.info("%s", choice.note)
        outbox = open_store(config)
    except (CriticalError, StoreError) as exc:
        handler.report(exc if isinstance(exc, SolarError) else CriticalError(str(exc), key="store"))
        log.error("cannot start: %s", exc)
        time.sleep(5 if handler_led else 0)  # leave the Critical pattern visible for a moment
        if handler_led:
            handler_led.close()
        return EXIT_FAILURE
    import autostart
    from tools import scan

    guard = make_clock_guard(config)
    findings = autostart.boot_checks(config, bus=choice.bus, bus_note=choice.note, store_path=outbox.path,
                                     clock_trusted=guard.check().trusted, scan=scan)
    autostart.report(findings, handler)  # nothing Critical can be left here: bus and store opened above
    if config.influx.kind != "none":
        # Through the writer's transport: the probe's connection (and TLS session) serves the first flush.
        autostart.start_influx_probe(config.influx.url, min(config.influx.timeout_s, 5.0), handler,
                                     transport=getattr(writer, "transport", None), ca_file=config.influx.ca_file)
    reader = make_reader(config, choice.bus, outbox, reopen_bus=bus_reopener(config, choice))
    sender = make_sender(config, writer, handler) if writer else None
    try:
        stale = outbox.quarantine_stale_held(guard.boot_id)
    except StoreError as exc:
        stale = 0
        log.warning("cannot check for readings of earlier unsynced boots yet: %s", exc)
    if stale:
        log.error("quarantined %d readings from an earlier boot whose clock never synced", stale)
    service = ServiceHooks(config, handler, outbox.directory, console=console_wanted(), sender=sender)
    daemon = Daemon(config, reader, outbox, handler, monitor=SystemMonitor(str(outbox.directory)), sender=sender,
                    clock_guard=guard, on_cycle=service.after_cycle)
    service.daemon = daemon
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: daemon.stop())
    log.info("measuring %d channels every %g s, storing in %s; delivery: %s",
             len(config.channels), config.sampling.interval_s, outbox.path,
             writer.label if writer else "none (everything stays in the store)")
    if sender:
        sender.start()
    service.start()
    try:
        daemon.run(args.cycles)
    finally:
        daemon.store_held_at_exit()
        service.stop()
        # Bounded (final flush + 2.5 s, a request in flight is cut), so SIGTERM ends the daemon within 10 s.
        if sender and sender.stop():
            sender.outbox.close()
            writer.close()
        outbox.close()
        if handler_led:
            handler_led.close()
    if daemon.lost_cycles:
        log.error("%d cycle%s lost while the store could not be written", daemon.lost_cycles,
                  " was" if daemon.lost_cycles == 1 else "s were")
    log.info("stopped after %d cycle%s", daemon.cycles_done, "" if daemon.cycles_done == 1 else "s")
    return EXIT_OK


# A self-updated release is "good" (no longer rolled back) only after this much healthy running.
GOOD_AFTER_CYCLES = 5
GOOD_AFTER_S = 900.0
ROLLBACK_NOTICE_CHECK_S = 60.0


class ServiceHooks:
    """What runs around each cycle for the outside world: systemd notifications, the self-updater's
    "this release works" mark, and the live page. Called in the measuring thread; each step is cheap."""

    def __init__(self, config: Config, handler: ErrorHandler, state_dir: Path, *, console: bool = False,
                 sender=None, clock: Callable[[], float] = time.monotonic) -> None:
        from sdnotify import Notifier

        self.config = config
        self.handler = handler
        self.console = console  # print a compact line per cycle (a person is watching a terminal)
        self.sender = sender
        # Where the updater keeps its state: $STATE_DIRECTORY under systemd (what its pre-start uses),
        # else `state_dir` (tests, runs by hand), never a relative [store] dir.
        self.update_state_dir = Path(os.environ["STATE_DIRECTORY"].split(":")[0]) \
            if os.environ.get("STATE_DIRECTORY") else state_dir
        self.notifier = Notifier()
        self.daemon: Daemon | None = None
        self.page = None
        self._ready = False
        # Probation of a new release (see mark_good_due): stored cycles and when the run began.
        self._stored_cycles = 0
        self._clock = clock
        self._began = clock()
        self._marked_good = False
        self._notice_checked = -math.inf

    def start(self) -> None:
        half = self.notifier.watchdog_interval_s
        interval = self.config.sampling.interval_s
        if half is not None and interval >= half:
            # The watchdog is pinged once per cycle: with a long interval, widen it (systemd allows
            # WATCHDOG_USEC= at run time) rather than be killed between two healthy cycles.
            self.notifier.notify(f"WATCHDOG_USEC={int(interval * 3 * 1_000_000)}")
            log.info("watchdog widened to %d s for the %g s interval", interval * 3, interval)
        self._check_rollback_notice()
        if self.config.web.enabled:
            self._start_page()

    def _start_page(self) -> None:
        from web import FlowPage

        config = self.config

        def history(since_ms: int):
            try:
                box = Outbox(config.store.dir, readonly=True)  # its own connection: the server's thread
            except StoreError:
                return
            try:
                yield from box.export(since_ms)
            except StoreError as exc:
                log.warning("live page history cut short: %s", exc)
            finally:
                box.close()

        page = FlowPage(config.web.listen, channels=config.channels, site=config.site.name, history=history,
                        plant_unit=config.simulation.plant)
        try:
            page.start()
        except OSError as exc:
            log.warning("live page not started on %s: %s", config.web.listen, exc.strerror or exc)
            return
        from web import make_snapshot

        self.page = page  # FlowPage.start logged its URL
        self._make_snapshot = make_snapshot

    def _check_rollback_notice(self) -> None:
        """Show an update rollback on the LED until `updater.py acknowledge` (or a day of good running)
        clears it; looked at once a minute (one small file read)."""
        now = self._clock()
        if not self.config.update.enabled or now - self._notice_checked < ROLLBACK_NOTICE_CHECK_S:
            return
        self._notice_checked = now
        import updater

        notice = updater.rollback_notice(self.update_state_dir)
        if notice:
            self.handler.report(RollbackNotice(notice, key="update:rollback"))
        else:
            self.handler.clear("update:rollback")

    def mark_good_due(self) -> bool:
        """A new release has proven itself: GOOD_AFTER_CYCLES stored cycles and a finished delivery
        attempt (none configured: the cycles alone), or GOOD_AFTER_CYCLES cycles and GOOD_AFTER_S running.
        One stored cycle is not enough: the delivery path (which the self-test skips) must have run."""
        if self._stored_cycles < GOOD_AFTER_CYCLES:
            return False
        sender = self.daemon.sender if self.daemon is not None else None
        return sender is None or sender.total_requests > 0 or self._clock() - self._began >= GOOD_AFTER_S

    def after_cycle(self, cycle) -> None:
        stored = self.daemon is not None and self.daemon.last_store_ok
        first_stored = stored and not self._ready
        if stored:
            self._stored_cycles += 1
        if first_stored:
            self._ready = True
        if self.config.update.enabled:
            if not self._marked_good and self.mark_good_due():
                import updater

                self._marked_good = True
                updater.mark_good(self.update_state_dir)
            self._check_rollback_notice()
        tier = self.handler.top_tier
        if self.notifier.enabled:  # off systemd, build nothing
            if first_stored:
                self.notifier.ready(self._status(cycle, tier))
            elif self._ready:
                self.notifier.status(self._status(cycle, tier))
            # After every complete cycle, stored or not: while the store fails, cycles are held in
            # memory and the Critical LED says so; a watchdog restart would only lose them.
            self.notifier.watchdog()
        if self.page is not None:
            self.page.update(self._make_snapshot(cycle, self.config.channels, tier=tier,
                                                 summary=self.handler.summary(),
                                                 meaning=self._meaning(tier),
                                                 system=self.daemon.last_system if self.daemon else None))
        if self.console:
            stored = self.daemon is not None and self.daemon.last_store_ok
            print(console_line(cycle, stored=stored, queue=self.daemon.queue_depth if self.daemon else 0,
                               delivered=self.sender.total_delivered if self.sender else None), flush=True)

    def _meaning(self, tier) -> str:
        if tier is None and self.config.influx.kind == "none":
            # "sending normally" would be untrue: nothing is configured to send to.
            return LOCAL_ONLY_MEANING
        return BLINK_CODES[tier].meaning

    def _status(self, cycle, tier) -> str:
        when = dt.datetime.fromtimestamp(cycle.time_ms / 1000).strftime("%H:%M:%S")
        depth = self.daemon.queue_depth if self.daemon else 0
        return f"last cycle {when}, queue {depth}, LED: {tier.name if tier is not None else 'all well'}"

    def stop(self) -> None:
        self.notifier.stopping()
        if self.page is not None:
            self.page.stop()


LOCAL_ONLY_MEANING = "All well: measuring and storing on this Pi only (no database configured)."


def console_wanted(stdout=None, environ=None) -> bool:
    """True when a person watches `run` in a terminal: stdout is a TTY and systemd is not the caller
    (under systemd, JOURNAL_STREAM is set and the journal has the log already)."""
    stdout = sys.stdout if stdout is None else stdout
    environ = os.environ if environ is None else environ
    try:
        tty = stdout.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and not environ.get("JOURNAL_STREAM")


def console_line(cycle, *, stored: bool, queue: int, delivered: int | None) -> str:
    """One compact line per cycle for a terminal: time, each channel's watts, what happened to the points.

    `delivered`: points the sender delivered this run, None when there is no writer.
    """
    when = dt.datetime.fromtimestamp(cycle.time_ms / 1000).strftime("%H:%M:%S")
    parts = [f"{r.name} {r.power_w:+.2f} W" if r.ok else f"{r.name} no reading" for r in cycle.channels]
    if not stored:
        fate = "NOT stored (held in memory)"
    elif delivered is None:
        fate = f"stored on this Pi ({queue} points kept)"
    else:
        fate = f"stored, {delivered} points sent this run, {queue} waiting"
    return f"{when}  {' | '.join(parts)}  -> {fate}"


def cmd_once(args, config: Config) -> int:
    from tools import SystemMonitor

    try:
        choice = open_bus(config, args.simulate)
        outbox = open_store(config)
    except (CriticalError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if not args.json:
        print(choice.note, file=sys.stderr)
    reader = make_reader(config, choice.bus, outbox)
    daemon = Daemon(config, reader, outbox, ErrorHandler(None), monitor=SystemMonitor(str(outbox.directory)),
                    clock_guard=make_clock_guard(config))
    cycle = daemon.run_cycle()
    system = daemon.last_system
    outbox.close()
    if args.json:
        print(json.dumps(cycle_json(cycle, system, choice.simulated, config.channels), indent=2))
    else:
        print(cycle_table(cycle, config.channels, system))
    if not daemon.last_store_ok:
        print(f"error: {daemon.handler.active['store'].message}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if not cycle.errors else EXIT_FAILURE


# What each role measures, in words, for "not measured" lines.
ROLE_WORDS = {"solar": "solar panels", "battery": "batteries", "load": "loads", "exchange": "trade with the plant"}


def not_measured(channels) -> list[str]:
    """The roles no configured channel measures (reports say "not measured", never 0)."""
    have = {c.role for c in channels}
    return [role for role in ROLE_WORDS if role not in have]


def cycle_json(cycle, system, simulated: bool, channels=()) -> dict:
    """The `once --json` document. `channels`: the configured channels (their roles)."""
    when = dt.datetime.fromtimestamp(cycle.time_ms / 1000, dt.timezone.utc)
    roles = {c.name: c.role for c in channels}
    items = []
    for r in cycle.channels:
        item = dataclasses.asdict(r)
        if item["error"] is None:
            del item["error"]
        if r.name in roles:
            item["role"] = roles[r.name]
        items.append(item)
    return {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "simulated": simulated,
        "channels": items,
        "not_measured": not_measured(channels),
        "system": dataclasses.asdict(system) if system else {},
    }


def cycle_table(cycle, channels=(), system=None) -> str:
    roles = {c.name: c.role for c in channels}
    head = f"{'channel':<14}{'role':>9}{'addr':>6}{'bus V':>9}{'shunt mV':>10}{'current mA':>12}{'power W':>9}" \
           f"{'samples':>9}{'in Wh':>9}{'out Wh':>9}"
    rows = [head, "-" * len(head)]
    for r in cycle.channels:
        role = roles.get(r.name, "")
        if not r.ok:
            rows.append(f"{r.name:<14}{role:>9}{'0x%02X' % r.address:>6}  {r.error}")
            continue
        rows.append(
            f"{r.name:<14}{role:>9}{'0x%02X' % r.address:>6}{r.bus_voltage_v:>9.3f}{r.shunt_voltage_mv:>10.2f}"
            f"{r.current_ma:>12.1f}{r.power_w:>9.3f}{r.samples:>6}/{r.samples + r.failed_samples:<2}"
            f"{r.energy_in_wh:>9.3f}{r.energy_out_wh:>9.3f}"
        )
    missing = not_measured(channels) if channels else []
    if missing:
        rows.append("not measured: " + ", ".join(ROLE_WORDS[role] for role in missing))
    if system is not None:
        rows.append(f"Pi supply: {pi_power_text(system)}")
    return "\n".join(rows)


def pi_power_text(system) -> str:
    """The firmware's power flags in words ("not measured" where this Pi does not report them)."""
    if system.undervoltage is None:
        return "not measured (no firmware flags on this machine)"
    words = ["UNDER-VOLTAGE now" if system.undervoltage else "ok"]
    if system.throttled:
        words.append("CPU throttled now")
    if system.undervoltage_since_boot and not system.undervoltage:
        words.append("under-voltage earlier since boot")
    if system.throttled_since_boot and not system.throttled:
        words.append("throttled earlier since boot")
    return ", ".join(words)


def cmd_check(args, config: Config) -> int:
    """The boot checks, printed for a technician, plus one reading per channel. Short findings
    (low disk, clock not synced yet) are warnings; anything more serious fails the check."""
    import autostart
    from tools import scan

    failures = 0

    def report(finding) -> None:
        nonlocal failures
        tier = finding.tier
        failures += tier is not None and tier > Tier.SHORT
        label = "OK  " if tier is None else "WARN" if tier <= Tier.SHORT else "FAIL"
        print(f"{label}  {finding.name}: {finding.error.message if finding.error else finding.detail}")

    try:
        choice = open_bus(config, args.simulate)
    except CriticalError as exc:
        report(autostart.Finding("i2c", str(exc), exc))
        return EXIT_FAILURE
    store_error = None
    try:
        outbox = open_store(config)
        outbox.set_state({"last_check": dt.datetime.now(dt.timezone.utc).isoformat()})
        outbox.close()
    except StoreError as exc:
        store_error = str(exc)
    for finding in autostart.boot_checks(config, bus=choice.bus, bus_note=choice.note,
                                         store_path=Path(config.store.dir) / "outbox.db",
                                         clock_trusted=make_clock_guard(config).check().trusted, scan=scan,
                                         store_error=store_error):
        report(finding)
    if config.influx.kind != "none":  # a TLS failure here says why (expired, hostname mismatch, ...)
        report(autostart.influx_finding(config.influx))
    reader = make_reader(config, choice.bus, None, window_s=min(config.sampling.window_s, 0.2))
    for r in reader.measure().channels:
        detail = r.error if not r.ok else f"{r.bus_voltage_v:.2f} V, {r.current_ma:.1f} mA, {r.power_w:.2f} W"
        report(autostart.Finding(f"reading {r.name}", detail, None if r.ok else MeasuringError(r.error)))
    print("all checks passed" if not failures else f"{failures} check(s) failed")
    return EXIT_OK if not failures else EXIT_FAILURE


def cmd_status(args, config: Config) -> int:
    if not (Path(config.store.dir) / "outbox.db").exists():
        print(f"no readings stored yet in {config.store.dir} (writer: {writer_label(config)})")
        return EXIT_OK
    try:
        outbox = Outbox(config.store.dir, readonly=True)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        stats = outbox.stats()
        state = outbox.state()
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        outbox.close()
    report = {
        "store": str(outbox.path),
        "writer": writer_label(config),
        "queue_depth": stats.queue_depth,
        "oldest_unsent": _iso(stats.oldest_unsent_ms),
        "newest_reading": _iso(stats.newest_ms),
        "stored_total": stats.stored_total,
        "last_successful_send": state.get("last_send"),
        "last_error": state.get("last_error"),
        "held_for_clock_sync": stats.held,
        "quarantined": stats.quarantined,
        "dropped": stats.dropped,
        "size_mb": round(stats.size_bytes / 1_048_576, 3),
    }
    if config.update.enabled:
        import updater

        # Where the service's pre-start keeps it: $STATE_DIRECTORY, which is the store dir install.sh writes.
        report["update_rolled_back"] = updater.rollback_notice(updater.default_state_dir(
            {"STATE_DIRECTORY": os.environ.get("STATE_DIRECTORY") or str(config.store.dir)}))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(map(len, report))
        for key, value in report.items():
            if key == "size_mb":
                key, value = "size", format_mb(stats.size_bytes)
            print(f"{key.replace('_', ' '):<{width}}  {'-' if value is None else value}")
    return EXIT_OK


def writer_label(config: Config) -> str:
    writer = build_writer(config)
    if writer is None:
        return "none (everything stays in the store)"
    writer.close()
    return writer.label


def cmd_export(args, config: Config) -> int:
    since_ms = None
    if args.since:
        try:
            since = dt.datetime.fromisoformat(args.since)
        except ValueError:
            print(f"error: --since {args.since!r} is not an ISO-8601 date or time", file=sys.stderr)
            return EXIT_USAGE
        if since.tzinfo is None:
            since = since.astimezone()
        since_ms = int(since.timestamp() * 1000)
    try:
        outbox = Outbox(config.store.dir, readonly=True)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        if args.format == "csv":
            export_csv(lambda: outbox.export(since_ms), sys.stdout, local_time=args.local_time)
        else:
            for _, line, _ in outbox.export(since_ms):
                sys.stdout.write(line + "\n")
    except StoreError as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        outbox.close()
    return EXIT_OK


def export_csv(lines: Callable[[], object], out, *, local_time: bool = False) -> int:
    """Write the store as CSV a spreadsheet opens: one row per point; columns time, measurement, every tag
    (sorted), every field (schema order, then any other sorted). `lines()` yields (time_ms, line, status)
    and is called twice: once for the columns, once for the rows (nothing is held in memory).
    Returns the number of rows. A line that is not line protocol is skipped and counted on stderr."""
    from schema import FIELD_TYPES, parse_line

    tags: set[str] = set()
    fields: set[str] = set()
    bad = 0
    for _, line, _ in lines():
        try:
            point = parse_line(line)
        except ValueError:
            bad += 1
            continue
        tags.update(point.tags)
        fields.update(point.fields)
    known = [f for types in FIELD_TYPES.values() for f in types if f in fields]
    field_cols = list(dict.fromkeys(known + sorted(fields - set(known))))
    tag_cols = sorted(tags)
    # A tag and a field may share a name; the header says which is which then.
    clash = set(tag_cols) & set(field_cols)
    header = ["time", "measurement", *(f"{t} (tag)" if t in clash else t for t in tag_cols), *field_cols]
    writer = csv.writer(out)
    writer.writerow(header)
    zone = None if local_time else dt.timezone.utc
    rows = 0
    for _, line, _ in lines():
        try:
            point = parse_line(line)
        except ValueError:
            continue
        when = dt.datetime.fromtimestamp(point.time_ms / 1000, zone)
        if zone is None:
            when = when.astimezone()
        stamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        writer.writerow([stamp, point.measurement, *(point.tags.get(t, "") for t in tag_cols),
                         *(_csv_value(point.fields.get(f)) for f in field_cols)])
        rows += 1
    if bad:
        print(f"warning: {bad} stored lines are not line protocol and are left out (--format lp shows them)",
              file=sys.stderr)
    return rows


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, simulate: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", metavar="FILE",
                       help="config file (default: $SOLAR_CONFIG, /etc/solarpowerbrampton/config.toml, "
                            "./config.toml, else the embedded default)")
        if simulate:
            p.add_argument("--simulate", action="store_true", help="measure the simulated model, not the I2C bus")
        return p

    run = add("run", "run the daemon: measure every interval, store, deliver")
    run.add_argument("--cycles", type=int, metavar="N", help="stop after N cycles")
    once = add("once", "measure one cycle, store it and print it")
    once.add_argument("--json", action="store_true", help="print one JSON object")
    add("check", "check config, I2C bus, sensors and store (what a technician runs)")
    status = add("status", "show the store's queue, last send and errors", simulate=False)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    export = add("export", "print every stored point (sent, unsent and quarantined)", simulate=False)
    export.add_argument("--since", metavar="ISO", help="only points at or after this time")
    export.add_argument("--format", choices=("lp", "csv"), default="lp", help="line protocol (default) or CSV")
    export.add_argument("--local-time", action="store_true",
                        help="CSV: times in this machine's local time zone (default: UTC)")
    return parser


COMMANDS = {"run": cmd_run, "once": cmd_once, "check": cmd_check, "status": cmd_status, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "cycles", None) is not None and args.cycles < 1:
        print("error: --cycles must be 1 or more", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "run":
        setup_logging(config.log.level, config.log, config.store.dir)
    else:
        setup_logging("WARNING")
    for warning in config.warnings:
        log.warning("%s", warning)
    return COMMANDS[args.command](args, config)


if __name__ == "__main__":
    sys.exit(main())
