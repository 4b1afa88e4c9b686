"""The cooperative's ledger: energy per unit, per local calendar day and hour, integrated from the stored points.

Rules (README "The ledger"): each channel's `power_w` is integrated over time between consecutive readings
by the trapezoid rule; a gap longer than two intervals is not bridged and counts as unmeasured time. A
segment is split at local hour boundaries and where the power changes sign (linear interpolation), so the
energy in and out of a battery, or bought and sold on a trade line, are kept apart. Figures by role:
solar -> generated, load -> used, battery -> battery_in (+, charging) / battery_out (-), exchange ->
bought / sold from the unit's own view (a house's trade line reads + when it buys; the plant's, + when it
sells). Each figure carries its coverage: measured channel-seconds over the period's channel-seconds. A
role no channel measures is "not measured" (None), never 0.

Daily totals are settled, hour by hour, into the store's `daily_totals` table before the raw points age
out (`Settler`, called by the store's housekeeping), so a month or a year can be reported later. Pure
computation except `Settler` and `Today`, which read (and, `Settler`, write) through the Outbox they are
handed. Not thread-safe: one object per thread.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import math
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from config import MAX_INTERVAL_S, MAX_SPEED
from config_check import escape_controls
from reports import NOT_DELIVERABLE, STATUS_COLUMN, from_text_cell, text_cell
from schema import ELECTRICITY, POWER_FIELDS, channel_power, parse_line

log = logging.getLogger(__name__)

FIGURES = ("generated", "used", "bought", "sold", "battery_in", "battery_out")
# Which figures a role's energy in (+) and out (-) go to; the plant's trade line reads + when it sells.
ROLE_FIGURES = {"solar": ("generated", None), "load": ("used", None), "battery": ("battery_in", "battery_out"),
                "exchange": ("bought", "sold")}
PLANT_EXCHANGE = ("sold", "bought")
FIGURE_ROLE = {"generated": "solar", "used": "load", "bought": "exchange", "sold": "exchange",
               "battery_in": "battery", "battery_out": "battery"}
HOUR_MS = 3_600_000
# Daily totals are settled in slices of 15 minutes, at most 4 per housekeeping pass (every 30 cycles): a
# slice of the full model (15 channels at 3 s) is ~4,500 lines, about 0.1 s of parsing here, so a pass never
# stalls a measuring cycle, and a long backlog (a first start on an old store) is worked off over many passes.
SETTLE_SLICE_MS = 15 * 60_000
SETTLE_SLICES_PER_PASS = 4
# Settling runs in the measuring thread (the store's housekeeping): a pass stops starting slices once it has
# spent this long, so catching up on an old store (or a slow Pi) never holds a cycle up for more than ~a slice.
SETTLE_BUDGET_S = 0.05
_SETTLED_KEY = "ledger:settled_ms"
# The interval the settler bridged gaps with, in the points' own time (the simulated time's with
# `stamp = "simulated"`): stored with each settled mark, so `report` need not guess how the daemon stamped.
_INTERVAL_KEY = "ledger:interval_s"
_MAX_STAMPED_INTERVAL_S = MAX_INTERVAL_S * MAX_SPEED  # the largest the config can make it


def local_zone(env: Mapping[str, str] | None = None) -> dt.tzinfo:
    """This machine's time zone with its DST rules: $TZ, else /etc/localtime, else UTC."""
    env = os.environ if env is None else env
    name = env.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            log.warning("TZ=%r is not a known time zone: using /etc/localtime", name)
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return dt.timezone.utc


@dataclass(frozen=True)
class Reading:
    """One channel's power at one time (W, signed as stored)."""

    time_ms: int
    site: str
    unit: str
    channel: str
    power_w: float


# -- where readings come from -------------------------------------------------------------------------------
def readings_from_store(rows: Iterable[tuple[int, str, str]], site: str | None = None) -> Iterator[Reading]:
    """Readings of `Outbox.export` (or `timed_points`) rows through the one parser (schema.parse_line). Held
    (clock not yet trusted) and quarantined lines are left out, as on the page's history; `site` keeps only
    that site."""
    for _, line, status in rows:
        if status not in ("sent", "unsent") or not line.startswith(ELECTRICITY + ","):
            continue
        try:
            point = parse_line(line, fields=POWER_FIELDS)
        except ValueError:
            continue
        reading = _reading(point.time_ms, point.tags, point.fields.get("power_w"))
        if reading is not None and (site is None or reading.site == site):
            yield reading


