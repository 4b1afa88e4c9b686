"""Measuring: the design card's `read_data` class (the Pi's own health readings: health.py).

`read_data` drives one adafruit INA219 per configured channel over whatever I2C bus object it is given (the
Pi's bus or the simulator's), takes `samples` samples of every channel spread evenly over the sampling window
and averages them.

Current is derived from the shunt register (10 uV LSB) and the configured shunt resistance, never from the
chip's current register: the shunt register needs no calibration, so a brownout (which zeroes the
calibration) cannot corrupt a reading. The chip's config and calibration are still checked (every
_SETTINGS_CHECK_CYCLES cycles, and at the next cycle after any failed transaction) and restored, so its own
current/power registers stay meaningful too.

Each sample is two I2C transactions (bus, then shunt register), each one writeto_then_readfrom on the bus
into a buffer kept per channel: the driver still owns the chip (it is attached and sets config and
calibration), but its per-register property and i2c_device layers are not paid 80 times a cycle.
"""
from __future__ import annotations

import errno
import functools
import logging
import math
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from config import ADC_SAMPLES, ADC_TIME_S as _ADC_TIME_S, ChannelConfig, SamplingConfig
from rpi_errors import MeasuringError

log = logging.getLogger(__name__)

# INA219 ADC codes for hardware averaging: 1 conversion = 12-bit, then 2..128 samples.
_ADC_CODES = dict(zip(ADC_SAMPLES, (0x3, 0x9, 0xA, 0xB, 0xC, 0xD, 0xE, 0xF)))  # samples averaged: BADC/SADC bits
_SHUNT_LSB_MV = 0.01
_BUS_LSB_V = 0.004
_BUS_RANGE_32V = 1
_MODE_SHUNT_AND_BUS_CONTINUOUS = 7
_REG_CONFIG = 0x00
_REG_SHUNT = 0x01
_REG_BUS = 0x02
_REG_CALIBRATION = 0x05
# The chip's settings are read back every this many cycles (30 s at the default 3 s), and at the next
# cycle after any failed transaction; a brownout between checks cannot make a reading wrong: current comes
# from the shunt register, which the calibration does not touch, and the power-on settings read the same
# registers at the same LSBs (only the hardware averaging and the range differ until restored).
_SETTINGS_CHECK_CYCLES = 10
_CNVR = 0x02  # bus register bit 1: a conversion finished since the last reset or config write
# The register pointers a sample pass writes (constants: no buffer to fill before each transaction).
_POINT_AT_BUS = bytes((_REG_BUS,))
_POINT_AT_SHUNT = bytes((_REG_SHUNT,))
_SAMPLE = struct.Struct(">Hh")  # one sample as the pass stores it: bus register, shunt register (signed)
# No sensor answered for this many cycles in a row: the bus is stuck (SDA held low, say) and re-opened,
_BUS_STUCK_CYCLES = 3
_TIMEOUTS_STUCK = 2  # sensors whose transactions timed out in one cycle: the bus itself is stuck
_SLOW_TIMEOUT_S = 0.1  # a timeout that took this long (a pass takes ms): not tried again this cycle
_STUCK_ERROR = "not tried again this cycle: the bus does not answer (transactions time out)"
_BUS_REOPEN_EVERY_CYCLES = 6  # and again every this many while it stays stuck


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
    def ok(self) -> bool:  # True when at least one sample was good (the channel publishes)
        return self.bus_voltage_v is not None


@dataclass(frozen=True)
class Cycle:
    """One measuring cycle. `time_ms` is the wall clock at the middle of the sampling window."""

    time_ms: int
    monotonic_s: float
    channels: tuple[ChannelReading, ...]
    bus_error: str | None = None  # set while the whole bus is stuck (no sensor answers at all)

    @property
    def errors(self) -> tuple[MeasuringError, ...]:
        """One MeasuringError per channel with no good sample (keyed `measure:<name>`), and one for a
        stuck bus (`measure:bus`)."""
        errors = tuple(MeasuringError(r.error, key=f"measure:{r.name}") for r in self.channels if not r.ok)
        if self.bus_error:
            errors += (MeasuringError(self.bus_error, key="measure:bus"),)
        return errors


