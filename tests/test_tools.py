"""Measuring with the real adafruit driver over the emulated bus: averages, failures, brownouts."""
from __future__ import annotations

import pytest

from config import parse_config
from simulator import build_simulated_bus
import tools
from tools import ChannelSetup, EnergyCounter, read_data

BUS_LSB_V = 0.004
SHUNT_LSB_MV = 0.01

TRUTH = {  # name -> (address, bus V, mA): every channel different, so a mixed-up address shows
    "red_house": (0x40, 12.345, 123.456),
    "green_house": (0x41, 13.1, -250.0),
    "blue_house": (0x44, 11.87, 420.0),
    "power_plant": (0x45, 12.9, -1234.5),
}


def constant_config(channels=None, **sampling):
    channels = channels or [
        {"name": n, "address": a, "max_current_a": 3.2 if n == "power_plant" else 2.0,
         "constant": {"bus_voltage_v": v, "current_ma": i}}
        for n, (a, v, i) in TRUTH.items()
    ]
    return parse_config({"simulation": {"enabled": True, "scenario": "constant"}, "channel": channels,
                         "sampling": sampling})


def make_reader(cfg, clock):
    bus = build_simulated_bus(cfg, clock)
    return read_data(bus, cfg.channels, cfg.sampling, clock=clock, sleep=clock.sleep, wall_ms=clock.wall_ms), bus


def test_constant_scenario_matches_truth_within_resolution_and_power_is_v_times_i(clock):
    cfg = constant_config()
    reader, _ = make_reader(cfg, clock)
    cycle = reader.measure()
    assert not cycle.errors
    for reading in cycle.channels:
        address, volts, milliamps = TRUTH[reading.name]
        assert reading.address == address
        assert reading.samples == 10 and reading.failed_samples == 0  # ten samples averaged, not summed
        assert reading.bus_voltage_v == pytest.approx(volts, abs=BUS_LSB_V / 2 + 1e-9)
        assert reading.shunt_voltage_mv == pytest.approx(milliamps * 0.1, abs=SHUNT_LSB_MV / 2 + 1e-9)
        assert reading.current_ma == pytest.approx(milliamps, abs=SHUNT_LSB_MV / 2 / 0.1 + 1e-9)
        # V x I, rounded to the digits the product resolves (0.1 mW here: 4 mV x I + V x 0.1 mA, averaged).
        assert reading.power_w == pytest.approx(reading.bus_voltage_v * reading.current_ma / 1000, abs=5e-5 + 1e-12)
        assert reading.power_w != pytest.approx(0.1 * reading.bus_voltage_v ** 2)  # the 2023 formula


@pytest.mark.parametrize("shunt_ohms,max_current_a,current_ma", [
    (0.1, 0.3, 250.0),    # 40 mV range
    (0.1, 0.7, -600.0),   # 80 mV
    (0.05, 3.0, 2500.0),  # 160 mV
    (0.01, 30.0, -15000.0),  # 320 mV, a big shunt
    (0.5, 0.6, 310.0),
])
def test_current_is_right_for_any_shunt_and_max_current(clock, shunt_ohms, max_current_a, current_ma):
    cfg = constant_config([{"name": "x", "address": 0x40, "shunt_ohms": shunt_ohms, "max_current_a": max_current_a,
                            "constant": {"bus_voltage_v": 12.0, "current_ma": current_ma}}])
    reader, bus = make_reader(cfg, clock)
    reading = reader.measure().channels[0]
    assert reading.current_ma == pytest.approx(current_ma, abs=SHUNT_LSB_MV / shunt_ohms)
    setup = ChannelSetup.for_channel(cfg.channels[0], 1)
    device = bus.device(0x40)
    assert device.config == setup.config_word and device.calibration == setup.calibration
    # the chip's own current register agrees too, through the driver
    driver_ma = reader._sensors[0].driver.current
    assert driver_ma == pytest.approx(current_ma, abs=max(setup.current_lsb_ma * 2, SHUNT_LSB_MV / shunt_ohms * 2))