def _reading(time_ms: int, tags: Mapping[str, str], power) -> Reading | None:
    found = channel_power(tags, power)
    if found is None:
        return None
    channel, power_w = found
    return Reading(time_ms, tags.get("site", ""), tags.get("unit", channel), channel, power_w)


class ExportError(ValueError):
    """An export file that cannot be read: the message names the file and line."""


def readings_from_export(path: Path, site: str | None = None) -> Iterator[Reading]:
    """Readings of a file `main.py export` wrote: line protocol (`--format lp`) or CSV (`--format csv`),
    told apart by the CSV header. Raises ExportError naming the file and line of the first bad line."""
    try:
        f = open(path, encoding="utf-8", newline="")
    except OSError as exc:
        raise ExportError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    with f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # /dev/zero, a FIFO: no end, or no file at all
            raise ExportError(f"{path}: not a regular file")
        try:
            first = f.readline(_MAX_LINE_CHARS)
        except UnicodeDecodeError as exc:
            raise ExportError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        f.seek(0)
        lines = _bounded_lines(f, path)
        readings = _csv_readings(lines, path) if first.startswith("time,measurement,") else _lp_readings(lines, path)
        try:
            for reading in readings:
                if site is None or reading.site == site:
                    yield reading
        except UnicodeDecodeError as exc:
            raise ExportError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        except csv.Error as exc:
            raise ExportError(f"{path}: not a CSV file `main.py export` wrote ({exc})") from None


_MAX_LINE_CHARS = 65536  # an exported line is a few hundred characters: a longer one is not an export


def _bounded_lines(f, path: Path) -> Iterator[str]:
    """The file's lines, each read with a bound (a file without line breaks is never read whole)."""
    for number, line in enumerate(iter(lambda: f.readline(_MAX_LINE_CHARS + 1), ""), 1):
        if len(line) > _MAX_LINE_CHARS:
            raise ExportError(f"{path}: line {number} is longer than {_MAX_LINE_CHARS // 1024} K characters")
        yield line


def _finite(power, path: Path, number: int):
    if isinstance(power, float) and not math.isfinite(power):
        raise ExportError(f"{path}: line {number}: power_w {power!r} is not a finite number")
    return power


def _lp_readings(lines: Iterable[str], path: Path) -> Iterator[Reading]:
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line or line.startswith("#") or not line.startswith(ELECTRICITY + ","):
            continue
        try:
            point = parse_line(line, fields=POWER_FIELDS)
        except ValueError:
            raise ExportError(f"{path}: line {number} is not line protocol: {line[:60]!r}") from None
        reading = _reading(point.time_ms, point.tags, _finite(point.fields.get("power_w"), path, number))
        if reading is not None:
            yield reading


def _csv_readings(lines: Iterable[str], path: Path) -> Iterator[Reading]:
    rows = csv.reader(lines)
    header = next(rows)
    # A tag that clashes with a field name is headed "name (tag)" (reports.export_csv).
    names = [h.removesuffix(" (tag)") for h in header]
    if not {"time", "measurement", "power_w"} <= set(names):
        raise ExportError(f"{path}: line 1: no time, measurement or power_w column "
                          "(not a `main.py export --format csv` file?)")
    col = {name: names.index(name) for name in ("time", "measurement", "site", "unit", "channel", "power_w")
           if name in names}
    # Exports since the status column: the last one (a tag or field of that name is headed apart).
    status = len(header) - 1 if header[-1] == STATUS_COLUMN else None
    for number, row in enumerate(rows, 2):
        if len(row) != len(header):
            raise ExportError(f"{path}: line {number} has {len(row)} cells, the header {len(header)}")
        if row[col["measurement"]] != ELECTRICITY or not row[col["power_w"]]:
            continue
        if status is not None and row[status] in NOT_DELIVERABLE:
            continue  # held for the clock or quarantined: left out, as from the store
        try:
            when = dt.datetime.fromisoformat(row[col["time"]].replace("Z", "+00:00"))
            if when.tzinfo is None:
                raise ValueError("no time zone")
            power = _finite(float(row[col["power_w"]]), path, number)
        except ValueError:
            raise ExportError(f"{path}: line {number}: bad time {row[col['time']]!r} or power_w "
                              f"{row[col['power_w']]!r}") from None
        tags = {name: from_text_cell(row[i]) for name, i in col.items() if name in ("site", "unit", "channel") and row[i]}
        reading = _reading(round(when.timestamp() * 1000), tags, power)
        if reading is not None:
            yield reading


