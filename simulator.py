"""The simulated model: the sun over Brampton, batteries, panels, loads and trading, behind emulated chips.

`SolarModel` supplies what each sensor sees: batteries, panels, loads and the energy exchanged
with the power plant of the Brampton scale model; `build_simulated_bus` puts one emulated INA219
(emulation.py) per configured channel on an emulated I2C bus, so the real driver reads the model.
Nothing here sleeps or reads the wall clock: time comes from an injected
`clock` (monotonic seconds).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import math
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from emulation import EmulatedINA219, SimulatedBus  # noqa: F401 - SimulatedBus: the bus this module builds

if TYPE_CHECKING:
    from config import Config

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# --- Sun and time ----------------------------------------------------------------
LATITUDE_DEG = 54.94  # Brampton, Cumbria
LONGITUDE_DEG = -2.73
_EPOCH = datetime.datetime(1970, 1, 1)
_HOUR = datetime.timedelta(hours=1)


def _last_sunday(year: int, month: int) -> datetime.datetime:
    last = datetime.datetime(year, month, 31)  # March and October both have 31 days
    return last - datetime.timedelta(days=(last.weekday() + 1) % 7)


def _is_bst(utc: datetime.datetime) -> bool:
    """UK summer time: last Sunday of March 01:00 UTC to last Sunday of October 01:00 UTC."""
    return _last_sunday(utc.year, 3) + _HOUR <= utc < _last_sunday(utc.year, 10) + _HOUR


def _to_utc(when: datetime.datetime) -> datetime.datetime:
    """Naive UTC for an aware time or a naive UK local time."""
    if when.tzinfo is not None:
        return when.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    guess = when - _HOUR
    return guess if _is_bst(guess) else when


def _utc_to_local(utc: datetime.datetime) -> datetime.datetime:
    return utc + _HOUR if _is_bst(utc) else utc


def _sun_elevation_utc(utc: datetime.datetime, latitude_deg: float, longitude_deg: float) -> float:
    # NOAA "General Solar Position Calculations" (fractional-year series).
    days = 366 if utc.year % 4 == 0 and (utc.year % 100 != 0 or utc.year % 400 == 0) else 365
    hours = utc.hour + utc.minute / 60 + (utc.second + utc.microsecond / 1e6) / 3600
    gamma = 2 * math.pi / days * (utc.timetuple().tm_yday - 1 + (hours - 12) / 24)
    eqtime_min = 229.18 * (0.000075 + 0.001868 * math.cos(gamma) - 0.032077 * math.sin(gamma)
                           - 0.014615 * math.cos(2 * gamma) - 0.040849 * math.sin(2 * gamma))
    decl = (0.006918 - 0.399912 * math.cos(gamma) + 0.070257 * math.sin(gamma)
            - 0.006758 * math.cos(2 * gamma) + 0.000907 * math.sin(2 * gamma)
            - 0.002697 * math.cos(3 * gamma) + 0.00148 * math.sin(3 * gamma))
    true_solar_min = hours * 60 + eqtime_min + 4 * longitude_deg
    hour_angle = math.radians(true_solar_min / 4 - 180)
    lat = math.radians(latitude_deg)
    cos_zenith = math.sin(lat) * math.sin(decl) + math.cos(lat) * math.cos(decl) * math.cos(hour_angle)
    return 90.0 - math.degrees(math.acos(max(-1.0, min(1.0, cos_zenith))))


def sun_elevation_deg(when: datetime.datetime, latitude_deg: float = LATITUDE_DEG,
                      longitude_deg: float = LONGITUDE_DEG) -> float:
    """Sun elevation in degrees (negative below the horizon).

    `when` is aware, or naive UK local time (GMT/BST); longitude east-positive.
    """
    return _sun_elevation_utc(_to_utc(when), latitude_deg, longitude_deg)


# --- Deterministic noise -----------------------------------------------------------
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _uniform(*parts: int) -> float:
    """A number in [0, 1) that depends only on `parts` (no process-salted hash())."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (part & _MASK64))
    return h / 2.0**64


