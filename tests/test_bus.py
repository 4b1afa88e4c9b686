"""The bus lies: a bus that stays stuck (every transaction fails, as with SDA held low).

The real adafruit driver over the emulated bus, with the simulator's `stuck` fault."""
from __future__ import annotations

import errno

import pytest

import main as main_mod
from config import parse_config
from daemon import Daemon, load_energy
from outbox import Outbox
from rpi_errors import ErrorHandler, Tier
from simulator import build_simulated_bus
from tools import read_data
from health import SystemMonitor

CFG = {"simulation": {"enabled": True, "scenario": "constant"}}


def test_the_simulator_can_hold_the_whole_bus_stuck(clock):
    bus = build_simulated_bus(parse_config(CFG), clock)
    assert bus.scan() == [0x40, 0x41, 0x44, 0x45]
    bus.inject(None, "stuck", count=None)  # until cleared
    assert bus.scan() == []
    for address in (0x40, 0x45, 0x10):  # present, present, absent: all the same on a stuck bus
        with pytest.raises(OSError) as err:
            bus.writeto(address, b"\x00")
        assert err.value.errno == errno.ETIMEDOUT
    bus.clear_faults()
    assert bus.scan() == [0x40, 0x41, 0x44, 0x45]
    bus.writeto(0x40, b"\x00")
    bus.inject(None, "stuck", count=2)  # or for a number of transactions
    for _ in range(2):
        with pytest.raises(OSError):
            bus.writeto(0x41, b"\x00")
    bus.writeto(0x41, b"\x00")
    with pytest.raises(ValueError, match="whole bus"):
        bus.inject(0x40, "stuck")
    with pytest.raises(ValueError, match="needs an address"):
        bus.inject(None, "nack")


def test_a_stuck_bus_keeps_the_daemon_measuring_reopens_on_a_schedule_and_recovers_by_itself(tmp_path, clock, caplog):
    cfg = parse_config({**CFG, "store": {"dir": str(tmp_path / "store")}})
    bus = build_simulated_bus(cfg, clock)
    reopened = []
    reopen = main_mod.bus_reopener(cfg, main_mod.BusChoice(bus, True, "simulated"))

    def counting_reopen(old):
        reopened.append(clock())
        return reopen(old)

    outbox = Outbox(cfg.store.dir, wall_ms=clock.wall_ms)
    reader = read_data(bus, cfg.channels, cfg.sampling, energy=load_energy(outbox), clock=clock, sleep=clock.sleep,
                       wall_ms=clock.wall_ms, reopen_bus=counting_reopen)
    handler = ErrorHandler(None, clock=clock)
    daemon = Daemon(cfg, reader, outbox, handler, monitor=SystemMonitor(str(tmp_path)), clock=clock,
                    wait=clock.wait)
    daemon.run(cycles=2)
    assert handler.top_tier is None
    bus.inject(None, "stuck", count=None)  # SDA held low from now on
    daemon.run(cycles=2 + 20)
    assert daemon.cycles_done == 22  # never stopped measuring
    assert handler.top_tier == Tier.MEASURING
    assert "I2C bus stuck" in handler.active["measure:bus"].message
    assert all(f"measure:{c.name}" in handler.active for c in cfg.channels)
    assert len(reopened) == 3  # after 3 stuck cycles, then every 6: cycles 3, 9 and 15
    assert reader.bus_reopens == 3 and caplog.text.count("re-opening it") == 3
    stored = outbox.stats().stored_total
    assert stored == 2 * 5 + 20  # only the system point of each stuck cycle (channels_failed=4): never a zero
    bus.clear_faults()  # the bus comes back
    daemon.run(cycles=23)
    assert handler.top_tier is None and "measure:bus" not in handler.active
    assert outbox.stats().stored_total == stored + 5
    assert len(reopened) == 3
    outbox.close()


