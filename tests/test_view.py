"""The live page's view model (view.py): snapshots from cycles, what the page derives from them."""
from __future__ import annotations

import pytest

import view
from config import ChannelConfig
from rpi_errors import Tier

CHANNELS = (
    ChannelConfig("red_house", 0x40),
    ChannelConfig("red_trade", 0x48, role="exchange", unit="red_house"),
)


def test_make_snapshot_from_a_cycle():
    from tools import ChannelReading, Cycle

    cycle = Cycle(1_780_000_000_000, 5.0, (
        ChannelReading("red_house", 0x40, 12.4, 10.0, 100.0, 1.24, 10, 0, 0.1, 0.0),
        ChannelReading("red_trade", 0x48, None, None, None, None, 0, 10, None, None, error="no answer"),
    ))
    snap = view.make_snapshot(cycle, CHANNELS, tier=None, summary="all well", meaning="All well.")
    assert snap["time_ms"] == 1_780_000_000_000
    assert snap["status"] == {"tier": None, "summary": "all well", "meaning": "All well."}
    assert snap["channels"][1] == {"name": "red_trade", "unit": "red_house", "role": "exchange",
                                   "bus_voltage_v": None, "current_ma": None, "power_w": None,
                                   "energy_in_wh": None, "energy_out_wh": None}
    assert view.make_snapshot(cycle, CHANNELS, tier=Tier.MEASURING)["status"]["tier"] == "MEASURING"


def test_battery_never_reads_full_while_it_is_charging():
    assert view.battery_level_pct(12.7) == 100  # at rest
    assert view.battery_level_pct(14.2, current_ma=1300.0) <= view.CHARGING_MAX_PCT < 100  # +16 W going in
    assert view.battery_level_pct(12.75, current_ma=400.0) < view.battery_level_pct(12.75)
    assert view.battery_level_pct(12.3, current_ma=-300.0) == 50  # discharging: no correction
    assert view.battery_level_pct(None, current_ma=100.0) is None


def test_make_snapshot_carries_the_pis_power_flags():
    from tools import ChannelReading, Cycle
    from health import SystemReading

    cycle = Cycle(1_780_000_000_000, 5.0, (ChannelReading("red_house", 0x40, 13.2, 25.6, 256.0, 3.38, 10, 0,
                                                          0.1, 0.0),))
    system = SystemReading(1.0, None, 100.0, 1000.0, 0, 0, 10.0, undervoltage=True, throttled=False,
                           undervoltage_since_boot=True, throttled_since_boot=False)
    snap = view.make_snapshot(cycle, [ChannelConfig("red_house", 0x40, role="solar")], system=system)
    assert snap["pi"] == {"undervoltage": True, "throttled": False, "undervoltage_since_boot": True,
                          "throttled_since_boot": False}
    derived = view.derive(snap, [ChannelConfig("red_house", 0x40, role="solar")], "power_plant", "s")
    assert derived["pi"]["undervoltage"] is True
    assert view.derive({"pi": {"undervoltage": "yes"}}, [], "p", "s")["pi"]["undervoltage"] is None  # untrusted


@pytest.mark.parametrize(("tier", "level"), [(None, "ok"), (Tier.SILENT, "ok"), (Tier.SHORT, "note"),
                                             (Tier.ROLLBACK, "note"), (Tier.SENDING, "fault"),
                                             (Tier.MEASURING, "fault"), (Tier.CRITICAL, "critical")])
def test_the_led_tier_becomes_the_pages_level(tier, level):
    snap = {"status": {"tier": tier.name if tier is not None else None, "summary": "x", "meaning": "y"}}
    assert view.derive(snap, [], "p", "s")["status"]["level"] == level
    bogus = view.derive({"status": {"tier": "NO_SUCH_TIER"}}, [], "p", "s")["status"]
    assert bogus["level"] == "fault" and bogus["tier"] == "NO_SUCH_TIER"  # an unknown tier is never "ok"


def test_numbers_on_the_page_are_never_a_negative_zero():
    import math

    from view import _number

    # An idle channel's mean power can round to -0.0 (noise either side of 0): JSON would show "-0.0".
    assert math.copysign(1.0, _number(-0.0)) == 1.0 and _number(-0.0) == 0.0
    assert _number(-1.5) == -1.5 and _number(float("nan")) is None and _number(True) is None
