"""Measuring: the design card's `read_data` class and the Pi's own health readings.

`read_data` drives one adafruit INA219 per configured channel over whatever
I2C bus object it is given (the Pi's bus or the simulator's), takes
`samples` samples of every channel spread evenly over the sampling window and
averages them.

Current is derived from the shunt register (10 uV LSB) and the configured
shunt resistance, never from the chip's current register: the shunt register
needs no calibration, so a brownout (which zeroes the calibration) cannot
corrupt a reading. The chip's config and calibration are still checked once a
cycle and restored, so its own current/power registers stay meaningful too.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from config import ChannelConfig, SamplingConfig
from rpi_errors import MeasuringError

log = logging.getLogger(__name__)

# INA219 ADC codes for hardware averaging: 1 conversion = 12-bit, then 2..128 samples.
_ADC_CODES = {1: 0x3, 2: 0x9, 4: 0xA, 8: 0xB, 16: 0xC, 32: 0xD, 64: 0xE, 128: 0xF}
_SHUNT_LSB_MV = 0.01
_BUS_LSB_V = 0.004
_BUS_RANGE_32V = 1
_MODE_SHUNT_AND_BUS_CONTINUOUS = 7
_REG_CONFIG = 0x00
_REG_CALIBRATION = 0x05


@dataclass(frozen=True)
class ChannelReading:
    """One channel's averages for one cycle. Values are None when no sample was good."""

    name: str
    address: int
    bus_voltage_v: float | None
    shunt_voltage_mv: float | None
    current_ma: float | None
    power_w: float | None
    samples: int
    failed_samples: int
    energy_in_wh: float | None
    energy_out_wh: float | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when at least one sample was good (the channel publishes)."""
        return self.bus_voltage_v is not None


@dataclass(frozen=True)
class Cycle:
    """One measuring cycle. `time_ms` is the wall clock at the middle of the sampling window."""

    time_ms: int
    monotonic_s: float
    channels: tuple[ChannelReading, ...]

    @property
    def errors(self) -> tuple[MeasuringError, ...]:
        """One MeasuringError per channel with no good sample (keyed `measure:<name>`)."""
        return tuple(MeasuringError(r.error, key=f"measure:{r.name}") for r in self.channels if not r.ok)


@dataclass
class EnergyCounter:
    """Energy through one channel in Wh, split by direction; kept across restarts."""

    in_wh: float = 0.0
    out_wh: float = 0.0
    last_s: float | None = field(default=None, compare=False)  # monotonic time of the last good reading

    def add(self, power_w: float, now_s: float, max_gap_s: float) -> None:
        # Integrate on the monotonic clock (immune to NTP steps); a long gap is
        # capped rather than filled with a guess of what flowed meanwhile.
        if self.last_s is not None:
            dt_h = min(now_s - self.last_s, max_gap_s) / 3600.0
            if power_w >= 0:
                self.in_wh += power_w * dt_h
            else:
                self.out_wh -= power_w * dt_h
        self.last_s = now_s


@dataclass(frozen=True)
class ChannelSetup:
    """Register values derived from a channel's shunt and maximum current."""

    gain_code: int
    shunt_full_scale: int  # shunt register counts at the gain's range
    calibration: int
    current_lsb_ma: float
    config_word: int

    @classmethod
    def for_channel(cls, channel: ChannelConfig, adc_samples: int) -> ChannelSetup:
        shunt_mv = channel.max_current_a * channel.shunt_ohms * 1000
        gain_code = next(code for code, mv in enumerate((40, 80, 160, 320)) if shunt_mv <= mv + 1e-6 or code == 3)
        current_lsb_a = channel.max_current_a / 32767
        calibration = min(int(0.04096 / (current_lsb_a * channel.shunt_ohms)), 0xFFFE) & 0xFFFE
        # Recompute the LSB from the truncated calibration so the chip's current register reads true.
        current_lsb_ma = 0.04096 / (calibration * channel.shunt_ohms) * 1000 if calibration else 0.0
        adc = _ADC_CODES[adc_samples]
        config_word = (_BUS_RANGE_32V << 13) | (gain_code << 11) | (adc << 7) | (adc << 3) | _MODE_SHUNT_AND_BUS_CONTINUOUS
        return cls(gain_code, 4000 << gain_code, calibration, current_lsb_ma, config_word)