# -- integration ---------------------------------------------------------------------------------------------
class Accumulator:
    """Integrates readings (in time order per channel) into local-hour buckets inside [lo_ms, hi_ms).

    `roles`: channel name -> role; readings of other channels are counted in `unknown` and left out.
    `max_gap_ms`: a longer gap between two readings of a channel is not bridged (two intervals).
    Buckets: (site, unit, role, hour_start_ms) -> [in_wh, out_wh, measured_s].
    """

    def __init__(self, roles: Mapping[str, str], max_gap_ms: int, tz: dt.tzinfo,
                 lo_ms: int = -(2**62), hi_ms: int = 2**62, unit_of: Mapping[str, str] | None = None) -> None:
        self.roles = dict(roles)
        # A configured channel counts for its configured unit, whatever the line's `unit` tag says (lines
        # stored before the `channel` tag had the channel's name there; another site may name units so).
        self.unit_of = dict(unit_of or {})
        self.max_gap_ms = max_gap_ms
        self.tz = tz
        self.lo_ms, self.hi_ms = lo_ms, hi_ms
        self.buckets: dict[tuple[str, str, str, int], list[float]] = {}
        self.sites: set[str] = set()
        self.units: dict[str, set[str]] = {}
        self.unknown: set[str] = set()
        self.last_ms: int | None = None
        self._last: dict[tuple[str, str], tuple[int, float]] = {}
        self._hour = (0, 0)

    def add_all(self, readings: Iterable[Reading]) -> Accumulator:
        for reading in readings:
            self.add(reading)
        return self

    def add(self, r: Reading) -> None:
        role = self.roles.get(r.channel)
        if role is None:
            self.unknown.add(r.channel)
            return
        self.last_ms = r.time_ms if self.last_ms is None else max(self.last_ms, r.time_ms)
        unit = self.unit_of.get(r.channel, r.unit)
        if self.lo_ms <= r.time_ms < self.hi_ms:
            self.sites.add(r.site)
            self.units.setdefault(r.site, set()).add(unit)
        key = (r.site, r.channel)
        previous = self._last.get(key)
        if previous is not None and r.time_ms <= previous[0]:
            return  # not later than the last reading (a re-sent copy, a clock step back): nothing to bridge
        self._last[key] = (r.time_ms, r.power_w)
        if previous is None or r.time_ms - previous[0] > self.max_gap_ms + 1:  # + 1: stamps are rounded to ms
            return
        t0, p0 = previous
        a, b = max(t0, self.lo_ms), min(r.time_ms, self.hi_ms)
        slope = (r.power_w - p0) / (r.time_ms - t0)
        while a < b:
            hour, hour_end = self._hour_of(a)
            e = min(b, hour_end)
            pa, pe = p0 + slope * (a - t0), p0 + slope * (e - t0)
            cell = self.buckets.setdefault((r.site, unit, role, hour), [0.0, 0.0, 0.0])
            span_h = (e - a) / HOUR_MS
            if pa * pe >= 0:
                area = (pa + pe) / 2 * span_h
                cell[0 if area >= 0 else 1] += abs(area)
            else:  # the sign changes inside: split where the line crosses zero
                share = pa / (pa - pe)
                first, second = pa / 2 * span_h * share, pe / 2 * span_h * (1 - share)
                cell[0 if first > 0 else 1] += abs(first)
                cell[0 if second > 0 else 1] += abs(second)
            cell[2] += (e - a) / 1000
            a = e

    def _hour_of(self, ms: int) -> tuple[int, int]:
        if not self._hour[0] <= ms < self._hour[1]:
            start = hour_start(ms, self.tz)
            self._hour = (start, start + HOUR_MS)
        return self._hour


def hour_start(ms: int, tz: dt.tzinfo) -> int:
    """The start (Unix ms) of the local hour holding `ms`."""
    local = dt.datetime.fromtimestamp(ms / 1000, tz)
    return round(local.replace(minute=0, second=0, microsecond=0).timestamp() * 1000)