@dataclass
class EnergyCounter:
    """Energy through one channel in Wh, split by direction; kept across restarts."""

    in_wh: float = 0.0
    out_wh: float = 0.0
    last_s: float | None = field(default=None, compare=False)  # monotonic time of the last good reading

    def add(self, power_w: float, now_s: float, max_gap_s: float) -> None:
        # On the monotonic clock (immune to NTP steps). A gap over `max_gap_s` (+1 us: a skipped slot's may round
        # a step above it) is not bridged, the ledger's rule too: what flowed meanwhile was not measured.
        if self.last_s is not None and now_s - self.last_s <= max_gap_s + 1e-6:
            dt_h = (now_s - self.last_s) / 3600.0
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
    """One channel's driver, the raw registers of the current window and their sums."""

    def __init__(self, channel: ChannelConfig, setup: ChannelSetup, energy: EnergyCounter, samples: int,
                 energy_digits: int) -> None:
        self.channel = channel
        self.setup = setup
        self.energy = energy
        self.driver = None
        self.restores = 0
        self.cycles_to_check = 0  # cycles until the chip's settings are read back (0: at the next cycle)
        self.buffer = bytearray(3)  # [register, msb, lsb]: reused by the settings checks
        self.raw = bytearray(_SAMPLE.size * samples)  # sample k's bus, shunt registers at [4k:4k+4], big-endian
        self.lost: list[int] = []  # offsets in `raw` of this window's samples whose transaction failed
        self.address = channel.address
        self.shunt_full_scale = setup.shunt_full_scale
        self.energy_digits = energy_digits  # decimals of the published energy counters (energy_digits())
        self.reset_sums()

    def lose(self, first: int, end: int, why: str) -> None:
        """Samples `first` to `end` - 1 of this window are lost (not tried, or the bus gave up); the sensor's
        first error of the cycle stays its error, else `why` is."""
        self.lost.extend(range(_SAMPLE.size * first, _SAMPLE.size * end, _SAMPLE.size))
        self.last_error = self.last_error or why

    def reset_sums(self) -> None:
        # Raw register counts, summed as integers (exact); scaled to volts and watts once per cycle.
        self.good = 0
        self.failed = 0
        self.sum_bus = 0  # bus register, 4 mV counts
        self.sum_shunt = 0  # shunt register, 10 uV counts (signed)
        self.sum_bus_x_shunt = 0  # per-sample products: the power's sum
        self.last_error = ""
        self.lost.clear()
        self.timed_out = False  # a transaction of this cycle timed out (1 s on a Pi): no more tries this cycle


