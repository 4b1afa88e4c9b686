"""A small line-protocol reader for tests: enough to compare what was stored with what a server holds."""
from __future__ import annotations


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside backslash escapes and double quotes."""
    parts, cur, i, quoted = [], [], 0, False
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _value(text: str):
    if text.endswith("i") and text[:-1].lstrip("-").isdigit():
        return int(text[:-1])
    if text in ("true", "false"):
        return text == "true"
    if text.startswith('"'):
        return _unescape(text[1:-1])
    return float(text)


def parse(line: str) -> tuple[str, dict[str, str], dict[str, object], int]:
    """(measurement, tags, fields, time_ms) of one line."""
    head, fields, stamp = _split(line, " ")
    key = _split(head, ",")
    tags: dict[str, str] = {}
    for item in key[1:]:
        k, v = _split(item, "=")
        tags[_unescape(k)] = _unescape(v)
    values = {}
    for item in _split(fields, ","):
        k, v = _split(item, "=")
        values[_unescape(k)] = _value(v)
    return _unescape(key[0]), tags, values, int(stamp)


def samples(lines) -> dict[tuple, float]:
    """{(measurement_field, sorted tag items, time_ms): value} for numeric fields."""
    out = {}
    for line in lines:
        measurement, tags, fields, ts = parse(line)
        for name, value in fields.items():
            out[(f"{measurement}_{name}", tuple(sorted(tags.items())), ts)] = float(value)
    return out