def day_bounds(day: dt.date, tz: dt.tzinfo) -> tuple[int, int]:
    """[start, end) of a local calendar day in Unix ms (23 or 25 hours on a DST change)."""
    start = dt.datetime.combine(day, dt.time(), tz)
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tz)
    return round(start.timestamp() * 1000), round(end.timestamp() * 1000)


def _figure(wh: float, measured_s: float, period_s: float, channels: int) -> dict:
    coverage = min(1.0, measured_s / (period_s * channels)) if period_s > 0 and channels else 0.0
    # Nothing measured: the energy is unknown, never 0.
    # A few seconds measured in a day still show as measured (0.0001), never as 0 beside a figure.
    shown = max(round(coverage, 4), 0.0001) if measured_s > 0 else round(coverage, 4)
    return {"wh": round(wh, 3) if measured_s > 0 else None, "coverage": shown}


NOT_MEASURED = {"wh": None, "coverage": None, "not_measured": True}


@dataclass(frozen=True)
class Layout:
    """What the config says about the units: channel -> role and unit, the plant, the interval."""

    roles: Mapping[str, str]
    units: Mapping[str, Mapping[str, int]]  # unit -> role -> how many channels measure it
    plant: str
    interval_s: float
    site: str
    unit_of: Mapping[str, str] = field(default_factory=dict)  # channel -> its unit, as configured

    @classmethod
    def from_config(cls, config, simulated_time: bool) -> Layout:
        """`simulated_time`: the points carry the simulated model's time (`[simulation] stamp = "simulated"`
        while the model is measured, as main.stamp_clock decides), so they are `speed` times further apart."""
        interval_s = config.sampling.interval_s
        if simulated_time:
            interval_s *= config.simulation.speed  # the points are this far apart in their own (simulated) time
        return cls.from_channels(config.channels, config.simulation.plant, interval_s, config.site.name)

    @classmethod
    def from_channels(cls, channels: Sequence, plant: str, interval_s: float, site: str) -> Layout:
        """From configured channels (.name, .role, .unit_name)."""
        units: dict[str, dict[str, int]] = {}
        for c in channels:
            per_role = units.setdefault(c.unit_name, {})
            per_role[c.role] = per_role.get(c.role, 0) + 1
        return cls({c.name: c.role for c in channels}, units, plant, interval_s, site,
                   {c.name: c.unit_name for c in channels})

    @property
    def max_gap_ms(self) -> int:
        return round(2 * self.interval_s * 1000)

    def accumulator(self, tz: dt.tzinfo, lo_ms: int, hi_ms: int, max_gap_ms: int | None = None) -> Accumulator:
        """An Accumulator over [lo_ms, hi_ms) for these channels' roles and units (gap: max_gap_ms)."""
        gap = self.max_gap_ms if max_gap_ms is None else max_gap_ms
        return Accumulator(self.roles, gap, tz, lo_ms, hi_ms, self.unit_of)

    def figures(self, unit: str, role: str, in_wh: float, out_wh: float) -> dict[str, float]:
        into, out = PLANT_EXCHANGE if (role == "exchange" and unit == self.plant) else ROLE_FIGURES[role]
        result = {into: in_wh}
        if out is not None:
            result[out] = out_wh
        return result


def unit_figures(layout: Layout, unit: str, cells: Mapping[str, list[float]], period_s: float) -> dict:
    """One unit's figures over a period from its role cells ([in_wh, out_wh, measured_s] per role)."""
    roles = layout.units.get(unit, {})
    result = {}
    for figure in FIGURES:
        role = FIGURE_ROLE[figure]
        if role not in roles:
            result[figure] = dict(NOT_MEASURED)
            continue
        in_wh, out_wh, measured_s = cells.get(role, (0.0, 0.0, 0.0))
        value = layout.figures(unit, role, in_wh, out_wh).get(figure, 0.0)
        result[figure] = _figure(value, measured_s, period_s, roles[role])
    return result


