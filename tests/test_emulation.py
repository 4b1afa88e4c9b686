"""Tests for emulation.py: INA219 registers, and the emulated bus under the real driver."""
from __future__ import annotations

import errno
import statistics
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import adafruit_ina219  # noqa: E402

from conftest import FakeClock  # noqa: E402
from emulation import REG_CALIBRATION, EmulatedINA219, SimulatedBus  # noqa: E402

UNITS = ("red_house", "green_house", "blue_house", "power_plant")


class Truth:
    """A settable (bus_voltage_v, current_a) source."""

    def __init__(self, bus_voltage_v: float = 12.0, current_a: float = 0.5):
        self.value = (bus_voltage_v, current_a)
        self.calls = 0

    def __call__(self) -> tuple[float, float]:
        self.calls += 1
        return self.value


def reg_write(chip: EmulatedINA219, pointer: int, value: int) -> None:
    chip.write(bytes([pointer, value >> 8 & 0xFF, value & 0xFF]))


CONVERSION_S = 0.14  # longer than the slowest shunt + bus conversion (2 x 68.1 ms at 128 samples)


def reg_read(chip: EmulatedINA219, pointer: int, signed: bool = False) -> int:
    chip.write(bytes([pointer]))
    return int.from_bytes(chip.read(2), "big", signed=signed)


@pytest.fixture
def truth() -> Truth:
    return Truth()


@pytest.fixture
def chip(truth: Truth, clock: FakeClock) -> EmulatedINA219:
    return EmulatedINA219(truth, 0.1, clock)


# --- registers ------------------------------------------------------------------
def test_power_on_values(chip):
    assert reg_read(chip, 0) == 0x399F == chip.config
    assert reg_read(chip, 5) == 0 == chip.calibration


def test_rst_bit_resets_every_register(chip):
    reg_write(chip, 0, 0x019F)
    reg_write(chip, 5, 4096)
    reg_write(chip, 0, 0x8000 | 0x019F)
    assert reg_read(chip, 0) == 0x399F  # RST itself reads back 0
    assert reg_read(chip, 5) == 0


def test_calibration_bit0_reads_zero(chip):
    reg_write(chip, 5, 0x1235)
    assert reg_read(chip, 5) == 0x1234


def test_writes_to_read_only_registers_are_ignored(chip, truth, clock):
    truth.value = (12.0, 0.1)
    for pointer in (1, 2, 3, 4):
        reg_write(chip, pointer, 0x5555)
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 1, signed=True) == 1000


def test_datasheet_calibration_example(chip, truth, clock):
    current_lsb_a = 100e-6
    cal = int(0.04096 / (current_lsb_a * 0.1))
    assert cal == 4096
    reg_write(chip, 5, cal)
    truth.value = (12.0, 1.234)
    clock.advance(CONVERSION_S)
    shunt = reg_read(chip, 1, signed=True)
    bus_raw = reg_read(chip, 2) >> 3
    current = reg_read(chip, 4, signed=True)
    power = reg_read(chip, 3)
    assert shunt == 12340 and bus_raw == 3000
    assert current == int(shunt * cal / 4096) == 12340
    assert power == int(current * bus_raw / 5000) == 7404
    assert current * current_lsb_a == pytest.approx(1.234)
    assert power * 20 * current_lsb_a == pytest.approx(12.0 * 1.234, abs=0.002)


def test_current_truncates_towards_zero_and_power_is_magnitude(chip, truth, clock):
    reg_write(chip, 5, 3000)
    truth.value = (10.0, -0.1235)
    clock.advance(CONVERSION_S)
    shunt = reg_read(chip, 1, signed=True)
    current = reg_read(chip, 4, signed=True)
    assert (shunt, current) == (-1235, -904)  # -904.5 truncates to -904, not -905
    assert reg_read(chip, 3) == abs(current) * 2500 // 5000


