"""The clock: held back until NTP sync on a Pi, re-stamped from boot time, quarantined if it never syncs."""
from __future__ import annotations

from clock import STA_UNSYNC, ClockGuard, adjtimex_status, detect_sync
from config import parse_config
from daemon import Daemon
from outbox import Outbox
from rpi_errors import ErrorHandler, Tier
from simulator import build_simulated_bus
from tools import read_data

HOURS_3_MS = 3 * 3600 * 1000


def test_detect_sync_sources(tmp_path):
    marker = tmp_path / "synchronized"
    assert detect_sync(marker, status=lambda: STA_UNSYNC) is False
    assert detect_sync(marker, status=lambda: 0) is True
    assert detect_sync(marker, status=lambda: None, fallback=lambda: None) is None
    assert detect_sync(marker, status=lambda: None, fallback=lambda: True) is True  # no adjtimex: ask systemd
    marker.write_text("")
    assert detect_sync(marker, status=lambda: STA_UNSYNC) is True
    assert isinstance(adjtimex_status(), int)  # the real syscall answers here


class Clocks:
    """Injected clock sources: boot time advances with the fake monotonic clock; wall = boot + offset."""

    def __init__(self, clock, offset_ms):
        self.clock = clock
        self.offset_ms = offset_ms
        self.synced = False

    def boot_ms(self):
        return round(self.clock() * 1000)

    def wall_ms(self):
        return self.boot_ms() + self.offset_ms


def test_guard_trusts_a_non_pi_and_waits_for_sync_on_a_pi(clock):
    c = Clocks(clock, 10**12)
    assert ClockGuard("auto", is_pi=False, synced=lambda: False, wall_ms=c.wall_ms, boot_ms=c.boot_ms,
                      boot_id=lambda: "b").check().trusted
    guard = ClockGuard("auto", is_pi=True, synced=lambda: c.synced, wall_ms=c.wall_ms, boot_ms=c.boot_ms,
                       boot_id=lambda: "b")
    assert not guard.check().trusted
    c.synced = True
    assert not guard.check().trusted  # sync is asked at most every 30 s (it may start a process)
    clock.advance(30)
    state = guard.check()
    assert state.trusted and state.newly_trusted
    c.synced = False  # a flicker later in the boot does not un-trust it
    assert guard.check().trusted and not guard.check().newly_trusted
    assert ClockGuard("always", is_pi=True, synced=lambda: False).check().trusted


def test_a_slow_sync_check_does_not_stamp_the_cycle_early(clock):
    """Asking for sync may run timedatectl (hundreds of ms): the boot time the cycle is stamped from is read
    after it, next to the monotonic reading the caller takes, not before."""
    c = Clocks(clock, 10**12)

    def slow_sync():
        clock.advance(0.4)
        return False

    guard = ClockGuard("sync", is_pi=True, synced=slow_sync, wall_ms=c.wall_ms, boot_ms=c.boot_ms, boot_id=lambda: "b")
    state = guard.check()
    assert state.boot_ms == c.boot_ms()  # not 400 ms behind the moment check() returned


def test_guard_notices_jumps(clock):
    c = Clocks(clock, 10**12)
    guard = ClockGuard("always", wall_ms=c.wall_ms, boot_ms=c.boot_ms, boot_id=lambda: "b")
    guard.check()
    clock.advance(10)
    assert guard.check().jump_ms == 0
    c.offset_ms += HOURS_3_MS
    assert guard.check().jump_ms == HOURS_3_MS


def make_daemon(tmp_path, clock, clocks, boot_id="boot-1"):
    cfg = parse_config({"simulation": {"enabled": True, "scenario": "constant"},
                        "store": {"dir": str(tmp_path / "store")}})
    bus = build_simulated_bus(cfg, clock)
    outbox = Outbox(cfg.store.dir, wall_ms=clocks.wall_ms)
    reader = read_data(bus, cfg.channels, cfg.sampling, clock=clock, sleep=clock.sleep, wall_ms=clocks.wall_ms)
    guard = ClockGuard("sync", synced=lambda: clocks.synced, wall_ms=clocks.wall_ms, boot_ms=clocks.boot_ms,
                       boot_id=lambda: boot_id, recheck_s=0)
    return Daemon(cfg, reader, outbox, ErrorHandler(None, clock=clock), clock=clock, wait=clock.wait,
                  clock_guard=guard), outbox


