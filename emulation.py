"""Emulated hardware: register-level INA219 chips on an emulated I2C bus, with injectable faults.

`SimulatedBus` offers the busio.I2C methods adafruit_ina219 uses, so the real driver runs unchanged
against `EmulatedINA219` devices (TI SBOS448 register map, conversion timing, noise). What each chip
measures comes from a `truth()` callable (simulator.py's solar model). Nothing here sleeps or reads
the wall clock: time comes from an injected `clock` (monotonic seconds).
"""
from __future__ import annotations

import errno
import logging
import math
import os
import random
import threading
from collections.abc import Callable

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
        self._math_key: tuple[int, int, int] | None = None  # (shunt, bus, calibration) of _math_result
        self._math_result = (0, 0, False)
        self._start_conversions()

    def _start_conversions(self) -> None:
        self._conversion_start_s = self._clock()
        self._conversions_done = 0  # since _conversion_start_s
        self._conversion_time_s = self._conversion_s()  # the config only changes through a write, which comes here

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
        return raw if n == 2 else bytes(raw[i % 2] for i in range(n))

    def read_register(self, pointer: int, n: int) -> bytes:
        """write([pointer]) then read(n) in one call: the driver's every register read, the simulator's
        hottest path (80 a cycle with four channels)."""
        self._pointer = pointer
        return self.read(n)

    def _register(self, pointer: int) -> int:
        if pointer == REG_CONFIG:
            return self._config
        if pointer == REG_CALIBRATION:
            return self._calibration
        if pointer not in (REG_SHUNT, REG_BUS, REG_POWER, REG_CURRENT):
            return 0
        self._update()
        shunt, bus = self._shunt_code, self._bus_code
        if pointer == REG_SHUNT:
            return shunt & 0xFFFF  # the shunt register needs none of the calibrated math
        key = (shunt, bus, self._calibration)
        if key != self._math_key:  # the results change once a conversion, the reads come more often
            self._math_result, self._math_key = self._math(shunt, bus), key
        current, power, overflow = self._math_result
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
        finished = int((self._clock() - self._conversion_start_s) / self._conversion_time_s)
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
        self.model = None  # the simulated model behind the chips (simulator.SolarModel), for tests and the demo
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
        if in_end is None:
            in_end = len(buffer_in)
        if out_end is None:
            out_end = len(buffer_out)
        one_byte = out_end == out_start + 1 and 0 <= out_start < len(buffer_out)  # the pointer alone
        with self._guard:
            device = self._devices.get(address)
            if device is not None and not self._faults and one_byte:
                # The common case, a register read, without the fault bookkeeping (the same steps as
                # _transaction's). The pointer is read out before buffer_in (maybe the same bytearray,
                # as adafruit_register passes it) is written.
                self.transactions += 1
                buffer_in[in_start:in_end] = device.read_register(buffer_out[out_start], in_end - in_start)
                return
        # Copy first: adafruit_register passes one bytearray as both buffers.
        self._write_then_read(address, bytes(buffer_out[out_start:out_end]), buffer_in, in_start, in_end)

    def _write_then_read(self, address: int, data: bytes, buffer_in, in_start: int, in_end: int) -> None:
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
