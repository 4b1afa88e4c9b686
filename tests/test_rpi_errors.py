"""Tests for rpi_errors: tiers, blink patterns, the status LED, the handler."""

import logging
import time
import warnings

import pytest
from gpiozero import LED, Device
from gpiozero.exc import PinWarning
from gpiozero.pins.mock import MockFactory

import rpi_errors
from rpi_errors import (
    BLINK_CODES, ConnectionFailedError, CriticalError, ErrorHandler,
    MeasuringError, SendingError, ShortError, SilentError, SolarError,
    StatusLED, Tier, blink_table_markdown, make_led, pattern_steps)

SCALE = 0.01  # 4.4 s MEASURING repetition -> 44 ms


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def mock_factory():
    old = Device.pin_factory
    Device.pin_factory = MockFactory()
    yield Device.pin_factory
    Device.pin_factory.reset()
    Device.pin_factory = old


@pytest.fixture
def led_pin(mock_factory):
    led = LED(18)
    yield led, mock_factory.pin(18)
    led.close()


class StepRecorder:
    """The LED thread's wait: records each step as (pin lit, seconds) before holding it.

    Repetitions are then found from the steps the LED really played, not guessed from how long a
    state lasted, which a busy machine stretches at will."""

    def __init__(self, pin):
        self.pin = pin
        self.steps: list[tuple[bool, float]] = []

    def __call__(self, event, seconds):
        self.steps.append((bool(self.pin.state), seconds))
        return event.wait(seconds)


@pytest.fixture
def status(led_pin):
    led, pin = led_pin
    recorder = StepRecorder(pin)
    sl = StatusLED(led, time_scale=SCALE, wait=recorder)
    sl.recorder = recorder
    yield sl, pin
    sl.close()


