"""The README is an interface: its fault table names real tests, its config reference every key,
and its Quick start the two commands CI runs."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 3)
    return README[start:end if end != -1 else None]


def test_every_test_the_fault_table_names_exists():
    table = section("What happens when")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "::" in line]
    assert len(rows) >= 20
    for row in rows:
        current = None
        for file_name, test in re.findall(r"`(test_\w+\.py)?::(test_\w+)`", row):
            current = file_name or current
            source = (ROOT / "tests" / current).read_text()
            assert re.search(rf"^def {test}\(", source, re.M), f"{current}::{test} named in the README is missing"


def test_the_config_reference_lists_every_key():
    table = section("Configuration reference")
    for name, cls in (("site", config.SiteConfig), ("sampling", config.SamplingConfig), ("i2c", config.I2CConfig),
                      ("led", config.LedConfig), ("store", config.StoreConfig),
                      ("simulation", config.SimulationConfig), ("influx", config.InfluxConfig),
                      ("log", config.LogConfig), ("update", config.UpdateConfig), ("clock", config.ClockConfig),
                      ("web", config.WebConfig), ("mqtt", config.MqttConfig)):
        for f in dataclasses.fields(cls):
            assert re.search(rf"`\[{name}\][^|]*\b{f.name}\b", table), f"[{name}] {f.name} is not documented"
    for f in dataclasses.fields(config.ChannelConfig):
        assert f"`[[channel]] {f.name}`" in table, f"[[channel]] {f.name} is not documented"


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one():
    quick = section("Quick start")
    block = re.search(r"```sh\n(.*?)```", quick, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["./run.sh", "./test.sh"]
    assert "./test.sh" in (ROOT / ".ci" / "run").read_text()


def test_the_led_table_is_the_one_rpi_errors_speaks():
    import rpi_errors

    assert rpi_errors.blink_table_markdown() in section("The status LED")
