"""How a cycle and the store read for a person: the `once` table and JSON, the CSV export.

Pure formatting: no store, bus or network is touched here (the caller hands the data in).
"""
from __future__ import annotations

import csv
import dataclasses
import sys
from collections.abc import Callable

from clock import iso_ms

# What each role measures, in words, for "not measured" lines.
ROLE_WORDS = {"solar": "solar panels", "battery": "batteries", "load": "loads", "exchange": "trade with the plant"}


def not_measured(channels) -> list[str]:
    """The roles no configured channel measures (reports say "not measured", never 0)."""
    have = {c.role for c in channels}
    return [role for role in ROLE_WORDS if role not in have]


def cycle_json(cycle, system, simulated: bool, channels=()) -> dict:
    """The `once --json` document. `channels`: the configured channels (their roles)."""
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
        "time": iso_ms(cycle.time_ms, "milliseconds"),
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


STATUS_COLUMN = "status"  # export_csv's last column: what the store did with the point
# Lines the store holds but InfluxDB must not get as they are (times not yet trusted, refused by the database):
# `export --format lp` writes them as comments, "# held: <line>", which line-protocol readers skip.
NOT_DELIVERABLE = ("held", "quarantined")


def export_lp(rows, out) -> int:
    """Write (time_ms, line, status) rows as line protocol, held and quarantined lines as comments
    ("# quarantined: <line>"), so a re-import or `report --from` leaves them out. Returns the lines written."""
    count = 0
    for _, line, status in rows:
        out.write(f"# {status}: {line}\n" if status in NOT_DELIVERABLE else line + "\n")
        count += 1
    return count


def export_csv(lines: Callable[[], object], out, *, local_time: bool = False, err=None) -> int:
    """Write the store as CSV a spreadsheet opens: one row per point; columns time, measurement, every tag
    (sorted), every field (schema order, then any other sorted), then `status` (sent, unsent, held or
    quarantined). `lines()` yields (time_ms, line, status) and is called twice: once for the columns, once
    for the rows (nothing is held in memory). Returns the number of rows. A line that is not line protocol
    is skipped and counted on `err` (default stderr)."""
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
    # A tag and a field may share a name (or take the status column's): the header says which is which then.
    clash = set(tag_cols) & {*field_cols, STATUS_COLUMN}
    header = ["time", "measurement", *(f"{t} (tag)" if t in clash else t for t in tag_cols),
              *(f"{f} (field)" if f == STATUS_COLUMN else f for f in field_cols), STATUS_COLUMN]
    writer = csv.writer(out)
    writer.writerow(header)
    rows = 0
    for _, line, status in lines():
        try:
            point = parse_line(line)
        except ValueError:
            continue
        stamp = iso_ms(point.time_ms, "milliseconds", local=local_time)
        writer.writerow([stamp, point.measurement, *(text_cell(point.tags.get(t, "")) for t in tag_cols),
                         *(_csv_value(point.fields.get(f)) for f in field_cols), status])
        rows += 1
    if bad:
        (err or sys.stderr).write(
            f"warning: {bad} stored lines are not line protocol and are left out (--format lp shows them)\n")
    return rows


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else text_cell(str(value)) if isinstance(value, str) else str(value)


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def text_cell(text: str) -> str:
    """A text value for a CSV cell a spreadsheet opens: one that starts like a formula (= + - @, tab, CR) gets a
    leading ' so it stays text (OWASP's advice against CSV injection); numbers are never passed here."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def from_text_cell(text: str) -> str:
    """text_cell undone (for reading an export back)."""
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_STARTS) else text