@pytest.mark.parametrize("pg, limit", [(0, 4000), (1, 8000), (2, 16000), (3, 32000)])
def test_shunt_clips_at_pga_range(chip, truth, clock, pg, limit):
    reg_write(chip, 0, (0x399F & ~(3 << 11)) | pg << 11)
    truth.value = (12.0, 5.0)  # 500 mV across 0.1 ohm: beyond every range
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 1, signed=True) == limit
    truth.value = (12.0, -5.0)
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 1, signed=True) == -limit
    truth.value = (12.0, 0.0345)  # 3.45 mV fits every range
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 1, signed=True) == 345


@pytest.mark.parametrize("sadc, expected", [(0, 16), (1, 12), (2, 14), (3, 13), (8, 13), (0xF, 13)])
def test_shunt_quantisation_follows_adc_resolution(chip, truth, clock, sadc, expected):
    reg_write(chip, 0, (0x399F & ~(0xF << 3)) | sadc << 3)
    truth.value = (12.0, 13.4 * 10e-6 / 0.1)  # 13.4 LSB
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 1, signed=True) == expected


def test_bus_register_voltage_and_range(chip, truth, clock):
    truth.value = (12.345, 0.0)
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 2) >> 3 == round(12.345 / 0.004)
    truth.value = (40.0, 0.0)
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 2) >> 3 == 8000  # 32 V full scale
    reg_write(chip, 0, 0x399F & ~0x2000)
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 2) >> 3 == 4000  # 16 V full scale
    truth.value = (-1.0, 0.0)
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 2) >> 3 == 0


def test_conversion_ready_bit_follows_the_datasheet(chip, clock, truth):
    reg_write(chip, 0, 0x399F)
    assert reg_read(chip, 2) & 2 == 0
    clock.advance(0.5e-3)
    assert reg_read(chip, 2) & 2 == 0  # 12-bit shunt + bus take 1.064 ms
    clock.advance(0.6e-3)
    assert reg_read(chip, 2) & 2 == 2
    reg_read(chip, 3)  # reading power clears CNVR
    assert reg_read(chip, 2) & 2 == 0
    clock.advance(0.01)
    assert reg_read(chip, 2) & 2 == 2
    reg_write(chip, 0, 0x3998)  # power-down: writing it leaves CNVR as it was, and nothing converts
    truth.value = (5.0, 0.0)
    clock.advance(1.0)
    assert reg_read(chip, 2) & 2 == 2
    assert reg_read(chip, 2) >> 3 == 3000  # still the 12 V of the last conversion
    reg_read(chip, 3)
    clock.advance(1.0)
    assert reg_read(chip, 2) & 2 == 0  # cleared by the power read; powered down, nothing sets it again


def test_results_change_only_when_a_conversion_has_finished(chip, truth, clock):
    # 128-sample averaging on both ADCs: 68.1 ms each, 136.2 ms per result
    reg_write(chip, 0, (0x399F & ~(0xFF << 3)) | 0xF << 7 | 0xF << 3)
    clock.advance(0.130)
    assert reg_read(chip, 1, signed=True) == 0 and reg_read(chip, 2) & 2 == 0  # power-on values still
    clock.advance(0.007)
    assert reg_read(chip, 1, signed=True) == 5000 and reg_read(chip, 2) & 2 == 2
    truth.value = (12.0, 0.8)
    clock.advance(0.1)
    assert reg_read(chip, 1, signed=True) == 5000  # the next result is not ready yet
    clock.advance(0.04)
    assert reg_read(chip, 1, signed=True) == 8000


def test_triggered_mode_converts_once_per_trigger(chip, truth, clock):
    triggered = (0x399F & ~7) | 3  # shunt and bus, triggered
    reg_write(chip, 0, triggered)
    clock.advance(0.01)
    assert reg_read(chip, 1, signed=True) == 5000 and reg_read(chip, 2) & 2 == 2
    calls = truth.calls
    truth.value = (11.0, 0.2)
    clock.advance(1.0)
    assert reg_read(chip, 1, signed=True) == 5000  # no new trigger: the result stays
    assert truth.calls == calls
    reg_write(chip, 0, triggered)  # trigger again
    assert reg_read(chip, 2) & 2 == 0  # writing an operating mode clears CNVR
    clock.advance(0.01)
    assert reg_read(chip, 1, signed=True) == 2000 and reg_read(chip, 2) >> 3 == 2750
    clock.advance(1.0)
    reg_read(chip, 1)
    assert truth.calls == calls + 1  # one conversion for one trigger


