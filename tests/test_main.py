"""The loop, the store wiring and the CLI, on the simulated model."""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config import parse_config
from daemon import Daemon, cycle_points, load_energy
from outbox import Outbox
from rpi_errors import BLINK_CODES, ErrorHandler, MeasuringError, ShortError, Tier
from schema import ELECTRICITY_FIELDS, parse_line
from simulator import build_simulated_bus
from tools import read_data
from health import SystemMonitor

ROOT = Path(__file__).resolve().parent.parent
CHANNEL_KEYS = {"name", "address", "bus_voltage_v", "shunt_voltage_mv", "current_ma", "power_w", "samples",
                "failed_samples", "energy_in_wh", "energy_out_wh", "role"}


def make_daemon(tmp_path, clock, doc=None):
    cfg = parse_config({"simulation": {"enabled": True, "scenario": "constant"},
                        "store": {"dir": str(tmp_path / "store")}, **(doc or {})})
    bus = build_simulated_bus(cfg, clock)
    outbox = Outbox(cfg.store.dir, wall_ms=clock.wall_ms)
    reader = read_data(bus, cfg.channels, cfg.sampling, energy=load_energy(outbox), clock=clock,
                       sleep=clock.sleep, wall_ms=clock.wall_ms)
    handler = ErrorHandler(None, clock=clock)
    starts = []
    daemon = Daemon(cfg, reader, outbox, handler, clock=clock, wait=clock.wait, monitor=SystemMonitor(str(tmp_path)),
                    listeners=[lambda r: starts.append(r.cycle.monotonic_s - cfg.sampling.window_s / 2)])
    return daemon, bus, outbox, starts


def test_cycles_start_on_a_fixed_grid_without_drift(tmp_path, clock):
    daemon, _, _, starts = make_daemon(tmp_path, clock)
    t0 = clock()
    daemon.run(cycles=50)
    assert starts == pytest.approx([t0 + 3 * k for k in range(50)], abs=1e-9)  # the default 3 s


def _sample_times(bus, clock):
    """The clock at each sample pass (the first register read of the first channel in it)."""
    times = []
    transfer = bus.writeto_then_readfrom

    def recording(address, out, into, **kw):
        if address == 0x40 and out[kw.get("out_start", 0)] == 0x02:  # the bus register opens a pass
            times.append(clock())
        return transfer(address, out, into, **kw)

    bus.writeto_then_readfrom = recording
    return times


def test_the_daemon_wakes_once_a_cycle_at_its_first_sample_and_the_samples_keep_their_instants(tmp_path, clock):
    daemon, bus, _, starts = make_daemon(tmp_path, clock)
    daemon.run(cycles=1)  # drivers attached and chips set up
    times = _sample_times(bus, clock)
    clock.sleeps.clear()
    daemon.run(cycles=5)  # four more cycles, on a grid that starts now
    t0 = starts[1]
    step = daemon.config.sampling.window_s / daemon.config.sampling.samples
    assert times == pytest.approx([t0 + 3 * c + (k + 0.5) * step for c in range(4) for k in range(10)], abs=1e-9)
    assert len(clock.sleeps) == 40  # one wait per cycle (to its first sample) and 9 sleeps between samples
    assert [s - t0 for s in starts[1:]] == pytest.approx([0, 3, 6, 9], abs=1e-9)


def test_a_cycle_that_sets_a_chip_up_leaves_it_a_conversion_before_the_first_sample(tmp_path, clock):
    daemon, bus, outbox, _ = make_daemon(tmp_path, clock, {"sampling": {"interval_s": 0.05, "window_s": 0.01,
                                                                        "samples": 2}})
    failed = []
    daemon.listeners.append(lambda report: failed.append(sum(r.failed_samples for r in report.cycle.channels)))
    daemon.run(cycles=1)  # the drivers attach and write each chip's config in this cycle
    bus.inject(0x41, "brownout")  # power-on values: the settings check restores them, conversions restart
    daemon.run(cycles=13)
    assert daemon.reader.restores["green_house"] == 1
    # The brownout itself costs cycle 2 a sample (the chip resets mid-window); the restore in cycle 3 does not.
    assert failed == [0, 1] + [0] * 11  # no sample read before its chip had converted once
    assert sum(1 for _, line, _ in outbox.export() if line.startswith("electricity,")) == 4 * 13


