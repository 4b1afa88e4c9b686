"""Config: defaults, lookup order, and one clear line per problem, naming its key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import config
from config import ConfigError, find_config, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_default_is_the_simulated_model_with_four_channels():
    cfg = load_config(None)
    assert cfg.simulation.enabled
    assert [(c.name, c.address) for c in cfg.channels] == [
        ("red_house", 0x40), ("green_house", 0x41), ("blue_house", 0x44), ("power_plant", 0x45)]
    assert {c.shunt_ohms for c in cfg.channels} == {0.1}
    assert {c.role for c in cfg.channels} == {"solar"}  # an INA219 on each panel, as on the real model
    assert cfg.sampling.interval_s == 3 and cfg.sampling.window_s == 1 and cfg.sampling.samples == 10
    assert cfg.led.pin == 18
    assert cfg.influx.kind == "none"


def test_example_file_is_valid_and_matches_documented_defaults():
    cfg = load_config(ROOT / "config.example.toml")
    default = load_config(None)
    assert [(c.name, c.address, c.role) for c in cfg.channels] == [
        (c.name, c.address, c.role) for c in default.channels]
    assert {c.role for c in cfg.channels} == {"solar"}
    assert cfg.sampling == default.sampling and cfg.sampling.interval_s == 3
    assert "\ninterval_s = 3 " in (ROOT / "config.example.toml").read_text()
    assert cfg.store.max_mb == 200 and cfg.store.retention_days == 7


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "SYSTEM_CONFIG_PATH", tmp_path / "etc.toml")
    assert find_config(None, env={}) is None
    (tmp_path / "config.toml").write_text("")
    assert find_config(None, env={}) == Path("config.toml")
    (tmp_path / "etc.toml").write_text("")
    assert find_config(None, env={}) == tmp_path / "etc.toml"
    assert find_config(None, env={"SOLAR_CONFIG": "x.toml"}) == Path("x.toml")
    assert find_config("y.toml", env={"SOLAR_CONFIG": "x.toml"}) == Path("y.toml")


def test_addresses_as_strings_tags_and_constant():
    cfg = parse_config({
        "channel": [{"name": "a", "address": "0x4A", "tags": {"colour": "red"},
                     "constant": {"bus_voltage_v": 12.0, "current_ma": -300}}],
    })
    ch = cfg.channels[0]
    assert ch.address == 0x4A and ch.tags == {"colour": "red"}
    assert ch.constant.current_ma == -300.0


# Each malformed document and the key path its error must name.
MALFORMED = [
    ({"sampling": {"interval_s": 0}}, "sampling.interval_s", "is outside"),
    ({"sampling": {"interval_s": "ten"}}, "sampling.interval_s", "must be a number"),
    ({"sampling": {"window_s": 10, "interval_s": 10}}, "sampling.window_s", "shorter than the interval"),
    ({"sampling": {"samples": 0}}, "sampling.samples", "is outside"),
    ({"sampling": {"samples": 2.5}}, "sampling.samples", "whole number"),
    ({"sampling": {"adc_samples": 3}}, "sampling.adc_samples", "not one of"),
    ({"sampling": {"speed": 2}}, "sampling.speed", "unknown key"),
    ({"bogus": {}}, "bogus", "unknown key"),
    ({"site": "brampton"}, "site", "must be a table"),
    ({"i2c": {"bus": -1}}, "i2c.bus", "is outside"),
    ({"led": {"pin": 40}}, "led.pin", "0-27"),
    ({"led": {"enabled": "yes"}}, "led.enabled", "true or false"),
    ({"store": {"max_mb": -5}}, "store.max_mb", "is outside"),
    ({"store": {"retention_days": -1}}, "store.retention_days", "is outside"),
    ({"simulation": {"scenario": "night"}}, "simulation.scenario", "not one of"),
    ({"simulation": {"speed": 0}}, "simulation.speed", "is outside"),
    ({"simulation": {"start": "noon"}}, "simulation.start", "date-time"),
    ({"channel": {"name": "a"}}, "channel", "array of tables"),
    ({"channel": []}, "channel", "at least one"),
    ({"channel": [{"address": 0x40}]}, "channel[0].name", "is required"),
    ({"channel": [{"name": "a"}]}, "channel[0].address", "is required"),
    ({"channel": [{"name": "a", "address": 0x20}]}, "channel[0].address", "0x40-0x4F"),
    ({"channel": [{"name": "a", "address": "forty"}]}, "channel[0].address", "not an I2C address"),
    ({"channel": [{"name": "a", "address": 0x40}, {"name": "b", "address": 0x40}]},
     "channel[1].address", "already used by channel[0]"),
    ({"channel": [{"name": "a", "address": 0x40}, {"name": "a", "address": 0x41}]},
     "channel[1].name", "already used by channel[0]"),
    ({"channel": [{"name": "a", "address": 0x40, "shunt_ohms": -0.1}]}, "channel[0].shunt_ohms", "is outside"),
    ({"channel": [{"name": "a", "address": 0x40, "max_current_a": 10}]},
     "channel[0].max_current_a", "320 mV"),
    ({"channel": [{"name": "a b", "address": 0x40}]}, "channel[0].name", "letters, digits"),
    ({"channel": [{"name": "a", "address": 0x40, "role": "kettle"}]}, "channel[0].role", "not one of"),
    ({"channel": [{"name": "a", "address": 0x40, "tags": {"unit": "x"}}]}, "channel[0].tags.unit", "set by the daemon"),
    ({"channel": [{"name": "a", "address": 0x40, "tags": {"floor": 2}}]}, "channel[0].tags.floor", "non-empty string"),
    ({"channel": [{"name": "a", "address": 0x40, "wires": 2}]}, "channel[0].wires", "unknown key"),
    ({"channel": [{"name": "a", "address": 0x40, "constant": {"amps": 1}}]}, "channel[0].constant.amps", "unknown key"),
    ({"influx": {"kind": "remote"}}, "influx.kind", "not one of"),
    ({"influx": {"kind": "cloud", "url": "http://x.example", "org": "o", "bucket": "b"}}, "influx.url", "https"),
    ({"influx": {"kind": "local", "api": "v1", "url": "http://127.0.0.1:8086"}}, "influx.database", "required"),
    ({"influx": {"kind": "local", "url": "ftp://x"}}, "influx.url", "not an http"),
    ({"influx": {"timeout_s": 0}}, "influx.timeout_s", "is outside"),
    ({"influx": {"token": "abc"}}, "influx.token", "unknown key"),
    ({"log": {"level": "LOUD"}}, "log.level", "not one of"),
]


@pytest.mark.parametrize("doc,key,words", MALFORMED, ids=[m[1] + ":" + m[2] for m in MALFORMED])
def test_malformed_config_names_its_key(doc, key, words):
    with pytest.raises(ConfigError) as err:
        parse_config(doc, "bad.toml")
    lines = str(err.value).splitlines()
    matching = [line for line in lines if f"at '{key}'" in line]
    assert matching, lines
    assert words in matching[0]
    assert all(line.startswith("bad.toml: at '") for line in lines)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_config({"sampling": {"interval_s": -1, "samples": 0}, "led": {"pin": 99}, "x": 1})
    assert len(err.value.problems) == 4


def test_invalid_toml_and_missing_file_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sampling\ninterval_s = 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value).startswith(f"{bad}: not valid TOML")
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "missing.toml")
    assert "cannot read the file" in str(err.value)


def test_cli_reports_config_errors_with_exit_78_and_no_traceback(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text('[[channel]]\nname = "a"\naddress = 0x40\n[[channel]]\nname = "b"\naddress = 0x40\n'
                   '[sampling]\nwindow_s = 20\n')
    bad.chmod(0o600)
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "once", "--config", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert "Traceback" not in result.stderr
    assert f"{bad}: at 'channel[1].address': 0x40 is already used by channel[0]" in result.stderr
    assert f"{bad}: at 'sampling.window_s'" in result.stderr


def test_a_config_others_can_read_is_accepted_one_they_can_write_is_refused(tmp_path):
    # A config holds no secret: 0644 (what git checks out, what `cp` of the example makes) is fine.
    path = tmp_path / "open.toml"
    path.write_text("")
    path.chmod(0o644)
    ok = subprocess.run([sys.executable, str(ROOT / "main.py"), "status", "--config", str(path)],
                        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    for mode, who in ((0o646, "others"), (0o664, "its group"), (0o666, "group and others")):
        path.chmod(mode)
        result = subprocess.run([sys.executable, str(ROOT / "main.py"), "once", "--config", str(path)],
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 78
        assert result.stderr.strip() == \
            f"{path}: the file is writable by {who} (mode {mode:04o}): run chmod go-w {path}"


@pytest.mark.parametrize("name", ["config.example.toml", "examples/flow-demo.toml"])
def test_shipped_example_configs_are_valid(name):
    cfg = load_config(ROOT / name)
    assert cfg.channels


@pytest.mark.parametrize("doc,key", [
    ({"store": {"retention_days": 1e12}}, "store.retention_days"),
    ({"sampling": {"interval_s": 1e10, "window_s": 1}}, "sampling.interval_s"),
    ({"influx": {"flush_interval_s": 1e10}}, "influx.flush_interval_s"),
    ({"influx": {"max_upload_bytes_per_s": 0.015}}, "influx.max_upload_bytes_per_s"),
    ({"influx": {"kind": "local", "api": "v1", "url": "http://logger:hunter2@db:8086", "database": "d"}},
     "influx.url"),
])
def test_values_that_would_fail_later_are_refused_now(doc, key):
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert f"at '{key}'" in str(err.value)
    assert "hunter2" not in str(err.value)


# -- one declaration per key: the README's reference and config.example.toml follow it --------------------------
def declared_keys() -> dict[str, object]:
    """'[section] key' -> its declared default (dataclasses.MISSING: required), for every declared key."""
    import dataclasses

    keys = {f"[{section}] {name}": f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for section, cls in config.SECTIONS.items() for name, f in config.declared(cls).items()}
    keys.update({f"[[channel]] {name}": f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                 for name, f in config.declared(config.ChannelConfig).items()})
    return keys


def readme_reference() -> dict[str, str]:
    """'[section] key' -> the README reference table's default cell (one row may name several keys)."""
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")] if line.startswith("| `[") else []
        if len(cells) < 3:
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        section, first = names[0].rsplit(" ", 1)
        parts = cells[1].split(", ") if len(names) > 1 else [cells[1]]
        for i, name in enumerate([first, *names[1:]]):
            part = parts[min(i, len(parts) - 1)]
            quoted = re.findall(r"`([^`]+)`", part)
            rows[f"{section} {name}"] = quoted[0] if quoted else part
    return rows


def test_every_declared_key_has_a_doc_and_is_in_the_readme_reference_with_its_default():
    import dataclasses
    import tomllib

    reference = readme_reference()
    assert set(reference) == set(declared_keys())  # no key undocumented, no documented key undeclared
    for cls in [*config.SECTIONS.values(), config.ChannelConfig]:
        assert all(f.metadata["doc"] for f in config.declared(cls).values()), cls
    for name, default in declared_keys().items():
        cell = reference[name]
        if default is dataclasses.MISSING or default is None or isinstance(default, config.ConstantTruth):
            continue  # "required", "now", the constant table: said in words
        try:
            shown = tomllib.loads(f"x = {cell}")["x"]
        except tomllib.TOMLDecodeError:
            continue  # a default said in words ("the name", "$STATE_DIRECTORY, else data")
        assert shown == default, f"README says {name} defaults to {cell}, the declaration says {default!r}"


def test_config_example_shows_only_declared_keys_with_their_declared_defaults():
    import re
    import tomllib

    declared = declared_keys()
    exceptions = {"[simulation] enabled", "[[channel]] role", "[[channel]] name", "[[channel]] address",
                  "[[channel]] tags", "[[channel]] max_current_a"}  # what the example's header says differs
    section = None
    for line in (ROOT / "config.example.toml").read_text(encoding="utf-8").splitlines():
        text = line.lstrip("# ").split("  #")[0].strip()
        header = re.fullmatch(r"(\[\[?[a-z0-9]+\]\]?)", text)
        if header:
            section = header.group(1)
            continue
        item = re.fullmatch(r"([a-z_0-9]+) = (.+)", text)
        if section is None or item is None:
            continue
        name = f"{section} {item.group(1)}"
        assert name in declared, f"config.example.toml shows {name}, which no declaration has"
        value = tomllib.loads(f"x = {item.group(2)}")["x"]
        if line.startswith("#") or name in exceptions or section == "[influx]":
            continue
        default = declared[name]
        if isinstance(default, config.ConstantTruth):
            default = {"bus_voltage_v": default.bus_voltage_v, "current_ma": default.current_ma}
        assert value == default, f"config.example.toml: {name} = {item.group(2)}, declared default {default!r}"


@pytest.mark.parametrize("mqtt, key, words", [
    ({"enabled": True}, "mqtt.host", "required when [mqtt] enabled = true"),
    ({"topic_prefix": "solar/#"}, "mqtt.topic_prefix", "wildcards"),
    ({"discovery_prefix": "homeassistant/"}, "mqtt.discovery_prefix", "cannot start or end with /"),
    ({"qos": 3}, "mqtt.qos", "2"),
    ({"port": 70000}, "mqtt.port", "65535"),
])
def test_bad_mqtt_keys_name_their_key(mqtt, key, words):
    with pytest.raises(ConfigError) as err:
        parse_config({"mqtt": mqtt})
    assert any(f"'{key}'" in p and words in p for p in err.value.problems), err.value.problems


def test_mqtt_port_follows_tls_unless_set():
    assert parse_config({"mqtt": {"enabled": True, "host": "b"}}).mqtt.effective_port == 1883
    assert parse_config({"mqtt": {"enabled": True, "host": "b", "tls": True}}).mqtt.effective_port == 8883
    assert parse_config({"mqtt": {"enabled": True, "host": "b", "tls": True, "port": 8884}}).mqtt.effective_port == 8884
