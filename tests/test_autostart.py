"""Boot checks: every finding logged with its tier and shown on the LED; only Critical stops the start."""
from __future__ import annotations

import logging
import threading

import autostart
from config import parse_config
from proxy import FaultProxy
from rpi_errors import ErrorHandler, Tier
from servers import free_port
from simulator import build_simulated_bus
from tools import scan


def findings_for(tmp_path, clock, *, remove=None, trusted=True):
    cfg = parse_config({"simulation": {"enabled": True, "scenario": "constant"}})
    bus = build_simulated_bus(cfg, clock)
    if remove:
        bus.remove(remove)
    (tmp_path / "outbox.db").write_text("")
    return autostart.boot_checks(cfg, bus=bus, bus_note="simulated", store_path=tmp_path / "outbox.db",
                                 clock_trusted=trusted, scan=scan)


def test_all_well(tmp_path, clock):
    findings = findings_for(tmp_path, clock)
    assert all(f.error is None for f in findings)
    assert {f.name for f in findings} >= {"config", "i2c", "store", "disk", "clock", "sensor red_house"}
    handler = ErrorHandler(None)
    assert autostart.report(findings, handler) and handler.top_tier is None


def test_missing_sensor_and_unsynced_clock_are_shown_but_do_not_stop_the_start(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO)
    findings = findings_for(tmp_path, clock, remove=0x44, trusted=False)
    handler = ErrorHandler(None)
    assert autostart.report(findings, handler) is True
    assert handler.top_tier == Tier.MEASURING
    assert set(handler.active) == {"measure:blue_house", "clock"}
    assert "no INA219 answers at 0x44" in caplog.text and "MEASURING" in caplog.text


def test_low_disk_is_a_short_error(tmp_path):
    finding = autostart.disk_finding(tmp_path, low_mb=10**12)
    assert finding.tier == Tier.SHORT and "free on the store's disk" in finding.detail


def test_influx_probe_runs_in_the_background_and_never_blocks(victoria):
    assert autostart.probe_influx(victoria.url, 2) is None
    assert "not reachable" in autostart.probe_influx(f"http://127.0.0.1:{free_port()}", 2)
    with FaultProxy(victoria.url) as proxy:
        proxy.delay(1.5)
        handler = ErrorHandler(None)
        thread = autostart.start_influx_probe(proxy.url, 0.5, handler)
        assert isinstance(thread, threading.Thread) and thread.is_alive()  # returned at once
        thread.join(5)
        assert "boot:influx" not in handler.active  # Silent: logged, never kept on the LED