class read_data:  # noqa: N801 - the name is fixed by the design card
    """Averages `samples` INA219 readings per channel over the sampling window.

    `bus` is any object with busio.I2C's methods; `clock` returns monotonic seconds, `sleep(s)` waits,
    `wall_ms()` returns Unix ms. `reopen_bus(old)` returns a freshly opened bus: called when no sensor has
    answered for _BUS_STUCK_CYCLES cycles, then every _BUS_REOPEN_EVERY_CYCLES cycles while the bus stays
    stuck (None: never). Not thread-safe: one measuring thread owns it.
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
        reopen_bus: Callable[[object], object] | None = None,
        energy_time_scale: float = 1.0,
    ) -> None:
        self.bus = bus
        # Seconds of the points' time per second of `clock`: the simulator's speed when points carry the
        # simulated time, so the energy counters agree with the stamps (and with the ledger integrating them).
        self._energy_scale = energy_time_scale
        self._reopen_bus = reopen_bus
        self.stuck_cycles = 0  # consecutive cycles in which no sensor answered at all
        self.bus_reopens = 0
        self.sampling = sampling
        self._clock = clock
        self._sleep = sleep
        self._wall_ms = wall_ms
        self._driver_factory = driver_factory
        energy = energy or {}
        self._sensors = [
            _Sensor(c, ChannelSetup.for_channel(c, sampling.adc_samples), EnergyCounter(*energy.get(c.name, (0.0, 0.0))),
                    sampling.samples, energy_digits(c, sampling.interval_s * energy_time_scale))
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

    @property
    def lead_s(self) -> float:  # s from a window's start to its first sample (half a sample's slice)
        return self.sampling.window_s / self.sampling.samples / 2

    def measure(self, window_start_s: float | None = None) -> Cycle:
        """Run one sampling window and return the averages.

        `window_start_s` (clock s): when the window began, for a caller that woke at its first sample
        (`window_start_s + lead_s`). None: it begins now. Never raises for a sensor fault: a channel with no
        good sample has None values and its MeasuringError is in `Cycle.errors`; the others go on."""
        configured = False
        for sensor in self._sensors:
            sensor.reset_sums()
        timeouts = 0  # sensors whose transaction timed out slowly this cycle
        for sensor in self._sensors:
            # Two sensors whose transactions time out: the bus is stuck (SDA held low); the others are not
            # tried this cycle (each try would cost a Pi about a second).
            if timeouts < _TIMEOUTS_STUCK:
                configured |= self._prepare(sensor)
                timeouts += sensor.timed_out
        start_wall_ms = self._wall_ms()
        start_s = self._clock()
        # A chip set up just now has a result only after its first conversion: no sample before then.
        settled_s = start_s + 2.5 * _ADC_TIME_S[self.sampling.adc_samples] if configured else start_s
        if window_start_s is not None and start_s - window_start_s < 2 * self.lead_s:
            # Woken for the first sample: the window keeps the slot's start. Later (a settings check that timed
            # out, a busy machine), it begins now, so the samples stay spread rather than taken back to back.
            start_wall_ms -= round((start_s - window_start_s) * 1000)
            start_s = window_start_s
        n = self.sampling.samples
        stuck = timeouts >= _TIMEOUTS_STUCK
        live = []
        for sensor in self._sensors:
            if sensor.driver is not None and (stuck or sensor.timed_out):  # not tried again this cycle
                sensor.lose(0, n, _STUCK_ERROR)
            elif sensor.driver is not None:
                live.append(sensor)
        step_s = self.sampling.window_s / n
        clock, sleep, sample_pass = self._clock, self._sleep, self._sample_pass
        # Transactions that time out (1 s each on a Pi's stuck bus) must not stretch a cycle to 40 s: past a
        # window and a step from the first pass (however late that began), the rest of the samples are lost.
        give_up_s = math.inf
        for k in range(n if live else 0):
            # Sample k sits in the middle of its slice of the window, so the
            # average is centred on the window's middle, where the point is stamped.
            target_s, now_s = max(start_s + (k + 0.5) * step_s, settled_s), clock()
            if now_s < target_s:
                sleep(target_s - now_s)
            elif now_s > give_up_s:
                for sensor in live:
                    sensor.lose(k, n, "the sampling window ran out (transactions timed out)")
                break
            if not k:
                give_up_s = max(now_s, target_s) + self.sampling.window_s + step_s
            # One sample pass holds the bus once (busio's try_lock/unlock) for every channel's reads.
            bus = self.bus
            while not bus.try_lock():
                sleep(0)
            try:
                timed_out = sample_pass(bus.writeto_then_readfrom, live, _SAMPLE.size * k,
                                        _TIMEOUTS_STUCK - timeouts, clock, max(now_s, target_s))
            finally:
                bus.unlock()
            if timed_out:
                # A sensor that timed out is not tried again this cycle (the others keep their samples);
                # a second one: the bus is stuck, nothing more is tried.
                timeouts += timed_out
                stuck = timeouts >= _TIMEOUTS_STUCK
                for sensor in live:
                    if stuck or sensor.timed_out:
                        sensor.lose(k + 1, n, _STUCK_ERROR)
                live = [] if stuck else [sensor for sensor in live if not sensor.timed_out]
                if not live:
                    break
        mid_s = start_s + self.sampling.window_s / 2
        for sensor in self._sensors:
            if sensor.driver is None:
                sensor.failed = n  # not attached: every sample failed
            else:
                self._tally(sensor, n)
        readings = tuple(self._average(sensor, mid_s) for sensor in self._sensors)
        return Cycle(start_wall_ms + round(self.sampling.window_s * 500), mid_s, readings, self._check_bus(readings))

    def _check_bus(self, readings: Sequence[ChannelReading]) -> str | None:
        """Notice a stuck bus (no sensor answered, cycle after cycle), re-open it on a schedule.
        Returns the bus error for this cycle, or None."""
        if any(r.ok for r in readings) or not readings:
            if self.stuck_cycles >= _BUS_STUCK_CYCLES:
                log.info("I2C bus answers again after %d cycles without any sensor", self.stuck_cycles)
            self.stuck_cycles = 0
            return None
        self.stuck_cycles += 1
        if self.stuck_cycles < _BUS_STUCK_CYCLES:
            return None  # every sensor missing once or twice: the channels' own errors say enough
        if (self.stuck_cycles - _BUS_STUCK_CYCLES) % _BUS_REOPEN_EVERY_CYCLES == 0 and self._reopen_bus:
            self._reopen()
        return (f"I2C bus stuck: no sensor has answered for {self.stuck_cycles} cycles (every transaction "
                f"fails, e.g. SDA held low); re-opened {self.bus_reopens} time(s), next try within "
                f"{_BUS_REOPEN_EVERY_CYCLES} cycles")

    def _reopen(self) -> None:
        self.bus_reopens += 1
        log.warning("I2C bus stuck for %d cycles: re-opening it (attempt %d)", self.stuck_cycles, self.bus_reopens)
        try:
            self.bus = self._reopen_bus(self.bus)
        except Exception as exc:  # noqa: BLE001 - Blinka and the kernel raise many kinds; try again later
            log.warning("cannot re-open the I2C bus: %s: %s", type(exc).__name__, exc)
            return
        for sensor in self._sensors:
            sensor.driver = None  # attached again (and set up) on the new bus at the next cycle

    def _prepare(self, sensor: _Sensor) -> bool:
        """Attach the driver if needed and, on its schedule, make sure the chip holds our settings.
        True when the chip's config was written (its conversions start again)."""
        if sensor.driver is not None and sensor.cycles_to_check > 0:
            sensor.cycles_to_check -= 1  # most cycles: no transaction, so nothing to time
            return False
        began_s = self._clock()
        try:
            if sensor.driver is None:
                sensor.driver = self._driver_factory(self.bus, sensor.channel.address)
                self._restore(sensor)
                sensor.cycles_to_check = _SETTINGS_CHECK_CYCLES
                log.info("%s: INA219 at 0x%02X answered", sensor.channel.name, sensor.channel.address)
                return True
            sensor.cycles_to_check = _SETTINGS_CHECK_CYCLES
            config = _read_register(sensor.driver, _REG_CONFIG, sensor.buffer)
            calibration = _read_register(sensor.driver, _REG_CALIBRATION, sensor.buffer)
            if config != sensor.setup.config_word or calibration != sensor.setup.calibration:
                # A brownout puts the chip back to power-on values (calibration 0).
                sensor.restores += 1
                log.info("%s: INA219 settings lost (config 0x%04X, calibration %d): restored",
                         sensor.channel.name, config, calibration)
                self._restore(sensor)
                return True
        except (OSError, ValueError) as exc:
            sensor.last_error = _describe(exc)
            sensor.cycles_to_check = 0
            # Slow, whatever it raised: the driver's probe turns two timed-out transactions into a ValueError.
            sensor.timed_out = self._clock() - began_s > _SLOW_TIMEOUT_S
        return False

    def _restore(self, sensor: _Sensor) -> None:
        setup = sensor.setup
        _write_register(sensor.driver, _REG_CONFIG, setup.config_word)
        # Through the driver's own setter, so its cached value (rewritten before
        # every `current` read) matches ours.
        sensor.driver.calibration = setup.calibration
        sensor.driver._current_lsb = setup.current_lsb_ma  # noqa: SLF001 - the driver has no setter for custom shunts
        sensor.driver._power_lsb = 20 * setup.current_lsb_ma / 1000  # noqa: SLF001

    @staticmethod
    def _sample_pass(transfer: Callable, live: Sequence[_Sensor], at: int, timeouts_left: int,
                     clock: Callable[[], float], began_s: float) -> int:
        """One sample of every channel in `live`: bus and shunt registers into raw[at:at + 4], straight from
        the bus (`transfer`: its writeto_then_readfrom, held by the caller). Runs right after each wake-up:
        only the transactions; the registers are checked and summed after the window (_tally). After
        `timeouts_left` sensors timed out slowly (the adapter's timeout, about 1 s on a Pi, since `began_s`
        or the last failure: `clock` is read only on a failure) the bus is stuck: the rest is not tried.
        Returns how many sensors timed out slowly in this pass."""
        timed_out = 0
        for i, sensor in enumerate(live):
            try:
                # Bus register first: its CNVR bit says a conversion has finished since the last
                # reset or config write, so the shunt register read after it holds a real result.
                transfer(sensor.address, _POINT_AT_BUS, sensor.raw, in_start=at, in_end=at + 2)
                transfer(sensor.address, _POINT_AT_SHUNT, sensor.raw, in_start=at + 2, in_end=at + 4)
            except OSError as exc:
                sensor.lost.append(at)
                sensor.last_error = _describe(exc)
                sensor.cycles_to_check = 0  # a failed transaction may be a brownout: check the settings next cycle
                failed_s = clock()
                sensor.timed_out = exc.errno == errno.ETIMEDOUT and failed_s - began_s > _SLOW_TIMEOUT_S
                began_s = failed_s
                timed_out += sensor.timed_out
                if timed_out >= timeouts_left:
                    for rest in live[i + 1:]:
                        rest.lose(at // _SAMPLE.size, at // _SAMPLE.size + 1, _STUCK_ERROR)
                    break
        return timed_out

    @staticmethod
    def _tally(sensor: _Sensor, n: int) -> None:
        """Check and sum the window's `n` raw samples of `sensor` (a lost one counts as failed)."""
        lost, full_scale, size = sensor.lost, sensor.shunt_full_scale, _SAMPLE.size
        sensor.failed = len(lost)
        good = sum_bus = sum_shunt = sum_product = 0
        for at, (bus_word, raw_shunt) in zip(range(0, size * n, size), _SAMPLE.iter_unpack(sensor.raw[:size * n])):
            if lost and at in lost:
                continue
            converted = bus_word & _CNVR
            if not converted or not -full_scale < raw_shunt < full_scale:
                read_data._bad_sample(sensor, converted, raw_shunt)
                continue
            raw_bus = bus_word >> 3  # bits 15..3: 4 mV steps
            good += 1
            sum_bus += raw_bus
            sum_shunt += raw_shunt
            sum_product += raw_bus * raw_shunt
        sensor.good, sensor.sum_bus, sensor.sum_shunt, sensor.sum_bus_x_shunt = good, sum_bus, sum_shunt, sum_product

    @staticmethod
    def _bad_sample(sensor: _Sensor, converted: int, raw_shunt: int) -> None:
        sensor.failed += 1
        if not converted:
            # Nothing converted since a config write or a power-on reset (a brownout: its registers read
            # 0 until the first conversion): not a reading. The settings are checked at the next cycle.
            sensor.last_error = "no finished conversion (the chip was reset or reconfigured)"
            sensor.cycles_to_check = 0
        else:
            range_mv = sensor.shunt_full_scale * _SHUNT_LSB_MV  # the gain max_current_a chose: 40-320 mV
            sensor.last_error = (f"shunt voltage at the end of its range ({raw_shunt * _SHUNT_LSB_MV:.2f} mV of "
                                 f"±{range_mv:g} mV): current beyond {range_mv / sensor.channel.shunt_ohms / 1000:g} A")

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
        bus_v = sensor.sum_bus * _BUS_LSB_V / n
        shunt_mv = sensor.sum_shunt * _SHUNT_LSB_MV / n
        current_ma = shunt_mv / channel.shunt_ohms
        # The mean of each sample's power (bus x shunt current), not the product of the means.
        power_w = sensor.sum_bus_x_shunt * (_BUS_LSB_V * _SHUNT_LSB_MV) / channel.shunt_ohms / 1000 / n
        scale = self._energy_scale
        sensor.energy.add(power_w, mid_s * scale, max_gap_s=2 * self.sampling.interval_s * scale)
        # Each value keeps the digits the chip resolves and no more: digits beyond carry no
        # information and cost bytes on every line sent over a SIM data plan.
        current_step_ma = _SHUNT_LSB_MV / channel.shunt_ohms  # current comes from the shunt register
        power_step_w = (abs(bus_v) * current_step_ma + abs(current_ma) * _BUS_LSB_V) / 1000
        return ChannelReading(
            channel.name,
            channel.address,
            bus_voltage_v=round(bus_v, resolved_digits(_BUS_LSB_V, n)),
            shunt_voltage_mv=round(shunt_mv, resolved_digits(_SHUNT_LSB_MV, n)),
            current_ma=round(current_ma, resolved_digits(current_step_ma, n)),
            power_w=round(power_w, resolved_digits(power_step_w, n)),
            samples=n,
            failed_samples=sensor.failed,
            energy_in_wh=round(sensor.energy.in_wh, sensor.energy_digits),
            energy_out_wh=round(sensor.energy.out_wh, sensor.energy_digits),
        )


def energy_digits(channel: ChannelConfig, cycle_s: float) -> int:
    """Decimals of a channel's energy counters (Wh), fixed per channel: what a cycle of `cycle_s` (the points'
    time) adds at the power's coarsest single-sample step (32 V, the maximum current). Digits that followed
    each cycle's reading (more at night, at 0 V) would make the rounded running total read lower now and then
    (a Prometheus counter, Home Assistant's total_increasing, a dashboard's difference must never see that)."""
    current_step_ma = _SHUNT_LSB_MV / channel.shunt_ohms
    power_step_w = (32 * current_step_ma + channel.max_current_a * 1000 * _BUS_LSB_V) / 1000
    return resolved_digits(power_step_w * cycle_s / 3600, 1)


@functools.lru_cache(maxsize=256)
def resolved_digits(step: float, samples: int) -> int:
    """Decimal places that carry information for a value quantised in `step` units, averaged over `samples`: the
    step's own digit (4 mV -> 3 decimals of a volt), plus one per factor of ten in the samples averaged (ten:
    one more, a hundred: two). At least 0; a step of 0 (e.g. the power at 0 V and 0 A) counts as 1e-9."""
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


def _read_register(driver, register: int, buf: bytearray) -> int:
    """One 16-bit register through the driver's i2c_device, into `buf` (3 bytes, reused). Raises OSError."""
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