def test_failed_samples_are_left_out_and_counted(clock):
    cfg = constant_config()
    reader, bus = make_reader(cfg, clock)
    reader.measure()  # attach drivers (their settings are checked again on a schedule, not this cycle)
    # each failing sample takes one transaction (its first register read fails); no check follows within
    # the cycle
    bus.inject(0x41, "timeout", count=4)
    reading = {r.name: r for r in reader.measure().channels}["green_house"]
    assert reading.failed_samples == 4 and reading.samples == 6
    assert reading.current_ma == pytest.approx(-250.0, abs=0.05)


def test_a_lost_sample_never_reuses_the_previous_windows_registers(clock):
    cfg = constant_config()
    reader, bus = make_reader(cfg, clock)
    reader.measure()
    reader.measure()  # every sample slot now holds green_house's registers at -250 mA
    bus.model._truths["green_house"] = (13.1, 0.5)  # the current turns round: +500 mA from now on
    sleep = reader._sleep
    passes = []

    def sleep_and_fail(seconds):  # samples 3 and 7 (of 0..9) are lost: their first transaction times out
        sleep(seconds)
        passes.append(seconds)
        if len(passes) in (4, 8):
            bus.inject(0x41, "timeout", count=1)

    reader._sleep = sleep_and_fail
    reading = {r.name: r for r in reader.measure().channels}["green_house"]
    assert reading.failed_samples == 2 and reading.samples == 8
    assert reading.current_ma == pytest.approx(500.0, abs=0.05)  # no stale -250 mA sample in the average
    assert reading.bus_voltage_v == pytest.approx(13.1, abs=0.004)


def test_a_sample_is_two_transactions_and_settings_are_checked_on_a_schedule(clock):
    from tools import _SETTINGS_CHECK_CYCLES

    cfg = constant_config()
    reader, bus = make_reader(cfg, clock)
    reader.measure()
    per_cycle = []
    for _ in range(_SETTINGS_CHECK_CYCLES + 1):
        before = bus.transactions
        reader.measure()
        per_cycle.append(bus.transactions - before)
    plain = 4 * 10 * 2  # 4 channels x 10 samples x (shunt, bus)
    assert per_cycle[:-1] == [plain] * _SETTINGS_CHECK_CYCLES
    assert per_cycle[-1] == plain + 4 * 2  # config and calibration of each channel read back


def test_channel_with_no_good_sample_publishes_nothing_never_zero(clock):
    cfg = constant_config()
    reader, bus = make_reader(cfg, clock)
    reader.measure()
    bus.inject(0x44, "nack", count=None)
    cycle = reader.measure()
    by_name = {r.name: r for r in cycle.channels}
    blue = by_name["blue_house"]
    assert blue.bus_voltage_v is None and blue.current_ma is None and blue.power_w is None
    assert blue.samples == 0 and blue.failed_samples == 10
    assert "0x44" in blue.error and "NACK" in blue.error
    assert [e.key for e in cycle.errors] == ["measure:blue_house"]
    assert by_name["red_house"].current_ma == pytest.approx(123.456, abs=0.05)


@pytest.mark.parametrize("with_error", [False, True])
def test_brownout_is_detected_restored_and_never_corrupts_a_reading(clock, with_error):
    from tools import _SETTINGS_CHECK_CYCLES

    cfg = constant_config([{"name": "x", "address": 0x40, "max_current_a": 0.3,
                            "constant": {"bus_voltage_v": 12.0, "current_ma": 200.0}}])
    reader, bus = make_reader(cfg, clock)
    reader.measure()
    bus.inject(0x40, "brownout")
    if with_error:
        bus.inject(0x40, "eio")  # a brownout that also breaks a transaction: checked at the next cycle
    setup = ChannelSetup.for_channel(cfg.channels[0], 1)
    device = bus.device(0x40)
    cycles = 0
    while reader.restores == {"x": 0}:
        # until the check finds it, the chip runs on power-on settings (calibration 0, widest range):
        # every reading stays right, because current comes from the shunt register
        reading = reader.measure().channels[0]
        cycles += 1
        assert reading.current_ma == pytest.approx(200.0, abs=0.1)
        assert reading.bus_voltage_v == pytest.approx(12.0, abs=0.004)
        assert cycles <= _SETTINGS_CHECK_CYCLES + 1, "the brownout was not found within the check schedule"
    # the failed transaction, or the reset chip's first sample (no conversion finished yet, not counted),
    # brings the check forward to the next cycle
    assert cycles == 2
    assert reader.restores == {"x": 1}
    assert device.calibration == setup.calibration and device.config == setup.config_word
    for _ in range(_SETTINGS_CHECK_CYCLES + 1):
        assert reader.measure().channels[0].current_ma == pytest.approx(200.0, abs=0.1)
    assert reader.restores == {"x": 1}