def _by_day(acc: Accumulator) -> tuple[dict, dict]:
    """acc's buckets summed per (site, day ISO, unit) -> role -> [in_wh, out_wh, measured_s], and per
    (site, unit, hour) -> role -> cell."""
    by_day: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    by_hour: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    for (site, unit, role, hour), cell in acc.buckets.items():
        day = dt.datetime.fromtimestamp(hour / 1000, acc.tz).date().isoformat()
        day_cells = by_day.setdefault((site, day, unit), {}).setdefault(role, [0.0, 0.0, 0.0])
        for i in range(3):
            day_cells[i] += cell[i]
        by_hour.setdefault((site, unit, hour), {})[role] = cell
    return by_day, by_hour


def report(acc: Accumulator, layout: Layout, days: Sequence[dt.date], now_ms: int,
           totals: Mapping[tuple[str, str, str], Mapping[str, Sequence[float]]] | None = None,
           sites: Iterable[str] = (), after: Accumulator | None = None) -> dict:
    """The `report` document: sites -> days -> units -> figures (each {"wh", "coverage"}) and hours.

    `totals`: settled rows from the store, (site, day ISO, unit) -> role -> (in_wh, out_wh, measured_s,
    channels), which hold the readings before the settled mark; `after`: the same readings as `acc` from the
    mark on (its lo_ms), None when there is no mark to trust. A day's role is the settled totals plus the
    points after the mark where those saw more of it than all the remaining points do (the points before the
    mark aged out), else the points. Hours are always the points'. The period of today ends at `now_ms`.
    """
    totals = totals or {}
    by_day, by_hour = _by_day(acc)
    after_day = _by_day(after)[0] if after is not None else {}
    all_sites = sorted(set(sites) | acc.sites | {k[0] for k in totals})
    document: dict = {"time_zone": str(getattr(acc.tz, "key", None) or acc.tz), "interval_s": layout.interval_s,
                      "sites": {}}
    for site in all_sites:
        site_days = {}
        for day in days:
            start_ms, end_ms = day_bounds(day, acc.tz)
            period_s = max(0.0, (min(end_ms, now_ms) - start_ms) / 1000)
            iso = day.isoformat()
            seen = acc.units.get(site, set()) | {k[2] for k in totals if k[:2] == (site, iso)}
            units = list(layout.units) + sorted(seen - set(layout.units))  # the config's order, then others
            units_doc = {}
            for unit in units:
                cells = dict(by_day.get((site, iso, unit), {}))
                settled, later = totals.get((site, iso, unit), {}), after_day.get((site, iso, unit), {})
                used_points_after = used_totals = False
                for role in set(settled) | (set(later) if settled else set()):
                    row, tail = settled.get(role, (0.0, 0.0, 0.0)), later.get(role, (0.0, 0.0, 0.0))
                    combined = [row[i] + tail[i] for i in range(3)]
                    # Over a second more (float sums of the same readings differ in their last digits).
                    if combined[2] > cells.get(role, (0.0, 0.0, 0.0))[2] + 1:
                        cells[role] = combined
                        used_totals = True
                        used_points_after |= tail[2] > 0
                source = ("daily totals and points" if used_points_after else "daily totals") if used_totals \
                    else "points"
                doc = unit_figures(layout, unit, cells, period_s)
                doc["source"] = source
                hours = {}
                hour = start_ms
                while hour < min(end_ms, now_ms):
                    local = dt.datetime.fromtimestamp(hour / 1000, acc.tz)
                    label = local.strftime("%H:%M")
                    if label in hours:  # the hour a DST change repeats: the second one says its offset
                        label = local.strftime("%H:%M%z")
                    hour_s = max(0.0, (min(hour + HOUR_MS, now_ms) - hour) / 1000)
                    hours[label] = unit_figures(layout, unit, by_hour.get((site, unit, hour), {}), hour_s)
                    hour += HOUR_MS
                doc["hours"] = hours
                units_doc[unit] = doc
            site_days[iso] = {"period_s": period_s, "units": units_doc}
        document["sites"][site] = {"days": site_days}
    if acc.unknown:
        document["unknown_channels"] = sorted(acc.unknown)
    return document