def test_a_failed_reopen_leaves_the_old_bus_open_for_the_next_try(monkeypatch):
    """The Pi's re-open opens /dev/i2c-N anew before it closes the stuck handle: when the new one cannot be
    opened (an adapter briefly gone), the old one is still a bus (Blinka's deinit deletes its handle, after
    which every transaction would raise AttributeError and no later re-open would be tried). No I2C adapter
    exists here, so adafruit_extended_bus's ExtendedI2C is the one stand-in."""
    import sys
    import types

    class Old:
        closed = False

        def deinit(self):
            self.closed = True

    opened = []

    def extended_i2c(bus_id, frequency=None):
        if not opened:
            opened.append("failed")
            raise ValueError(f"no /dev/i2c-{bus_id}")
        opened.append("new")
        return f"bus {bus_id}"

    monkeypatch.setitem(sys.modules, "adafruit_extended_bus", types.SimpleNamespace(ExtendedI2C=extended_i2c))
    cfg = parse_config({})
    old = Old()
    reopen = main_mod.bus_reopener(cfg, main_mod.BusChoice(old, False, "i2c"))
    with pytest.raises(ValueError):
        reopen(old)
    assert not old.closed  # still usable: the loop keeps it and tries again later
    assert reopen(old) == f"bus {cfg.i2c.bus}" and old.closed


class SlowFailures:
    """The emulated bus, with the time a real adapter spends before it gives up (1 s of the fake clock for
    each failed transaction)."""

    def __init__(self, bus, clock) -> None:
        self._bus, self._clock = bus, clock

    def __getattr__(self, name):
        return getattr(self._bus, name)

    def writeto_then_readfrom(self, *args, **kwargs):
        try:
            self._bus.writeto_then_readfrom(*args, **kwargs)
        except OSError:
            self._clock.advance(1.0)
            raise

def test_transactions_that_time_out_cannot_stretch_a_window_much_past_its_length(clock):
    """On a Pi's stuck bus every transaction fails only after the adapter's timeout (about 1 s): ten passes
    of four channels would take 40 s a cycle. Past a window and a step from the first pass, the rest of the
    window's samples are lost instead; a bus that answers is sampled in full as before."""
    cfg = parse_config(CFG)
    bus = build_simulated_bus(cfg, clock)

    reader = read_data(SlowFailures(bus, clock), cfg.channels, cfg.sampling, clock=clock, sleep=clock.sleep,
                       wall_ms=clock.wall_ms)
    reader.measure()
    began = clock()
    healthy = reader.measure()
    assert all(r.ok and r.samples == cfg.sampling.samples for r in healthy.channels)
    assert clock() - began <= cfg.sampling.window_s + 0.01
    bus.inject(None, "stuck", count=None)
    began = clock()
    stuck = reader.measure()
    took = clock() - began
    assert not any(r.ok for r in stuck.channels)
    # Two sensors timing out is a stuck bus: nothing more is tried this cycle (not 10 passes x 4 channels x 1 s).
    assert took <= reader.lead_s + 2 * 1.0 + 0.01, took  # up to the first sample, then two timeouts
    assert "the bus does not answer" in " ".join(r.error for r in stuck.channels)
    bus.clear_faults()
    reader.measure()  # the settings checked again, the bus answers


def test_one_sensor_that_times_out_costs_one_try_a_cycle_and_the_others_keep_every_sample(clock):
    """A single sensor whose transactions time out (a hung chip holding the clock line, about 1 s each on a
    Pi) is tried once a cycle; the other channels are sampled in full, on time."""
    cfg = parse_config(CFG)
    bus = build_simulated_bus(cfg, clock)

    reader = read_data(SlowFailures(bus, clock), cfg.channels, cfg.sampling, clock=clock, sleep=clock.sleep,
                       wall_ms=clock.wall_ms)
    reader.measure()
    bus.inject(0x40, "timeout", count=None)
    reader.measure()  # it times out while sampling: its settings are checked from the next cycle on
    for _ in range(3):
        began = clock()  # the slot: as the daemon does, woken at its first sample and told the slot's start
        clock.advance(reader.lead_s)
        sleeps = len(clock.sleeps)
        cycle = reader.measure(began)
        assert clock() - began <= 1.0 + reader.lead_s + cfg.sampling.window_s + 0.01  # one try, one window
        # The settings check that timed out ran late into the window: it begins afresh, the samples spread
        # over it (a wait before each), not taken back to back as one conversion read ten times.
        assert len(clock.sleeps) - sleeps >= cfg.sampling.samples - 1
        bad = [r for r in cycle.channels if r.address == 0x40]
        assert len(bad) == 1 and not bad[0].ok and "bus timeout" in bad[0].error
        assert all(r.ok and r.samples == cfg.sampling.samples for r in cycle.channels if r.address != 0x40)