def test_woken_late_the_window_begins_when_the_cycle_does_so_its_samples_stay_spread(tmp_path, clock):
    daemon, bus, _, starts = make_daemon(tmp_path, clock)
    daemon.run(cycles=1)
    times = _sample_times(bus, clock)
    waits = []
    late_wait = clock.wait

    def wait(seconds):  # the machine is busy: this wake-up comes 0.5 s late
        waits.append(seconds)
        late_wait(seconds)
        clock.advance(0.5)
        return False

    daemon.wait = wait
    daemon.run(cycles=2)
    step = daemon.config.sampling.window_s / daemon.config.sampling.samples
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == pytest.approx([step] * 9, abs=1e-9)  # not ten back-to-back reads
    assert times[0] - starts[-1] == pytest.approx(step / 2, abs=1e-9)  # the window starts when woken


def test_overrun_skips_to_the_next_slot_with_a_short_error(tmp_path, clock):
    daemon, _, _, starts = make_daemon(tmp_path, clock)
    def slow_second_cycle(report):
        if len(starts) == 2:
            clock.advance(4)  # this cycle ends 5 s after it began (3 s interval): slot 2 is gone
    daemon.listeners.append(slow_second_cycle)
    t0 = clock()
    seen = []
    daemon.handler.report = (lambda report: (lambda e: (seen.append(e), report(e))))(daemon.handler.report)
    daemon.run(cycles=4)
    assert [s - t0 for s in starts] == pytest.approx([0, 3, 9, 12])
    assert [e.tier for e in seen] == [Tier.SHORT]
    assert "cycle:overrun" not in daemon.handler.active  # cleared by the next punctual cycle
    assert daemon.overruns == 1


def test_every_cycle_is_stored_with_energy_in_the_same_transaction(tmp_path, clock):
    daemon, _, outbox, _ = make_daemon(tmp_path, clock)
    daemon.run(cycles=6)
    rows = list(outbox.export())
    assert len(rows) == 6 * 5  # four channels and one system point per cycle
    assert sum(1 for _, line, _ in rows if line.startswith("system,")) == 6
    energy = load_energy(outbox)
    assert set(energy) == {"red_house", "green_house", "blue_house", "power_plant"}
    # 12.6 V * 250 mA for 15 s (six readings, five gaps of 3 s)
    assert energy["red_house"][0] == pytest.approx(12.6 * 0.25 * 15 / 3600, rel=1e-3)


def test_energy_counters_continue_across_restarts(tmp_path, clock):
    daemon, _, outbox, _ = make_daemon(tmp_path, clock)
    daemon.run(cycles=3)
    first = load_energy(outbox)["red_house"][0]
    outbox.close()
    daemon2, _, outbox2, _ = make_daemon(tmp_path, clock)
    daemon2.run(cycles=3)
    second = load_energy(outbox2)["red_house"][0]
    # the restart gap is not integrated; the new process adds its own two intervals
    assert second == pytest.approx(first * 2, rel=1e-3)


def test_failed_channel_publishes_nothing_and_others_go_on(tmp_path, clock):
    daemon, bus, outbox, _ = make_daemon(tmp_path, clock)
    bus.inject(0x44, "nack", count=None)
    cycle = daemon.run_cycle()
    lines = [line for _, line, _ in outbox.export()]
    assert not any("unit=blue_house" in line for line in lines)
    assert sum(1 for line in lines if line.startswith("electricity,")) == 3
    assert "channels_failed=1i" in [line for line in lines if line.startswith("system")][0]
    assert daemon.handler.top_tier == Tier.MEASURING
    assert [e.key for e in cycle.errors] == ["measure:blue_house"]
    bus.clear_faults()
    daemon.run_cycle()
    assert daemon.handler.top_tier is None