# -- daily totals kept in the store ---------------------------------------------------------------------------
class Settler:
    """Settles 15-minute slices into the store's daily_totals before the raw points can age out.

    Called by `Outbox.enforce_limits` (its `before_prune`) in the measuring thread, with that Outbox; returns
    the time from which raw points must be kept (the retention prune stops there), so pruning never loses a
    day's totals. A slice is settled once the reading after it must be in (two intervals and a minute later);
    while the store holds lines waiting for the clock to sync (their time is not known yet), only the slices
    before the newest point with a known time stored before them. Not thread-safe (one Settler per store).
    """

    def __init__(self, layout: Layout, tz: dt.tzinfo, wall_ms: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.layout = layout
        self.tz = tz
        self._wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self._clock = clock  # for the pass's time budget (SETTLE_BUDGET_S)

    def __call__(self, outbox) -> int | None:
        try:
            return self.settle(outbox)
        except Exception as exc:  # noqa: BLE001 - the ledger must never stop the store's housekeeping
            log.warning("daily totals not settled this time: %s", exc)
            settled = _settled_mark(outbox)
            return settled - self.layout.max_gap_ms if settled is not None else -(2**62)

    def settle(self, outbox, max_slices: int = SETTLE_SLICES_PER_PASS) -> int:
        """Settle up to `max_slices` completed 15-minute slices (fewer once SETTLE_BUDGET_S is spent; always at
        least one that is ready); returns the keep-from time (Unix ms)."""
        gap = self.layout.max_gap_ms
        ready_ms = self._wall_ms() - gap - 60_000  # the reading after a slice must be stored by then
        ready_ms -= ready_ms % SETTLE_SLICE_MS
        start = _settled_mark(outbox)
        if outbox.queue_stats().held:
            # Lines held for the clock get their true time only once it syncs, and the wall clock may be
            # anywhere. They were measured after every point stored before the first of them, so the slices
            # whose interpolation ends before the newest of those are settled; the rest wait for the sync.
            # (Not the newest known point: a release that failed leaves held lines older than later ones.)
            if start is None:  # never settled, or the mark lost: where to start waits for the sync too
                return -(2**62)
            # Read every pass (a scan of the held lines' index, as queue_stats' count every cycle).
            newest = outbox.newest_known_time_ms()
            known_ms = -(2**62) if newest is None else newest - gap
            ready_ms = min(ready_ms, known_ms - known_ms % SETTLE_SLICE_MS)
        if start is None:
            oldest = outbox.next_time_ms(-(2**62))
            if oldest is None:
                return -(2**62)
            start = self._restart_from(outbox, oldest)
        began_s = self._clock()
        for done in range(max_slices):
            end = start + SETTLE_SLICE_MS
            if end > ready_ms or (done and self._clock() - began_s > SETTLE_BUDGET_S):
                break
            acc = self.layout.accumulator(self.tz, start, end, gap)
            acc.add_all(readings_from_store(outbox.timed_points(start - gap, end + gap)))
            rows = []
            for (site, unit, role, hour), (in_wh, out_wh, measured_s) in acc.buckets.items():
                day = dt.datetime.fromtimestamp(hour / 1000, self.tz).date().isoformat()
                channels = self.layout.units.get(unit, {}).get(role, 1)
                rows.append((day, site, unit, role, in_wh, out_wh, measured_s, channels))
            if not acc.buckets:  # nothing in this slice: skip the empty ones up to the next reading's
                following = outbox.next_time_ms(end)
                target = ready_ms if following is None else min(following - following % SETTLE_SLICE_MS, ready_ms)
                end = max(end, target)
            outbox.add_daily_totals(rows, {_SETTLED_KEY: str(end), _INTERVAL_KEY: repr(self.layout.interval_s)})
            start = end
        return start - gap


    def _restart_from(self, outbox, oldest_ms: int) -> int:
        """Where settling starts without a mark. A store that never settled: the oldest point's slice. One
        whose mark was lost (a damaged row) while totals exist: totals are added up, so settling the same
        slices again would count them twice; the oldest point's day is kept as it stands (its earlier
        readings may have aged out, so only its totals hold them) and every later day is settled again,
        from its points, after its totals are dropped."""
        next_day = dt.datetime.fromtimestamp(oldest_ms / 1000, self.tz).date() + dt.timedelta(days=1)
        if outbox.drop_daily_totals_from(next_day.isoformat()):
            log.warning("the ledger's settled mark was lost: daily totals from %s on are settled again", next_day)
            return day_bounds(next_day, self.tz)[0]
        return oldest_ms - oldest_ms % SETTLE_SLICE_MS


def _settled_mark(outbox) -> int | None:
    """The stored settled-up-to time (Unix ms); None when there is none or it does not read as a whole
    number (a damaged row: Settler._restart_from says where settling starts again)."""
    return _mark_ms(outbox.state(_SETTLED_KEY).get(_SETTLED_KEY))


def _mark_ms(settled: str | None) -> int | None:
    try:
        return int(settled) if settled else None
    except ValueError:
        log.warning("ignoring the store's unreadable %s value %r", _SETTLED_KEY, settled[:40])
        return None


def stamped_interval_s(outbox) -> float | None:
    """The interval (s, in the points' own time) the daemon's settler last used, from the store; None when
    it has settled nothing yet or the value does not read as one (a damaged row: `report` then decides from
    the config)."""
    text = outbox.state(_INTERVAL_KEY).get(_INTERVAL_KEY)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if 0 < value <= _MAX_STAMPED_INTERVAL_S:  # nan and inf fail too
        return value
    log.warning("ignoring the store's unreadable %s value %r", _INTERVAL_KEY, text[:40])
    return None


def settled_day(outbox, day: dt.date) -> tuple[int | None, list[tuple]]:
    """(settled mark, the day's daily_totals rows) from one snapshot of the store (`Today`'s `settled`)."""
    mark, rows = outbox.settled_totals([day.isoformat()], _SETTLED_KEY)
    return _mark_ms(mark), rows


def stored_totals(outbox, days: Sequence[dt.date], site: str | None = None
                  ) -> tuple[int | None, dict[tuple[str, str, str], dict[str, tuple[float, float, float, int]]]]:
    """(the settled mark, Unix ms or None; the settled daily_totals of `days`: (site, day, unit) -> role ->
    row), from one snapshot of the store."""
    mark, rows = outbox.settled_totals([d.isoformat() for d in days], _SETTLED_KEY)
    result: dict = {}
    for day, row_site, unit, role, in_wh, out_wh, measured_s, channels in rows:
        if site is None or row_site == site:
            result.setdefault((row_site, day, unit), {})[role] = (in_wh, out_wh, measured_s, channels)
    return _mark_ms(mark), result


# -- the live page's "today" ----------------------------------------------------------------------------------
TODAY_FIGURES = ("generated", "used", "sold", "bought")
TODAY_CACHE_S = 30.0


class Today:
    """Today's totals per unit for the live page, read from the store incrementally (at most every 30 s).

    `source(since_ms)`: the store's rows from that time, as Outbox.export gives them (its own connection:
    called in a server thread). `settled(day)`: (settled mark, the day's daily_totals rows), as
    `settled_day` reads them (None: none are used). The part of the day the settler has already summed
    is taken from its totals, so the first call late in the day reads only the points after the mark
    (minutes), not the whole day. Starts afresh at local midnight. Thread-safety: call from one thread at a
    time (the page holds a lock).
    """

    def __init__(self, source: Callable[[int], Iterable[tuple[int, str, str]]], layout: Layout, tz: dt.tzinfo,
                 wall_ms: Callable[[], int] | None = None, *,
                 settled: Callable[[dt.date], tuple[int | None, list[tuple]]] | None = None) -> None:
        self._source = source
        self._settled = settled
        self.layout = layout
        self.tz = tz
        self._wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self._acc: Accumulator | None = None
        self._day: dt.date | None = None
        self._read_ms: int | None = None
        self._base: dict[str, dict[str, list[float]]] = {}  # unit -> role -> settled [in_wh, out_wh, measured_s]
        self._cached: tuple[int, dict] | None = None

    def totals(self) -> dict:
        """{"day": ISO, "units": {unit: {generated/used/sold/bought: {"wh", "coverage"}}}}."""
        now_ms = self._wall_ms()
        if self._cached and 0 <= now_ms - self._cached[0] < TODAY_CACHE_S * 1000:
            return self._cached[1]
        day = dt.datetime.fromtimestamp(now_ms / 1000, self.tz).date()
        start_ms, end_ms = day_bounds(day, self.tz)
        if day != self._day or self._acc is None:
            begin_ms, self._base = self._settled_part(day, start_ms, now_ms)
            self._acc = self.layout.accumulator(self.tz, begin_ms, end_ms)
            self._day, self._read_ms = day, begin_ms - self.layout.max_gap_ms
        for reading in readings_from_store(self._source(self._read_ms), self.layout.site):
            self._acc.add(reading)
        if self._acc.last_ms is not None:
            self._read_ms = self._acc.last_ms + 1  # a cycle's lines share one time and commit together
        cells = {unit: {role: list(cell) for role, cell in roles.items()} for unit, roles in self._base.items()}
        for (_, unit, role, _), cell in self._acc.buckets.items():
            total = cells.setdefault(unit, {}).setdefault(role, [0.0, 0.0, 0.0])
            for i in range(3):
                total[i] += cell[i]
        period_s = max(0.0, (min(end_ms, now_ms) - start_ms) / 1000)
        seen = set(cells) | self._acc.units.get(self.layout.site, set())
        units = list(self.layout.units) + sorted(seen - set(self.layout.units))  # the config's order, then others
        result = {"day": day.isoformat(),
                  "units": {u: {f: v[f] for f in TODAY_FIGURES}
                            for u in units for v in (unit_figures(self.layout, u, cells.get(u, {}), period_s),)}}
        self._cached = (now_ms, result)
        return result

    def _settled_part(self, day: dt.date, start_ms: int, now_ms: int) -> tuple[int, dict]:
        """(where the points take over from the settled totals, those totals per unit and role)."""
        if self._settled is None:
            return start_ms, {}
        mark, rows = self._settled(day)
        if mark is None or not start_ms < mark <= now_ms:
            # Nothing of today settled yet; or a mark ahead of now (the clock stepped back, a demo run again on
            # its store): the totals cannot say which readings they hold, so the day is read from its points.
            return start_ms, {}
        base: dict[str, dict[str, list[float]]] = {}
        for _, site, unit, role, in_wh, out_wh, measured_s, _ in rows:
            if site == self.layout.site:
                base.setdefault(unit, {})[role] = [in_wh, out_wh, measured_s]
        return mark, base


# -- formats -------------------------------------------------------------------------------------------------
def _cell(figure: dict) -> str:
    if figure.get("not_measured"):
        return "not measured"
    if figure["wh"] is None:
        return "no data"
    return f"{figure['wh']:.2f} ({figure['coverage'] * 100:.0f}%)"


def as_table(document: dict) -> str:
    """The report for a person: one block per site and day, one row per unit, Wh (coverage %)."""
    out = []
    for site, site_doc in document["sites"].items():
        for day, day_doc in site_doc["days"].items():
            out.append(f"{escape_controls(site)}  {day}  (Wh, share of the day measured; time zone {document['time_zone']})")
            head = f"{'unit':<16}" + "".join(f"{f.replace('_', ' '):>18}" for f in FIGURES)
            out += [head, "-" * len(head)]
            for unit, figures in day_doc["units"].items():
                out.append(f"{escape_controls(unit):<16}" + "".join(f"{_cell(figures[f]):>18}" for f in FIGURES))
            out.append("")
    if document.get("unknown_channels"):
        out.append("left out (not in the config): " + ", ".join(map(escape_controls, document["unknown_channels"])))
    return "\n".join(out).rstrip() + "\n"


def as_csv(document: dict) -> str:
    """The report for a spreadsheet: one row per site, day, unit and hour ("day" for the whole day);
    per figure its Wh and coverage (empty Wh: no data; "not measured" in both cells: no channel)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["site", "day", "hour", "unit", *(f"{f}_{k}" for f in FIGURES for k in ("wh", "coverage"))])

    def cells(figures: dict) -> list:
        row = []
        for f in FIGURES:
            v = figures[f]
            if v.get("not_measured"):
                row += ["not measured", "not measured"]
            else:
                row += ["" if v["wh"] is None else f"{v['wh']:.3f}", f"{v['coverage']:.4f}"]
        return row

    for site, site_doc in document["sites"].items():
        for day, day_doc in site_doc["days"].items():
            for unit, figures in day_doc["units"].items():
                writer.writerow([text_cell(site), day, "day", text_cell(unit), *cells(figures)])
                for hour, hour_figures in figures["hours"].items():
                    writer.writerow([text_cell(site), day, hour, text_cell(unit), *cells(hour_figures)])
    return buffer.getvalue()