def test_sensor_absent_at_boot_recovers_when_it_answers(clock):
    cfg = constant_config()
    reader, bus = make_reader(cfg, clock)
    device = bus.device(0x45)
    bus.remove(0x45)
    cycle = reader.measure()
    assert {r.name for r in cycle.channels if not r.ok} == {"power_plant"}
    bus.add(0x45, device)
    cycle = reader.measure()
    assert all(r.ok for r in cycle.channels)


def test_overflow_beyond_the_shunt_range_is_a_failed_sample_not_a_clipped_value(clock):
    cfg = constant_config([{"name": "x", "address": 0x40, "max_current_a": 0.3,
                            "constant": {"bus_voltage_v": 12.0, "current_ma": 900.0}}])  # 90 mV > 40 mV range
    reader, _ = make_reader(cfg, clock)
    reading = reader.measure().channels[0]
    assert not reading.ok and reading.failed_samples == 10
    # The gain max_current_a chose (40 mV: 0.4 A on 0.1 ohm) is the limit, not max_current_a itself.
    assert "end of its range (40.00 mV of ±40 mV): current beyond 0.4 A" in reading.error, reading.error


def test_samples_are_spread_evenly_and_stamped_at_the_window_middle(clock):
    cfg = constant_config(window_s=2.0, interval_s=10.0)
    reader, _ = make_reader(cfg, clock)
    t0, wall0 = clock(), clock.wall_ms()
    cycle = reader.measure()
    assert clock.sleeps == pytest.approx([0.1] + [0.2] * 9)
    assert cycle.time_ms == wall0 + 1000
    assert cycle.monotonic_s == pytest.approx(t0 + 1.0)


def test_hardware_averaging_sets_the_adc_fields(clock):
    cfg = constant_config(adc_samples=16)
    reader, bus = make_reader(cfg, clock)
    reader.measure()
    config_word = bus.device(0x40).config
    assert (config_word >> 7) & 0xF == 0xC and (config_word >> 3) & 0xF == 0xC


def test_energy_counter_splits_directions_and_does_not_bridge_gaps():
    counter = EnergyCounter()
    counter.add(36.0, 0.0, max_gap_s=20)
    counter.add(36.0, 10.0, max_gap_s=20)    # +0.1 Wh
    counter.add(-72.0, 20.0, max_gap_s=20)   # 0.2 Wh out
    counter.add(36.0, 1000.0, max_gap_s=20)  # a long gap: not bridged (the ledger's rule), adds nothing
    counter.add(36.0, 1020.0, max_gap_s=20)  # two intervals exactly: bridged, +0.2 Wh
    # One skipped slot at interval_s = 3.3: 2 x 3.3 s apart in exact arithmetic, a rounding step more in floats.
    gap = EnergyCounter()
    start = 1234.5
    gap.add(3600.0, start + 6 * 3.3, max_gap_s=2 * 3.3)
    gap.add(3600.0, start + 8 * 3.3, max_gap_s=2 * 3.3)
    assert (start + 8 * 3.3) - (start + 6 * 3.3) > 2 * 3.3 and gap.in_wh == pytest.approx(6.6)
    assert counter.in_wh == pytest.approx(0.1 + 0.2)
    assert counter.out_wh == pytest.approx(0.2)