def _value_noise(seed: int, salt: int, epoch_s: float, period_s: float) -> float:
    """Smooth noise in [0, 1]: random knots every `period_s`, smoothstep between them."""
    position = epoch_s / period_s
    knot = math.floor(position)
    frac = position - knot
    a, b = _uniform(seed, salt, knot), _uniform(seed, salt, knot + 1)
    return a + (b - a) * frac * frac * (3 - 2 * frac)


def _uniform_seed(*parts: int) -> int:
    return _splitmix64(int(_uniform(*parts) * 2.0**53))


def _key(name: str) -> int:
    return zlib.crc32(name.encode())


# --- The physical model -------------------------------------------------------------
@dataclass(frozen=True)
class UnitSpec:
    """One unit's hardware: battery capacity (Ah), panel peak (W), always-on load (A)."""

    capacity_ah: float
    panel_peak_w: float
    base_load_a: float


HOUSE = UnitSpec(capacity_ah=3.2, panel_peak_w=10.0, base_load_a=0.0)
PLANT = UnitSpec(capacity_ah=36.0, panel_peak_w=20.0, base_load_a=0.1)
LED_A = 0.3
FAN_A = 0.15
BUY_A = 0.5
SELL_A = 0.3
# A 36-cell "12 V" panel: maximum power at 17.5 V, a short-circuit current 7 % above the maximum-power
# current, 21.6 V open-circuit in full sun, falling by ~1.2 V per e-fold less light.
PANEL_VMP_V = 17.5
PANEL_VOC_V = 21.6
PANEL_VOC_PER_E_V = 1.2
PANEL_ISC_FACTOR = 1.07
# The PWM charge controller connects the panel to the battery while it charges (the panel then sits this
# far above the battery), never lets the battery rise above the absorption voltage, stops charging when the
# battery is full (the panel floats at its open-circuit voltage) and starts again once the battery sagged.
CONTROLLER_DROP_V = 0.2
ABSORPTION_V = 14.4
FULL_SOC = 0.98
RECHARGE_SOC = 0.93
DISCONNECT_SOC = 0.02  # the controller's low-voltage disconnect drops the loads
# Lead-acid: 11.9 V (empty) to 12.7 V (full) at rest; internal resistance per Ah of capacity.
INTERNAL_OHM_AH = 0.35
# The trading switches (see SolarModel).
SELL_ABOVE_SOC = 0.9
SELL_DOWN_TO_SOC = 0.8
BUY_BELOW_SOC = 0.6
BUY_UNTIL_SOC = 0.75
PLANT_RESERVE_SOC = 0.3
STEP_S = 60.0
# The model's own energy account per unit (SolarModel.account), in Wh.
ACCOUNT_FIGURES = ("generated", "used", "bought", "sold", "battery_in", "battery_out", "losses")
# A snapshot is reused for reads within this much real time after it was computed: one sample pass reads
# every chip within about a millisecond, so the model is computed once per pass, not once per chip.
# (At speed 1 that is 10 ms of simulated time on a model integrated on a 60-s grid.)
SNAPSHOT_REUSE_REAL_S = 0.01
_CLOUD, _LED, _FAN, _SOC = 1, 2, 3, 4


@dataclass(frozen=True)
class UnitState:
    """A unit at one moment. Currents in A; exchange_a + = house buys (plant: + = plant sells).

    panel_v is what a sensor on the panel's line sees: the battery's voltage plus the controller's
    drop while charging (`charging`), the panel's open-circuit voltage otherwise (0 V in the dark).
    """

    soc: float  # 0..1
    battery_v: float
    solar_a: float
    load_a: float
    exchange_a: float
    battery_a: float  # net, + = charging
    panel_v: float = 0.0
    charging: bool = False  # the controller connects the panel to the battery


def _ocv_v(soc: float) -> float:
    return 11.9 + 0.8 * soc


