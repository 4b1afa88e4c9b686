"""Line protocol: escaping, stable field types, and what cannot be stored."""
from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schema import ELECTRICITY, SYSTEM, Point, typed_fields


def test_example_line():
    p = Point(ELECTRICITY, {"unit": "red_house", "site": "brampton2zero"},
              typed_fields(ELECTRICITY, {"bus_voltage_v": 12, "current_ma": -250.5, "samples": 10}), 1700000000123)
    assert p.to_line() == (
        "electricity,site=brampton2zero,unit=red_house bus_voltage_v=12.0,current_ma=-250.5,samples=10i 1700000000123")


@pytest.mark.parametrize("name,escaped", [
    ("red house", "red\\ house"),
    ("a,b", "a\\,b"),
    ("x=y", "x\\=y"),
    ('say "hi"', 'say\\ "hi"'),
    ("back\\slash", "back\\\\slash"),
])
def test_tag_escaping(name, escaped):
    line = Point(SYSTEM, {"site": name}, {"uptime_s": 1.0}, 1).to_line()
    assert line == f"system,site={escaped} uptime_s=1.0 1"


def test_string_field_and_measurement_escaping():
    line = Point("my m,x", {}, {"note": 'a "q" \\ b'}, 5).to_line()
    assert line == 'my\\ m\\,x note="a \\"q\\" \\\\ b" 5'


def test_types_never_change():
    # A count given as float still goes out as an integer and a float given as an int as a float.
    fields = typed_fields(SYSTEM, {"outbox_depth": 3.0, "cpu_percent": 7, "uptime_s": 0})
    line = Point(SYSTEM, {}, fields, 1).to_line()
    assert "outbox_depth=3i" in line and "cpu_percent=7.0" in line and "uptime_s=0.0" in line
    with pytest.raises(KeyError):
        typed_fields(SYSTEM, {"not_a_field": 1})


def test_nan_inf_and_none_are_left_out_and_empty_point_refused():
    p = Point(SYSTEM, {}, {"a": math.nan, "b": math.inf, "c": None, "d": 1.5}, 1)
    assert p.to_line() == "system d=1.5 1"
    with pytest.raises(ValueError):
        Point(SYSTEM, {}, {"a": math.nan}, 1).to_line()


def _parse_tag_value(text: str) -> tuple[str, str]:
    """Undo tag escaping up to the first unescaped space (a tiny line-protocol reader)."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"n": "\n", "r": "\r", "t": "\t"}.get(nxt, nxt))
            i += 2
            continue
        if ch == " ":
            return "".join(out), text[i + 1:]
        out.append(ch)
        i += 1
    return "".join(out), ""


@given(st.text(min_size=1, max_size=30))
def test_any_tag_value_round_trips(value):
    line = Point(SYSTEM, {"site": value}, {"uptime_s": 2.0}, 7).to_line()
    assert line.startswith("system,site=")
    parsed, rest = _parse_tag_value(line[len("system,site="):])
    assert parsed == value
    assert rest == "uptime_s=2.0 7"


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20),
       st.floats(allow_nan=False, allow_infinity=False), st.integers(-2**40, 2**40), st.text(max_size=20))
def test_parse_line_reads_back_what_to_line_wrote(tag, measurement, value, count, note):
    from schema import parse_line

    point = Point(measurement, {"site": tag, "unit": "u"}, {"v": value, "n": count, "s": note}, 12345)
    back = parse_line(point.to_line())
    assert back.measurement == measurement and dict(back.tags) == {"site": tag, "unit": "u"}
    assert back.fields == {"v": value, "n": count, "s": note} and back.time_ms == 12345


def test_health_readings_are_rounded_to_what_they_resolve_and_stay_floats():
    from schema import SYSTEM, typed_fields

    fields = typed_fields(SYSTEM, {"memory_used_mb": 1250.8984375, "disk_free_mb": 78972.80859375,
                                   "uptime_s": 1061.192080728, "cpu_temp_c": 47.234, "cpu_percent": 3,
                                   "net_sent_bytes": 1234, "channels_ok": 4})
    assert fields == {"memory_used_mb": 1250.9, "disk_free_mb": 78972.8, "uptime_s": 1061.0, "cpu_temp_c": 47.2,
                      "cpu_percent": 3.0, "net_sent_bytes": 1234, "channels_ok": 4}
    assert type(fields["uptime_s"]) is float and type(fields["net_sent_bytes"]) is int
    line = Point(SYSTEM, {"site": "s"}, fields, 1).to_line()
    assert "uptime_s=1061.0," in line and "memory_used_mb=1250.9," in line
