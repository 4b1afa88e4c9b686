"""The per-cycle service work: what each finished cycle tells the outside world.

`ServiceHooks` is a listener of the measuring loop (daemon.Daemon): from each CycleReport it sends
systemd notifications (ready, status, watchdog), marks a self-updated release good, shows an update
rollback on the LED, updates the live page and writes the console line. A new output is one more
listener beside it.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from config import Config
from daemon import CycleReport
from outbox import DB_NAME, Outbox, StoreError
from rpi_errors import BLINK_CODES, ErrorHandler, RollbackNotice

log = logging.getLogger(__name__)

# A self-updated release is "good" (no longer rolled back) only after this much healthy running.
GOOD_AFTER_CYCLES = 5
GOOD_AFTER_S = 900.0
ROLLBACK_NOTICE_CHECK_S = 60.0


@contextlib.contextmanager
def _page_store(directory: str, what: str, *, strict: bool = False) -> Iterator[Outbox | None]:
    """A read-only connection to the store for the page's server thread (None when there is no store yet);
    a StoreError while reading is logged as `what` and ends the read. `strict`: a store that exists but
    cannot be opened or read raises StoreError instead (the page answers 503, not an empty chart). Closed
    on leaving."""
    try:
        box = Outbox(directory, readonly=True)
    except StoreError:
        if strict and (Path(directory) / DB_NAME).exists():
            raise
        yield None
        return
    try:
        yield box
    except StoreError as exc:
        log.warning("%s: %s", what, exc)
        if strict:
            raise
    finally:
        box.close()


class ServiceHooks:
    """What runs around each cycle for the outside world: systemd notifications, the self-updater's
    "this release works" mark, and the live page. Called in the measuring thread; each step is cheap."""

    def __init__(self, config: Config, handler: ErrorHandler, state_dir: Path, *,
                 console: Callable[[str], None] | None = None, sender=None,
                 clock: Callable[[], float] = time.monotonic,
                 metrics: Callable[[], tuple[bytes, str]] | None = None,
                 wall_ms: Callable[[], int] | None = None) -> None:
        """`console(line)` writes the compact per-cycle line (None: nobody watches a terminal);
        `sender`: the delivery thread (its counters), None without a writer; `metrics()`: what the
        page's `/metrics` serves (metrics.DaemonMetrics.render); `wall_ms()`: the time the points carry
        (Unix ms: the simulated time with `[simulation] stamp = "simulated"`), None: the wall clock."""
        from release import state_dir_from_env
        from sdnotify import Notifier

        self.config = config
        self.handler = handler
        self.console = console
        self.sender = sender
        self.metrics = metrics
        self.wall_ms = wall_ms
        # Where the updater keeps its state: $STATE_DIRECTORY under systemd (what its pre-start uses),
        # else `state_dir` (tests, runs by hand), never a relative [store] dir.
        self.update_state_dir = state_dir_from_env() or state_dir
        self.notifier = Notifier()
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
            with _page_store(config.store.dir, "live page history cut short", strict=True) as box:
                if box is not None:
                    yield from box.export(since_ms)

        from ledger import Layout, Today, local_zone, settled_day

        def settled(day):
            with _page_store(config.store.dir, "live page: today's settled totals unreadable, reading the day's "
                                               "points") as box:
                if box is not None:
                    return settled_day(box, day)
            return None, []

        wall_ms = self.wall_ms or (lambda: time.time_ns() // 1_000_000)
        # Today's totals per unit beside the diagram, from the store (its own connection, the server's thread).
        today = Today(history, Layout.from_config(config, simulated_time=self.wall_ms is not None), local_zone(),
                      wall_ms, settled=settled)
        page = FlowPage(config.web.listen, channels=config.channels, site=config.site.name, history=history,
                        plant_unit=config.simulation.plant, metrics=self.metrics, today=today.totals,
                        clock=lambda: wall_ms() / 1000)
        try:
            page.start()
        except OSError as exc:
            log.warning("live page not started on %s: %s", config.web.listen, exc.strerror or exc)
            return
        from view import make_snapshot

        self.page = page  # FlowPage.start logged its URL
        self._make_snapshot = make_snapshot

    def _check_rollback_notice(self) -> None:
        """Show an update rollback on the LED until `updater.py acknowledge` (or a day of good running)
        clears it; looked at once a minute (one small file read)."""
        now = self._clock()
        if not self.config.update.enabled or now - self._notice_checked < ROLLBACK_NOTICE_CHECK_S:
            return
        self._notice_checked = now
        import release

        notice = release.rollback_notice(self.update_state_dir)
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
        sender = self.sender
        return sender is None or sender.total_requests > 0 or self._clock() - self._began >= GOOD_AFTER_S

    def after_cycle(self, report: CycleReport) -> None:
        """The listener: everything one finished cycle tells the outside world."""
        cycle, stored = report.cycle, report.stored
        # READY after the first complete cycle, stored or held in memory (its STATUS and the LED say the store
        # fails): waiting for a stored one, systemd would end a start whose store is full after
        # TimeoutStartSec, and the held cycles with it, again at every restart.
        first = not self._ready
        self._ready = True
        if stored:
            self._stored_cycles += 1
        if self.config.update.enabled:
            if not self._marked_good and self.mark_good_due():
                import release

                self._marked_good = True
                release.mark_good(self.update_state_dir)
            self._check_rollback_notice()
        tier = self.handler.top_tier
        if self.notifier.enabled:  # off systemd, build nothing
            if first:
                self.notifier.ready(self._status(report, tier))
            else:
                self.notifier.status(self._status(report, tier))
            # After every complete cycle, stored or not: while the store fails, cycles are held in
            # memory and the Critical LED says so; a watchdog restart would only lose them.
            self.notifier.watchdog()
        if self.page is not None:
            self.page.update(self._make_snapshot(cycle, self.config.channels, tier=tier,
                                                 summary=self.handler.summary(),
                                                 meaning=self.meaning(tier), system=report.system))
        if self.console is not None:
            self.console(console_line(cycle, stored=stored, queue=report.queue_depth,
                                      delivered=self.sender.total_delivered if self.sender else None))

    def meaning(self, tier) -> str:
        """What the page says the LED's `tier` (None: all well) means for this config."""
        if tier is None and self.config.influx.kind == "none":
            # "sending normally" would be untrue: nothing is configured to send to.
            return LOCAL_ONLY_MEANING
        return BLINK_CODES[tier].meaning

    def _status(self, report: CycleReport, tier) -> str:
        when = dt.datetime.fromtimestamp(report.cycle.time_ms / 1000).strftime("%H:%M:%S")
        held = "" if report.stored else " not stored (held in memory)"
        return f"last cycle {when}{held}, queue {report.queue_depth}, LED: {tier.name if tier is not None else 'all well'}"

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