def battery_voltage_v(soc: float, current_a: float, capacity_ah: float) -> float:
    """Terminal voltage (V) of a 12 V lead-acid battery at charge `soc` (0..1) and `current_a` (+ = charging).

    Open-circuit voltage by charge, the drop on the internal resistance, and while charging the charge
    overvoltage, which grows with the current and towards full (13-14.4 V from half charge up at C/20 and
    more; a gentler charge, or one into an emptier battery, reads less).
    """
    volts = _ocv_v(soc) + current_a * INTERNAL_OHM_AH / capacity_ah
    if current_a > 0:
        volts += (0.25 + 0.3 * soc**6) * math.log1p(current_a / (0.003 * capacity_ah))
    return volts


def _max_charge_a(soc: float, capacity_ah: float) -> float:
    """The largest charging current (A) that keeps the battery at ABSORPTION_V or below."""
    low, high = 0.0, capacity_ah
    for _ in range(30):
        middle = (low + high) / 2
        if battery_voltage_v(soc, middle, capacity_ah) <= ABSORPTION_V:
            low = middle
        else:
            high = middle
    return low


def panel_output(peak_w: float, irradiance_w_m2: float) -> tuple[float, float]:
    """(short-circuit current A, open-circuit voltage V) of a 36-cell panel of `peak_w` in this light."""
    if irradiance_w_m2 <= 0:
        return 0.0, 0.0
    isc_a = PANEL_ISC_FACTOR * peak_w / PANEL_VMP_V * irradiance_w_m2 / 1000
    voc_v = max(0.0, PANEL_VOC_V + PANEL_VOC_PER_E_V * math.log(irradiance_w_m2 / 1000))
    return isc_a, voc_v


def _clamp01(x: float) -> float:
    return max(0.0, min(1.0, x))


