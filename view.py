"""The live page's view model: what the page shows of a cycle (units, flows, charge, the LED's word).

`make_snapshot` turns a measuring cycle into the small dict the measuring loop hands the page;
`derive` turns that snapshot into the view the browser draws (pure, no I/O; the server in web.py
calls it once per new snapshot, in its own thread).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from rpi_errors import Tier

# 12 V lead-acid battery at rest: 11.9 V is empty, 12.7 V is full (linear in between).
EMPTY_V = 11.9
FULL_V = 12.7
# Below this current (mA) a house is idle: neither buying nor selling, neither charging nor discharging.
DEAD_BAND_MA = 20.0
# While a battery charges its voltage reads above its resting voltage, so the charge estimated from it
# is lowered by a typical charging lift and never shown as full.
CHARGING_LIFT_V = 0.5
CHARGING_MAX_PCT = 95
# A panel's line above this voltage with no current: the charge controller has stopped charging.
PANEL_OPEN_V = 17.0
# The firmware's power flags of the Pi, as `health.SystemReading` names them.
PI_FLAGS = ("undervoltage", "throttled", "undervoltage_since_boot", "throttled_since_boot")
# A URL or a host:port in an error summary names a server (the MQTT broker's messages give host:port), and
# "for user X" a login: the page never shows either.
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+"  # a URL; then host:port (a name or address, not a time)
                  r"|(?:(?<=\s)|^)(?:\[[0-9A-Fa-f:.]+\]|(?=[A-Za-z0-9.-]*[A-Za-z.])[A-Za-z0-9.-]+):\d{1,5}(?!\d|:\d)")
_LOGIN = re.compile(r"\bfor user \S+")


# -- snapshots ----------------------------------------------------------------------------------------------
def make_snapshot(cycle: Any, channels: Sequence[Any], *, tier: Any = None, summary: str = "all well",
                  meaning: str = "", system: Any = None) -> dict:
    """The dict `FlowPage.update` takes, from a measuring cycle (duck-typed: `tools.Cycle`).

    `channels` are the configured channels (.name, .role, .unit_name); `tier` an
    `rpi_errors.Tier` or None, `summary` `ErrorHandler.summary()`, `meaning`
    `BLINK_CODES[tier].meaning`; `system` a `health.SystemReading` (the Pi's power flags) or None.
    """
    by_name = {c.name: c for c in channels}
    rows = []
    for reading in cycle.channels:
        channel = by_name.get(reading.name)
        rows.append({
            "name": reading.name,
            "unit": channel.unit_name if channel is not None else reading.name,
            "role": channel.role if channel is not None else "battery",
            "bus_voltage_v": reading.bus_voltage_v,
            "current_ma": reading.current_ma,
            "power_w": reading.power_w,
            "energy_in_wh": reading.energy_in_wh,
            "energy_out_wh": reading.energy_out_wh,
        })
    return {
        "time_ms": cycle.time_ms,
        "channels": rows,
        "status": {"tier": getattr(tier, "name", tier), "summary": summary, "meaning": meaning},
        "pi": {flag: getattr(system, flag, None) for flag in PI_FLAGS},
    }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value + 0.0 if math.isfinite(value) else None  # + 0.0: never a negative zero


def battery_level_pct(volts: float | None, current_ma: float | None = None) -> int | None:
    """Charge estimated from the voltage of a 12 V lead-acid battery, 0..100 (None: unknown).

    `current_ma` is the battery's current where it is measured (+ = charging): while it charges, its
    voltage reads high, so the estimate is lowered by CHARGING_LIFT_V and capped below full.
    """
    if volts is None:
        return None
    charging = current_ma is not None and current_ma >= DEAD_BAND_MA
    if charging:
        volts -= CHARGING_LIFT_V
    pct = round(min(max((volts - EMPTY_V) / (FULL_V - EMPTY_V), 0.0), 1.0) * 100)
    return min(pct, CHARGING_MAX_PCT) if charging else pct


def flow_width(watts: float) -> float:
    """Stroke width (diagram units) for a flow of `watts`: grows with the square root, 3..26."""
    return round(min(max(3.0 + 5.0 * math.sqrt(abs(watts)), 3.0), 26.0), 1)


_STATE_TEXT = {
    "buying": "Buying from the plant",
    "selling": "Selling to the plant",
    "idle": "Not trading",
    "charging": "Charging its battery",
    "using battery": "Running on its battery",
    "generating": "Its panel is charging the battery",
    "full": "Battery full: the charge controller has stopped charging",
    "no sun": "No sun on the panel",
    "unknown": "No reading",
}
_PLANT_STATE_TEXT = {"selling": "Supplying the houses", "buying": "Taking energy from the houses",
                     "idle": "Not trading"}


def derive(snapshot: Mapping | None, channels: Sequence[Any], plant_unit: str, site: str) -> dict:
    """The page's view of a snapshot: units (battery level, state), flows (arrows) and status.

    Robust to missing or malformed values: anything unreadable counts as no reading.
    """
    snapshot = snapshot if isinstance(snapshot, Mapping) else {}
    readings: dict[str, Mapping] = {}
    rows = snapshot.get("channels")
    for row in rows if isinstance(rows, (list, tuple)) else ():
        if isinstance(row, Mapping) and isinstance(row.get("name"), str):
            readings[row["name"]] = row
    layout = _layout(readings, channels, plant_unit)
    units, flows = [], []
    for unit, members in layout.items():
        chans = [_channel_values(readings, name, role) for name, role in members]
        by_role: dict[str, list[dict]] = {}
        for chan in chans:
            by_role.setdefault(chan["role"], []).append(chan)
        units.append(_unit_view(unit, chans, by_role, unit == plant_unit))
        flows += _unit_flows(unit, by_role, plant_unit)

    status = snapshot.get("status") if isinstance(snapshot.get("status"), Mapping) else {}
    tier_name = status.get("tier")
    tier_name = tier_name if isinstance(tier_name, str) and tier_name else None
    summary = _LOGIN.sub("for user <user>", _URL.sub("<server>", str(status.get("summary") or "")))[:300]
    meaning = str(status.get("meaning") or "")[:300]
    level = _level(tier_name)
    time_ms = snapshot.get("time_ms")
    pi = snapshot.get("pi") if isinstance(snapshot.get("pi"), Mapping) else {}
    return {
        "site": site,
        "plant": plant_unit,
        "time_ms": time_ms if isinstance(time_ms, int) and not isinstance(time_ms, bool) else None,
        "units": units,
        "flows": flows,
        "status": {"tier": tier_name, "level": level, "summary": summary, "meaning": meaning},
        "pi": {flag: pi.get(flag) if isinstance(pi.get(flag), bool) else None for flag in PI_FLAGS},
        "dead_band_ma": DEAD_BAND_MA,
    }


def _layout(readings: Mapping[str, Mapping], channels: Sequence[Any], plant_unit: str
            ) -> dict[str, list[tuple[str, str]]]:
    """Units in configuration order (the plant last), each with its (channel name, role)s."""
    layout: dict[str, list[tuple[str, str]]] = {}
    for channel in channels:
        layout.setdefault(channel.unit_name, []).append((channel.name, channel.role))
    for name, row in readings.items():  # a reading the configuration does not know (should not happen)
        if not any(name == n for chans in layout.values() for n, _ in chans):
            layout.setdefault(str(row.get("unit") or name), []).append((name, str(row.get("role") or "battery")))
    layout.setdefault(plant_unit, [])
    return {u: layout[u] for u in [u for u in layout if u != plant_unit] + [plant_unit]}


def _channel_values(readings: Mapping[str, Mapping], name: str, role: str) -> dict:
    row = readings.get(name, {})
    return {
        "name": name,
        "role": role,
        "bus_voltage_v": _number(row.get("bus_voltage_v")),
        "current_ma": _number(row.get("current_ma")),
        "power_w": _number(row.get("power_w")),
        "energy_in_wh": _number(row.get("energy_in_wh")),
        "energy_out_wh": _number(row.get("energy_out_wh")),
    }


def _total(chans: list[dict], key: str) -> float | None:
    nums = [c[key] for c in chans if c[key] is not None]
    return sum(nums) if nums else None


def _unit_state(by_role: Mapping[str, list[dict]], is_plant: bool) -> tuple[str, str | None, str]:
    """(state, what it was read from, its words) of one unit."""
    state, source = "unknown", None
    if by_role.get("exchange"):
        source = "exchange"
        current = _total(by_role["exchange"], "current_ma")
        if current is not None:
            # A house: + = buys from the plant. The plant: + = sells to the houses.
            if abs(current) < DEAD_BAND_MA:
                state = "idle"
            elif is_plant:
                state = "selling" if current > 0 else "buying"
            else:
                state = "buying" if current > 0 else "selling"
    elif by_role.get("battery"):
        source = "battery"
        current = _total(by_role["battery"], "current_ma")
        if current is not None:
            state = ("idle" if abs(current) < DEAD_BAND_MA
                     else "charging" if current > 0 else "using battery")
    elif by_role.get("solar"):
        # Only the panel is measured (the real model): what its charge controller is doing.
        source = "solar"
        current = _total(by_role["solar"], "current_ma")
        panel_v = next((c["bus_voltage_v"] for c in by_role["solar"] if c["bus_voltage_v"] is not None), None)
        if current is not None and panel_v is not None:
            state = ("generating" if current >= DEAD_BAND_MA
                     else "full" if panel_v >= PANEL_OPEN_V else "no sun")
    if source == "battery" and state == "idle":
        text = "Battery neither charging nor in use"
    else:
        text = (_PLANT_STATE_TEXT.get(state) if is_plant else None) or _STATE_TEXT[state]
    return state, source, text


def _unit_view(unit: str, chans: list[dict], by_role: Mapping[str, list[dict]], is_plant: bool) -> dict:
    # Battery, load and trade meters sit on the battery's bus; a panel's meter sees the panel's
    # voltage (up to ~21 V with the controller open), never the battery's.
    on_battery = [c for c in chans if c["role"] != "solar"]
    volts_from = by_role.get("battery") or on_battery
    volts = next((c["bus_voltage_v"] for c in volts_from if c["bus_voltage_v"] is not None), None)
    if volts is None:
        volts = next((c["bus_voltage_v"] for c in on_battery if c["bus_voltage_v"] is not None), None)
    state, source, text = _unit_state(by_role, is_plant)
    solar = by_role.get("solar", [])
    return {
        "name": unit,
        "is_plant": is_plant,
        "channels": chans,
        "battery_v": volts,
        "battery_pct": battery_level_pct(volts, _total(by_role.get("battery", []), "current_ma")),
        "battery_power_w": _total(by_role.get("battery", []), "power_w"),
        # What the page cannot know says so ("not measured"), it is never shown as 0.
        "battery_measured": bool(on_battery),
        "panel_v": next((c["bus_voltage_v"] for c in solar if c["bus_voltage_v"] is not None), None),
        "panel_power_w": _total(solar, "power_w"),
        "state": state,
        "state_source": source,
        "state_text": text,
        "has_exchange": bool(by_role.get("exchange")),
    }


def _unit_flows(unit: str, by_role: Mapping[str, list[dict]], plant_unit: str) -> list[dict]:
    """The arrows of one unit: its trade with the plant, its panel, its load."""
    flows = []
    for role in ("exchange", "solar", "load"):
        if role not in by_role or (role == "exchange" and unit == plant_unit):
            continue
        current = _total(by_role[role], "current_ma")
        power = _total(by_role[role], "power_w")
        idle_text = "idle" if role == "exchange" else "off"
        ok = current is not None
        active = ok and abs(current) >= DEAD_BAND_MA
        watts = abs(power) if power is not None else 0.0
        if role == "exchange":
            buying = ok and current > 0
            ends = (plant_unit, unit) if buying or not active else (unit, plant_unit)
            direction = "none" if not active else ("to_unit" if buying else "from_unit")
        elif role == "solar":
            ends, direction = ("sun", unit), "to_unit" if active else "none"
            panel_v = next((c["bus_voltage_v"] for c in by_role[role] if c["bus_voltage_v"] is not None), None)
            idle_text = "battery full" if panel_v is not None and panel_v >= PANEL_OPEN_V else "no sun"
        else:
            ends, direction = (unit, "load"), "from_unit" if active else "none"
        flows.append({
            "kind": role,
            "unit": unit,
            "from": ends[0],
            "to": ends[1],
            "direction": direction,
            "active": active,
            "ok": ok,
            "watts": round(watts, 3) + 0.0 if ok else None,  # + 0.0: never a negative zero
            "current_ma": round(current, 1) + 0.0 if ok else None,
            "width": flow_width(watts) if active else 2.0,
            "idle_text": idle_text,
        })
    return flows


def _level(tier_name: str | None) -> str:
    """The page's word for the LED's tier (its Tier name in the snapshot; a name no Tier has is a fault)."""
    if tier_name is None:
        return "ok"
    tier = Tier.__members__.get(tier_name)
    if tier is Tier.SILENT:
        return "ok"
    if tier in (Tier.SHORT, Tier.ROLLBACK):  # the logger works; a note, not a fault
        return "note"
    if tier is Tier.CRITICAL:
        return "critical"
    return "fault"