def test_unsynced_readings_are_held_then_restamped_from_boot_time(tmp_path, clock):
    true_offset = 1_780_000_000_000 - round(clock() * 1000)
    clocks = Clocks(clock, true_offset - HOURS_3_MS)  # the Pi was off for 3 h: its clock is 3 h behind
    daemon, outbox = make_daemon(tmp_path, clock, clocks)
    daemon.run(cycles=3)
    assert outbox.pending(100, 10**6) == []  # nothing goes out with a wrong time
    assert outbox.stats().held == 12  # four channels, three cycles
    assert daemon.handler.top_tier == Tier.SHORT
    wrong = [t for t, _, s in outbox.export() if s == "held"]
    clocks.offset_ms = true_offset  # NTP steps the clock
    clocks.synced = True
    daemon.run_cycle()
    rows = list(outbox.export())
    assert all(s == "unsent" for _, _, s in rows) and len(rows) == 16
    fixed = [t for t, _, _ in rows[:12]]
    assert [f - w for f, w in zip(fixed, wrong)] == [HOURS_3_MS] * 12
    assert all(line.endswith(f" {t}") for t, line, _ in rows)
    # the held readings keep their 3 s spacing (the default interval), and the first synced cycle
    # (started right after the third, 0.95 s later) lines up with them on the true clock
    electricity = [t for t, line, _ in rows if "unit=red_house" in line]
    assert [b - a for a, b in zip(electricity, electricity[1:])] == [3_000, 3_000, 950]
    assert daemon.handler.top_tier is None


def test_readings_of_a_boot_that_never_synced_are_quarantined(tmp_path, clock):
    clocks = Clocks(clock, 10**12)
    daemon, outbox = make_daemon(tmp_path, clock, clocks, boot_id="boot-1")
    daemon.run(cycles=2)
    outbox.close()
    _, outbox2 = make_daemon(tmp_path, clock, clocks, boot_id="boot-2")
    assert outbox2.quarantine_stale_held("boot-2") == 8
    stats = outbox2.stats()
    assert stats.held == 0 and stats.quarantined == 8
    reasons = outbox2._db.execute("SELECT DISTINCT reason FROM quarantine").fetchall()
    assert reasons == [("the clock never synced during boot boot-1: time unknown",)]


def test_a_restart_within_the_same_boot_after_sync_releases_what_the_first_run_held(tmp_path, clock):
    true_offset = 1_780_000_000_000
    clocks = Clocks(clock, true_offset - HOURS_3_MS)
    daemon, outbox = make_daemon(tmp_path, clock, clocks)
    daemon.run(cycles=2)
    outbox.close()
    clocks.offset_ms, clocks.synced = true_offset, True  # synced while the daemon was restarting
    daemon2, outbox2 = make_daemon(tmp_path, clock, clocks)
    daemon2.run(cycles=1)
    assert outbox2.stats().held == 0
    assert all(t > true_offset for t, _, _ in outbox2.export())


def test_cycles_held_in_memory_while_the_store_failed_are_released_when_it_recovers(tmp_path, clock):
    clocks = Clocks(clock, 1_780_000_000_000 - HOURS_3_MS)
    daemon, outbox = make_daemon(tmp_path, clock, clocks)
    daemon.run(cycles=1)
    outbox._db.execute("PRAGMA query_only = ON")  # the store cannot be written
    daemon.run_cycle()
    daemon.run_cycle()  # two unsynced cycles held in memory
    clocks.offset_ms += HOURS_3_MS
    clocks.synced = True
    daemon.run_cycle()  # synced, still cannot store
    outbox._db.execute("PRAGMA query_only = OFF")
    daemon.run_cycle()
    assert outbox.stats().held == 0 and outbox.stats().stored_total == 5 * 4


def test_an_ntp_step_during_the_window_cannot_leave_the_old_time_on_a_trusted_cycle(tmp_path, clock):
    clocks = Clocks(clock, 1_780_000_000_000)
    daemon, outbox = make_daemon(tmp_path, clock, clocks)
    clocks.synced = True
    original = daemon.reader.measure

    def measure_then_step():
        cycle = original()
        clocks.offset_ms += HOURS_3_MS  # NTP steps the clock just after the window
        return cycle
    daemon.reader.measure = measure_then_step
    cycle = daemon.run_cycle()
    assert cycle.time_ms == round(cycle.monotonic_s * 1000) + clocks.offset_ms
    assert all(t == cycle.time_ms for t, _, _ in outbox.export())


def test_an_unreadable_boot_id_makes_each_run_its_own_boot(tmp_path):
    from clock import read_boot_id

    first, second = read_boot_id(tmp_path / "missing"), read_boot_id(tmp_path / "missing")
    assert first.startswith("unknown-") and first != second