class SolarModel:
    """Physical model of the scale model, deterministic for a seed.

    Every value is a function of (seed, simulated time) alone: the state (charge, controllers,
    switches) is integrated on a fixed 60-s grid from `start`, so sampling rate cannot change readings
    (a snapshot serves the reads of the next SNAPSHOT_REUSE_REAL_S of real time: one sample pass).
    Batteries start part-charged (45-75 %).

    Each unit's PWM controller charges its battery from the panel (the panel at the battery's voltage
    plus 0.2 V, never above 14.4 V on the battery) until the charge reaches 98 %, then opens (the panel
    reads its open-circuit voltage and 0 A) until the charge has fallen to 93 %.

    The switches, checked every grid step (a house trades with the plant only, one switch at a time):
    - SELL closes when the house battery is at 90 % or more, its panel could give more than the house
      uses plus the 0.3 A sale (or, the battery full and its controller open, more than the house uses:
      the panel's power would go to waste), and the plant's battery is below 93 %; it opens when the charge falls
      below 80 %, the surplus ends (evening, clouds) or the plant's battery is full (98 %).
    - BUY closes when the house battery has run down to 60 % and the plant's is above 30 %; it draws
      0.5 A from the plant until the house reaches 75 % or the plant falls to 20 %.
    Thread-safe.
    """

    def __init__(self, units: Sequence[str], plant: str, seed: int, speed: float,
                 start: datetime.datetime, clock: Clock):
        if not units:
            raise ValueError("the model needs at least one unit")
        if not speed > 0:
            raise ValueError(f"speed must be > 0, not {speed!r}")
        self.units = tuple(dict.fromkeys(units))
        self.plant = plant
        self.seed = seed
        self.speed = speed
        self.start = start
        self._clock = clock
        self._clock0 = clock()
        self._start_epoch_s = (_to_utc(start) - _EPOCH).total_seconds()
        self._houses = tuple(u for u in self.units if u != plant)
        self._specs = {u: PLANT if u == plant else HOUSE for u in self.units}
        self._initial = {u: 0.45 + 0.3 * _uniform(seed, _SOC, _key(u)) for u in self.units}
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._socs = dict(self._initial)
        self._account = {u: dict.fromkeys(ACCOUNT_FIGURES, 0.0) for u in self.units}
        self._full = dict.fromkeys(self.units, False)
        self._trade = dict.fromkeys(self._houses, "")  # "buy", "sell" or ""
        self._grid_s = 0.0
        self._cached: tuple[float, dict[str, UnitState]] | None = None
        self._decide(self._start_epoch_s)

    def _elapsed_s(self) -> float:
        return (self._clock() - self._clock0) * self.speed

    def sim_epoch_ms(self) -> int:
        """The simulated time now as Unix ms (what `[simulation] stamp = "simulated"` puts on points)."""
        return round((self._start_epoch_s + self._elapsed_s()) * 1000)

    def account(self) -> tuple[float, dict[str, dict[str, float]]]:
        """(grid time as Unix s, per unit the energy in Wh since the start, integrated on the model's own
        60-s grid as the charge is): ACCOUNT_FIGURES. Per house, at every step,
        generated + bought = used + sold + stored + losses exactly (stored = battery_in - battery_out at the
        battery's terminals; losses = the charge controller's 0.2 V drop times the panel current)."""
        self._snapshot(self._elapsed_s())
        with self._lock:
            return self._start_epoch_s + self._grid_s, {u: dict(a) for u, a in self._account.items()}

    def sim_time(self) -> datetime.datetime:
        """start + elapsed clock seconds * speed."""
        return self.start + datetime.timedelta(seconds=self._elapsed_s())

    def irradiance_w_m2(self) -> float:
        """Irradiance on the panels now (W/m²)."""
        return self._environment(self._start_epoch_s + self._elapsed_s())[1]

    def truth(self, unit: str, role: str) -> tuple[float, float]:
        """(bus_voltage_v, current_a) a sensor with `role` on `unit` sees. Raises KeyError/ValueError."""
        state = self.state(unit)
        if role == "battery":
            return state.battery_v, state.battery_a
        if role == "solar":
            return state.panel_v, state.solar_a
        if role == "load":
            return state.battery_v, state.load_a
        if role == "exchange":
            return state.battery_v, state.exchange_a
        raise ValueError(f"unknown role {role!r}")

    def state(self, unit: str) -> UnitState:
        """Snapshot of `unit` now. Raises KeyError for an unknown unit."""
        return self._snapshot(self._elapsed_s())[unit]

    def _snapshot(self, elapsed_s: float) -> dict[str, UnitState]:
        with self._lock:
            if self._cached and 0 <= elapsed_s - self._cached[0] < SNAPSHOT_REUSE_REAL_S * self.speed:
                return self._cached[1]
            if elapsed_s < self._grid_s:  # clock went back: integrate again from the start
                self._reset()
            while self._grid_s + STEP_S <= elapsed_s:
                flows = self._flows(self._start_epoch_s + self._grid_s)
                for unit, flow in flows.items():
                    self._socs[unit] = self._integrate(unit, flow.battery_a, STEP_S)
                    self._book(unit, flow)
                self._grid_s += STEP_S
                self._decide(self._start_epoch_s + self._grid_s)
            partial_s = max(0.0, elapsed_s - self._grid_s)
            states = {}
            for unit, flow in self._flows(self._start_epoch_s + elapsed_s).items():
                soc = self._integrate(unit, flow.battery_a, partial_s)
                battery_v = battery_voltage_v(soc, flow.battery_a, self._specs[unit].capacity_ah)
                panel_v = battery_v + CONTROLLER_DROP_V if flow.charging else flow.panel_v
                states[unit] = dataclasses.replace(flow, soc=soc, battery_v=battery_v, panel_v=panel_v)
            self._cached = (elapsed_s, states)
            return states

    def _book(self, unit: str, flow: UnitState) -> None:
        """Add one grid step of `flow` to the unit's energy account (Wh)."""
        hours, volts, account = STEP_S / 3600, flow.battery_v, self._account[unit]
        # The plant's trade line reads + when it sells (UnitState); a house's when it buys.
        bought_a = -flow.exchange_a if unit == self.plant else flow.exchange_a
        account["generated"] += flow.panel_v * flow.solar_a * hours
        account["used"] += volts * flow.load_a * hours
        account["bought"] += volts * max(bought_a, 0.0) * hours
        account["sold"] += volts * max(-bought_a, 0.0) * hours
        account["battery_in"] += volts * max(flow.battery_a, 0.0) * hours
        account["battery_out"] += volts * max(-flow.battery_a, 0.0) * hours
        account["losses"] += (flow.panel_v - volts) * flow.solar_a * hours

    def _integrate(self, unit: str, battery_a: float, dt_s: float) -> float:
        return _clamp01(self._socs[unit] + battery_a * dt_s / 3600 / self._specs[unit].capacity_ah)

    def _environment(self, epoch_s: float) -> tuple[float, float, float]:
        """(sun elevation deg, irradiance W/m², local hour) at `epoch_s` (UTC seconds)."""
        utc = _EPOCH + datetime.timedelta(seconds=epoch_s)
        elevation = _sun_elevation_utc(utc, LATITUDE_DEG, LONGITUDE_DEG)
        cloud = 0.2 + 0.8 * (0.6 * _value_noise(self.seed, _CLOUD, epoch_s, 3600)
                             + 0.4 * _value_noise(self.seed, _CLOUD + 100, epoch_s, 600))
        irradiance = 1000 * math.sin(math.radians(elevation)) * cloud if elevation > 0 else 0.0
        local = _utc_to_local(utc)
        return elevation, irradiance, local.hour + local.minute / 60

    def _switched_load_a(self, unit: str, epoch_s: float, hour: float, irradiance: float) -> float:
        slot = math.floor(epoch_s / 900)  # switches change at most every 15 simulated minutes
        if 17 <= hour < 23:
            led_chance = 0.85
        elif hour >= 23 or hour < 6:
            led_chance = 0.3
        elif hour < 8:
            led_chance = 0.5
        else:
            led_chance = 0.1
        load = LED_A if _uniform(self.seed, _LED, _key(unit), slot) < led_chance else 0.0
        if 11 <= hour < 17 and irradiance > 450 and _uniform(self.seed, _FAN, _key(unit), slot) < 0.75:
            load += FAN_A
        return load

    def _load_a(self, unit: str, epoch_s: float, hour: float, irradiance: float) -> float:
        if self._socs[unit] <= DISCONNECT_SOC:
            return 0.0
        load = self._specs[unit].base_load_a
        if unit != self.plant:
            load += self._switched_load_a(unit, epoch_s, hour, irradiance)
        return load

    def _decide(self, epoch_s: float) -> None:
        """Flip the controllers and the trading switches at a grid step (rules: the class docstring)."""
        for unit, soc in self._socs.items():
            if soc >= FULL_SOC:
                self._full[unit] = True
            elif soc <= RECHARGE_SOC:
                self._full[unit] = False
        plant_soc = self._socs.get(self.plant)
        if plant_soc is None:
            return
        _, irradiance, hour = self._environment(epoch_s)
        for house in self._houses:
            soc, trade = self._socs[house], self._trade[house]
            isc_a, _ = panel_output(self._specs[house].panel_peak_w, irradiance)
            # A sale is the panel's surplus, not the battery's charge: the panel covers the house and the sale,
            # or (the battery full, the controller open) the panel's power would go to waste.
            load = self._load_a(house, epoch_s, hour, irradiance)
            surplus = isc_a > load + SELL_A or (self._full[house] and isc_a > load)
            if trade == "buy" and (soc >= BUY_UNTIL_SOC or plant_soc <= PLANT_RESERVE_SOC - 0.1):
                trade = ""
            elif trade == "sell" and (soc < SELL_DOWN_TO_SOC or not surplus or plant_soc >= FULL_SOC):
                trade = ""
            if not trade:
                if soc <= BUY_BELOW_SOC and plant_soc > PLANT_RESERVE_SOC:
                    trade = "buy"
                elif soc >= SELL_ABOVE_SOC and surplus and plant_soc < RECHARGE_SOC:
                    trade = "sell"
            self._trade[house] = trade

    def _flows(self, epoch_s: float) -> dict[str, UnitState]:
        _, irradiance, hour = self._environment(epoch_s)
        exchange = {h: BUY_A if t == "buy" else -SELL_A if t == "sell" else 0.0 for h, t in self._trade.items()}
        if self.plant in self._specs:
            exchange[self.plant] = sum(exchange.values())
        flows = {}
        for unit in self.units:
            spec, soc = self._specs[unit], self._socs[unit]
            load = self._load_a(unit, epoch_s, hour, irradiance)
            other_a = (-exchange[unit] if unit == self.plant else exchange[unit]) - load
            isc_a, voc_v = panel_output(spec.panel_peak_w, irradiance)
            # The controller charges while the battery is not full and the panel can drive current into it.
            charging = not self._full[unit] and voc_v > _ocv_v(soc) + 1.0
            solar = 0.0
            if charging:
                solar = isc_a
                if battery_voltage_v(soc, solar + other_a, spec.capacity_ah) > ABSORPTION_V:
                    solar = max(0.0, min(isc_a, _max_charge_a(soc, spec.capacity_ah) - other_a))
            battery = solar + other_a
            battery_v = battery_voltage_v(soc, battery, spec.capacity_ah)
            panel_v = battery_v + CONTROLLER_DROP_V if charging else voc_v
            flows[unit] = UnitState(soc, battery_v, solar, load, exchange[unit], battery, panel_v, charging)
        return flows


