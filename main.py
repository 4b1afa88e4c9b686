"""SolarPowerBrampton: measure the Brampton2Zero solar model, store every reading, deliver it.

Commands: run, once, check, status, export, report (``python main.py --help``).
This module wires the parts together and owns the exit codes; the parts never import it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import config as config_mod
from clock import iso_ms
from config import Config, ConfigError
from daemon import Daemon, StopFlag, load_energy
from outbox import DB_NAME, Outbox, OutboxStats, StoreError, format_mb
from reports import cycle_json, cycle_table, export_csv, export_lp
from rpi_errors import CriticalError, ErrorHandler, MeasuringError, SolarError, StatusLED, Tier, is_raspberry_pi, make_led
from service import ServiceHooks, console_wanted

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h: systemd and shell scripts know it


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

    device = Path(f"/dev/i2c-{config.i2c.bus}")
    if _measures_model(config, simulate):
        if simulate or config.simulation.enabled:
            why = "--simulate" if simulate else f"[simulation] enabled in {config.source}"
            note = f"using the simulated model ({config.simulation.scenario} scenario, {why})"
        else:
            note = f"no {device} and this is not a Raspberry Pi: using the simulated model"
        return BusChoice(build_simulated_bus(config, clock), True, note)
    if device.exists():
        try:
            from adafruit_extended_bus import ExtendedI2C  # Blinka: only loaded where a real bus exists

            return BusChoice(ExtendedI2C(config.i2c.bus, frequency=None), False, f"using I2C bus {device}")
        except Exception as exc:  # noqa: BLE001 - Blinka's board detection raises several kinds
            raise CriticalError(f"cannot open I2C bus {device}: {type(exc).__name__}: {exc}", key="i2c") from None
    raise CriticalError(f"I2C bus {device} is missing: enable I2C (sudo raspi-config nonint do_i2c 0) and reboot",
                        key="i2c")


def _measures_model(config: Config, simulate: bool) -> bool:
    """Whether open_bus measures the simulated model (found without opening anything): asked to, or no I2C
    bus on a machine that is no Pi."""
    if simulate or config.simulation.enabled:
        return True
    return not Path(f"/dev/i2c-{config.i2c.bus}").exists() and not is_raspberry_pi()


def simulated_stamps(config: Config, measures_model: bool) -> bool:
    """Whether points carry the simulated time: `[simulation] stamp = "simulated"` and the model is what is
    measured (a Pi on its real bus stamps the real clock whatever the config says)."""
    return measures_model and config.simulation.stamp == "simulated"


def bus_reopener(config: Config, choice: BusChoice) -> Callable[[object], object]:
    """How the measuring loop re-opens a stuck bus: the Pi's /dev/i2c-N is closed and opened again;
    the simulated bus is the same emulated wire (its devices and injected faults stay, as a real
    bus's would), handed back as it is."""
    if choice.simulated:
        return lambda old: old

    def reopen(old):
        from adafruit_extended_bus import ExtendedI2C

        # The new handle first: if it cannot be opened (the adapter is briefly gone), the old one stays
        # usable for the next try instead of being a closed object every transaction trips over.
        new = ExtendedI2C(config.i2c.bus, frequency=None)
        try:
            old.deinit()
        except Exception:  # noqa: BLE001 - closing a broken handle may fail; the new one is open anyway
            log.debug("closing the stuck I2C bus failed", exc_info=True)
        return new

    return reopen


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
    """The config the command runs with. Raises ConfigError (also for a file group or others can write)."""
    path = config_mod.find_config(getattr(args, "config", None))
    if path is not None:
        config_mod.check_permissions(path)
    return config_mod.load_config(path)


def open_store(config: Config, check_integrity: bool = True, *, wall_ms: Callable[[], int] | None = None,
               settle: bool = False) -> Outbox:
    """The store. `wall_ms`: the time points carry (simulated with `[simulation] stamp = "simulated"`), for
    the retention; `settle`: the measuring loop's store settles the ledger's daily totals before pruning."""
    settler = None
    if settle:
        from ledger import Layout, Settler, local_zone

        settler = Settler(Layout.from_config(config, simulated_time=wall_ms is not None), local_zone(), wall_ms)
    extra = {"wall_ms": wall_ms} if wall_ms is not None else {}
    return Outbox(config.store.dir, max_mb=config.store.max_mb, retention_days=config.store.retention_days,
                  check_integrity=check_integrity, local_only=config.influx.kind == "none", before_prune=settler,
                  **extra)


def stamp_clock(config: Config, choice: BusChoice) -> Callable[[], int] | None:
    """The simulated time as Unix ms when `[simulation] stamp = "simulated"` and the simulated model is
    measured; None: points carry the wall clock."""
    if not simulated_stamps(config, choice.simulated):
        return None
    from simulator import simulated_wall_ms

    return simulated_wall_ms(config, choice.bus, time.monotonic)


def make_clock_guard(config: Config):
    from clock import ClockGuard

    return ClockGuard(config.clock.trust, is_pi=is_raspberry_pi(), jump_threshold_s=config.clock.jump_threshold_s)


def make_reader(config: Config, bus, outbox: Outbox | None, *, window_s: float | None = None,
                reopen_bus: Callable[[object], object] | None = None, wall_ms: Callable[[], int] | None = None,
                stop: StopFlag | None = None):
    from tools import read_data

    sampling = config.sampling
    if window_s is not None:
        sampling = dataclasses.replace(sampling, window_s=window_s)
    energy = load_energy(outbox) if outbox else None
    # Points stamped with the simulated time: the energy counters integrate the same (simulated) seconds.
    extra = {"wall_ms": wall_ms, "energy_time_scale": config.simulation.speed} if wall_ms is not None else {}
    if stop is not None:  # the samples' pauses end at a stop (SIGTERM within 10 s, whatever window_s says)
        extra["sleep"] = stop.sleep
    return read_data(bus, config.channels, sampling, energy=energy, reopen_bus=reopen_bus, **extra)


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
        from credentials import PASSWORD_ENV, SecretError

        try:
            writer.secret.value()
        except SecretError as exc:
            key = "influx.password_file" if writer.secret.env_name == PASSWORD_ENV else "influx.token_file"
            raise ConfigError(config.source, [f"at '{key}': {exc}"]) from None
    return writer


def make_sender(config: Config, writer, handler: ErrorHandler):
    from sender import Policy, Sender

    influx = config.influx
    policy = Policy(flush_interval_s=influx.flush_interval_s, batch_lines=influx.batch_lines,
                    batch_bytes=influx.batch_bytes, max_upload_bytes_per_s=influx.max_upload_bytes_per_s)
    # The sender gets its own connection: SQLite connections are not shared between threads here.
    return Sender(writer, open_store(config, check_integrity=False), handler, policy)


def make_metrics(config: Config, handler: ErrorHandler, sender):
    """The Prometheus metrics the live page's server offers at /metrics (README "Prometheus")."""
    from metrics import DaemonMetrics

    return DaemonMetrics(config, top_tier=lambda: handler.top_tier,
                         delivered=(lambda: sender.total_delivered) if sender else (lambda: None))


def check_mqtt_secret(config: Config) -> None:
    """Raises ConfigError for an MQTT password file that is missing or readable by others."""
    mqtt = config.mqtt
    if not mqtt.enabled or not (mqtt.username or mqtt.password_file):
        return
    from credentials import MQTT_PASSWORD_ENV, Secret, SecretError

    try:
        Secret(MQTT_PASSWORD_ENV, mqtt.password_file).value()
    except SecretError as exc:
        raise ConfigError(config.source, [f"at 'mqtt.password_file': {exc}"]) from None


def mqtt_finding(config: Config, timeout_s: float = 5.0):
    """The boot check of `[mqtt]` for `main.py check`: the broker answers the login within `timeout_s`.
    Not answering is Short (InfluxDB or the store keeps the record), or Connection when MQTT is the only
    output, as on the LED when running; a password file that is missing or readable by others is Critical."""
    from autostart import Finding
    from credentials import SecretError
    from mqtt_output import MqttOutput
    from rpi_errors import ConnectionFailedError, ShortError

    only_output = config.influx.kind == "none"
    output = MqttOutput(config, ErrorHandler(None), only_output=only_output)
    try:
        problem = output.probe(timeout_s)
    except SecretError as exc:
        message = f"{config.source}: at 'mqtt.password_file': {exc}"
        return Finding("mqtt", message, CriticalError(message, key="boot:mqtt"))
    if problem:
        error = ConnectionFailedError if only_output else ShortError
        return Finding("mqtt", problem, error(problem, key="boot:mqtt"))
    return Finding("mqtt", f"MQTT broker {output.where} accepted the login "
                           f"(user {config.mqtt.username or '(anonymous)'})")


def make_mqtt(config: Config, handler: ErrorHandler, service):
    """The MQTT output (README "Home Assistant"). With [influx] kind = "none", MQTT is the only way the
    readings leave the Pi: its faults then show as Connection, else as Short (InfluxDB holds the record)."""
    from mqtt_output import MqttOutput

    return MqttOutput(config, handler, meaning=lambda: service.meaning(handler.top_tier),
                      only_output=config.influx.kind == "none")


def open_led(config: Config) -> StatusLED | None:
    """The status LED, or None when [led] is off or the GPIO cannot be had (the LED is optional)."""
    if not config.led.enabled:
        return None
    try:
        return StatusLED(make_led(config.led.pin))
    except Exception as exc:  # noqa: BLE001 - gpiozero raises many kinds; the LED is optional
        log.warning("no status LED on GPIO %d (%s: %s): measuring without it",
                    config.led.pin, type(exc).__name__, exc)
        return None


def quarantine_stale(outbox: Outbox, boot_id: str) -> None:
    """Quarantine held readings of earlier boots whose clock never synced (their times cannot be fixed)."""
    try:
        stale = outbox.quarantine_stale_held(boot_id)
    except StoreError as exc:
        stale = 0
        log.warning("cannot check for readings of earlier unsynced boots yet: %s", exc)
    if stale:
        log.error("quarantined %d readings from an earlier boot whose clock never synced", stale)


def cmd_run(args, config: Config) -> int:
    from health import SystemMonitor

    try:
        writer = make_writer(config)
        check_mqtt_secret(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    handler_led = open_led(config)
    handler = ErrorHandler(handler_led)
    try:
        choice = open_bus(config, args.simulate)
        log.info("%s", choice.note)
        stamp = stamp_clock(config, choice)
        if stamp is not None:
            log.info("points carry the simulated time ([simulation] stamp = \"simulated\", speed %g)",
                     config.simulation.speed)
        outbox = open_store(config, wall_ms=stamp, settle=True)
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
    stop = StopFlag()  # the loop's, and a long window's (make_reader)
    reader = make_reader(config, choice.bus, outbox, reopen_bus=bus_reopener(config, choice), wall_ms=stamp, stop=stop)
    sender = make_sender(config, writer, handler) if writer else None
    quarantine_stale(outbox, guard.boot_id)
    metrics = make_metrics(config, handler, sender) if config.web.enabled else None
    service = ServiceHooks(config, handler, outbox.directory, sender=sender,
                           console=(lambda line: print(line, flush=True)) if console_wanted() else None,
                           metrics=metrics.render if metrics else None, wall_ms=stamp)
    listeners = [service.after_cycle] + ([metrics.after_cycle] if metrics else [])
    mqtt = make_mqtt(config, handler, service) if config.mqtt.enabled else None
    if mqtt is not None:
        listeners.append(mqtt.after_cycle)
    # Simulated stamps are the model's own time: no NTP hold or re-stamping applies to them.
    daemon = Daemon(config, reader, outbox, handler, monitor=SystemMonitor(str(outbox.directory)), sender=sender,
                    clock_guard=guard if stamp is None else None, listeners=listeners,
                    stored_state=mqtt.stored_state if mqtt else None, stop_event=stop)
    for signum in (signal.SIGTERM, signal.SIGINT):
        # From a thread: the handler runs in the main thread between any two bytecodes, so a second signal could
        # arrive while the first one's stop() holds the stop flag's lock; taken there, it would wait for itself.
        signal.signal(signum, lambda *_: threading.Thread(target=daemon.stop, name="stop", daemon=True).start())
    log.info("measuring %d channels every %g s, storing in %s; delivery: %s",
             len(config.channels), config.sampling.interval_s, outbox.path,
             writer.label if writer else "none (everything stays in the store)")
    if sender:
        sender.start()
    service.start()
    if mqtt is not None:
        mqtt.start()
    try:
        daemon.run(args.cycles)
    finally:
        daemon.store_held_at_exit()
        service.stop()
        # The outputs stop side by side, each bounded (MQTT: 2 s + a connection attempt's 5 s; the sender: the final
        # flush + 2.5 s, a request in flight is cut), so SIGTERM ends the daemon within 10 s when both hang.
        mqtt_stop = threading.Thread(target=mqtt.stop, name="mqtt-stop", daemon=True) if mqtt else None
        if mqtt_stop:
            mqtt_stop.start()
        if sender and sender.stop():
            sender.outbox.close()
            writer.close()
        if mqtt_stop:
            mqtt_stop.join()
        outbox.close()
        if handler_led:
            handler_led.close()
    if daemon.lost_cycles:
        log.error("%d cycle%s lost while the store could not be written", daemon.lost_cycles,
                  " was" if daemon.lost_cycles == 1 else "s were")
    log.info("stopped after %d cycle%s", daemon.cycles_done, "" if daemon.cycles_done == 1 else "s")
    return EXIT_OK


def cmd_once(args, config: Config) -> int:
    from health import SystemMonitor

    try:
        choice = open_bus(config, args.simulate)
        stamp = stamp_clock(config, choice)
        outbox = open_store(config, wall_ms=stamp)
    except (CriticalError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if not args.json:
        print(choice.note, file=sys.stderr)
    reader = make_reader(config, choice.bus, outbox, wall_ms=stamp)
    daemon = Daemon(config, reader, outbox, ErrorHandler(None), monitor=SystemMonitor(str(outbox.directory)),
                    clock_guard=make_clock_guard(config) if stamp is None else None)
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
                                         store_path=Path(config.store.dir) / DB_NAME,
                                         clock_trusted=make_clock_guard(config).check().trusted, scan=scan,
                                         store_error=store_error):
        report(finding)
    if config.influx.kind != "none":  # a TLS failure here says why (expired, hostname mismatch, ...)
        report(autostart.influx_finding(config.influx))
    if config.mqtt.enabled:  # the broker's answer to the login: refused, TLS failure, unreachable
        report(mqtt_finding(config))
    reader = make_reader(config, choice.bus, None, window_s=min(config.sampling.window_s, 0.2))
    for r in reader.measure().channels:
        detail = r.error if not r.ok else f"{r.bus_voltage_v:.2f} V, {r.current_ma:.1f} mA, {r.power_w:.2f} W"
        report(autostart.Finding(f"reading {r.name}", detail, None if r.ok else MeasuringError(r.error)))
    print("all checks passed" if not failures else f"{failures} check(s) failed")
    return EXIT_OK if not failures else EXIT_FAILURE


def _open_readonly(config: Config) -> Outbox | None:
    """The store opened for reading, or None once the reason it cannot be is printed."""
    try:
        return Outbox(config.store.dir, readonly=True)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def cmd_status(args, config: Config) -> int:
    path = Path(config.store.dir) / DB_NAME
    if not path.exists():
        if not args.json:
            print(f"no readings stored yet in {config.store.dir} (writer: {writer_label(config)})")
            return EXIT_OK
        # --json always prints the one object (a script must not meet a sentence on a fresh install).
        stats = OutboxStats(queue_depth=0, oldest_unsent_ms=None, newest_ms=None, stored_total=0, quarantined=0,
                            dropped=0, size_bytes=0)
        state = {}
    else:
        if (outbox := _open_readonly(config)) is None:
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
        "store": str(path),
        "writer": writer_label(config),
        "queue_depth": stats.queue_depth,
        "oldest_unsent": iso_ms(stats.oldest_unsent_ms),
        "newest_reading": iso_ms(stats.newest_ms),
        "stored_total": stats.stored_total,
        "last_successful_send": state.get("last_send"),
        "last_error": state.get("last_error"),
        "held_for_clock_sync": stats.held,
        "quarantined": stats.quarantined,
        "dropped": stats.dropped,
        "size_mb": round(stats.size_bytes / 1_048_576, 3),
    }
    if config.mqtt.enabled:
        report["mqtt"] = state.get("mqtt")
    if config.update.enabled:
        import release

        # Where the service's pre-start keeps it: $STATE_DIRECTORY, which is the store dir install.sh writes.
        report["update_rolled_back"] = release.rollback_notice(release.state_dir_from_env()
                                                               or Path(config.store.dir))
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
    if (outbox := _open_readonly(config)) is None:
        return EXIT_FAILURE
    try:
        if args.format == "csv":
            export_csv(lambda: outbox.export(since_ms), sys.stdout, local_time=args.local_time)
        else:
            export_lp(outbox.export(since_ms), sys.stdout)
    except StoreError as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        outbox.close()
    return EXIT_OK


def report_days(args, today: dt.date) -> list[dt.date] | str:
    """The days `report` covers (oldest first), or the one-line problem with --day / --days."""
    if args.day is not None:
        try:
            day = dt.date.fromisoformat(args.day)
        except ValueError:
            return f"--day {args.day!r} is not a date (YYYY-MM-DD)"
        # Its local day's bounds need the next day, and Unix ms a year Python's datetime can hold.
        return [day] if 1970 <= day.year <= 9998 else f"--day {args.day!r} is not between 1970 and 9998"
    count = 2 if args.days is None else args.days
    if not 1 <= count <= 3660:
        return f"--days {count} is not between 1 and 3660"
    return [today - dt.timedelta(days=n) for n in range(count - 1, -1, -1)]


def cmd_report(args, config: Config) -> int:
    """Energy per unit and day (README "The ledger"), from the store or from an export file."""
    import ledger

    tz = ledger.local_zone()
    now_ms = time.time_ns() // 1_000_000
    days = report_days(args, dt.datetime.fromtimestamp(now_ms / 1000, tz).date())
    if isinstance(days, str):
        print(f"error: {days}", file=sys.stderr)
        return EXIT_USAGE
    # The points carry the simulated time when the daemon, run with this config, measured the model: the store
    # says which interval its settler used; an export (or a store not settled yet) is judged from the config.
    layout = ledger.Layout.from_config(config, simulated_stamps(config, _measures_model(config, simulate=False)))
    lo_ms, hi_ms = ledger.day_bounds(days[0], tz)[0], ledger.day_bounds(days[-1], tz)[1]
    totals, after = {}, None
    try:
        if args.source:
            acc = layout.accumulator(tz, lo_ms, hi_ms)
            acc.add_all(ledger.readings_from_export(Path(args.source), args.site))
            sites = []
        else:
            outbox = Outbox(config.store.dir, readonly=True)
            try:
                layout = dataclasses.replace(layout, interval_s=ledger.stamped_interval_s(outbox) or layout.interval_s)
                mark, totals = ledger.stored_totals(outbox, days, args.site)
                acc = layout.accumulator(tz, lo_ms, hi_ms)
                # The settled totals hold the readings before the mark; the points from it on add to them (a
                # mark ahead of now, a clock stepped back: which readings the totals hold is unknown).
                after = layout.accumulator(tz, max(lo_ms, mark), hi_ms) if mark is not None and mark <= now_ms \
                    else None
                for reading in ledger.readings_from_store(outbox.timed_points(lo_ms - layout.max_gap_ms,
                                                                              hi_ms + layout.max_gap_ms), args.site):
                    acc.add(reading)
                    # Readings before the mark (but the one a gap from it bridges) are the totals' already.
                    if after is not None and reading.time_ms >= after.lo_ms - layout.max_gap_ms - 1:
                        after.add(reading)
            finally:
                outbox.close()
            # This Pi's own site is always shown (a day without readings says "no data"); another only with data.
            sites = [config.site.name] if args.site in (None, config.site.name) else []
    except (StoreError, ledger.ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    document = ledger.report(acc, layout, days, now_ms, totals, sites, after)
    if args.site and args.site not in document["sites"]:
        print(f"error: no readings of site {args.site!r} in {args.source or config.store.dir}", file=sys.stderr)
        return EXIT_FAILURE
    if args.format == "json":
        print(json.dumps(document, indent=1))
    elif args.format == "csv":
        sys.stdout.write(ledger.as_csv(document))
    else:
        sys.stdout.write(ledger.as_table(document))
    return EXIT_OK


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
    export = add("export", "print every stored point (sent, unsent, held and quarantined; in line protocol the "
                           "held and quarantined ones as comments)", simulate=False)
    export.add_argument("--since", metavar="ISO", help="only points at or after this time")
    export.add_argument("--format", choices=("lp", "csv"), default="lp", help="line protocol (default) or CSV")
    export.add_argument("--local-time", action="store_true",
                        help="CSV: times in this machine's local time zone (default: UTC)")
    report = add("report", "energy per unit and day: generated, used, bought, sold, battery in and out",
                 simulate=False)
    when = report.add_mutually_exclusive_group()
    when.add_argument("--day", metavar="YYYY-MM-DD", help="one local calendar day")
    when.add_argument("--days", type=int, metavar="N", help="the last N days, today included (default 2)")
    report.add_argument("--site", metavar="S", help="only the points of this site (the `site` tag)")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table",
                        help="table (default), csv or json")
    report.add_argument("--from", dest="source", metavar="FILE",
                        help="read a `main.py export` file (line protocol or CSV) instead of the store")
    return parser


COMMANDS = {"run": cmd_run, "once": cmd_once, "check": cmd_check, "status": cmd_status, "export": cmd_export,
            "report": cmd_report}


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
    try:
        code = main()
        sys.stdout.flush()  # here, not at exit: a buffered pipe's last block fails here, inside the try
    except BrokenPipeError:  # `main.py export | head` stopped reading: not worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # where the exit's flush goes
        code = 141  # as a shell reports a command SIGPIPE ended
    sys.exit(code)