def wait_for(predicate, timeout=10.0):
    """Poll until `predicate()` holds; False after `timeout` s (generous: a deadline, not a timing)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return False


def one_full_repetition(sl, pattern):
    """The (lit, seconds) steps of the first complete repetition played after this call."""
    pause = (False, pattern_steps(pattern)[-1][1] * SCALE)
    sl.recorder.steps.clear()
    assert wait_for(lambda: sl.recorder.steps.count(pause) >= 2)
    steps = list(sl.recorder.steps)
    first, second = [i for i, step in enumerate(steps) if step == pause][:2]
    return steps[first + 1:second + 1]


# --- exceptions and patterns ----------------------------------------------

def test_exception_tree_tiers_and_keys():
    expected = {CriticalError: Tier.CRITICAL,
                ConnectionFailedError: Tier.CONNECTION,
                SendingError: Tier.SENDING, MeasuringError: Tier.MEASURING,
                ShortError: Tier.SHORT, SilentError: Tier.SILENT}
    for cls, tier in expected.items():
        err = cls("boom")
        assert isinstance(err, SolarError)
        assert err.tier is tier
        assert err.key == cls.__name__
        assert str(err) == err.message == "boom"
    assert MeasuringError("x", key="measure:red").key == "measure:red"


def test_every_tier_has_a_pattern_and_counts_are_the_2023_codes():
    assert set(BLINK_CODES) == {None, *Tier}
    counts = {t: BLINK_CODES[t].blinks for t in
              (Tier.SHORT, Tier.SENDING, Tier.MEASURING, Tier.CRITICAL,
               Tier.CONNECTION)}
    assert counts == {Tier.SHORT: 1, Tier.SENDING: 2, Tier.MEASURING: 3,
                      Tier.CRITICAL: 4, Tier.CONNECTION: 5}
    assert BLINK_CODES[Tier.SHORT].on_s <= 0.1  # one *quick* blink
    assert pattern_steps(BLINK_CODES[Tier.SILENT]) == pattern_steps(
        BLINK_CODES[None])
    with pytest.raises(TypeError):
        BLINK_CODES[None] = BLINK_CODES[Tier.SHORT]


def lit_fraction(pattern):
    steps = pattern_steps(pattern)
    return sum(s for on, s in steps if on) / sum(s for _, s in steps)


def test_all_well_cannot_be_mistaken_for_any_error_code():
    """All well is mostly on with a brief dip; every error code is mostly off and counted."""
    well = BLINK_CODES[None]
    assert lit_fraction(well) >= 0.9
    dips = [s for on, s in pattern_steps(well) if not on]
    assert dips and max(dips) <= 0.3  # brief, yet visible
    for tier in (Tier.SHORT, Tier.SENDING, Tier.MEASURING, Tier.CRITICAL,
                 Tier.CONNECTION, Tier.ROLLBACK):
        code = BLINK_CODES[tier]
        assert lit_fraction(code) <= 0.5, tier
        assert max(s for on, s in pattern_steps(code) if not on) >= 2.0, tier


def test_pattern_steps():
    assert pattern_steps(BLINK_CODES[Tier.MEASURING]) == [
        (True, 0.4), (False, 0.4), (True, 0.4), (False, 0.4),
        (True, 0.4), (False, 2.4)]
    assert pattern_steps(BLINK_CODES[Tier.SHORT]) == [(True, 0.1), (False, 2.4)]
    assert pattern_steps(BLINK_CODES[Tier.CRITICAL]) == [
        (True, 0.4), (False, 0.4)] * 3 + [(True, 0.4), (False, 2.4)]
    heartbeat = pattern_steps(BLINK_CODES[None])
    assert heartbeat == [(True, 4.8), (False, 0.2)]
    assert sum(s for _, s in heartbeat) == pytest.approx(5.0)


def test_blink_table_has_one_row_per_code_count_first():
    table = blink_table_markdown()
    rows = table.strip().splitlines()
    assert rows[0] == "| LED shows | Meaning | What to do |"
    # all well, 1..6 blinks, off: SILENT looks like all well and has no row
    assert len(rows) == 2 + 8
    for pattern in BLINK_CODES.values():
        assert pattern.meaning in table or pattern is BLINK_CODES[Tier.SILENT]
        assert pattern.action
    shows = [row.split(" | ")[0].lstrip("| ") for row in rows[2:]]
    assert shows == ["On, with a brief dip every 5 s",
                     "1 quick blink, then a pause", "2 blinks, then a pause",
                     "3 blinks, then a pause", "4 blinks, then a pause",
                     "5 blinks, then a pause", "6 blinks, then a pause", "Off"]
    by_count = dict(zip(shows, rows[2:]))
    assert "refused" in by_count["2 blinks, then a pause"]
    assert "sensor" in by_count["3 blinks, then a pause"]
    assert "cannot run" in by_count["4 blinks, then a pause"]
    assert "network or the database" in by_count["5 blinks, then a pause"]
    assert "under-voltage" in by_count["1 quick blink, then a pause"]
    assert "update failed and was undone" in by_count["6 blinks, then a pause"]
    assert "acknowledge" in by_count["6 blinks, then a pause"]


# --- StatusLED ------------------------------------------------------------

@pytest.mark.parametrize("tier", [Tier.SHORT, Tier.SENDING, Tier.MEASURING,
                                  Tier.CRITICAL, Tier.CONNECTION, Tier.ROLLBACK])
def test_led_plays_exact_blink_count(status, tier):
    sl, pin = status
    sl.show(tier)
    assert sl.showing is tier
    rep = one_full_repetition(sl, BLINK_CODES[tier])
    n = BLINK_CODES[tier].blinks
    assert len(rep) == 2 * n  # n on and n off steps, nothing else
    assert [lit for lit, _ in rep] == [True, False] * n  # what the (mock) pin really showed
    assert rep == [(lit, seconds * SCALE) for lit, seconds in pattern_steps(BLINK_CODES[tier])]


def test_all_well_is_mostly_on_with_a_brief_dip(status):
    sl, pin = status
    assert sl.showing is None
    rep = one_full_repetition(sl, BLINK_CODES[None])
    assert rep == [(True, 4.8 * SCALE), (False, 0.2 * SCALE)]  # on for 4.8 s, a 0.2 s dip


def test_show_never_blocks_and_close_is_prompt(led_pin):
    led, pin = led_pin
    sl = StatusLED(led)  # real durations: one CONNECTION repetition is 6 s
    t0 = time.perf_counter()
    sl.show(Tier.CONNECTION)
    sl.show(Tier.CONNECTION)  # no-op
    sl.show(Tier.CRITICAL)
    assert time.perf_counter() - t0 < 1.0  # far below the 6 s a blocking show() would take
    assert wait_for(lambda: sl.showing is Tier.CRITICAL)
    t0 = time.perf_counter()
    sl.close()
    sl.close()  # idempotent
    assert not sl._thread.is_alive()  # ended, not left behind by close()'s 2 s join deadline
    assert time.perf_counter() - t0 < 1.5  # woken at once, not at the end of its 6 s step
    assert not led.is_lit


def test_show_interrupts_current_repetition(status):
    sl, pin = status
    sl.show(Tier.CONNECTION)
    pin.clear_states()
    sl.show(Tier.SENDING)
    rep = one_full_repetition(sl, BLINK_CODES[Tier.SENDING])
    assert [lit for lit, _ in rep] == [True, False] * 2


# --- ErrorHandler ---------------------------------------------------------

def test_most_severe_wins_and_fallback(status):
    sl, _ = status
    handler = ErrorHandler(sl, clock=FakeClock())
    handler.report(MeasuringError("red_house 0x40 did not answer",
                                  key="measure:red_house"))
    handler.report(MeasuringError("blue_house 0x41 did not answer",
                                  key="measure:blue_house"))
    assert sl.showing is handler.top_tier is Tier.MEASURING
    handler.report(ConnectionFailedError("db down", key="send:connect"))
    assert sl.showing is Tier.CONNECTION
    handler.report(ShortError("cycle overran", key="cycle"))
    assert sl.showing is Tier.CONNECTION
    assert handler.summary() == "CONNECTION: db down (+3 more)"
    handler.clear("send:connect")
    assert sl.showing is Tier.MEASURING
    assert handler.summary() == (
        "MEASURING: red_house 0x40 did not answer (+2 more)")
    handler.clear_prefix("measure:")
    assert sl.showing is Tier.SHORT
    handler.clear("cycle")
    handler.clear("never-reported")  # no-op
    assert sl.showing is None and handler.top_tier is None
    assert handler.summary() == "all well" and handler.active == {}


def test_silent_never_changes_led_and_is_not_active(status):
    sl, _ = status
    handler = ErrorHandler(sl, clock=FakeClock())
    handler.report(SilentError("retrying once", key="note"))
    assert sl.showing is None and handler.active == {}
    handler.report(SendingError("refused", key="send"))
    handler.report(SilentError("retrying once", key="note"))
    assert sl.showing is Tier.SENDING
    assert handler.top_tier is Tier.SENDING


def test_active_snapshot(status):
    sl, _ = status
    clock = FakeClock()
    handler = ErrorHandler(sl, clock=clock)
    for _ in range(3):
        handler.report(MeasuringError("no answer", key="measure:a"))
        clock.now += 1
    tier, message, count, since = handler.active["measure:a"]
    assert (tier, message, count, since) == (Tier.MEASURING, "no answer", 3,
                                             1000.0)


def test_persistent_fault_does_not_flood_the_log(caplog):
    clock = FakeClock()
    handler = ErrorHandler(None, clock=clock, summary_s=300)
    caplog.set_level(logging.DEBUG, logger=rpi_errors.__name__)
    for _ in range(1000):  # one report per 1-s cycle for 1000 s
        handler.report(MeasuringError("red_house 0x40 did not answer",
                                      key="measure:red_house"))
        handler.tick()
        clock.now += 1
    handler.clear("measure:red_house")
    handler.clear("measure:red_house")
    records = [r for r in caplog.records if r.name == rpi_errors.__name__]
    starts = [r for r in records if r.levelno == logging.WARNING]
    summaries = [r for r in records if "still active" in r.getMessage()]
    clears = [r for r in records if "cleared" in r.getMessage()]
    assert len(starts) == 1
    assert "MEASURING" in starts[0].getMessage()
    assert "red_house 0x40 did not answer" in starts[0].getMessage()
    assert len(summaries) == 3  # at 300, 600 and 900 s
    assert "300 times in the last 300 s" in summaries[0].getMessage()
    assert len(clears) == 1
    assert "cleared after 1000 occurrences over 1000 s" in (
        clears[0].getMessage())
    assert len(records) == 5


def test_log_levels_by_tier(caplog):
    handler = ErrorHandler(None, clock=FakeClock())
    caplog.set_level(logging.DEBUG, logger=rpi_errors.__name__)
    handler.report(CriticalError("config broken", key="config"))
    handler.report(SilentError("note", key="note"))
    handler.report(SilentError("note", key="note"))  # rate-limited
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels == [(logging.ERROR, "CRITICAL [config]: config broken"),
                      (logging.INFO, "SILENT [note]: note")]


# --- make_led -------------------------------------------------------------

def test_make_led_falls_back_to_mock_off_a_pi(monkeypatch, caplog):
    old = Device.pin_factory
    monkeypatch.setattr(Device, "pin_factory", None)
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    caplog.set_level(logging.INFO, logger=rpi_errors.__name__)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        led = make_led(18)
        led2 = make_led(19)  # factory already chosen: no second line
    try:
        assert isinstance(Device.pin_factory, MockFactory)
        led.on()
        assert led.is_lit and Device.pin_factory.pin(18).state
        infos = [r for r in caplog.records
                 if r.name == rpi_errors.__name__
                 and r.levelno >= logging.INFO]
        assert len(infos) == 1
        assert "simulated" in infos[0].getMessage()
        assert not [w for w in caught if issubclass(w.category, PinWarning)]
    finally:
        led.close()
        led2.close()
        Device.pin_factory.reset()
        Device.pin_factory = old


def test_import_does_not_touch_gpio():
    import subprocess
    import sys
    code = ("import sys, rpi_errors; "
            "assert 'gpiozero' not in sys.modules, 'gpiozero imported'")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=rpi_errors.__file__.rsplit("/", 1)[0])
