"""The live energy-flow page for visitors standing at the model (no internet needed).

`FlowPage` serves a small read-only web site from a daemon thread
(stdlib ``http.server``): the page and its assets from ``web/``, the latest
snapshot as JSON (``/api/now``), a server-sent event stream that pushes every
new snapshot (``/api/events``) and the last hours of power per unit
(``/api/history``) read from the store.

The measuring loop calls ``update(snapshot)`` once per cycle; that only stores
the dict under a lock and wakes the event streams. Everything else (deriving
the flows, encoding JSON, reading the store) happens in the server's threads.

Nothing here runs at import time, and no configuration value other than
channel and unit names and roles is ever put on the page.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from schema import ELECTRICITY

log = logging.getLogger(__name__)

WEB_DIR_NAME = "web"  # next to this file: index.html, flow.js, style.css, favicon.svg

# 12 V lead-acid battery at rest: 11.9 V is empty, 12.7 V is full (linear in between).
EMPTY_V = 11.9
FULL_V = 12.7
# Below this current (mA) a house is idle: neither buying nor selling, neither charging nor discharging.
DEAD_BAND_MA = 20.0
KEEPALIVE_S = 15.0
HISTORY_CACHE_S = 60.0
# Re-read the whole window now and then, and when the clock went back: catches lines stored with a time
# before the newest one already read (readings re-stamped after a clock sync, a wall-clock step back).
HISTORY_FULL_REBUILD_S = 6 * 3600.0
HISTORY_BUCKET_S = 300
MAX_EVENT_CLIENTS = 16
# While a battery charges its voltage reads above its resting voltage, so the charge estimated from it
# is lowered by a typical charging lift and never shown as full.
CHARGING_LIFT_V = 0.5
CHARGING_MAX_PCT = 95
# A panel's line above this voltage with no current: the charge controller has stopped charging.
PANEL_OPEN_V = 17.0
# The firmware's power flags of the Pi, as `tools.SystemReading` names them.
PI_FLAGS = ("undervoltage", "throttled", "undervoltage_since_boot", "throttled_since_boot")
# Which channel of a unit the history chart shows, best first.
_CHART_ROLES = ("battery", "exchange", "solar", "load")

_WHOLE_HOURS = re.compile(r"[0-9]{1,4}")
_STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}
# A URL in an error summary could name a server; the page never shows it.
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")


# -- snapshots ----------------------------------------------------------------------------------------------
def make_snapshot(cycle: Any, channels: Sequence[Any], *, tier: Any = None, summary: str = "all well",
                  meaning: str = "", system: Any = None) -> dict:
    """The dict `FlowPage.update` takes, from a measuring cycle (duck-typed: `tools.Cycle`).

    `channels` are the configured channels (.name, .role, .unit_name); `tier` an
    `rpi_errors.Tier` or None, `summary` `ErrorHandler.summary()`, `meaning`
    `BLINK_CODES[tier].meaning`; `system` a `tools.SystemReading` (the Pi's power flags) or None.
    """
    by_name = {c.name: c for c in channels}
    rows = []
    for reading in cycle.channels:
        channel = by_name.get(reading.name)
        rows.append({
            "name": reading.name,
            "unit": channel.unit_name if channel is not None else reading.name,
            "role": channel.role if channel is not None else "battery",
            "bus_voltage_v": reading.bus_voltage_v,
            "current_ma": reading.current_ma,
            "power_w": reading.power_w,
            "energy_in_wh": reading.energy_in_wh,
            "energy_out_wh": reading.energy_out_wh,
        })
    return {
        "time_ms": cycle.time_ms,
        "channels": rows,
        "status": {"tier": getattr(tier, "name", tier), "summary": summary, "meaning": meaning},
        "pi": {flag: getattr(system, flag, None) for flag in PI_FLAGS},
    }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def battery_level_pct(volts: float | None, current_ma: float | None = None) -> int | None:
    """Charge estimated from the voltage of a 12 V lead-acid battery, 0..100 (None: unknown).

    `current_ma` is the battery's current where it is measured (+ = charging): while it charges, its
    voltage reads high, so the estimate is lowered by CHARGING_LIFT_V and capped below full.
    """
    if volts is None:
        return None
    charging = current_ma is not None and current_ma >= DEAD_BAND_MA
    if charging:
        volts -= CHARGING_LIFT_V
    pct = round(min(max((volts - EMPTY_V) / (FULL_V - EMPTY_V), 0.0), 1.0) * 100)
    return min(pct, CHARGING_MAX_PCT) if charging else pct


def flow_width(watts: float) -> float:
    """Stroke width (diagram units) for a flow of `watts`: grows with the square root, 3..26."""
    return round(min(max(3.0 + 5.0 * math.sqrt(abs(watts)), 3.0), 26.0), 1)


_STATE_TEXT = {
    "buying": "Buying from the plant",
    "selling": "Selling to the plant",
    "idle": "Not trading",
    "charging": "Charging its battery",
    "using battery": "Running on its battery",
    "generating": "Its panel is charging the battery",
    "full": "Battery full: the charge controller has stopped charging",
    "no sun": "No sun on the panel",
    "unknown": "No reading",
}
_PLANT_STATE_TEXT = {"selling": "Supplying the houses", "buying": "Taking energy from the houses",
                     "idle": "Not trading"}


def derive(snapshot: Mapping | None, channels: Sequence[Any], plant_unit: str, site: str) -> dict:
    """The page's view of a snapshot: units (battery level, state), flows (arrows) and status.

    Robust to missing or malformed values: anything unreadable counts as no reading.
    """
    snapshot = snapshot if isinstance(snapshot, Mapping) else {}
    readings: dict[str, Mapping] = {}
    rows = snapshot.get("channels")
    for row in rows if isinstance(rows, (list, tuple)) else ():
        if isinstance(row, Mapping) and isinstance(row.get("name"), str):
            readings[row["name"]] = row

    # Units in configuration order (the plant last), each with its channels.
    layout: dict[str, list[tuple[str, str]]] = {}
    for channel in channels:
        layout.setdefault(channel.unit_name, []).append((channel.name, channel.role))
    for name, row in readings.items():  # a reading the configuration does not know (should not happen)
        if not any(name == n for chans in layout.values() for n, _ in chans):
            layout.setdefault(str(row.get("unit") or name), []).append((name, str(row.get("role") or "battery")))
    layout.setdefault(plant_unit, [])
    order = [u for u in layout if u != plant_unit] + [plant_unit]

    def values(name: str, role: str) -> dict:
        row = readings.get(name, {})
        return {
            "name": name,
            "role": role,
            "bus_voltage_v": _number(row.get("bus_voltage_v")),
            "current_ma": _number(row.get("current_ma")),
            "power_w": _number(row.get("power_w")),
            "energy_in_wh": _number(row.get("energy_in_wh")),
            "energy_out_wh": _number(row.get("energy_out_wh")),
        }

    def total(chans: list[dict], key: str) -> float | None:
        nums = [c[key] for c in chans if c[key] is not None]
        return sum(nums) if nums else None

    units, flows = [], []
    for unit in order:
        chans = [values(name, role) for name, role in layout[unit]]
        by_role: dict[str, list[dict]] = {}
        for chan in chans:
            by_role.setdefault(chan["role"], []).append(chan)
        is_plant = unit == plant_unit
        # Battery, load and trade meters sit on the battery's bus; a panel's meter sees the panel's
        # voltage (up to ~21 V with the controller open), never the battery's.
        on_battery = [c for c in chans if c["role"] != "solar"]
        volts_from = by_role.get("battery") or on_battery
        volts = next((c["bus_voltage_v"] for c in volts_from if c["bus_voltage_v"] is not None), None)
        if volts is None:
            volts = next((c["bus_voltage_v"] for c in on_battery if c["bus_voltage_v"] is not None), None)

        state, source = "unknown", None
        if by_role.get("exchange"):
            source = "exchange"
            current = total(by_role["exchange"], "current_ma")
            if current is not None:
                # A house: + = buys from the plant. The plant: + = sells to the houses.
                if abs(current) < DEAD_BAND_MA:
                    state = "idle"
                elif is_plant:
                    state = "selling" if current > 0 else "buying"
                else:
                    state = "buying" if current > 0 else "selling"
        elif by_role.get("battery"):
            source = "battery"
            current = total(by_role["battery"], "current_ma")
            if current is not None:
                state = ("idle" if abs(current) < DEAD_BAND_MA
                         else "charging" if current > 0 else "using battery")
        elif by_role.get("solar"):
            # Only the panel is measured (the real model): what its charge controller is doing.
            source = "solar"
            current = total(by_role["solar"], "current_ma")
            panel_v = next((c["bus_voltage_v"] for c in by_role["solar"] if c["bus_voltage_v"] is not None), None)
            if current is not None and panel_v is not None:
                state = ("generating" if current >= DEAD_BAND_MA
                         else "full" if panel_v >= PANEL_OPEN_V else "no sun")
        if source == "battery" and state == "idle":
            text = "Battery neither charging nor in use"
        else:
            text = (_PLANT_STATE_TEXT.get(state) if is_plant else None) or _STATE_TEXT[state]
        battery_power = total(by_role.get("battery", []), "power_w")
        solar = by_role.get("solar", [])
        units.append({
            "name": unit,
            "is_plant": is_plant,
            "channels": chans,
            "battery_v": volts,
            "battery_pct": battery_level_pct(volts, total(by_role.get("battery", []), "current_ma")),
            "battery_power_w": battery_power,
            # What the page cannot know says so ("not measured"), it is never shown as 0.
            "battery_measured": bool(on_battery),
            "panel_v": next((c["bus_voltage_v"] for c in solar if c["bus_voltage_v"] is not None), None),
            "panel_power_w": total(solar, "power_w"),
            "state": state,
            "state_source": source,
            "state_text": text,
            "has_exchange": bool(by_role.get("exchange")),
        })

        for role in ("exchange", "solar", "load"):
            if role not in by_role or (role == "exchange" and is_plant):
                continue
            current = total(by_role[role], "current_ma")
            power = total(by_role[role], "power_w")
            idle_text = "idle" if role == "exchange" else "off"
            ok = current is not None
            active = ok and abs(current) >= DEAD_BAND_MA
            watts = abs(power) if power is not None else 0.0
            if role == "exchange":
                buying = ok and current > 0
                ends = (plant_unit, unit) if buying or not active else (unit, plant_unit)
                direction = "none" if not active else ("to_unit" if buying else "from_unit")
            elif role == "solar":
                ends, direction = ("sun", unit), "to_unit" if active else "none"
                panel_v = next((c["bus_voltage_v"] for c in by_role[role] if c["bus_voltage_v"] is not None), None)
                idle_text = "battery full" if panel_v is not None and panel_v >= PANEL_OPEN_V else "no sun"
            else:
                ends, direction = (unit, "load"), "from_unit" if active else "none"
            flows.append({
                "kind": role,
                "unit": unit,
                "from": ends[0],
                "to": ends[1],
                "direction": direction,
                "active": active,
                "ok": ok,
                "watts": round(watts, 3) if ok else None,
                "current_ma": round(current, 1) if ok else None,
                "width": flow_width(watts) if active else 2.0,
                "idle_text": idle_text,
            })

    status = snapshot.get("status") if isinstance(snapshot.get("status"), Mapping) else {}
    tier = status.get("tier")
    tier = tier if isinstance(tier, str) and tier else None
    summary = _URL.sub("<server>", str(status.get("summary") or ""))[:300]
    meaning = str(status.get("meaning") or "")[:300]
    if tier in (None, "SILENT"):
        level = "ok"
    elif tier in ("SHORT", "ROLLBACK"):  # the logger works; a note, not a fault
        level = "note"
    elif tier == "CRITICAL":
        level = "critical"
    else:
        level = "fault"
    time_ms = snapshot.get("time_ms")
    pi = snapshot.get("pi") if isinstance(snapshot.get("pi"), Mapping) else {}
    return {
        "site": site,
        "plant": plant_unit,
        "time_ms": time_ms if isinstance(time_ms, int) and not isinstance(time_ms, bool) else None,
        "units": units,
        "flows": flows,
        "status": {"tier": tier, "level": level, "summary": summary, "meaning": meaning},
        "pi": {flag: pi.get(flag) if isinstance(pi.get(flag), bool) else None for flag in PI_FLAGS},
        "dead_band_ma": DEAD_BAND_MA,
    }


# -- history ------------------------------------------------------------------------------------------------
def _unit_and_power(line: str) -> tuple[str, float] | None:
    """(channel name, power_w) of an `electricity` line, by string search: a full parse of every line of 24
    hours costs seconds of a Pi Zero's CPU. Channel names are plain (letters, digits, _ - .), so the
    tag needs no unescaping; anything unexpected returns None. The name is in the `channel` tag; lines
    stored before that tag existed carried it in `unit`."""
    tag = ",channel="
    start = line.find(tag)
    if start < 0:
        tag = ",unit="
        start = line.find(tag)
    if start < 1 or line[start - 1] == "\\":  # an escaped comma inside another tag's value
        return None
    start += len(tag)
    end = start
    while end < len(line) and line[end] not in ", ":
        end += 1
    at = line.find("power_w=", end)
    if at < 0 or line[at - 1] not in ", ":
        return None
    value_end = line.find(",", at)
    if value_end < 0:
        value_end = line.find(" ", at)
    try:
        return line[start:end], float(line[at + 8:value_end])
    except ValueError:
        return None


class _History:
    """Power per unit in 5-minute buckets, kept up to date incrementally.

    The first request reads the whole window from the store; later ones (at
    most every HISTORY_CACHE_S) read only what came since, so a page load costs
    SQLite almost nothing. Lines still held for the clock or quarantined are
    left out (their time is not trusted).
    """

    def __init__(self, source: Callable[[int], Iterable[tuple[int, str, str]]], channels: Sequence[Any],
                 clock: Callable[[], float], window_h: int) -> None:
        self._source = source
        self._clock = clock
        self.window_h = window_h
        self._chart = self._chart_channels(channels)
        self._charted = {name for _, name, _ in self._chart}
        # Channel names are plain (letters, digits, _ - .): a cheap test before the full parse.
        self._needles = tuple(f"{tag}={name}" for name in self._charted for tag in ("channel", "unit"))
        self._lock = threading.Lock()
        self._sums: dict[str, dict[int, list[float]]] = {}
        self._last_ms: int | None = None
        self._refreshed_s: float | None = None
        self._rebuilt_s: float | None = None
        self._encoded: dict[int, bytes] = {}

    @staticmethod
    def _chart_channels(channels: Sequence[Any]) -> list[tuple[str, str, str]]:
        best: dict[str, tuple[int, str, str]] = {}
        for c in channels:
            rank = _CHART_ROLES.index(c.role) if c.role in _CHART_ROLES else len(_CHART_ROLES)
            if c.unit_name not in best or rank < best[c.unit_name][0]:
                best[c.unit_name] = (rank, c.name, c.role)
        return [(unit, name, role) for unit, (_, name, role) in best.items()]

    def json(self, hours: int) -> bytes:
        """The encoded answer for the last `hours` hours. Raises whatever the store raises."""
        with self._lock:  # one reader at a time: concurrent page loads wait for the same refresh
            now_s = self._clock()
            if self._refreshed_s is None or not 0 <= now_s - self._refreshed_s < HISTORY_CACHE_S:
                full = (self._rebuilt_s is None or not 0 <= now_s - self._rebuilt_s < HISTORY_FULL_REBUILD_S
                        or now_s < self._refreshed_s)
                self._refresh(now_s, full)
                self._refreshed_s = now_s
                if full:
                    self._rebuilt_s = now_s
                self._encoded.clear()
            if hours not in self._encoded:
                self._encoded[hours] = json.dumps(self._result(hours, self._refreshed_s)).encode()
            return self._encoded[hours]

    def _refresh(self, now_s: float, full: bool) -> None:
        bucket_ms = HISTORY_BUCKET_S * 1000
        now_ms = int(now_s * 1000)
        window_start = now_ms - self.window_h * 3_600_000 - bucket_ms
        if full or self._last_ms is None:
            sums: dict[str, dict[int, list[float]]] = {}
            since = window_start
            last = None
        else:
            sums = self._sums
            since = self._last_ms + 1  # a cycle's lines share one time and commit together
            last = self._last_ms
        started = time.monotonic()
        parsed = 0
        for time_ms, line, status in self._source(since):
            if status not in ("sent", "unsent") or not line.startswith(ELECTRICITY + ","):
                continue
            if not any(needle in line for needle in self._needles):
                continue
            if time_ms > now_ms + 60_000:  # a clock far ahead: not on the chart, and not a resume point
                continue
            found = _unit_and_power(line)
            if found is None:
                continue
            parsed += 1
            name, power = found
            if name not in self._charted:
                continue
            bucket = sums.setdefault(name, {}).setdefault(time_ms // bucket_ms, [0.0, 0])
            bucket[0] += power
            bucket[1] += 1
            last = time_ms if last is None else max(last, time_ms)
        oldest = window_start // bucket_ms
        for per_bucket in sums.values():
            for key in [k for k in per_bucket if k < oldest]:
                del per_bucket[key]
        self._sums = sums
        self._last_ms = last
        log.debug("history: %s read, %d lines parsed in %.2f s", "full" if full else "incremental",
                  parsed, time.monotonic() - started)

    def _result(self, hours: int, now_s: float) -> dict:
        bucket_ms = HISTORY_BUCKET_S * 1000
        count = hours * 3600 // HISTORY_BUCKET_S
        last_bucket = int(now_s * 1000) // bucket_ms
        first_bucket = last_bucket - count + 1
        series = []
        for unit, name, role in self._chart:
            per_bucket = self._sums.get(name, {})
            values = []
            for key in range(first_bucket, last_bucket + 1):
                cell = per_bucket.get(key)
                values.append(round(cell[0] / cell[1], 3) if cell else None)
            series.append({"unit": unit, "channel": name, "role": role, "values": values})
        return {
            "available": True,
            "hours": hours,
            "bucket_s": HISTORY_BUCKET_S,
            "start_ms": first_bucket * bucket_ms,
            "end_ms": (last_bucket + 1) * bucket_ms,
            "generated_ms": int(now_s * 1000),
            "series": series,
        }


# -- the server ---------------------------------------------------------------------------------------------
def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen address {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


MAX_CONNECTIONS = 32  # page loads and API calls at once; the event streams have their own MAX_EVENT_CLIENTS
# A request's whole header (and the wait for it on a kept-alive connection) must arrive within this, however
# slowly a client trickles it (slowloris): a per-read timeout alone never fires for a byte every few seconds.
HEADER_DEADLINE_S = 10.0


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most MAX_CONNECTIONS page/API connections at once (a room full of
    phones must not exhaust a Pi Zero's threads). When they are all taken, the connection that has
    waited longest for its request header is closed to make room: slow clients cannot hold the page.
    An event stream gives its page slot back (the streams are capped by MAX_EVENT_CLIENTS)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # socketserver's 5 makes a burst of connections wait for SYN retries
    page: FlowPage

    def __init__(self, *args, header_deadline_s: float = HEADER_DEADLINE_S, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_deadline_s = header_deadline_s
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self._holding: set = set()  # connections holding a page slot
        self._waiting: dict = {}  # connection -> monotonic time it began waiting for a request header

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._evict_oldest_waiting()
            if not self._slots.acquire(timeout=1.0):
                self.shutdown_request(request)
                return
        with self._lock:
            self._holding.add(request)
        try:
            super().process_request(request, client_address)
        except Exception:
            self.release_slot(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.waiting(request, False)
            self.release_slot(request)

    def release_slot(self, request) -> None:
        """Give `request`'s page slot back (idempotent): it ended or became an event stream."""
        with self._lock:
            if request not in self._holding:
                return
            self._holding.discard(request)
        self._slots.release()

    def waiting(self, request, on: bool) -> None:
        """Mark `request` as waiting for (or reading) a request header, or no longer."""
        with self._lock:
            if on:
                self._waiting[request] = time.monotonic()
            else:
                self._waiting.pop(request, None)

    def _evict_oldest_waiting(self) -> None:
        with self._lock:
            if not self._waiting:
                return
            oldest = min(self._waiting, key=self._waiting.__getitem__)
            del self._waiting[oldest]
        try:
            oldest.shutdown(socket.SHUT_RDWR)  # its thread wakes with EOF and gives its slot back
        except OSError:
            pass


class _DeadlineReader(io.RawIOBase):
    """The request's socket, read with a deadline for the whole header: each read may wait only for
    what is left of it. With no deadline set, reads wait `idle_s` (the handler's timeout)."""

    def __init__(self, sock: socket.socket, idle_s: float) -> None:
        super().__init__()
        self._sock = sock
        self._idle_s = idle_s
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is None:
            self._sock.settimeout(self._idle_s)
        else:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request header deadline passed")
            self._sock.settimeout(min(left, self._idle_s))
        return self._sock.recv_into(buffer)


class FlowPage:
    """The live energy-flow web site. See the module docstring.

    `channels`: the configured channels (.name, .role, .unit_name); `site`:
    the site name shown in the title; `history(since_ms)`: the store's
    export, (time_ms, line, status) oldest first, called from a server thread
    (give it its own connection); `plant_unit`: the unit the houses trade
    with; `clock`: Unix seconds.
    """

    def __init__(self, listen: str = "127.0.0.1:8080", *, channels: Sequence[Any], site: str,
                 history: Callable[[int], Iterable[tuple[int, str, str]]] | None = None,
                 plant_unit: str = "power_plant", clock: Callable[[], float] = time.time,
                 history_hours: int = 24, header_deadline_s: float = HEADER_DEADLINE_S) -> None:
        self._host, self._port = _parse_listen(listen)
        self.channels = tuple(channels)
        self.site = site
        self.plant_unit = plant_unit
        self.clock = clock
        self._history = _History(history, self.channels, clock, history_hours) if history else None
        self.history_hours = history_hours
        self.header_deadline_s = header_deadline_s
        self._cond = threading.Condition()
        self._snapshot: dict | None = None
        self._version = 0
        self._derived: tuple[int, dict, bytes] | None = None
        self._derive_lock = threading.Lock()
        self._stopping = False
        self._event_clients = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._files: dict[str, tuple[float, bytes, str]] = {}
        self.web_dir = Path(__file__).resolve().parent / WEB_DIR_NAME

    # -- the caller's side ------------------------------------------------------------------------------
    def update(self, snapshot: dict) -> None:
        """Publish this cycle's snapshot (kept by reference: do not change it afterwards). Cheap."""
        with self._cond:
            self._snapshot = snapshot
            self._version += 1
            self._cond.notify_all()

    def start(self) -> None:
        """Bind and serve in a daemon thread. Raises OSError if the address is taken."""
        if self._server is not None:
            return
        server_class = _Server
        if ":" in self._host:
            server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        server = server_class((self._host, self._port), _Handler, header_deadline_s=self.header_deadline_s)
        server.page = self
        self._stopping = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="flow-page", daemon=True)
        self._thread.start()
        log.info("live energy-flow page on %s", self.url)

    def stop(self) -> None:
        """Stop serving (idempotent); open event streams end."""
        server = self._server
        if server is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        """http://host:port/ as a browser on this machine reaches it."""
        host, port = self._host, self._port
        if self._server is not None:
            port = self._server.server_address[1]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    # -- the server's side ------------------------------------------------------------------------------
    def current(self) -> tuple[int, dict, bytes]:
        """(version, derived view, its JSON) of the latest snapshot, derived once per version."""
        with self._cond:
            version, snapshot = self._version, self._snapshot
        with self._derive_lock:
            if self._derived is None or self._derived[0] != version:
                view = derive(snapshot, self.channels, self.plant_unit, self.site)
                view["version"] = version
                self._derived = (version, view, json.dumps(view, separators=(",", ":")).encode())
            return self._derived

    def wait_for_update(self, seen: int, timeout: float) -> int | None:
        """Block until the version differs from `seen` (returns it), or None on timeout / stop."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != seen or self._stopping, timeout)
            if self._stopping or self._version == seen:
                return None
            return self._version

    @property
    def stopping(self) -> bool:
        return self._stopping

    def enter_events(self) -> bool:
        with self._cond:
            if self._event_clients >= MAX_EVENT_CLIENTS:
                return False
            self._event_clients += 1
            return True

    def leave_events(self) -> None:
        with self._cond:
            self._event_clients -= 1

    def history_json(self, hours: int) -> bytes | None:
        if self._history is None:
            return None
        return self._history.json(min(max(hours, 1), self._history.window_h))

    def static_file(self, name: str) -> tuple[bytes, str, str] | None:
        """(content, content type, etag) of web/<name>, or None. Re-read when the file changes."""
        if not _STATIC_NAME.match(name) or ".." in name:
            return None
        path = self.web_dir / name
        try:
            mtime = path.stat().st_mtime
            if not path.is_file():
                return None
            cached = self._files.get(name)
            if cached is None or cached[0] != mtime:
                data = path.read_bytes()
                cached = (mtime, data, '"' + hashlib.sha256(data).hexdigest()[:20] + '"')
                self._files[name] = cached
        except OSError:
            return None
        return cached[1], _CONTENT_TYPES.get(path.suffix, "application/octet-stream"), cached[2]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "flow-page"
    sys_version = ""
    timeout = 30  # an idle keep-alive connection, or a client that stopped reading, frees its thread

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    # -- methods ----------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._route(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._route(head=True)

    def _not_allowed(self) -> None:
        self.close_connection = True  # the request body (if any) is not read
        self._send(405, b"Read-only: only GET and HEAD.\n", "text/plain; charset=utf-8",
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed  # noqa: N815

    def setup(self) -> None:
        super().setup()
        self._reader = _DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        # The whole header, from the moment we wait for it, has HEADER_DEADLINE_S (slowloris).
        self._reader.deadline = time.monotonic() + self.server.header_deadline_s
        self.server.waiting(self.connection, True)
        try:
            # Any other method (e.g. PROPFIND) also gets 405, not http.server's 501.
            super().handle_one_request()
        except (ConnectionError, TimeoutError, ValueError):
            self.close_connection = True
        finally:
            self._header_done()

    def _header_done(self) -> None:
        self._reader.deadline = None
        self.server.waiting(self.connection, False)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self._header_done()  # the header is in: from here on the request is served, not evictable
        return ok

    def __getattr__(self, name: str):
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    # -- routing ----------------------------------------------------------------------------------------
    def _route(self, head: bool) -> None:
        page = self.server.page
        parts = urlsplit(self.path)
        path = parts.path
        try:
            if path in ("/", "/index.html"):
                self._file("index.html", head)
            elif path.startswith("/static/"):
                self._file(path[len("/static/"):], head)
            elif path == "/favicon.ico":
                self._file("favicon.svg", head, cache="public, max-age=86400")
            elif path == "/api/now":
                _, view, _ = page.current()
                body = json.dumps({**view, "server_time_ms": int(page.clock() * 1000)},
                                  separators=(",", ":")).encode()
                self._send(200, body, "application/json", head=head, cache="no-store")
            elif path == "/api/events":
                self._events(head)
            elif path == "/api/history":
                self._history(parse_qs(parts.query, keep_blank_values=True), head)
            else:
                self._send(404, b"Not found.\n", "text/plain; charset=utf-8", head=head)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - a bug here must not take the page down
            log.exception("flow page: error answering %s", path)
            self._send(500, b"Internal error.\n", "text/plain; charset=utf-8", head=head)

    def _file(self, name: str, head: bool, cache: str = "no-cache") -> None:
        found = self.server.page.static_file(name)
        if found is None:
            self._send(404, b"Not found.\n", "text/plain; charset=utf-8", head=head)
            return
        data, content_type, etag = found
        if etag in (self.headers.get("If-None-Match") or ""):
            self._send(304, b"", None, head=True, cache=cache, extra={"ETag": etag})
            return
        self._send(200, data, content_type, head=head, cache=cache, extra={"ETag": etag})

    def _history(self, query: dict[str, list[str]], head: bool) -> None:
        page = self.server.page
        text = (query.get("hours") or [str(page.history_hours)])[0]
        # ASCII digits only ("²".isdigit() is True, and int() takes "٣"), within the window the page keeps.
        hours = int(text) if _WHOLE_HOURS.fullmatch(text) else 0
        if not 1 <= hours <= page.history_hours:
            message = f"hours must be a whole number from 1 to {page.history_hours}"
            self._send(400, json.dumps({"error": message}).encode(), "application/json", head=head,
                       cache="no-store")
            return
        try:
            body = page.history_json(hours)
        except Exception as exc:  # noqa: BLE001 - the store may be busy, locked or broken
            log.warning("flow page: cannot read the history: %s", exc)
            self._send(503, b'{"error":"the history cannot be read right now"}', "application/json",
                       head=head, cache="no-store", extra={"Retry-After": "60"})
            return
        if body is None:  # no store behind this page: say so (a 404 would be a console error)
            body = json.dumps({"available": False, "hours": hours, "bucket_s": HISTORY_BUCKET_S,
                               "series": []}).encode()
        self._send(200, body, "application/json", head=head, cache=f"max-age={int(HISTORY_CACHE_S)}")

    def _events(self, head: bool) -> None:
        page = self.server.page
        if head:
            self._send(200, b"", "text/event-stream", head=True, cache="no-store")
            return
        if not page.enter_events():
            self._send(503, b"Too many live viewers.\n", "text/plain; charset=utf-8", cache="no-store",
                       extra={"Retry-After": "30"})
            return
        self.server.release_slot(self.connection)  # streams are capped apart: page loads keep their slots
        try:
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.send_header("X-Accel-Buffering", "no")
            for key, value in _SECURITY_HEADERS.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(b"retry: 3000\n\n")
            seen = 0  # version 0: nothing published yet
            while not page.stopping:
                version, _, body = page.current()
                if version != seen:
                    seen = version
                    self.wfile.write(b"id: %d\ndata: %s\n\n" % (version, body))
                    self.wfile.flush()
                if page.wait_for_update(seen, KEEPALIVE_S) is None and not page.stopping:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
        except (ConnectionError, TimeoutError, OSError):
            pass
        finally:
            page.leave_events()

    def _send(self, status: int, body: bytes, content_type: str | None, *, head: bool = False,
              cache: str = "no-store", extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if status != 304:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        for key, value in {**_SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