def _noise_run(clock, adc_code: int, reads: int) -> list[int]:
    chip = EmulatedINA219(lambda: (12.0, 0.25), 0.1, clock, noise_seed=3)
    reg_write(chip, 0, (0x399F & ~(0xFF << 3)) | adc_code << 7 | adc_code << 3)
    values = []
    for _ in range(reads):
        clock.advance(CONVERSION_S)
        values.append(reg_read(chip, 1, signed=True))
    return values


def test_adc_noise_averages_down_in_software_and_in_the_chip(clock):
    single = _noise_run(clock, 0x3, 2000)  # 12-bit, one conversion per result
    assert 1.0 < statistics.stdev(single) < 4.0  # about 2 LSB (20 uV) of noise
    assert statistics.mean(single) == pytest.approx(2500, abs=0.3)  # unbiased
    tens = [statistics.mean(single[i:i + 10]) for i in range(0, len(single), 10)]
    assert statistics.stdev(tens) < statistics.stdev(single) / 2.5  # averaging ten samples: ~1/sqrt(10)
    chip_averaged = _noise_run(clock, 0xB, 2000)  # the chip averages 8 conversions per result
    assert statistics.stdev(chip_averaged) < statistics.stdev(single) / 2


def test_without_a_noise_seed_readings_are_exact(chip, truth, clock):
    values = set()
    for _ in range(50):
        clock.advance(CONVERSION_S)
        values.add((reg_read(chip, 1, signed=True), reg_read(chip, 2) >> 3))
    assert values == {(5000, 3000)}


def test_overflow_bit(chip, truth, clock):
    truth.value = (12.0, 1.0)
    reg_write(chip, 5, 4096)
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 2) & 1 == 0
    reg_write(chip, 5, 0xFFFE)  # 10000 * 65534 / 4096 > 32767
    assert reg_read(chip, 2) & 1 == 1
    assert reg_read(chip, 4, signed=True) == 32767
    reg_write(chip, 5, 4096)
    chip.force_overflow = True
    assert reg_read(chip, 2) & 1 == 1
    chip.force_overflow = False
    truth.value = (32.0, 3.2)  # current 32000, bus 8000: power 51200 fits
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 2) & 1 == 0


def test_power_overflow_sets_ovf(chip, truth, clock):
    truth.value = (32.0, 3.2)
    reg_write(chip, 5, 4200)  # current 32812 > 32767: clipped and flagged
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 2) & 1 == 1
    reg_write(chip, 5, 4096)
    reg_write(chip, 0, 0x399F)
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 3) == 51200


def test_zero_calibration_reads_zero_current_and_power(chip, truth, clock):
    truth.value = (12.0, 1.0)
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 1, signed=True) == 10000
    assert reg_read(chip, 4) == 0
    assert reg_read(chip, 3) == 0


def test_power_down_holds_last_values(chip, truth, clock):
    truth.value = (12.0, 0.2)
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 1, signed=True) == 2000
    reg_write(chip, 0, 0x3998)  # MODE 0
    truth.value = (11.0, 0.3)
    calls = truth.calls
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 1, signed=True) == 2000
    assert reg_read(chip, 2) >> 3 == 3000
    assert truth.calls == calls
    reg_write(chip, 0, 0x399D)  # MODE 5: shunt only, bus holds
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 1, signed=True) == 3000
    assert reg_read(chip, 2) >> 3 == 3000
    reg_write(chip, 0, 0x399F)
    clock.advance(CONVERSION_S)
    assert reg_read(chip, 2) >> 3 == 2750


def test_read_length_and_short_writes(chip):
    chip.write(b"\x00")
    assert chip.read(4) == b"\x39\x9f\x39\x9f"
    assert chip.read(1) == b"\x39"
    chip.write(b"\x05\x10")  # pointer plus one byte: no register write
    assert chip.read(2) == b"\x00\x00"
    chip.write(b"")  # probe
    assert chip.read(2) == b"\x00\x00"


