"""The point schema and its InfluxDB line-protocol encoding.

Field types are part of the schema: a float field is always written as a float
and a count always as an integer (``42i``), so InfluxDB never sees a type
conflict between two cycles. Escaping follows the line-protocol reference (and
influxdb-client's own escaping), so names with spaces, commas, equals signs,
quotes or backslashes survive the trip.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Container, Mapping
from dataclasses import dataclass

ELECTRICITY = "electricity"
SYSTEM = "system"

# Field name -> type. The daemon never writes a field that is not listed here.
ELECTRICITY_FIELDS: Mapping[str, type] = {
    "bus_voltage_v": float,
    "shunt_voltage_mv": float,
    "current_ma": float,
    "power_w": float,
    "samples": int,
    "failed_samples": int,
    "energy_in_wh": float,
    "energy_out_wh": float,
}
SYSTEM_FIELDS: Mapping[str, type] = {
    "cpu_percent": float,
    "cpu_temp_c": float,
    "memory_used_mb": float,
    "disk_free_mb": float,
    "net_sent_bytes": int,
    "net_recv_bytes": int,
    "uptime_s": float,
    "undervoltage": bool,
    "throttled": bool,
    "undervoltage_since_boot": bool,
    "throttled_since_boot": bool,
    "channels_ok": int,
    "channels_failed": int,
    "outbox_depth": int,
    "dropped_points": int,
    "quarantined_points": int,
}
FIELD_TYPES: Mapping[str, Mapping[str, type]] = {ELECTRICITY: ELECTRICITY_FIELDS, SYSTEM: SYSTEM_FIELDS}
# Decimals a health reading resolves (psutil gives memory and disk in bytes and uptime in ns, so their MB
# and seconds come with noise digits that cost bytes on every line). The electricity fields are rounded
# where they are measured (tools.read_data), to the chip's resolution.
SYSTEM_DECIMALS: Mapping[str, int] = {"cpu_percent": 1, "cpu_temp_c": 1, "memory_used_mb": 1, "disk_free_mb": 1,
                                      "uptime_s": 0}
_DECIMALS: Mapping[str, Mapping[str, int]] = {SYSTEM: SYSTEM_DECIMALS}

_MEASUREMENT_ESCAPES = str.maketrans({"\\": "\\\\", ",": "\\,", " ": "\\ ", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_KEY_ESCAPES = str.maketrans(
    {"\\": "\\\\", ",": "\\,", " ": "\\ ", "=": "\\=", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
)
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"'})
_isfinite = math.isfinite  # one global lookup, not two: called for most fields of every line


@dataclass(frozen=True)
class Point:
    """One line of line protocol. `time_ms` is Unix time in milliseconds."""

    measurement: str
    tags: Mapping[str, str]
    fields: Mapping[str, float | int | bool | str | None]
    time_ms: int

    def to_line(self, prefix: str | None = None) -> str:
        """Encode as line protocol (ms precision).

        `prefix`: this point's `line_prefix(measurement, tags)`, when the caller keeps it (a channel's
        tags do not change, so they need escaping once, not on every line). Fields that are None, NaN or
        infinite are left out (InfluxDB cannot store them). Raises ValueError if no field is left.
        """
        parts = []
        for k, v in self.fields.items():
            # The exact types inline (floats first: most fields are), as _storable and _value would encode
            # them: this runs for every field of every line.
            kind = type(v)
            if kind is float:
                if _isfinite(v):
                    parts.append(f"{_key(k)}={v!r}")
            elif kind is int:
                parts.append(f"{_key(k)}={v}i")
            elif kind is bool:
                parts.append(f"{_key(k)}={'true' if v else 'false'}")
            elif _storable(v):
                parts.append(f"{_key(k)}={_value(v)}")
        fields = ",".join(parts)
        if not fields:
            raise ValueError(f"point {self.measurement!r} has no storable field")
        if prefix is None:
            prefix = line_prefix(self.measurement, self.tags)
        return f"{prefix} {fields} {self.time_ms}"


def line_prefix(measurement: str, tags: Mapping[str, str]) -> str:
    """The escaped measurement and sorted tags that start a line (empty tag values left out)."""
    tag_text = "".join(f",{_key(k)}={_key(v)}" for k, v in sorted(tags.items()) if v != "")
    return f"{measurement.translate(_MEASUREMENT_ESCAPES)}{tag_text}"


def typed_fields(measurement: str, values: Mapping[str, float | int | None]) -> dict[str, float | int | None]:
    """Coerce `values` to the schema's field types (so 12 becomes 12.0 for a float field), rounded to the
    decimals the schema gives (a float stays a float: round(x, 0) is 12.0).

    Raises KeyError for a field the schema does not have.
    """
    types = FIELD_TYPES[measurement]
    decimals = _DECIMALS.get(measurement, {})
    out: dict[str, float | int | None] = {}
    for name, value in values.items():
        kind = types[name]
        if value is not None and type(value) is not kind:  # kind(value) of its own type is value itself
            value = kind(value)
        if name in decimals and isinstance(value, float) and _isfinite(value):
            value = round(value, decimals[name])
        out[name] = value
    return out


def _storable(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return True


@functools.lru_cache(maxsize=512)
def _key(text: str) -> str:
    # Memoised: the same few field names and tag values are escaped on every line (bounded cache).
    return text.translate(_KEY_ESCAPES)


def _value(value: float | int | bool | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value)
    return '"' + value.translate(_STRING_ESCAPES) + '"'


POWER_FIELDS = frozenset({"power_w"})  # parse_line(fields=...) for the readers that need only the power


def channel_power(tags: Mapping[str, str], power: object) -> tuple[str, float] | None:
    """(channel name, power_w) of an `electricity` point from its tags and its power_w value; None without a
    name or a number. The name is in the `channel` tag; lines stored before that tag existed had it in `unit`."""
    name = tags.get("channel", tags.get("unit"))
    if name is None or isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power):
        return None  # NaN or infinity would poison every total it touches
    return name, float(power)


def parse_line(line: str, fields: Container[str] | None = None) -> Point:
    """Read back one line this module wrote (the web page's history, `export --format csv`, tests).

    `fields`: decode only these fields (the others are left out unread: the page's history of 24 hours
    needs one field of ~100,000 lines). Raises ValueError for a line that is not line protocol.
    """
    if "\\" not in line and '"' not in line:
        return _parse_plain(line, fields)
    try:
        # Quotes only delimit string field values; in the measurement and tags they are literal.
        head, rest = _split(line, " ", quotes=False, limit=1)
        fields_text, stamp = _split(rest, " ")
        key = _split(head, ",", quotes=False)
        tags = {}
        for item in key[1:]:
            name, value = _split(item, "=", quotes=False)
            tags[_unescape(name)] = _unescape(value)
        parsed = {}
        for item in _split(fields_text, ","):
            name, value = _split(item, "=", limit=1)
            if fields is None or _unescape(name) in fields:
                parsed[_unescape(name)] = _parse_value(value)
        return Point(_unescape(key[0]), tags, parsed, int(stamp))
    except (ValueError, IndexError) as exc:
        raise ValueError(f"not a line-protocol line: {line[:80]!r}") from exc


def _parse_plain(line: str, wanted: Container[str] | None) -> Point:
    """parse_line for a line without escapes or string fields (every line this project writes but a
    `system` point's text): str.split does the work, ~10x faster than the general path (the history of
    24 hours on the live page parses every electricity line of the window)."""
    try:
        head, fields_text, stamp = line.split(" ")
        measurement, *tag_items = head.split(",")
        tags = dict(item.split("=") for item in tag_items)
        fields = {}
        for item in fields_text.split(","):
            name, value = item.split("=", 1)
            if wanted is None or name in wanted:
                fields[name] = _parse_value(value)
        return Point(measurement, tags, fields, int(stamp))
    except ValueError as exc:
        raise ValueError(f"not a line-protocol line: {line[:80]!r}") from exc


def _split(text: str, sep: str, *, quotes: bool = True, limit: int = -1) -> list[str]:
    """Split on `sep` outside backslash escapes (and double-quoted strings when `quotes`), at most `limit` times."""
    parts, current, i, quoted = [], [], 0, False
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i:i + 2])
            i += 2
            continue
        if ch == '"' and quotes:
            quoted = not quoted
        if ch == sep and not quoted and limit != len(parts):
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


_UNESCAPES = {"n": "\n", "r": "\r", "t": "\t"}


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(_UNESCAPES.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _parse_value(text: str) -> float | int | bool | str:
    if text.endswith("i") and text[:-1].lstrip("-").isdigit():
        return int(text[:-1])
    if text in ("true", "false"):
        return text == "true"
    if text.startswith('"') and text.endswith('"'):
        return _unescape(text[1:-1])
    return float(text)