def test_the_chips_overflow_flag_does_not_touch_readings_derived_from_the_shunt(clock):
    cfg = constant_config()
    reader, bus = make_reader(cfg, clock)
    reader.measure()
    bus.inject(0x40, "overflow", count=None)  # OVF: the chip's own current/power math overflowed
    assert reader._sensors[0].driver.overflow  # the real driver sees the flag
    reading = reader.measure().channels[0]
    assert reading.ok and reading.failed_samples == 0
    assert reading.current_ma == pytest.approx(123.456, abs=0.05)


def test_day_scenario_readings_match_the_model(clock):
    import datetime as dt

    cfg = parse_config({"simulation": {"enabled": True, "scenario": "day", "speed": 1,
                                       "start": dt.datetime(2026, 6, 21, 13, 0)}})
    reader, bus = make_reader(cfg, clock)
    cycle = reader.measure()
    for reading, channel in zip(cycle.channels, cfg.channels):
        volts, amps = bus.model.truth(channel.unit_name, channel.role)  # the model barely moves in 1 s at 1x
        assert reading.bus_voltage_v == pytest.approx(volts, abs=0.01)
        assert reading.current_ma == pytest.approx(amps * 1000, abs=1.0)
        assert reading.power_w == pytest.approx(volts * amps, rel=0.01, abs=0.01)
    assert any(abs(r.current_ma) > 50 for r in cycle.channels)  # midsummer midday: current flows


# -- the Pi's own power: the firmware's flags, from real files standing in for sysfs --------------------
def test_power_flags_from_the_firmwares_get_throttled_word(tmp_path):
    from health import PowerFlagReader, PowerFlags

    word = tmp_path / "get_throttled"
    word.write_text("50005\n")  # under-voltage now, throttled now, and both since boot
    reader = PowerFlagReader(str(word), str(tmp_path / "no-hwmon"))
    assert reader.available
    assert reader.read() == PowerFlags(True, True, True, True)
    word.write_text("50000\n")  # fine now, but it happened since boot
    assert reader.read() == PowerFlags(False, False, True, True)
    word.write_text("0\n")
    assert reader.read() == PowerFlags(False, False, False, False)
    word.write_text("not hex")
    assert reader.read() == PowerFlags()  # unreadable: unknown, never "all fine"
    word.unlink()
    assert reader.read() == PowerFlags()


def test_power_flags_from_the_rpi_volt_hwmon_alarm_and_none_off_a_pi(tmp_path):
    from health import PowerFlagReader, PowerFlags

    hwmon = tmp_path / "hwmon"
    (hwmon / "hwmon0").mkdir(parents=True)
    (hwmon / "hwmon0" / "name").write_text("cpu_thermal\n")
    (hwmon / "hwmon1").mkdir()
    (hwmon / "hwmon1" / "name").write_text("rpi_volt\n")
    alarm = hwmon / "hwmon1" / "in0_lcrit_alarm"
    alarm.write_text("1\n")
    reader = PowerFlagReader(str(tmp_path / "no-get_throttled"), str(hwmon))
    assert reader.read() == PowerFlags(undervoltage=True)  # throttling is not reported there
    alarm.write_text("0\n")
    assert reader.read() == PowerFlags(undervoltage=False)
    off_a_pi = PowerFlagReader(str(tmp_path / "absent"), str(tmp_path / "absent-too"))
    assert not off_a_pi.available and off_a_pi.read() == PowerFlags()


def test_system_monitor_reads_the_power_flags(tmp_path):
    from health import PowerFlagReader, SystemMonitor

    word = tmp_path / "get_throttled"
    word.write_text("1\n")
    reading = SystemMonitor(str(tmp_path), power=PowerFlagReader(str(word), str(tmp_path))).read()
    assert (reading.undervoltage, reading.throttled, reading.undervoltage_since_boot) == (True, False, False)
    off = SystemMonitor(str(tmp_path), power=PowerFlagReader(str(tmp_path / "x"), str(tmp_path / "y"))).read()
    assert off.undervoltage is None and off.throttled is None