def test_power_on_reset_method(chip):
    reg_write(chip, 5, 4096)
    reg_write(chip, 0, 0x0000)
    chip.power_on_reset()
    assert (chip.config, chip.calibration) == (0x399F, 0)


@settings(max_examples=200, deadline=None)
@given(bus_v=st.floats(0, 26), current_a=st.floats(-3.2, 3.2), cal=st.integers(1, 0x7FFF))
def test_register_formulas_hold(bus_v, current_a, cal):
    clock = FakeClock()
    chip = EmulatedINA219(lambda: (bus_v, current_a), 0.1, clock)
    reg_write(chip, 5, cal << 1)
    clock.advance(CONVERSION_S)
    shunt = reg_read(chip, 1, signed=True)
    bus_raw = reg_read(chip, 2) >> 3
    assert abs(shunt - current_a * 10000) <= 0.5 + 1e-9
    assert abs(bus_raw * 0.004 - bus_v) <= 0.002 + 1e-9
    raw_current = int(shunt * (cal << 1) / 4096)
    expected = max(-32768, min(32767, raw_current))
    assert reg_read(chip, 4, signed=True) == expected
    assert reg_read(chip, 3) == min(0xFFFF, abs(expected) * bus_raw // 5000)


# --- the bus and the real driver ------------------------------------------------------
@pytest.fixture
def bus(truth, clock) -> SimulatedBus:
    return SimulatedBus({0x40: EmulatedINA219(truth, 0.1, clock)})


def test_driver_reads_match_truth(bus, truth, clock):
    truth.value = (12.6, 0.4321)
    sensor = adafruit_ina219.INA219(bus, 0x40)
    assert bus.device(0x40).calibration == 4096
    clock.advance(CONVERSION_S)
    assert sensor.bus_voltage == pytest.approx(12.6, abs=0.004)
    assert sensor.shunt_voltage == pytest.approx(0.04321, abs=1e-5)
    assert sensor.current == pytest.approx(432.1, abs=0.1)
    assert sensor.power == pytest.approx(12.6 * 0.4321, abs=0.004)
    truth.value = (11.9, -0.25)
    clock.advance(CONVERSION_S)
    assert sensor.current == pytest.approx(-250.0, abs=0.1)
    assert sensor.power == pytest.approx(11.9 * 0.25, abs=0.004)


def test_driver_setters_round_trip(bus):
    sensor = adafruit_ina219.INA219(bus, 0x40)
    sensor.gain = adafruit_ina219.Gain.DIV_1_40MV
    sensor.bus_voltage_range = adafruit_ina219.BusVoltageRange.RANGE_16V
    sensor.mode = adafruit_ina219.Mode.POWERDOWN
    assert bus.device(0x40).config == 0x019F & ~0x7
    assert sensor.gain == 0 and sensor.mode == 0


def test_absent_address_raises_value_error_in_driver(bus):
    with pytest.raises(ValueError):
        adafruit_ina219.INA219(bus, 0x41)


@pytest.mark.parametrize("method, args", [
    ("writeto", (b"\x00",)),
    ("readfrom_into", (bytearray(2),)),
    ("writeto_then_readfrom", (b"\x00", bytearray(2))),
])
def test_absent_address_nacks_on_every_method(bus, method, args):
    with pytest.raises(OSError) as info:
        getattr(bus, method)(0x41, *args)
    assert info.value.errno == errno.EREMOTEIO


def test_shared_buffer_slices_are_honoured(bus):
    buffer = bytearray([0x00, 0xAA, 0xBB, 0xCC])
    bus.writeto_then_readfrom(0x40, buffer, buffer, out_end=1, in_start=1, in_end=3)
    assert buffer == bytearray([0x00, 0x39, 0x9F, 0xCC])
    buffer = bytearray([0xEE, 0xEE, 0xEE])
    bus.readfrom_into(0x40, buffer, start=1)
    assert buffer == bytearray([0xEE, 0x39, 0x9F])
    bus.writeto(0x40, bytearray([0xFF, 0x05, 0x10, 0x00, 0xFF]), start=1, end=4)
    assert bus.device(0x40).calibration == 0x1000

    # An empty write range is a probe: the pointer stays (the register read's fast path must not take a
    # byte from outside the range).
    bus.writeto_then_readfrom(0x40, bytes([REG_CALIBRATION]), buffer, in_end=2)
    for out, start, end in ((b"", 0, 1), (bytes([0, 2]), 5, 6), (bytes([2]), -1, 0)):
        bus.writeto_then_readfrom(0x40, out, buffer, out_start=start, out_end=end, in_end=2)
        assert buffer[:2] == bytes([0x10, 0x00])  # still the calibration register


def test_probe_scan_lock_and_hotplug(bus, truth, clock):
    bus.writeto(0x40, b"")
    assert bus.scan() == [0x40]
    assert bus.try_lock() and not bus.try_lock()
    bus.unlock()
    bus.add(0x44, EmulatedINA219(truth, 0.1, clock))
    assert bus.scan() == [0x40, 0x44]
    bus.remove(0x40)
    assert bus.scan() == [0x44]
    with pytest.raises(OSError):
        bus.writeto(0x40, b"")


def test_transactions_are_counted(bus):
    sensor = adafruit_ina219.INA219(bus, 0x40)
    before = bus.transactions
    sensor.bus_voltage
    assert bus.transactions == before + 1
    sensor.current  # rewrites calibration, then reads
    assert bus.transactions == before + 3


@pytest.mark.parametrize("fault, code", [("nack", 121), ("timeout", 110), ("eio", 5)])
def test_error_faults_raise_errno_for_count_transactions(bus, clock, fault, code):
    sensor = adafruit_ina219.INA219(bus, 0x40)
    clock.advance(CONVERSION_S)
    bus.inject(0x40, fault, count=2)
    for _ in range(2):
        with pytest.raises(OSError) as info:
            sensor.bus_voltage
        assert info.value.errno == code
    assert sensor.bus_voltage == pytest.approx(12.0, abs=0.004)


def test_persistent_fault_until_cleared(bus, clock):
    sensor = adafruit_ina219.INA219(bus, 0x40)
    clock.advance(CONVERSION_S)
    bus.inject(0x40, "nack", count=None)
    for _ in range(5):
        with pytest.raises(OSError):
            sensor.bus_voltage
    assert bus.scan() == []
    bus.clear_faults(0x40)
    assert sensor.bus_voltage == pytest.approx(12.0, abs=0.004)


def test_brownout_resets_registers(bus, truth, clock):
    truth.value = (12.0, 0.5)
    sensor = adafruit_ina219.INA219(bus, 0x40)
    sensor.gain = adafruit_ina219.Gain.DIV_2_80MV
    bus.inject(0x40, "brownout", count=7)
    assert sensor.raw_current == 0  # calibration lost
    chip = bus.device(0x40)
    assert (chip.config, chip.calibration) == (0x399F, 0)
    clock.advance(CONVERSION_S)  # the chip converts again from its power-on config
    assert sensor.shunt_voltage == pytest.approx(0.05, abs=1e-5)
    assert sensor.current == pytest.approx(500.0, abs=0.1)  # the driver rewrites calibration
    assert chip.calibration == 4096


def test_overflow_fault(bus):
    sensor = adafruit_ina219.INA219(bus, 0x40)
    assert not sensor.overflow
    bus.inject(0x40, "overflow", count=1)
    assert sensor.overflow
    assert not sensor.overflow
    bus.inject(0x40, "overflow", count=None)
    assert sensor.overflow and sensor.overflow
    bus.clear_faults()
    assert not sensor.overflow


def test_inject_validates(bus):
    with pytest.raises(ValueError):
        bus.inject(0x40, "smoke")
    with pytest.raises(ValueError):
        bus.inject(0x40, "nack", count=0)
