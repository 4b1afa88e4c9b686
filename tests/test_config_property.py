"""The config lies: any value of any key, mutated from a valid config, is either a working `once`
(exit 0, or the documented 1 for a failed reading) or exit 78 with one `FILE: at 'key': ...` line per
problem. Never a traceback, never anything else. Runs main.main in-process to stay fast."""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import config
import main as main_mod
from outbox import Outbox, StoreError

SECTIONS = {"site": config.SiteConfig, "sampling": config.SamplingConfig, "i2c": config.I2CConfig,
            "led": config.LedConfig, "store": config.StoreConfig, "simulation": config.SimulationConfig,
            "influx": config.InfluxConfig, "log": config.LogConfig, "update": config.UpdateConfig,
            "clock": config.ClockConfig, "web": config.WebConfig, "mqtt": config.MqttConfig}
CHANNEL_KEYS = [f.name for f in dataclasses.fields(config.ChannelConfig)]
KEY_PATHS = ([(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
             + [("channel", i, key) for i in range(2) for key in CHANNEL_KEYS]
             + [("channel", 0, "constant", "bus_voltage_v"), ("channel", 0, "constant", "current_ma"),
                ("channel", 1, "tags", "colour")])


def base_doc(store_dir: str) -> dict:
    """A valid config that makes `once` quick (a 10 ms window)."""
    return {
        "site": {"name": "fuzz"},
        "sampling": {"interval_s": 0.05, "window_s": 0.01, "samples": 2},
        "led": {"enabled": False},
        "store": {"dir": store_dir},
        "simulation": {"enabled": True, "scenario": "day", "start": dt.datetime(2026, 6, 21, 12, 0)},
        "channel": [{"name": "red_house", "address": 0x40, "tags": {"colour": "red"}},
                    {"name": "power_plant", "address": 0x45, "max_current_a": 3.2, "role": "solar"}],
    }


EDGE_FLOATS = [0.0, -0.0, 1e308, -1e308, 5e-324, -5e-324, math.inf, -math.inf, math.nan, 1e-9, 0.5, 86_400.0,
               86_401.0, 1e16, 2.5]
EDGE_INTS = [0, 1, -1, 255, 256, 65_535, 65_536, 2**31, 2**63 - 1, -(2**63), 0x40, 0x4F, 1000, 1001]
EDGE_TEXT = ["", " ", "\x00", "a\x00b", "a\nb", "\x1b[31m", "\x7f", "\u0085", "\u2028", "\u0668\u0660",
             "127.0.0.1:\u0668\u0660\u0668\u0660", "http://127.0.0.1:\u0668\u0660", "http://h:0", "http://[::1]:8086",
             "https://x:99999", "0x40", "0x4F", "power_plant", "local", "v1", "cloud", "day", "constant", "simulated", "broker..lan", "x" * 5000]
EDGE_DATES = [dt.datetime(1, 1, 1), dt.datetime(9999, 12, 31, 23, 59, 59, 999999), dt.datetime(1969, 12, 31, 23, 59),
              dt.datetime(2100, 12, 31, 23, 59, 59), dt.datetime(2026, 3, 29, 1, 30), dt.date(1, 1, 1),
              dt.date(9999, 12, 31), dt.time(12, 0), dt.datetime(2026, 6, 21, 12, 0, tzinfo=dt.timezone.utc)]

scalars = st.one_of(
    st.sampled_from(EDGE_FLOATS), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(EDGE_INTS), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from(EDGE_TEXT), st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
    st.sampled_from(EDGE_DATES), st.booleans(),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.sampled_from(["a", "name", "\x00", "k\ny", "x y"]), scalars, max_size=2))
weird_keys = st.one_of(st.sampled_from(["bogus", "a\nb", "\x00", "tab\tkey", "\u202e", "é"]),
                       st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=6))
mutation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEY_PATHS), values),
    st.tuples(st.just("unknown"), st.sampled_from([(), ("site",), ("sampling",), ("channel", 0)]), weird_keys),
    st.tuples(st.just("delete"), st.sampled_from(KEY_PATHS), st.none()),
    st.tuples(st.just("section"), st.sampled_from([(s,) for s in [*SECTIONS, "channel"]]), values),
)


def mutate(doc: dict, op: str, path: tuple, value, store_dir: str) -> None:
    if op == "unknown":
        target = doc
        for part in path:
            if not isinstance(target, (dict, list)) or (isinstance(target, list) and part >= len(target)) \
                    or (isinstance(target, dict) and part not in target):
                return  # an earlier mutation replaced or removed what the key would go into
            target = target[part]
        if isinstance(target, dict):
            target[value] = 1
        return
    *parents, last = path
    target = doc
    for part in parents:
        if isinstance(target, dict) and isinstance(part, str):
            target = target.setdefault(part, {})
        elif isinstance(target, list) and isinstance(part, int) and part < len(target):
            target = target[part]
        else:
            return
        if not isinstance(target, (dict, list)):
            return
    if op == "delete":
        if isinstance(target, dict):
            target.pop(last, None)
        return
    if path == ("store", "dir") and isinstance(value, str):
        value = f"{store_dir}/{value}"  # whatever the bytes, never outside this example's directory
    if isinstance(target, dict):
        target[last] = value
    elif isinstance(target, list) and isinstance(last, int) and last < len(target):
        target[last] = value


# -- a small TOML writer: every document the strategies build, as inline tables --------------------------
def toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else "inf" if value == math.inf else "-inf" if value == -math.inf \
            else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        text = value.isoformat()
        return text.replace("+00:00", "Z")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def to_toml(doc: dict) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in doc.items())


def test_the_toml_writer_round_trips():
    import tomllib

    doc = base_doc("/x")
    doc["site"]["name"] = "a\x00\n\x7f\"\\é"
    assert tomllib.loads(to_toml(doc)) == doc


@settings(max_examples=int(os.environ.get("CONFIG_EXAMPLES", "150")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_any_mutated_config_is_a_working_once_or_exit_78_naming_each_key(mutations, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = f"{tmp}/store"
        doc = base_doc(store_dir)
        for op, path, value in mutations:
            mutate(doc, op, path, value, store_dir)
        path = Path(tmp) / "config.toml"
        path.write_text(to_toml(doc), encoding="utf-8")
        path.chmod(0o600)
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        cwd = os.getcwd()
        os.chdir(tmp)  # a relative store dir stays inside the example's directory
        try:
            code = main_mod.main(["once", "--config", str(path)])
        finally:
            os.chdir(cwd)
            root.handlers[:], root.level = handlers, level
        out, err = capsys.readouterr()
        event(f"exit {code}")  # --hypothesis-show-statistics shows the mix
        assert "Traceback" not in err, err
        if code == 78:
            lines = err.splitlines()
            assert lines, "exit 78 without a word"
            for line in lines:
                assert line.startswith(f"{path}: at '") and "': " in line, lines
            return
        assert code in (0, 1), (code, out, err)
        if code == 1:
            # the documented 1: a channel without a good reading, or the store could not be written
            assert "error" in (out + err).lower(), (out, err)
            return
        stored = [d for d in Path(tmp).rglob("outbox.db")]
        assert stored, (doc, err)
        try:
            box = Outbox(stored[0].parent, readonly=True)
        except StoreError as exc:
            raise AssertionError(f"once exited 0 but its store is unreadable: {exc}") from None
        # `once` really measured and stored: the point is there, or (a retention under a day) it was settled
        # into the ledger's daily totals, which keep it, and then aged out.
        assert box.stats().stored_total >= 1 or box.state("ledger:"), (doc, err)
        box.close()