def test_system_monitor_reads_the_cpu_temperature_from_one_small_file(tmp_path):
    from health import PowerFlagReader, SystemMonitor

    no_power = PowerFlagReader(str(tmp_path / "x"), str(tmp_path / "y"))
    zone = tmp_path / "temp"
    zone.write_text("48312\n")  # millidegrees, as the kernel writes it
    monitor = SystemMonitor(str(tmp_path), power=no_power, thermal_path=str(zone), hwmon_dir=str(tmp_path / "none"))
    assert monitor.read().cpu_temp_c == pytest.approx(48.312)
    zone.write_text("51000\n")
    assert monitor.read().cpu_temp_c == pytest.approx(51.0)  # read anew every cycle
    zone.write_text("garbage")
    assert monitor.read().cpu_temp_c is None
    # no thermal zone: the CPU's hwmon sensor, found once by name
    hwmon = tmp_path / "hwmon"
    for entry, name, milli in (("hwmon0", "acpitz", "27800"), ("hwmon1", "coretemp", "61000")):
        (hwmon / entry).mkdir(parents=True)
        (hwmon / entry / "name").write_text(name + "\n")
        (hwmon / entry / "temp1_input").write_text(milli + "\n")
    monitor = SystemMonitor(str(tmp_path), power=no_power, thermal_path=str(tmp_path / "absent"), hwmon_dir=str(hwmon))
    assert monitor.read().cpu_temp_c == pytest.approx(61.0)
    bare = SystemMonitor(str(tmp_path), power=no_power, thermal_path=str(tmp_path / "absent"),
                         hwmon_dir=str(tmp_path / "absent"))
    assert bare.read().cpu_temp_c is None


# -- values carry the digits the chip resolves, no more (issue 14) ----------------------------------------
def test_resolved_digits_keep_the_steps_digit_and_one_more_per_ten_samples():
    from tools import resolved_digits

    assert resolved_digits(0.004, 1) == 3    # bus voltage, one sample: the 4 mV step is in the third decimal
    assert resolved_digits(0.004, 10) == 4   # an average of ten earns one extra digit, not ten
    assert resolved_digits(0.004, 9) == 3
    assert resolved_digits(0.004, 100) == 5
    assert resolved_digits(0.01, 10) == 3    # shunt voltage in mV (10 uV step)
    assert resolved_digits(0.01 / 0.1, 10) == 2  # current in mA through 0.1 ohm (0.0999... in binary)
    assert resolved_digits(0.0025, 1) == 3
    assert resolved_digits(20.0, 1) == 0
    assert resolved_digits(0.0, 10) == 10    # nothing to resolve: a bounded number of digits all the same


def _decimals(value: float) -> int:
    import decimal

    return max(-decimal.Decimal(repr(value)).as_tuple().exponent, 0)


def test_values_carry_no_digits_beyond_what_the_chip_resolves(clock):
    import datetime as dt

    from tools import resolved_digits

    # The day carries ADC noise: the samples of one window differ, so their averages have digits to cut
    # (at real speed, so V and I hardly move within a window and their averages' product is the power).
    cfg = parse_config({"simulation": {"enabled": True, "scenario": "day", "speed": 1,
                                       "start": dt.datetime(2026, 6, 21, 12)}})
    reader, _ = make_reader(cfg, clock)
    used = {"bus_voltage_v": set(), "shunt_voltage_mv": set(), "current_ma": set()}
    by_name = {c.name: c for c in cfg.channels}
    for _ in range(30):
        cycle = reader.measure()
        clock.advance(cfg.sampling.interval_s - cfg.sampling.window_s)
        for r in cycle.channels:
            n, ohms = r.samples, by_name[r.name].shunt_ohms
            assert n == 10
            for name in ("bus_voltage_v", "shunt_voltage_mv", "current_ma", "power_w", "energy_in_wh",
                         "energy_out_wh"):
                assert type(getattr(r, name)) is float, name  # field types stay stable
            allowed = {"bus_voltage_v": resolved_digits(BUS_LSB_V, n),
                       "shunt_voltage_mv": resolved_digits(SHUNT_LSB_MV, n),
                       "current_ma": resolved_digits(SHUNT_LSB_MV / ohms, n)}
            assert allowed == {"bus_voltage_v": 4, "shunt_voltage_mv": 3, "current_ma": 2}  # default 0.1 ohm
            for name, digits in allowed.items():
                assert _decimals(getattr(r, name)) <= digits, (name, getattr(r, name))
                used[name].add(_decimals(getattr(r, name)) == digits)
            # Power: 4 mV x I + V x the current step, averaged; the product of the rounded V and I within it.
            step_w = (abs(r.bus_voltage_v) * SHUNT_LSB_MV / ohms + abs(r.current_ma) * BUS_LSB_V) / 1000
            assert _decimals(r.power_w) <= resolved_digits(step_w * 0.99, n), r
            assert r.power_w == pytest.approx(r.bus_voltage_v * r.current_ma / 1000, abs=step_w)
            energy_digits = tools.energy_digits(by_name[r.name], cfg.sampling.interval_s)
            assert energy_digits <= resolved_digits(step_w * 0.99 * cfg.sampling.interval_s / 3600, 1)
            assert _decimals(r.energy_in_wh) <= energy_digits and _decimals(r.energy_out_wh) <= energy_digits, r
    # ... and no fewer: averages that need the extra digit keep it.
    assert all(True in seen for seen in used.values()), used



