"""The live page's history: mean power per unit in 5-minute buckets, read from the store.

Reads the store's lines through schema.parse_line (only the one field it charts) and keeps the sums
up to date incrementally; web.py serves the result as /api/history.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from schema import ELECTRICITY, POWER_FIELDS, channel_power, parse_line

log = logging.getLogger(__name__)

HISTORY_CACHE_S = 60.0
# Re-read the whole window now and then, and when the clock went back: catches lines stored with a time
# before the newest one already read (readings re-stamped after a clock sync, a wall-clock step back).
HISTORY_FULL_REBUILD_S = 6 * 3600.0
HISTORY_BUCKET_S = 300
# Which channel of a unit the history chart shows, best first.
_CHART_ROLES = ("battery", "exchange", "solar", "load")


# -- history ------------------------------------------------------------------------------------------------
def _channel_and_power(line: str) -> tuple[str, float] | None:
    """(channel name, power_w) of an `electricity` line; None for a line that is not line protocol or has
    no power (schema.channel_power)."""
    try:
        point = parse_line(line, fields=POWER_FIELDS)
    except ValueError:
        return None
    return channel_power(point.tags, point.fields.get("power_w"))


class History:
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
                try:
                    self._refresh(now_s, full)
                except Exception:
                    # Cut short (the store unreadable): the sums may hold part of a read, so the next
                    # request rebuilds them from scratch; the caller answers 503 meanwhile.
                    self._refreshed_s = self._rebuilt_s = None
                    raise
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
            found = _channel_and_power(line)
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
                # + 0.0: a mean of night-time noise may round to -0.0, which JSON would show as such
                values.append(round(cell[0] / cell[1], 3) + 0.0 if cell else None)
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
