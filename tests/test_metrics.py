"""/metrics scraped by Debian's real prometheus on loopback: the values read back through Prometheus' HTTP API
(/api/v1/query) equal what the store holds for that cycle; the names follow Prometheus' conventions."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import lp
from conftest import simulated_config
from outbox import Outbox
from servers import Prometheus, free_port, mqtt_binaries_available, require

ROOT = Path(__file__).resolve().parent.parent
SITE = "prom-test"
DEADLINE_S = 90.0


@pytest.fixture
def _need_prometheus():
    reason = mqtt_binaries_available()
    require(reason)


def write_config(tmp_path, web_port):
    return simulated_config(tmp_path / "config.toml", SITE, tmp_path / "store", interval_s=0.5,
                            tables=f'[web]\nenabled = true\nlisten = "127.0.0.1:{web_port}"\n')


def scrape(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return resp.read(1_000_000).decode()


@pytest.mark.slow
def test_prometheus_scrapes_what_the_store_holds(tmp_path, _need_prometheus):
    web_port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", "--config",
                             str(write_config(tmp_path, web_port))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with Prometheus([f"127.0.0.1:{web_port}"], scrape_interval_s=1) as prom:
            deadline = time.monotonic() + DEADLINE_S
            while True:  # wait for a scrape that saw a cycle
                results = prom.query('{job="solarpowerbrampton"}')
                names = {r["metric"]["__name__"] for r in results}
                if "solarpowerbrampton_power_watts" in names:
                    break
                assert time.monotonic() < deadline, f"nothing scraped within {DEADLINE_S} s: {prom.log_tail()}"
                time.sleep(0.2)
            text = scrape(f"http://127.0.0.1:{web_port}/metrics")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    for name in ("bus_voltage_volts", "current_amperes", "power_watts", "energy_in_joules_total",
                 "energy_out_joules_total", "outbox_depth_points", "quarantined_points", "dropped_points_total",
                 "error_tier", "cycle_duration_seconds", "cycles_total"):
        assert f"\nsolarpowerbrampton_{name}" in text, name
    assert "# TYPE solarpowerbrampton_energy_in_joules_total counter" in text

    # One instant query: every series' latest sample comes from the same scrape, so from one cycle.
    values = {}
    for r in results:
        m = r["metric"]
        values[(m["__name__"], m.get("channel"))] = float(r["value"][1])
    time_ms = round(values[("solarpowerbrampton_cycle_timestamp_seconds", None)] * 1000)
    box = Outbox(tmp_path / "store", check_integrity=False)
    try:
        lines = [line for t, line, _ in box.export() if t == time_ms]
    finally:
        box.close()
    stored = lp.samples(lines)
    assert stored, f"no stored cycle at {time_ms}"
    compared = 0
    for (measurement_field, tags, _), value in stored.items():
        tags = dict(tags)
        channel = tags.get("channel")
        want = {"electricity_bus_voltage_v": ("bus_voltage_volts", 1), "electricity_current_ma": ("current_amperes", 1e-3),
                "electricity_power_w": ("power_watts", 1), "electricity_energy_in_wh": ("energy_in_joules_total", 3600),
                "electricity_energy_out_wh": ("energy_out_joules_total", 3600),
                "system_quarantined_points": ("quarantined_points", 1),
                "system_dropped_points": ("dropped_points_total", 1)}.get(measurement_field)
        if want is None:
            continue
        got = values[(f"solarpowerbrampton_{want[0]}", channel)]
        assert got == pytest.approx(value * want[1], rel=1e-9, abs=1e-12), measurement_field
        compared += 1
    assert compared >= 4 * 5 + 2
    # The depth after the cycle: the store's count before it (in its system point) plus the cycle's own points.
    before = stored[("system_outbox_depth", (("site", SITE),), time_ms)]
    assert values[("solarpowerbrampton_outbox_depth_points", None)] == before + len(lines)
    assert values[("solarpowerbrampton_error_tier", None)] == 0
    assert 0 < values[("solarpowerbrampton_cycle_duration_seconds", None)] < 0.5


def test_metrics_follow_the_latest_cycle_in_base_units_and_the_page_serves_them(tmp_path):
    import config
    from daemon import CycleReport
    from metrics import DaemonMetrics
    from outbox import QueueStats
    from rpi_errors import Tier
    from tools import ChannelReading, Cycle
    from web import FlowPage

    cfg = config.parse_config({"site": {"name": SITE}})
    tier = [None]
    metrics = DaemonMetrics(cfg, top_tier=lambda: tier[0], delivered=lambda: 42)
    readings = tuple(ChannelReading(c.name, c.address, 12.5, 1.0, -250.0, -3.125, 10, 0, 2.0, 0.5)
                     for c in cfg.channels[:3]) + (ChannelReading(cfg.channels[3].name, 0x45, None, None, None,
                                                                  None, 0, 10, None, None, "no answer"),)
    metrics.after_cycle(CycleReport(Cycle(1_780_000_000_250, 1.0, readings, False), None, True, 17, 3,
                                    QueueStats(queue_depth=12, quarantined=2, dropped=5, held=0), 0.0123))
    tier[0] = Tier.CONNECTION
    page = FlowPage("127.0.0.1:0", channels=cfg.channels, site=SITE, metrics=metrics.render)
    bare = FlowPage("127.0.0.1:0", channels=cfg.channels, site=SITE)
    page.start()
    bare.start()
    try:
        text = scrape(page.url + "metrics")
        with pytest.raises(urllib.error.HTTPError) as missing:
            scrape(bare.url + "metrics")
    finally:
        page.stop()
        bare.stop()
    assert missing.value.code == 404
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, s.labels.get("channel")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    red = cfg.channels[0].name
    assert samples[("solarpowerbrampton_bus_voltage_volts", red)] == 12.5
    assert samples[("solarpowerbrampton_current_amperes", red)] == -0.25
    assert samples[("solarpowerbrampton_power_watts", red)] == -3.125
    assert samples[("solarpowerbrampton_energy_in_joules_total", red)] == 7200.0
    assert samples[("solarpowerbrampton_energy_out_joules_total", red)] == 1800.0
    assert ("solarpowerbrampton_power_watts", cfg.channels[3].name) not in samples  # no reading: no sample
    assert samples[("solarpowerbrampton_outbox_depth_points", None)] == 17
    assert samples[("solarpowerbrampton_quarantined_points", None)] == 2
    assert samples[("solarpowerbrampton_dropped_points_total", None)] == 5
    assert samples[("solarpowerbrampton_delivered_points_total", None)] == 42
    assert samples[("solarpowerbrampton_error_tier", None)] == 5  # read at scrape time
    assert samples[("solarpowerbrampton_cycle_duration_seconds", None)] == 0.0123
    assert samples[("solarpowerbrampton_cycle_timestamp_seconds", None)] == 1_780_000_000.25
    # A cycle whose store could not give its counts: no depth, rather than the 0 (or one cycle's lines) the
    # daemon is left with then.
    metrics.after_cycle(CycleReport(Cycle(1_780_000_003_250, 4.0, readings, False), None, False, 0, 4, None, 0.01))
    names = {s.name for family in text_string_to_metric_families(metrics.render()[0].decode()) for s in family.samples}
    assert "solarpowerbrampton_cycles_total" in names and "solarpowerbrampton_outbox_depth_points" not in names