def test_energy_counters_never_read_lower_from_one_cycle_to_the_next_through_dusk(clock):
    """The counters are running totals (a Prometheus counter, Home Assistant's total_increasing): rounded to
    digits that followed each cycle's power (fewer in daylight, more at night, when the panel's bus voltage
    falls to 0) they read lower now and then. Rounded to the channel's fixed digits, never."""
    import datetime as dt

    cfg = parse_config({"simulation": {"speed": 20, "start": dt.datetime(2025, 6, 21, 21)}})  # the embedded default
    bus = build_simulated_bus(cfg, clock)
    reader = read_data(bus, cfg.channels, cfg.sampling, clock=clock, sleep=clock.sleep, wall_ms=clock.wall_ms,
                       energy_time_scale=20.0)  # the points carry the model's time
    last: dict[str, tuple[float, float]] = {}
    digits = {c.name: tools.energy_digits(c, cfg.sampling.interval_s * 20) for c in cfg.channels}
    assert set(digits.values()) <= {4, 5}  # the default channels (0.1 ohm, 2 or 3 A), a cycle of 60 s
    for _ in range(600):
        start = clock()
        cycle = reader.measure()
        clock.advance(start + cfg.sampling.interval_s - clock())
        for r in cycle.channels:
            assert _decimals(r.energy_in_wh) <= digits[r.name] and _decimals(r.energy_out_wh) <= digits[r.name]
            before = last.get(r.name, (0.0, 0.0))
            assert r.energy_in_wh >= before[0] and r.energy_out_wh >= before[1], (r.name, before, r)
            last[r.name] = (r.energy_in_wh, r.energy_out_wh)
    assert all(in_wh > 0 for in_wh, _ in last.values())  # the evening's sun was counted

# -- the Pi's health from kept-open /proc files (issue 13) ------------------------------------------------
_STAT = b"cpu  100 5 50 800 20 3 2 0 10 0\ncpu0 50 2 25 400 10 1 1 0 5 0\nintr 1\n"
_MEMINFO = b"MemTotal:        1000000 kB\nMemFree:          100000 kB\nMemAvailable:     400000 kB\nBuffers: 1 kB\n"
_NET_DEV = (b"Inter-|   Receive                                                |  Transmit\n"
            b" face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
            b"    lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0\n"
            b"  eth0:  500000     300    0    0    0     0          0         0    70000     200    0    0    0     0       0          0\n")


def _fake_proc(root, stat=_STAT, meminfo=_MEMINFO, net_dev=_NET_DEV):
    (root / "net").mkdir(parents=True, exist_ok=True)
    for name, data in (("stat", stat), ("meminfo", meminfo), ("net/dev", net_dev)):
        if data is not None:
            (root / name).write_bytes(data)
    return root


