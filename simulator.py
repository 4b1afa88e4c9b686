"""Simulated hardware: an emulated I2C bus, register-level INA219s and a solar model.

`SimulatedBus` offers the busio.I2C methods adafruit_ina219 uses, so the real
driver runs unchanged against `EmulatedINA219` devices (TI SBOS448 register
map). `SolarModel` supplies what each sensor sees: batteries, panels, loads and
the energy exchanged with the power plant of the Brampton scale model.
Nothing here sleeps or reads the wall clock: time comes from an injected
`clock` (monotonic seconds).
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import functools
import logging
import math
import os
import random
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from config import Config

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Truth = Callable[[], tuple[float, float]]

# --- INA219 register map (SBOS448) -------------------------------------------
REG_CONFIG, REG_SHUNT, REG_BUS, REG_POWER, REG_CURRENT, REG_CALIBRATION = range(6)
POWER_ON_CONFIG = 0x399F
SHUNT_LSB_V = 10e-6
BUS_LSB_V = 0.004
_RST = 0x8000
_BRNG = 0x2000
# Conversion time per ADC setting; codes 4-7 repeat 0-3 (bit 2 is "don't care").
_ADC_TIME_S = {0: 84e-6, 1: 148e-6, 2: 276e-6, 3: 532e-6, 8: 532e-6, 9: 1.06e-3, 10: 2.13e-3,
               11: 4.26e-3, 12: 8.51e-3, 13: 17.02e-3, 14: 34.05e-3, 15: 68.10e-3}


def _adc_bits(code: int) -> int:
    return 9 + (code & 3) if code < 8 else 12


def _adc_time_s(code: int) -> float:
    return _ADC_TIME_S[code & 3 if code < 8 else code]


# ADC noise of one 12-bit conversion (1 sigma): about two LSBs on each ADC, as on a real INA219 with
# quiet wiring. Hardware averaging of n conversions divides it by sqrt(n), as on the chip.
SHUNT_NOISE_V = 20e-6
BUS_NOISE_V = 0.008
_POWER_DOWN_MODES = (0, 4)  # power-down and ADC off: writing them leaves CNVR as it was (SBOS448 8.6.3.2)


def _adc_samples(code: int) -> int:
    return 1 << (code - 8) if code >= 8 else 1


class EmulatedINA219:
    """One INA219 at register level (TI SBOS448).

    `truth()` returns (bus_voltage_v, current_a) at this moment, current signed
    (+ = through the shunt from V+ to V-). Like the chip, the result registers
    change only when a conversion has finished (per the configured ADC times):
    continuously in modes 5-7, once per config write (trigger) in modes 1-3,
    never in power-down (0, 4). CNVR is set when results are new and cleared by
    reading the power register or writing an operating mode (not power-down).
    `noise_seed` adds seeded ADC noise (None: exact readings). Not thread-safe
    by itself: `SimulatedBus` serialises every transaction.
    """

    def __init__(self, truth: Truth, shunt_ohms: float, clock: Clock, *, noise_seed: int | None = None):
        if not shunt_ohms > 0:
            raise ValueError(f"shunt_ohms must be > 0, not {shunt_ohms!r}")
        self._truth = truth
        self._shunt_ohms = shunt_ohms
        self._clock = clock
        self._noise = random.Random(noise_seed) if noise_seed is not None else None
        self.force_overflow = False  # test hook: OVF reads 1 while set
        self.conversions = 0  # conversions whose results reached the registers
        self.power_on_reset()

    def power_on_reset(self) -> None:
        """Every register back to its power-on value (config 0x399F, calibration 0)."""
        self._config = POWER_ON_CONFIG
        self._calibration = 0
        self._pointer = REG_CONFIG
        # Last converted values, which the registers show until the next conversion finishes.
        self._shunt_code = 0
        self._bus_code = 0
        self._ready = False  # CNVR
        self._start_conversions()

    def _start_conversions(self) -> None:
        self._conversion_start_s = self._clock()
        self._conversions_done = 0  # since _conversion_start_s

    @property
    def config(self) -> int:
        """The configuration register (16-bit)."""
        return self._config

    @property
    def calibration(self) -> int:
        """The calibration register (16-bit, bit 0 always 0)."""
        return self._calibration

    def write(self, data: bytes) -> None:
        """I2C write: [] (probe), [pointer] or [pointer, msb, lsb]."""
        if not data:
            return
        self._pointer = data[0]
        if len(data) < 3:
            return
        value = (data[1] << 8) | data[2]
        if self._pointer == REG_CONFIG:
            if value & _RST:
                log.debug("INA219 reset through the RST bit")
                self.power_on_reset()
            else:
                self._update()  # a conversion that finished before this write still counts
                self._config = value
                if value & 7 not in _POWER_DOWN_MODES:
                    self._ready = False
                # A new mode starts converting (a triggered mode: exactly one conversion) from now.
                self._start_conversions()
        elif self._pointer == REG_CALIBRATION:
            self._calibration = value & 0xFFFE
        # Other registers are read-only: the write only moved the pointer.

    def read(self, n: int) -> bytes:
        """I2C read of n bytes from the pointer register (the chip repeats its 2 bytes)."""
        raw = self._register(self._pointer).to_bytes(2, "big")
        return bytes(raw[i % 2] for i in range(n))

    def _register(self, pointer: int) -> int:
        if pointer == REG_CONFIG:
            return self._config
        if pointer == REG_CALIBRATION:
            return self._calibration
        if pointer not in (REG_SHUNT, REG_BUS, REG_POWER, REG_CURRENT):
            return 0
        self._update()
        shunt, bus = self._shunt_code, self._bus_code
        current, power, overflow = self._math(shunt, bus)
        if pointer == REG_SHUNT:
            return shunt & 0xFFFF
        if pointer == REG_BUS:
            return (bus << 3) | (int(self._ready) << 1) | int(overflow or self.force_overflow)
        if pointer == REG_POWER:
            self._ready = False  # reading power clears CNVR
            return power
        return current & 0xFFFF

    def _conversion_s(self) -> float:
        mode = self._config & 7
        needed_s = 0.0
        if mode & 1:
            needed_s += _adc_time_s((self._config >> 3) & 0xF)
        if mode & 2:
            needed_s += _adc_time_s((self._config >> 7) & 0xF)
        return needed_s

    def _update(self) -> None:
        """Bring the result registers up to date with the conversions finished by now."""
        mode = self._config & 7
        if not mode & 3:
            return  # power-down or ADC off: nothing converts, the registers hold
        finished = int((self._clock() - self._conversion_start_s) / self._conversion_s())
        if mode < 4:
            finished = min(finished, 1)  # triggered: one conversion per config write
        if finished <= self._conversions_done:
            return
        self._conversions_done = finished
        # Only the latest finished conversion is visible: convert the truth once, now.
        bus_v, current_a = self._truth()
        if mode & 1:
            code = (self._config >> 3) & 0xF
            self._shunt_code = self._quantise_shunt(current_a * self._shunt_ohms
                                                    + self._noise_v(SHUNT_NOISE_V, code))
        if mode & 2:
            code = (self._config >> 7) & 0xF
            self._bus_code = self._quantise_bus(bus_v + self._noise_v(BUS_NOISE_V, code))
        self._ready = True
        self.conversions += 1

    def _noise_v(self, sigma_v: float, adc_code: int) -> float:
        if self._noise is None:
            return 0.0
        return self._noise.gauss(0.0, sigma_v / math.sqrt(_adc_samples(adc_code)))

    def _quantise_shunt(self, shunt_v: float) -> int:
        step = 1 << (12 - _adc_bits((self._config >> 3) & 0xF))
        code = math.floor(shunt_v / SHUNT_LSB_V / step + 0.5) * step
        limit = 4000 << ((self._config >> 11) & 3)  # ±40 mV at /1 up to ±320 mV at /8
        return max(-limit, min(limit, code))

    def _quantise_bus(self, bus_v: float) -> int:
        full_scale_v = 32.0 if self._config & _BRNG else 16.0
        return min(0x1FFF, math.floor(min(max(bus_v, 0.0), full_scale_v) / BUS_LSB_V + 0.5))

    def _math(self, shunt: int, bus: int) -> tuple[int, int, bool]:
        if self._calibration == 0:
            return 0, 0, False
        raw_current = int(shunt * self._calibration / 4096)  # int() truncates towards zero
        current = max(-0x8000, min(0x7FFF, raw_current))
        # The chip multiplies the magnitude of the current: power is never negative.
        raw_power = abs(current) * bus // 5000
        return current, min(raw_power, 0xFFFF), current != raw_current or raw_power > 0xFFFF


# --- The I2C bus ---------------------------------------------------------------
_ERROR_FAULTS = {"nack": errno.EREMOTEIO, "timeout": errno.ETIMEDOUT, "eio": errno.EIO}
FAULTS = (*_ERROR_FAULTS, "brownout", "overflow", "stuck")
_BUS = None  # the address under which faults of the whole bus ("stuck") are kept


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class SimulatedBus:
    """The I2C bus object adafruit_ina219 drives: same methods as busio.I2C.

    Absent addresses NACK with OSError(121) on every method. All methods are
    thread-safe; try_lock/unlock give the busio ownership protocol.
    """

    def __init__(self, devices: dict[int, EmulatedINA219] | None = None):
        self._devices: dict[int, EmulatedINA219] = {}
        self._lock = threading.Lock()  # the busio ownership lock
        self._guard = threading.RLock()  # serialises transactions and fault bookkeeping
        self._faults: dict[int, dict[str, int | None]] = {}
        self.transactions = 0
        self.model: SolarModel | ConstantModel | None = None
        for address, device in (devices or {}).items():
            self.add(address, device)

    def try_lock(self) -> bool:
        """Take the bus without blocking; True when taken."""
        return self._lock.acquire(blocking=False)

    def unlock(self) -> None:
        """Release the bus. Raises RuntimeError if it was not locked."""
        self._lock.release()

    def deinit(self) -> None:
        """Nothing to release (busio compatibility)."""

    def __enter__(self) -> SimulatedBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.deinit()

    def add(self, address: int, device: EmulatedINA219) -> None:
        """Attach (or replace) a device, as if a sensor were plugged in. Raises ValueError."""
        if not 0 <= address <= 0x7F:
            raise ValueError(f"0x{address:X} is not a 7-bit I2C address")
        with self._guard:
            self._devices[address] = device
        log.debug("simulated device added at 0x%02X", address)

    def remove(self, address: int) -> None:
        """Detach a device (it NACKs from now on); absent addresses are ignored."""
        with self._guard:
            self._devices.pop(address, None)
        log.debug("simulated device removed from 0x%02X", address)

    def device(self, address: int) -> EmulatedINA219:
        """The device at `address`. Raises KeyError."""
        with self._guard:
            return self._devices[address]

    def scan(self) -> list[int]:
        """Addresses that acknowledge (not counted as transactions)."""
        with self._guard:
            if _BUS in self._faults:
                return []
            return sorted(a for a in self._devices if not self._faults.get(a, {}).keys() & _ERROR_FAULTS)

    def writeto(self, address: int, buffer, *, start: int = 0, end: int | None = None) -> None:
        """Write buffer[start:end]. Raises OSError (121 absent, or an injected fault)."""
        data = bytes(buffer[start:end])
        self._transaction(address, lambda device: device.write(data))

    def readfrom_into(self, address: int, buffer, *, start: int = 0, end: int | None = None) -> None:
        """Fill buffer[start:end]. Raises OSError (121 absent, or an injected fault)."""
        end = len(buffer) if end is None else end

        def action(device: EmulatedINA219) -> None:
            buffer[start:end] = device.read(end - start)

        self._transaction(address, action)

    def writeto_then_readfrom(self, address: int, buffer_out, buffer_in, *,
                              out_start: int = 0, out_end: int | None = None,
                              in_start: int = 0, in_end: int | None = None) -> None:
        """Write then read with a repeated start (one transaction). Raises OSError."""
        # Copy first: adafruit_register passes one bytearray as both buffers.
        data = bytes(buffer_out[out_start:out_end])
        in_end = len(buffer_in) if in_end is None else in_end

        def action(device: EmulatedINA219) -> None:
            device.write(data)
            buffer_in[in_start:in_end] = device.read(in_end - in_start)

        self._transaction(address, action)

    def inject(self, address: int, fault: str, count: int | None = 1) -> None:
        """Make the next `count` transactions to `address` suffer `fault` (None = until cleared).

        fault: nack/timeout/eio (OSError 121/110/5), brownout (power-on reset once
        before the next transaction), overflow (OVF bit set), or stuck: the whole
        bus hangs (SDA held low), every transaction to any address times out
        (OSError 110); `address` must then be None. Raises ValueError.
        """
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r} (expected one of: {', '.join(FAULTS)})")
        if (fault == "stuck") != (address is _BUS):
            raise ValueError("a stuck bus is a fault of the whole bus: inject(None, 'stuck'); "
                             "every other fault needs an address")
        if count is not None and count < 1:
            raise ValueError(f"count must be 1 or more, or None, not {count!r}")
        with self._guard:
            self._faults.setdefault(address, {})[fault] = 1 if fault == "brownout" else count
        log.debug("fault %s injected at %s for %s transactions", fault,
                  "the whole bus" if address is _BUS else f"0x{address:02X}", count)

    def clear_faults(self, address: int | None = None) -> None:
        """Remove injected faults at `address` (None = everywhere)."""
        with self._guard:
            for addr in list(self._faults) if address is None else [address]:
                faults = self._faults.pop(addr, {})
                if "overflow" in faults and addr in self._devices:
                    self._devices[addr].force_overflow = False

    def _transaction(self, address: int, action: Callable[[EmulatedINA219], None]) -> None:
        with self._guard:
            self.transactions += 1
            stuck = self._faults.get(_BUS)
            if stuck:
                self._expire(_BUS, None, stuck)
                raise _os_error(errno.ETIMEDOUT)  # what the Pi's driver reports when SDA stays low
            device = self._devices.get(address)
            if device is None:
                raise _os_error(errno.EREMOTEIO)
            faults = self._faults.get(address)
            if not faults:
                action(device)
                return
            try:
                if faults.pop("brownout", None):
                    log.debug("simulated brownout at 0x%02X", address)
                    device.power_on_reset()
                if "overflow" in faults:
                    device.force_overflow = True
                for fault, code in _ERROR_FAULTS.items():
                    if fault in faults:
                        raise _os_error(code)
                action(device)
            finally:
                self._expire(address, device, faults)

    def _expire(self, address: int | None, device: EmulatedINA219 | None, faults: dict[str, int | None]) -> None:
        for fault, left in list(faults.items()):
            if left is None:
                continue
            if left > 1:
                faults[fault] = left - 1
                continue
            del faults[fault]
            if fault == "overflow":
                device.force_overflow = False
        if not faults:
            self._faults.pop(address, None)


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
SELL_DOWN_TO_SOC = 0.55
BUY_BELOW_SOC = 0.45
BUY_UNTIL_SOC = 0.6
PLANT_RESERVE_SOC = 0.3
STEP_S = 60.0
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
    overvoltage, which grows with the current and towards full (13-14.4 V at typical solar currents).
    """
    volts = _ocv_v(soc) + current_a * INTERNAL_OHM_AH / capacity_ah
    if current_a > 0:
        volts += (0.3 + 0.35 * soc**6) * math.log1p(current_a / (0.01 * capacity_ah))
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
    switches) is integrated on a fixed 60-s grid from `start`, so sampling rate cannot change readings.
    Batteries start part-charged (45-75 %).

    Each unit's PWM controller charges its battery from the panel (the panel at the battery's voltage
    plus 0.2 V, never above 14.4 V on the battery) until the charge reaches 98 %, then opens (the panel
    reads its open-circuit voltage and 0 A) until the charge has fallen to 93 %.

    The switches, checked every grid step (a house trades with the plant only, one switch at a time):
    - SELL closes when the house battery is at 90 % or more, its panel could give more than the house
      uses plus the 0.3 A sale, and the plant's battery is below 93 %; it opens when the charge falls
      below 75 %, the surplus ends (evening, clouds) or the plant's battery is full (98 %).
    - BUY closes when the house battery has run down to 35 % and the plant's is above 30 %; it draws
      0.5 A from the plant until the house reaches 55 % or the plant falls to 20 %.
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
        self._full = dict.fromkeys(self.units, False)
        self._trade = dict.fromkeys(self._houses, "")  # "buy", "sell" or ""
        self._grid_s = 0.0
        self._cached: tuple[float, dict[str, UnitState]] | None = None
        self._decide(self._start_epoch_s)

    def _elapsed_s(self) -> float:
        return (self._clock() - self._clock0) * self.speed

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
            if self._cached and self._cached[0] == elapsed_s:
                return self._cached[1]
            if elapsed_s < self._grid_s:  # clock went back: integrate again from the start
                self._reset()
            while self._grid_s + STEP_S <= elapsed_s:
                flows = self._flows(self._start_epoch_s + self._grid_s)
                for unit, flow in flows.items():
                    self._socs[unit] = self._integrate(unit, flow.battery_a, STEP_S)
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
            surplus = isc_a > self._load_a(house, epoch_s, hour, irradiance)  # the panel covers the house
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