def default_driver_factory(bus, address: int):
    """The real adafruit driver. Raises ValueError when nothing answers at `address`."""
    import adafruit_ina219  # imported here: it pulls in Blinka, which the CLI's `status` never needs

    return adafruit_ina219.INA219(bus, address)


class _Sensor:
    """One channel's driver and running sums for the current cycle."""

    def __init__(self, channel: ChannelConfig, setup: ChannelSetup, energy: EnergyCounter) -> None:
        self.channel = channel
        self.setup = setup
        self.energy = energy
        self.driver = None
        self.restores = 0
        self.reset_sums()

    def reset_sums(self) -> None:
        self.good = 0
        self.failed = 0
        self.sum_bus_v = 0.0
        self.sum_shunt_mv = 0.0
        self.sum_power_w = 0.0
        self.last_error = ""


class read_data:  # noqa: N801 - the name is fixed by the design card
    """Averages `samples` INA219 readings per channel over the sampling window.

    `bus` is any object with busio.I2C's methods; `clock` returns monotonic
    seconds, `sleep(s)` waits, `wall_ms()` returns Unix ms. Not thread-safe:
    one measuring thread owns it.
    """

    def __init__(
        self,
        bus,
        channels: Sequence[ChannelConfig],
        sampling: SamplingConfig,
        *,
        energy: Mapping[str, tuple[float, float]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        driver_factory: Callable = default_driver_factory,
    ) -> None:
        self.bus = bus
        self.sampling = sampling
        self._clock = clock
        self._sleep = sleep
        self._wall_ms = wall_ms
        self._driver_factory = driver_factory
        energy = energy or {}
        self._sensors = [
            _Sensor(c, ChannelSetup.for_channel(c, sampling.adc_samples), EnergyCounter(*energy.get(c.name, (0.0, 0.0))))
            for c in channels
        ]

    @property
    def energy(self) -> dict[str, tuple[float, float]]:
        """Energy counters per channel name: (in_wh, out_wh)."""
        return {s.channel.name: (s.energy.in_wh, s.energy.out_wh) for s in self._sensors}

    @property
    def restores(self) -> dict[str, int]:
        """How often each channel's config/calibration had to be restored (brownouts)."""
        return {s.channel.name: s.restores for s in self._sensors}

    def measure(self) -> Cycle:
        """Run one sampling window and return the averages.

        Never raises for a sensor fault: a channel with no good sample has None
        values and its MeasuringError is in `Cycle.errors`; the others go on.
        """
        for sensor in self._sensors:
            sensor.reset_sums()
            self._prepare(sensor)
        n = self.sampling.samples
        step_s = self.sampling.window_s / n
        start_s = self._clock()
        start_wall_ms = self._wall_ms()
        for k in range(n):
            # Sample k sits in the middle of its slice of the window, so the
            # average is centred on the window's middle, where the point is stamped.
            delay = start_s + (k + 0.5) * step_s - self._clock()
            if delay > 0:
                self._sleep(delay)
            for sensor in self._sensors:
                self._sample(sensor)
        mid_s = start_s + self.sampling.window_s / 2
        readings = tuple(self._average(sensor, mid_s) for sensor in self._sensors)
        return Cycle(start_wall_ms + round(self.sampling.window_s * 500), mid_s, readings)

    def _prepare(self, sensor: _Sensor) -> None:
        """Attach the driver if needed and make sure the chip holds our settings."""
        try:
            if sensor.driver is None:
                sensor.driver = self._driver_factory(self.bus, sensor.channel.address)
                self._restore(sensor)
                log.info("%s: INA219 at 0x%02X answered", sensor.channel.name, sensor.channel.address)
                return
            config = _read_register(sensor.driver, _REG_CONFIG)
            calibration = _read_register(sensor.driver, _REG_CALIBRATION)
            if config != sensor.setup.config_word or calibration != sensor.setup.calibration:
                # A brownout puts the chip back to power-on values (calibration 0).
                sensor.restores += 1
                log.info("%s: INA219 settings lost (config 0x%04X, calibration %d): restored",
                         sensor.channel.name, config, calibration)
                self._restore(sensor)
        except (OSError, ValueError) as exc:
            sensor.last_error = _describe(exc)

    def _restore(self, sensor: _Sensor) -> None:
        setup = sensor.setup
        _write_register(sensor.driver, _REG_CONFIG, setup.config_word)
        # Through the driver's own setter, so its cached value (rewritten before
        # every `current` read) matches ours.
        sensor.driver.calibration = setup.calibration
        sensor.driver._current_lsb = setup.current_lsb_ma  # noqa: SLF001 - the driver has no setter for custom shunts
        sensor.driver._power_lsb = 20 * setup.current_lsb_ma / 1000  # noqa: SLF001

    def _sample(self, sensor: _Sensor) -> None:
        if sensor.driver is None:
            sensor.failed += 1
            return
        try:
            raw_shunt = sensor.driver.raw_shunt_voltage
            bus_v = sensor.driver.bus_voltage
        except OSError as exc:
            sensor.failed += 1
            sensor.last_error = _describe(exc)
            return
        if abs(raw_shunt) >= sensor.setup.shunt_full_scale:
            sensor.failed += 1
            sensor.last_error = (
                f"shunt voltage at the end of its range ({raw_shunt * _SHUNT_LSB_MV:.2f} mV): "
                f"current above {sensor.channel.max_current_a} A"
            )
            return
        shunt_mv = raw_shunt * _SHUNT_LSB_MV
        sensor.good += 1
        sensor.sum_bus_v += bus_v
        sensor.sum_shunt_mv += shunt_mv
        sensor.sum_power_w += bus_v * shunt_mv / sensor.channel.shunt_ohms / 1000

    def _average(self, sensor: _Sensor, mid_s: float) -> ChannelReading:
        channel = sensor.channel
        if sensor.good == 0:
            why = sensor.last_error or "no sample"
            return ChannelReading(
                channel.name, channel.address, None, None, None, None, 0, sensor.failed,
                None, None,
                error=f"{channel.name} (INA219 at 0x{channel.address:02X}): no good sample of "
                      f"{self.sampling.samples}: {why}",
            )
        n = sensor.good
        bus_v = sensor.sum_bus_v / n
        shunt_mv = sensor.sum_shunt_mv / n
        current_ma = shunt_mv / channel.shunt_ohms
        power_w = sensor.sum_power_w / n
        sensor.energy.add(power_w, mid_s, max_gap_s=2 * self.sampling.interval_s)
        # Each value keeps the digits the chip resolves and no more: digits beyond carry no
        # information and cost bytes on every line sent over a SIM data plan.
        current_step_ma = _SHUNT_LSB_MV / channel.shunt_ohms  # current comes from the shunt register
        power_step_w = (abs(bus_v) * current_step_ma + abs(current_ma) * _BUS_LSB_V) / 1000
        # Energy: what one cycle adds at the power's single-sample step; finer digits would only
        # show the rounding of averages accumulating.
        energy_step_wh = power_step_w * self.sampling.interval_s / 3600
        energy_digits = resolved_digits(energy_step_wh, 1)
        return ChannelReading(
            channel.name,
            channel.address,
            bus_voltage_v=round(bus_v, resolved_digits(_BUS_LSB_V, n)),
            shunt_voltage_mv=round(shunt_mv, resolved_digits(_SHUNT_LSB_MV, n)),
            current_ma=round(current_ma, resolved_digits(current_step_ma, n)),
            power_w=round(power_w, resolved_digits(power_step_w, n)),
            samples=n,
            failed_samples=sensor.failed,
            energy_in_wh=round(sensor.energy.in_wh, energy_digits),
            energy_out_wh=round(sensor.energy.out_wh, energy_digits),
        )


def resolved_digits(step: float, samples: int) -> int:
    """Decimal places that carry information for a value quantised in `step` units, averaged over `samples`.

    The step's own digit (4 mV -> 3 decimals of a volt), plus one per factor of ten in the samples
    averaged: an average of ten earns one extra digit, of a hundred two. At least 0; a step of 0 (nothing to
    resolve, e.g. the power of a channel at 0 V and 0 A) counts as 1e-9.
    """
    exponent = math.floor(math.log10(max(step, 1e-9)) + 1e-9)  # + 1e-9: 0.1 is 0.09999... in binary
    return max(-exponent, 0) + (math.floor(math.log10(samples) + 1e-9) if samples > 0 else 0)


def scan(bus, addresses=range(0x40, 0x50)) -> list[int]:
    """Addresses that acknowledge an empty write (how i2cdetect probes)."""
    found = []
    while not bus.try_lock():
        time.sleep(0)
    try:
        for address in addresses:
            try:
                bus.writeto(address, b"")
                found.append(address)
            except OSError:
                pass
    finally:
        bus.unlock()
    return found


def _read_register(driver, register: int) -> int:
    buf = bytearray(3)
    buf[0] = register
    with driver.i2c_device as device:
        device.write_then_readinto(buf, buf, out_end=1, in_start=1)
    return (buf[1] << 8) | buf[2]


def _write_register(driver, register: int, value: int) -> None:
    with driver.i2c_device as device:
        device.write(bytes((register, value >> 8, value & 0xFF)))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        names = {121: "no answer (NACK)", 5: "I/O error", 110: "bus timeout"}
        return f"{names.get(exc.errno, exc.strerror or 'OS error')} (errno {exc.errno})"
    return str(exc) or type(exc).__name__


@dataclass(frozen=True)
class SystemReading:
    """The Pi's health for one cycle."""

    cpu_percent: float
    cpu_temp_c: float | None
    memory_used_mb: float
    disk_free_mb: float
    net_sent_bytes: int
    net_recv_bytes: int
    uptime_s: float


class SystemMonitor:
    """psutil readings; network bytes are counted since the previous call. Not thread-safe."""

    def __init__(self, disk_path: str, psutil_module=None) -> None:
        if psutil_module is None:
            import psutil as psutil_module
        self._psutil = psutil_module
        self._disk_path = disk_path
        self._psutil.cpu_percent(interval=None)  # the first call only primes the counter
        self._net = self._net_counters()

    def _net_counters(self) -> tuple[int, int]:
        counters = self._psutil.net_io_counters()
        return (counters.bytes_sent, counters.bytes_recv) if counters else (0, 0)

    def read(self) -> SystemReading:
        ps = self._psutil
        sent, recv = self._net_counters()
        # Counters can wrap or reset (interface down/up): never report a negative delta.
        delta = (max(sent - self._net[0], 0), max(recv - self._net[1], 0))
        self._net = (sent, recv)
        return SystemReading(
            cpu_percent=float(ps.cpu_percent(interval=None)),
            cpu_temp_c=self._cpu_temp(),
            memory_used_mb=ps.virtual_memory().used / 1_048_576,
            disk_free_mb=ps.disk_usage(self._disk_path).free / 1_048_576,
            net_sent_bytes=delta[0],
            net_recv_bytes=delta[1],
            uptime_s=_uptime_s(ps),
        )

    def _cpu_temp(self) -> float | None:
        reader = getattr(self._psutil, "sensors_temperatures", None)
        if reader is None:
            return None
        try:
            temps = reader()
        except (OSError, RuntimeError):
            return None
        for name in ("cpu_thermal", "coretemp", "k10temp", "soc_thermal"):
            if temps.get(name):
                return float(temps[name][0].current)
        for entries in temps.values():
            if entries and math.isfinite(entries[0].current):
                return float(entries[0].current)
        return None


def _uptime_s(ps) -> float:
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return time.time() - ps.boot_time()