def test_proc_parsers_give_what_psutil_computes():
    from procfs import cpu_percent, cpu_ticks, memory_used_bytes, net_bytes

    before = cpu_ticks(_STAT)
    assert before == (100, 5, 50, 800, 20, 3, 2, 0, 10, 0)
    # +30 user (of which 10 guest, already inside user), +10 system, +50 idle, +10 iowait, +10 guest:
    # total 110 - 10 guest = 100; busy = 100 - 50 idle - 10 iowait = 40 -> 40.0 %
    after = cpu_ticks(b"cpu  130 5 60 850 30 3 2 0 20 0\n")
    assert cpu_percent(before, after) == 40.0
    assert cpu_percent(after, after) == 0.0  # no time passed: psutil says 0.0 too
    assert cpu_percent(after, before) == 0.0  # counters that went backwards count 0
    assert cpu_ticks(b"intr 1\n") is None and cpu_ticks(b"cpu  1 2 x 4 5\n") is None
    assert memory_used_bytes(_MEMINFO) == 600000 * 1024  # psutil: total - available
    assert memory_used_bytes(b"MemTotal: 1000 kB\nMemAvailable: 0 kB\n") is None  # psutil estimates then
    assert memory_used_bytes(b"MemTotal: 1000 kB\n") is None
    assert net_bytes(_NET_DEV) == (71000, 501000)  # (sent, received), every interface
    assert net_bytes(_NET_DEV + b"  bad: x\n") is None


def test_system_monitor_reads_kept_open_proc_files_and_falls_back_to_psutil(tmp_path):
    import psutil

    from health import PowerFlagReader, SystemMonitor

    no_power = PowerFlagReader(str(tmp_path / "x"), str(tmp_path / "y"))
    proc = _fake_proc(tmp_path / "proc")
    monitor = SystemMonitor(str(tmp_path), power=no_power, thermal_path=str(tmp_path / "none"),
                            hwmon_dir=str(tmp_path / "none"), proc_dir=str(proc))
    first = monitor.read()
    assert first.memory_used_mb == pytest.approx(600000 / 1024)
    assert (first.net_sent_bytes, first.net_recv_bytes, first.cpu_percent) == (0, 0, 0.0)
    # the same open files give the new values: the kernel (here: the file) is read again from offset 0
    (proc / "stat").write_bytes(b"cpu  130 5 60 850 30 3 2 0 20 0\n")
    (proc / "net" / "dev").write_bytes(_NET_DEV.replace(b"500000", b"500300").replace(b"70000", b"70050"))
    (proc / "meminfo").write_bytes(_MEMINFO.replace(b"400000", b"300000"))
    second = monitor.read()
    assert (second.cpu_percent, second.net_sent_bytes, second.net_recv_bytes) == (40.0, 50, 300)
    assert second.memory_used_mb == pytest.approx(700000 / 1024)
    monitor.close()
    # files that cannot be read: psutil reads this machine's values instead
    bare = SystemMonitor(str(tmp_path), power=no_power, thermal_path=str(tmp_path / "none"),
                         hwmon_dir=str(tmp_path / "none"), proc_dir=str(tmp_path / "no-proc"))
    reading = bare.read()
    assert reading.memory_used_mb == pytest.approx(psutil.virtual_memory().used / 1_048_576, rel=0.05)
    assert reading.net_sent_bytes >= 0 and 0.0 <= reading.cpu_percent <= 100.0


def test_system_monitor_on_this_machine_agrees_with_psutil(tmp_path):
    import psutil

    from health import SystemMonitor

    monitor = SystemMonitor(str(tmp_path))
    counters = psutil.net_io_counters()
    sent, recv = monitor._net_counters()
    assert sent >= counters.bytes_sent and recv >= counters.bytes_recv  # read after psutil: never less
    assert monitor._memory_used_bytes() == pytest.approx(psutil.virtual_memory().used, rel=0.05)
    # free space: one statvfs gives psutil's figure (other writers on the disk may move it a little)
    from procfs import free_bytes

    assert free_bytes(str(tmp_path)) == pytest.approx(psutil.disk_usage(str(tmp_path)).free, abs=4 << 20)
    reading = monitor.read()
    assert reading.disk_free_mb == pytest.approx(psutil.disk_usage(str(tmp_path)).free / 1_048_576, abs=4)
    monitor.close()