def test_points_carry_site_unit_and_channel_tags(tmp_path, clock):
    # One meaning per word: `channel` is the sensor's name, `unit` the part of the model it sits on.
    doc = {"site": {"name": "village hall"},
           "channel": [{"name": "red_house", "address": 0x40, "tags": {"colour": "red"}},
                       {"name": "red_trade", "address": 0x48, "role": "exchange", "unit": "red_house"}]}
    daemon, _, _, _ = make_daemon(tmp_path, clock, doc)
    cycle = daemon.reader.measure()
    battery, trade = cycle_points(daemon.config, cycle)
    assert battery.to_line().startswith(
        "electricity,channel=red_house,colour=red,site=village\\ hall,unit=red_house ")
    assert trade.to_line().startswith("electricity,channel=red_trade,site=village\\ hall,unit=red_house ")
    assert battery.time_ms == cycle.time_ms


def test_an_old_channel_tag_in_a_config_is_a_warning_not_exit_78(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text('[[channel]]\nname = "red_house"\naddress = 0x40\ntags = { channel = "A", colour = "red" }\n'
                    '[simulation]\nenabled = true\nscenario = "constant"\n')
    result = run_cli("once", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{path}: at 'channel[0].tags.channel': deprecated and ignored" in result.stderr
    lines = run_cli("export", "--config", str(path), cwd=tmp_path).stdout.splitlines()
    assert lines[0].startswith("electricity,channel=red_house,colour=red,")


def run_cli(*args, cwd, env=None, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "SOLAR_CONFIG": "", **(env or {})})


def test_once_json_on_the_embedded_default(tmp_path):
    result = run_cli("once", "--simulate", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["simulated"] is True
    assert doc["time"].endswith("Z")
    assert [c["name"] for c in doc["channels"]] == ["red_house", "green_house", "blue_house", "power_plant"]
    assert [c["address"] for c in doc["channels"]] == [0x40, 0x41, 0x44, 0x45]
    assert doc["not_measured"] == ["battery", "load", "exchange"]  # only the four panels are measured
    for channel in doc["channels"]:
        assert set(channel) == CHANNEL_KEYS and channel["role"] == "solar"
        # a panel's line: 0 V in the dark, ~13-14.5 V while charging, ~21 V open circuit (any hour)
        assert 0.0 <= channel["bus_voltage_v"] < 22.5
        assert channel["samples"] == 10 and channel["failed_samples"] == 0
        assert channel["power_w"] == pytest.approx(channel["bus_voltage_v"] * channel["current_ma"] / 1000,
                                                   rel=0.02, abs=0.01)
    assert {"cpu_percent", "memory_used_mb", "disk_free_mb", "uptime_s"} <= set(doc["system"])
    # the cycle was stored too (./data is the embedded default's store)
    assert len(list(Outbox(tmp_path / "data").export())) == 5


def write_config(tmp_path, extra="", *, interval_s=0.5, window_s=0.1):
    path = tmp_path / "c.toml"
    path.write_text(f"""
[sampling]
interval_s = {interval_s}
window_s = {window_s}
[store]
dir = "{tmp_path / 'store'}"
[simulation]
enabled = true
scenario = "constant"
[led]
enabled = false
{extra}""")
    path.chmod(0o600)
    return path


@pytest.mark.slow  # whole daemon processes
def test_run_stores_every_cycle_and_status_and_export_show_them(tmp_path):
    cfg = write_config(tmp_path)
    # Before the first cycle: a sentence for a person, and with --json still the one JSON object.
    empty = run_cli("status", "--config", str(cfg), "--json", cwd=tmp_path)
    assert empty.returncode == 0, empty.stderr
    report = json.loads(empty.stdout)
    assert report["stored_total"] == 0 and report["queue_depth"] == 0 and report["newest_reading"] is None
    assert report["store"].endswith("outbox.db") and not (tmp_path / "store" / "outbox.db").exists()
    assert "no readings stored yet" in run_cli("status", "--config", str(cfg), cwd=tmp_path).stdout
    result = run_cli("run", "--config", str(cfg), "--cycles", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "stopped after 3 cycles" in result.stderr
    status = run_cli("status", "--config", str(cfg), "--json", cwd=tmp_path)
    report = json.loads(status.stdout)
    assert report["stored_total"] == 15 and report["queue_depth"] == 15 and report["dropped"] == 0
    export = run_cli("export", "--config", str(cfg), cwd=tmp_path)
    assert len(export.stdout.splitlines()) == 15
    csv_rows = list(csv.reader(io.StringIO(run_cli("export", "--config", str(cfg), "--format", "csv",
                                                   "--since", "2000-01-01T00:00:00Z", cwd=tmp_path).stdout)))
    assert len(csv_rows) == 16  # the header and one row per point
    assert "stopped after 1 cycle\n" in run_cli("run", "--config", str(cfg), "--cycles", "1", cwd=tmp_path).stderr
    bad = run_cli("export", "--config", str(cfg), "--since", "yesterday", cwd=tmp_path)
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr


def test_export_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    """`main.py export | head`: the reader closes the pipe; the export ends with the shell's SIGPIPE status and
    no traceback (one used to follow every such pipe)."""
    cfg = write_config(tmp_path)
    assert run_cli("run", "--config", str(cfg), "--cycles", "1", cwd=tmp_path).returncode == 0
    # Buffered as in any shell pipe (PYTHONUNBUFFERED off): a small export is written only by the last flush.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "export", "--config", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proc.stdout.close()  # before it writes a byte: its first write meets a closed pipe
    err = proc.stderr.read()
    proc.wait(60)
    assert proc.returncode == 141 and "Traceback" not in err, err


def test_sigterm_finishes_the_cycle_and_exits_0(tmp_path):
    cfg = write_config(tmp_path)
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", "--config", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = tmp_path / "store" / "outbox.db"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if db.exists() and Outbox(db.parent, check_integrity=False).stats().stored_total >= 10:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    total = Outbox(db.parent).stats().stored_total
    assert total >= 10 and total % 5 == 0  # only whole cycles


def test_sigterm_during_a_long_sampling_window_ends_the_daemon_within_10_s_with_the_cycle_stored(tmp_path):
    """A window of 40 s (samples 4 s apart) would hold SIGTERM until it ends: the waits between samples end at
    the stop, the rest of the window is sampled at once, and the cycle is stored (README: within 10 s)."""
    cfg = write_config(tmp_path, interval_s=60, window_s=40)
    log = tmp_path / "daemon.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", "--config", str(cfg)], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        # The chips answer when the first cycle's first sample is taken (2 s into the slot): from that line on,
        # the daemon is inside the window, whose last sample is 36 s later.
        deadline = time.monotonic() + 60
        while "power_plant: INA219 at 0x45 answered" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        took_s = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()
    assert took_s < 10, f"SIGTERM took {took_s:.1f} s mid-window"
    assert Outbox(tmp_path / "store").stats().stored_total == 5  # the interrupted cycle, whole
    assert "stopped after 1 cycle" in log.read_text()


def test_a_samples_pause_ends_at_a_stop_and_a_short_one_is_a_plain_sleep(monkeypatch):
    """StopFlag.sleep, read_data's pause between samples: a long one waits on the flag, a short one (up to
    SHORT_SLEEP_S) sleeps, and once the flag is set none pauses at all (time.sleep(0) still yields)."""
    import daemon
    from daemon import StopFlag

    flag, calls = StopFlag(), []
    monkeypatch.setattr(daemon.time, "sleep", lambda s: calls.append(("sleep", s)))
    monkeypatch.setattr(flag, "wait", lambda s: calls.append(("wait", s)))
    flag.sleep(0.1)
    flag.sleep(daemon.SHORT_SLEEP_S + 0.1)
    flag.set()
    flag.sleep(4.0)
    assert calls == [("sleep", 0.1), ("wait", daemon.SHORT_SLEEP_S + 0.1), ("sleep", 0.0)]


def test_the_loops_stop_flag_ends_a_wait_from_another_thread_and_every_wait_after():
    import threading

    from daemon import StopFlag

    flag = StopFlag()
    assert flag.wait(0.01) is False and flag.wait(0) is False and flag.wait(-1) is False and not flag.is_set()
    results = []
    waiter = threading.Thread(target=lambda: results.append((flag.wait(120), time.monotonic())))
    waiter.start()
    # set() once the waiter sleeps in the kernel: its task asleep at three looks in a row, this thread
    # sleeping (the GIL free) between them, so it is in the wait, not on its way in.
    asleep, deadline = 0, time.monotonic() + 60
    while asleep < 3:
        assert time.monotonic() < deadline and not results, "the waiter never waited"
        stat = Path(f"/proc/self/task/{waiter.native_id}/stat").read_text()
        asleep = asleep + 1 if stat[stat.rindex(")") + 2] == "S" else 0
        time.sleep(0.01)
    set_at = time.monotonic()
    flag.set()
    flag.set()  # twice, as two signals would: harmless
    waiter.join(60)
    assert results and results[0][0] is True
    assert results[0][1] - set_at < 30  # woken by set(), not by its 120 s timeout
    assert flag.is_set() and flag.wait(120) is True and flag.wait(0) is True  # at once from now on


def test_check_passes_on_the_simulator_and_fails_on_an_unwritable_store(tmp_path):
    cfg = write_config(tmp_path)
    ok = run_cli("check", "--config", str(cfg), cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "addresses answering: 0x40, 0x41, 0x44, 0x45" in ok.stdout
    assert ok.stdout.count("OK  ") >= 10
    (tmp_path / "blocker").write_text("")
    bad_cfg = write_config(tmp_path, "").read_text().replace(str(tmp_path / "store"), str(tmp_path / "blocker/x"))
    (tmp_path / "bad.toml").write_text(bad_cfg)
    (tmp_path / "bad.toml").chmod(0o600)
    bad = run_cli("check", "--config", str(tmp_path / "bad.toml"), cwd=tmp_path)
    assert bad.returncode == 1
    assert "FAIL  store:" in bad.stdout


def notify_receiver(path):
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""
    import socket

    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(0.2)
    return receiver


def received(receiver) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(receiver.recv(4096).decode())
        except TimeoutError:
            return messages


@pytest.mark.slow  # whole daemon processes
def test_under_systemd_ready_after_the_first_stored_cycle_then_status_and_watchdog(tmp_path):
    sock_path = tmp_path / "notify.sock"
    receiver = notify_receiver(sock_path)
    cfg = write_config(tmp_path)
    result = run_cli("run", "--config", str(cfg), "--cycles", "3", cwd=tmp_path,
                     env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "300000000"})
    assert result.returncode == 0, result.stderr
    messages = received(receiver)
    receiver.close()
    assert messages[0].startswith("READY=1\nSTATUS=last cycle ")
    assert "queue 5, LED: all well" in messages[0]  # the first cycle is stored before READY
    assert sum("WATCHDOG=1" in m for m in messages) == 3  # one per complete cycle
    assert sum(m.startswith("STATUS=") for m in messages) == 2
    assert messages[-1] == "STOPPING=1"


def test_ready_comes_with_the_first_cycle_even_when_the_store_fails_from_the_start(tmp_path):
    """A store that cannot be written from the start (a full card after a reboot): the cycles are held in
    memory, so READY must not wait for a stored one, or systemd would end the start (and the held cycles)
    after TimeoutStartSec, again at every restart."""
    from types import SimpleNamespace

    from daemon import CycleReport
    from service import ServiceHooks

    calls = []
    hooks = ServiceHooks(parse_config({}), ErrorHandler(None), tmp_path)
    hooks.notifier = SimpleNamespace(enabled=True, ready=lambda text: calls.append(("READY", text)),
                                     status=lambda text: calls.append(("STATUS", text)),
                                     watchdog=lambda: calls.append(("WATCHDOG", "")))
    cycle = SimpleNamespace(time_ms=1_780_000_000_000, channels=())
    for stored in (False, False, True):
        hooks.after_cycle(CycleReport(cycle, None, stored, 5, 1, None, 0.1))
    assert [kind for kind, _ in calls] == ["READY", "WATCHDOG", "STATUS", "WATCHDOG", "STATUS", "WATCHDOG"]
    assert "not stored (held in memory)" in calls[0][1] and "not stored" not in calls[4][1]


def test_the_page_history_of_a_store_that_cannot_be_read_is_503_not_an_empty_chart(tmp_path):
    """The page's own store reader (service.py): a damaged outbox.db is "cannot be read right now" (503,
    Retry-After), not a 200 that says nothing was stored in 24 hours, cached for a minute."""
    import urllib.error
    import urllib.request

    from service import ServiceHooks

    store = tmp_path / "store"
    store.mkdir()
    (store / "outbox.db").write_bytes(b"this is not an SQLite database" * 200)
    cfg = parse_config({"store": {"dir": str(store)}, "web": {"enabled": True, "listen": "127.0.0.1:0"}})
    hooks = ServiceHooks(cfg, ErrorHandler(None), tmp_path)
    hooks.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(hooks.page.url + "api/history?hours=1", timeout=10)
        assert caught.value.code == 503 and caught.value.headers["Retry-After"] == "60"
    finally:
        hooks.stop()


def test_the_live_page_is_served_while_running(tmp_path):
    import urllib.request

    from servers import free_port

    port = free_port()
    cfg = write_config(tmp_path, f'[web]\nenabled = true\nlisten = "127.0.0.1:{port}"')
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", "--config", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        doc = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/now", timeout=2) as response:
                    doc = json.loads(response.read())
                if doc.get("time_ms"):
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert doc and doc["time_ms"], doc
        assert "red_house" in json.dumps(doc)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_a_rolled_back_update_is_shown_on_the_led(tmp_path):
    import release
    from service import ServiceHooks

    (tmp_path / release.MARKER_FILE).write_text(json.dumps({"message": "rolled back from abc to def", "at": "now"}))
    cfg = parse_config({"update": {"enabled": True, "remote": "/srv/solar.git"}})
    handler = ErrorHandler(None)
    hooks = ServiceHooks(cfg, handler, tmp_path)
    hooks.start()
    # Its own tier and code (6 blinks), outranking a minor problem but never a real fault.
    assert handler.top_tier == Tier.ROLLBACK and BLINK_CODES[Tier.ROLLBACK].blinks == 6
    assert "rolled back from abc to def" in handler.active["update:rollback"].message
    handler.report(ShortError("a cycle ran late", key="overrun"))
    assert handler.top_tier == Tier.ROLLBACK
    handler.report(MeasuringError("red_house at 0x40 did not answer", key="measure:red_house"))
    assert handler.top_tier == Tier.MEASURING
    handler.clear("measure:red_house")
    assert handler.top_tier == Tier.ROLLBACK  # back to the notice until it is acknowledged
    hooks.stop()


def test_status_says_an_update_was_rolled_back(tmp_path):
    import release

    cfg = write_config(tmp_path, '[update]\nenabled = true\nremote = "/srv/solar.git"')
    assert run_cli("run", "--config", str(cfg), "--cycles", "1", cwd=tmp_path).returncode == 0
    env = {"STATE_DIRECTORY": ""}
    result = run_cli("status", "--json", "--config", str(cfg), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["update_rolled_back"] is None
    (tmp_path / "store" / release.MARKER_FILE).write_text(json.dumps(
        {"message": "rolled back from abc to def after 3 failed starts", "at": "2026-06-21T06:00:00+00:00"}))
    result = run_cli("status", "--json", "--config", str(cfg), cwd=tmp_path, env=env)
    assert "rolled back from abc to def" in json.loads(result.stdout)["update_rolled_back"]


@pytest.mark.slow
def test_a_release_is_good_only_after_cycles_and_a_delivery_attempt(tmp_path, clock):
    """One stored cycle is not "good" (a release that then crashes in delivery must be rolled back):
    GOOD_AFTER_CYCLES stored cycles and a finished delivery attempt, or that many cycles and GOOD_AFTER_S."""
    import main as main_mod
    import release
    import service
    from service import ServiceHooks

    state = tmp_path / "state"
    state.mkdir()
    sha = "a" * 40
    (state / release.STATE_FILE).write_text(json.dumps(
        {"started": sha, "releases": {sha: {"starts": 1, "good": False}}}))

    def good() -> bool:
        return json.loads((state / release.STATE_FILE).read_text())["releases"][sha].get("good", False)

    # Delivery to a closed port (an attempt that fails: the delivery code ran without crashing).
    doc = {"influx": {"kind": "local", "api": "v1", "url": "http://127.0.0.1:9", "database": "d"},
           "update": {"enabled": True, "remote": "/srv/solar.git"}}
    daemon, _, outbox, _ = make_daemon(tmp_path, clock, doc)
    daemon.sender = main_mod.make_sender(daemon.config, main_mod.make_writer(daemon.config), daemon.handler)
    hooks = ServiceHooks(daemon.config, daemon.handler, state, clock=clock, sender=daemon.sender)
    daemon.listeners.append(hooks.after_cycle)
    for _ in range(service.GOOD_AFTER_CYCLES):
        daemon.run_cycle()
        assert not good(), "marked good before any delivery attempt"
    daemon.sender.flush()
    assert daemon.sender.total_requests > 0
    daemon.run_cycle()
    assert good()

    # No delivery attempt at all (the sender never got to run): good once GOOD_AFTER_S have passed.
    (state / release.STATE_FILE).write_text(json.dumps({"started": sha, "releases": {sha: {"starts": 1}}}))
    daemon2, _, _, _ = make_daemon(tmp_path / "2", clock, doc)
    daemon2.sender = main_mod.make_sender(daemon2.config, main_mod.make_writer(daemon2.config), daemon2.handler)
    began = clock()
    hooks2 = ServiceHooks(daemon2.config, daemon2.handler, state, clock=clock, sender=daemon2.sender)
    stored = []
    daemon2.listeners += [hooks2.after_cycle, lambda report: stored.append(report.stored)]
    daemon2.run_cycle()
    assert not good()
    while clock() - began < service.GOOD_AFTER_S:
        daemon2.run_cycle()
    assert sum(stored) >= service.GOOD_AFTER_CYCLES and daemon2.sender.total_requests == 0
    assert good()
    daemon.sender.outbox.close()
    daemon2.sender.outbox.close()


def test_optional_log_file_in_the_store_directory(tmp_path):
    cfg = write_config(tmp_path, '[log]\nfile = true\nfile_max_bytes = 2000\nfile_backups = 2')
    result = run_cli("run", "--config", str(cfg), "--cycles", "2", cwd=tmp_path,
                     env={"INFLUXDB_TOKEN": "tok-never-logged"})
    assert result.returncode == 0, result.stderr
    log_file = tmp_path / "store" / "solarpowerbrampton.log"
    text = log_file.read_text()
    assert "stopped after 2 cycles" in text and "tok-never-logged" not in text
    assert text.splitlines()[0][:4].isdigit()  # the file carries its own timestamps


def test_a_failing_cycle_is_reported_and_measuring_goes_on(tmp_path, clock):
    daemon, _, outbox, _ = make_daemon(tmp_path, clock)
    calls = []
    original = daemon.run_cycle

    def sometimes_broken(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return original(*args)
    daemon.run_cycle = sometimes_broken
    daemon.run(cycles=4)
    assert len(calls) == 4 and outbox.stats().stored_total == 3 * 5
    assert "cycle:error" not in daemon.handler.active  # cleared by the next good cycle


def test_cycles_evicted_from_memory_while_the_store_is_down_are_counted_as_dropped(tmp_path, clock, monkeypatch):
    import daemon as daemon_mod

    monkeypatch.setattr(daemon_mod, "_MAX_UNSTORED_CYCLES", 3)
    daemon, _, outbox, _ = make_daemon(tmp_path, clock)
    daemon.run_cycle()
    outbox._db.execute("PRAGMA query_only = ON")  # every write now fails, as on a card gone read-only
    for _ in range(5):
        daemon.run_cycle()  # 5 cycles, 3 fit in memory: 2 evicted
    outbox._db.execute("PRAGMA query_only = OFF")
    daemon.run_cycle()
    stats = outbox.queue_stats()
    assert stats.dropped == 2 * 5
    assert outbox.stats().stored_total == (1 + 3 + 1) * 5


def test_watchdog_pings_after_every_cycle_even_while_the_store_fails(tmp_path, clock, monkeypatch):
    from service import ServiceHooks

    sock_path = tmp_path / "n.sock"
    receiver = notify_receiver(sock_path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    daemon, _, outbox, _ = make_daemon(tmp_path, clock)
    hooks = ServiceHooks(daemon.config, daemon.handler, tmp_path)
    daemon.listeners.append(hooks.after_cycle)
    daemon.run_cycle()
    outbox._db.execute("PRAGMA query_only = ON")
    daemon.run_cycle()
    daemon.run_cycle()
    messages = received(receiver)
    assert sum("WATCHDOG=1" in m for m in messages) == 3
    assert any("LED: CRITICAL" in m for m in messages)  # STATUS= says the store is failing


def test_a_long_interval_widens_the_watchdog(tmp_path, monkeypatch):
    from service import ServiceHooks

    sock_path = tmp_path / "w.sock"
    receiver = notify_receiver(sock_path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "300000000")
    cfg = parse_config({"sampling": {"interval_s": 600}})
    ServiceHooks(cfg, ErrorHandler(None), tmp_path).start()
    assert received(receiver) == ["WATCHDOG_USEC=1800000000"]


@pytest.mark.slow  # whole daemon processes
def test_export_csv_is_one_row_per_point_with_a_column_per_tag_and_field(tmp_path):
    cfg = write_config(tmp_path, '[[channel]]\nname = "red_house"\naddress = 0x40\ntags = { colour = "red, really" }\n'
                                 '[[channel]]\nname = "red_trade"\naddress = 0x48\nrole = "exchange"\n'
                                 'unit = "red_house"\n')
    assert run_cli("run", "--config", str(cfg), "--cycles", "2", cwd=tmp_path).returncode == 0
    points = [parse_line(line) for line in run_cli("export", "--config", str(cfg), cwd=tmp_path).stdout.splitlines()]
    assert len(points) == 6
    out = run_cli("export", "--config", str(cfg), "--format", "csv", cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == ""
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    header = next(csv.reader(io.StringIO(out.stdout)))
    tags = sorted({t for p in points for t in p.tags})
    assert header[:2 + len(tags)] == ["time", "measurement", *tags] == \
        ["time", "measurement", "channel", "colour", "site", "unit"]
    fields, status = header[2 + len(tags):-1], header[-1]
    assert fields[:8] == list(ELECTRICITY_FIELDS) and set(fields) == {f for p in points for f in p.fields}
    assert status == "status" and {row["status"] for row in rows} == {"unsent"}  # nothing to send to here
    assert len(rows) == len(points)
    for row, point in zip(rows, points):
        when = dt.datetime.fromisoformat(row["time"].replace("Z", "+00:00"))
        assert row["time"].endswith("Z") and round(when.timestamp() * 1000) == point.time_ms
        assert row["measurement"] == point.measurement
        assert {t: row[t] for t in tags if row[t]} == dict(point.tags)
        for name in fields:
            value = point.fields.get(name)
            if value is None:
                assert row[name] == ""
            elif isinstance(value, int):
                assert int(row[name]) == value
            else:
                assert float(row[name]) == value
    trade = next(r for r in rows if r["channel"] == "red_trade")
    assert trade["unit"] == "red_house" and trade["colour"] == ""
    assert next(r for r in rows if r["channel"] == "red_house")["colour"] == "red, really"
    # --local-time: the same instants, with this machine's offset
    local = list(csv.DictReader(io.StringIO(run_cli("export", "--config", str(cfg), "--format", "csv",
                                                    "--local-time", cwd=tmp_path,
                                                    env={"TZ": "Europe/London"}).stdout)))
    for row, point in zip(local, points):
        when = dt.datetime.fromisoformat(row["time"])
        assert when.utcoffset() is not None and round(when.timestamp() * 1000) == point.time_ms


def test_undervoltage_on_the_pis_supply_is_a_short_error_and_a_system_field(tmp_path, clock):
    from health import PowerFlagReader

    word = tmp_path / "get_throttled"
    word.write_text("50005\n")
    daemon, _, outbox, _ = make_daemon(tmp_path, clock)
    daemon.monitor = SystemMonitor(str(tmp_path), power=PowerFlagReader(str(word), str(tmp_path / "none")))
    daemon.run_cycle()
    condition = daemon.handler.active["power"]
    assert condition.tier == Tier.SHORT and "under-voltage" in condition.message
    system = [line for _, line, _ in outbox.export() if line.startswith("system,")]
    assert "undervoltage=true" in system[-1] and "throttled=true" in system[-1]
    word.write_text("50000\n")  # the supply recovered; the firmware remembers it happened
    daemon.run_cycle()
    assert "power" not in daemon.handler.active
    system = [line for _, line, _ in outbox.export() if line.startswith("system,")]
    assert "undervoltage=false" in system[-1] and "undervoltage_since_boot=true" in system[-1]


def test_once_says_what_the_default_model_does_not_measure(tmp_path):
    result = run_cli("once", "--simulate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "not measured: batteries, loads, trade with the plant" in result.stdout
    assert result.stdout.count(" solar ") == 4
    assert "Pi supply: " in result.stdout
