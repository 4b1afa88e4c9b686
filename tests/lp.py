"""Compare what was stored with what a server holds (tests)."""
from __future__ import annotations

from schema import parse_line


def parse(line: str) -> tuple[str, dict[str, str], dict[str, object], int]:
    """(measurement, tags, fields, time_ms) of one line."""
    point = parse_line(line)
    return point.measurement, dict(point.tags), dict(point.fields), point.time_ms


def samples(lines) -> dict[tuple, float]:
    """{(measurement_field, sorted tag items, time_ms): value} for numeric fields."""
    out = {}
    for line in lines:
        measurement, tags, fields, ts = parse(line)
        for name, value in fields.items():
            out[(f"{measurement}_{name}", tuple(sorted(tags.items())), ts)] = float(value)
    return out