class ConstantModel:
    """Every channel pinned to fixed (bus_voltage_v, current_a). Thread-safe (read-only)."""

    def __init__(self, truths: dict[str, tuple[float, float]]):
        self._truths = dict(truths)

    def truth_for(self, channel_name: str) -> tuple[float, float]:
        """(bus_voltage_v, current_a) of a channel. Raises KeyError."""
        return self._truths[channel_name]


def simulated_wall_ms(config: Config, bus: SimulatedBus, clock: Clock,
                      now: Callable[[], datetime.datetime] | None = None) -> Callable[[], int]:
    """Unix ms of the simulated time, for `[simulation] stamp = "simulated"`: the day model's own time, or
    for the constant scenario `start` (default now) + elapsed `clock` seconds x `speed`."""
    model = getattr(bus, "model", None)
    if isinstance(model, SolarModel):
        return model.sim_epoch_ms
    sim = config.simulation
    start_s = (_to_utc(sim.start if sim.start is not None else (now or datetime.datetime.now)()) - _EPOCH
               ).total_seconds()
    clock0 = clock()
    return lambda: round((start_s + (clock() - clock0) * sim.speed) * 1000)


def build_simulated_bus(config: Config, clock: Clock,
                        now: Callable[[], datetime.datetime] | None = None) -> SimulatedBus:
    """A bus with one EmulatedINA219 per configured channel, driven by the configured scenario.

    The model is attached as `bus.model`. Raises ValueError for an unknown scenario.
    """
    sim = config.simulation
    model: SolarModel | ConstantModel
    if sim.scenario == "day":
        start = sim.start if sim.start is not None else (now or datetime.datetime.now)()
        units = [channel.unit_name for channel in config.channels]
        model = SolarModel(units, sim.plant, sim.seed, sim.speed, start, clock)
        truths = {c.name: functools.partial(model.truth, c.unit_name, c.role) for c in config.channels}
    elif sim.scenario == "constant":
        model = ConstantModel({c.name: (c.constant.bus_voltage_v, c.constant.current_ma / 1000)
                               for c in config.channels})
        truths = {c.name: functools.partial(model.truth_for, c.name) for c in config.channels}
    else:
        raise ValueError(f"unknown simulation scenario {sim.scenario!r}")
    # The day scenario's chips carry ADC noise (seeded per channel); the constant scenario stays exact.
    noisy = sim.scenario == "day"
    bus = SimulatedBus({c.address: EmulatedINA219(truths[c.name], c.shunt_ohms, clock,
                                                  noise_seed=_uniform_seed(sim.seed, c.address) if noisy else None)
                        for c in config.channels})
    bus.model = model
    log.info("simulated I2C bus: %d INA219 at %s, scenario %s", len(config.channels),
             ", ".join(f"0x{c.address:02X}" for c in config.channels), sim.scenario)
    return bus
