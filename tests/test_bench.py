"""The benchmark's own parts: what its figures rest on (the 2023 baseline's requests, the replay bus,
the ceiling's batches, the schedule arithmetic, the backlog). No timing is asserted here."""
from __future__ import annotations

import socket
import time

import adafruit_ina219
import pytest

import bench
import bench_proc
import config as config_mod
import lp
from outbox import Outbox
from simulator import build_simulated_bus


def constant_bus(clock):
    cfg = config_mod.parse_config({"simulation": {"enabled": True, "scenario": "constant"}}, "test")
    return build_simulated_bus(cfg, clock)


def test_seed2023_cycle_is_18_synchronous_single_field_requests_in_the_2023_layout(victoria, make_proxy, clock):
    from influxdb_client import InfluxDBClient
    from influxdb_client.client.write_api import SYNCHRONOUS

    from bench_seed2023 import Seed2023, requests_per_cycle

    proxy = make_proxy(victoria.url)
    client = InfluxDBClient(url=proxy.url, token="bench", org="B2Z")
    seed = Seed2023(bench_proc.ReplayBus(constant_bus(clock)), client.write_api(write_options=SYNCHRONOUS),
                    sample_sleep_s=0, cpu_interval_s=0)
    seed.cycle()
    client.close()
    assert proxy.requests == 18
    host = socket.gethostname()
    sent = []
    for request in proxy.log:
        assert request.method == "POST" and request.query == {"org": "B2Z", "bucket": "Solar Power",
                                                              "precision": "ns"}
        with pytest.raises(ValueError):
            lp.parse(request.text)  # no timestamp: the server stamps each point
        measurement, tags, fields, _ = lp.parse(request.text.strip() + " 0")
        assert len(fields) == 1  # one field per request
        (tag_key, tag_value), = tags.items()
        sent.append((measurement, tag_value, next(iter(fields))))
        assert tag_key == ("Machine" if measurement != "Electricity Gen" else "House")
    assert sent == requests_per_cycle()
    assert sent[:4] == [("network", host, "upload"), ("network", host, "download"), ("cpu_usage", host, "CPU"),
                        ("ram_usage", host, "RAM")]
    assert 4_000 < proxy.bytes_in < 7_000  # FIELD-NOTES: ~5.2 kB of request headers and bodies per cycle


def test_replay_bus_answers_like_the_chip_without_asking_it_again(clock):
    bus = constant_bus(clock)
    replay = bench_proc.ReplayBus(bus)
    direct = adafruit_ina219.INA219(bus, 0x40)
    replayed = adafruit_ina219.INA219(replay, 0x40)
    assert replayed.bus_voltage == pytest.approx(direct.bus_voltage)
    assert replayed.shunt_voltage == pytest.approx(direct.shunt_voltage)
    expected = direct.bus_voltage
    before = bus.transactions
    for _ in range(10):
        assert replayed.bus_voltage == pytest.approx(expected)
        replayed.shunt_voltage
    direct.bus_voltage
    assert bus.transactions == before + 1  # only the direct read reached the emulated chip
    replayed.calibration = 1234  # settings still go to the chip
    assert bus.device(0x40).calibration == 1234


def test_ceiling_batches_are_the_senders_batches(tmp_path):
    from influx_http import prepare

    box = Outbox(tmp_path)
    lines = [f"m,k=v f={i}i,pad=\"{'x' * (i % 300)}\" {1_000 + i}" for i in range(12_345)]
    box.append([(1_000 + i, line) for i, line in enumerate(lines)])
    batches = bench_proc.ceiling_batches(tmp_path, 5000, 400_000)  # replays the unsent lines
    cuts, bodies = [], []
    while batch := box.pending(5000, 400_000):
        cuts.append(len(batch))
        drained = box.pending_batch(5000, 400_000)  # what the sender reads and sends
        bodies.append(prepare(drained.text, backlog=len(drained) == 5000 or len(drained.text) + 1 >= 200_000).body)
        assert drained.ids == tuple(p.id for p in batch)
        box.mark_sent(p.id for p in batch)
    box.close()
    assert [n for n, _ in batches] == cuts and len(cuts) > 3
    assert [body for _, body in batches] == bodies  # the same gzip bodies, byte for byte
    import gzip

    assert gzip.decompress(batches[0][1]).decode().splitlines() == lines[:cuts[0]]


def test_schedule_errors_are_lateness_after_the_grid_the_first_cycle_starts_and_count_skipped_slots():
    interval = 0.1
    late_ms = [0, 1, 2, 0, 1, 2, 60, 1, 2, 0]  # 60 ms: more than half a slot late, still the same slot
    starts = [100 + k * interval + ms / 1000 for k, ms in enumerate(late_ms)] + [100 + 11 * interval + 0.004]
    result = bench_proc.schedule_errors(starts, interval)
    assert result["overruns"] == 1  # slot 10 was skipped
    assert result["p50_ms"] == pytest.approx(1.0)
    assert result["p99_ms"] == pytest.approx(60.0)
    assert result["cycles"] == 11
    warm = bench_proc.schedule_errors(starts, interval, skip=7)
    assert warm["cycles"] == 4 and warm["p99_ms"] == pytest.approx(4.0) and warm["overruns"] == 1
    with pytest.raises(ValueError, match="too few"):
        bench_proc.schedule_errors(starts[:2], interval)


def test_schedule_errors_measure_against_the_loops_grid_when_the_first_cycle_was_late_too():
    interval, grid = 0.2, 50.002  # the loop started at 50.0; each cycle begins at its first sample, 2 ms in
    late_ms = [0.3, 0.1, 0.0, 0.2, 0.1]  # the first wake-up was later than the third
    starts = [grid + k * interval + ms / 1000 for k, ms in enumerate(late_ms)]
    result = bench_proc.schedule_errors(starts, interval, grid_s=grid)
    assert result["overruns"] == 0
    assert result["p99_ms"] == pytest.approx(0.3, abs=1e-6)
    # Anchored at the first start instead, the third cycle would look a whole slot late and the slot skipped.
    assert bench_proc.schedule_errors(starts, interval)["p99_ms"] > 190


def test_a_traced_daemon_reports_its_grid_and_cycle_starts_on_it(tmp_path):
    store = tmp_path / "store"
    cfg = bench_proc.write_config(tmp_path / "c.toml", bench_proc.daemon_tables(store, interval_s=0.1, window_s=0.02))
    daemon = bench_proc.DaemonProcess(cfg, store, 0.1, trace=tmp_path / "trace.json")
    try:
        daemon.wait_cycles(8, 60)
    finally:
        assert daemon.stop() == 0
    grid_s, starts = daemon.trace_starts()
    assert len(starts) >= 8 and grid_s is not None
    result = bench_proc.schedule_errors(starts, 0.1, skip=2, grid_s=grid_s)
    assert 0 <= result["p50_ms"] < 100  # every start on or after its own slot: none counted a slot early
    assert min(s - grid_s for s in starts) >= 0
    assert all(s >= grid_s + k * 0.1 - 1e-6 for k, s in enumerate(starts))  # cycle k never before slot k


def test_backlog_is_a_simulated_day_not_one_cycle_repeated(tmp_path):
    points = bench.fill_backlog(tmp_path, hours=0.5, interval_s=1.0)
    assert points == 1800 * 5
    box = Outbox(tmp_path, check_integrity=False)
    rows = [(t, line) for t, line, _ in box.export()]
    box.close()
    parsed = [lp.parse(line) for _, line in rows]
    assert {m for m, *_ in parsed} == {"electricity", "system"}
    powers = [fields["power_w"] for m, tags, fields, _ in parsed if m == "electricity" and tags["unit"] == "red_house"]
    assert len(set(powers)) > 100  # the values change from cycle to cycle
    times = sorted({t for t, _ in rows})
    assert len(times) == 1800 and times[1] - times[0] == 1000
    assert abs(times[-1] - time.time() * 1000) < 60_000  # recent: every server keeps it


def test_proc_readings_of_a_running_process():
    import os

    pid = os.getpid()
    spent = bench_proc.proc_cpu_ms(pid)
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert bench_proc.proc_cpu_ms(pid) >= spent + 30
    assert bench_proc.proc_peak_rss_mb(pid) > 10
    assert bench_proc.proc_write_bytes(pid) >= 0


def test_proc_cpu_counts_every_thread_ended_ones_too_and_resolves_less_than_a_tick():
    import os
    import subprocess
    import sys

    burn = ("import sys, threading\nt = threading.Thread(target=lambda: sum(range(4 * 10**6)))\nt.start()\n"
            "t.join()\nprint('ended', flush=True)\nsys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ended\n"  # its busy thread has ended
        precise, ticks = bench_proc.proc_cpu_ms(child.pid), bench_proc.proc_stat_cpu_ms(child.pid)
        assert ticks >= 30 and abs(precise - ticks) <= 20, (precise, ticks)  # the ended thread's CPU is in
    finally:
        child.kill()
        child.wait()
    pid = os.getpid()
    before = bench_proc.proc_cpu_ms(pid)
    deadline = time.process_time() + 0.002
    while time.process_time() < deadline:
        pass
    assert 1.5 <= bench_proc.proc_cpu_ms(pid) - before < 10  # 2 ms, where /proc/PID/stat counts in 10 ms ticks


@pytest.mark.parametrize("options", [[], ["--emulated"], ["--no-commit"]])
def test_the_floor_runs_its_cycles_at_real_time_and_reports_its_cpu(options):
    import json
    import subprocess
    import sys

    began = time.monotonic()
    out = subprocess.run([sys.executable, str(bench_proc.ROOT / "bench_proc.py"), "floor", "6", "0.05", "0.02",
                          *options], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    elapsed = time.monotonic() - began
    result = json.loads(out.strip().splitlines()[-1])
    cpu_ms = result["cpu_ms_per_cycle"]
    assert elapsed >= 16 * 0.05 - 0.05  # ten warm-up and six measured cycles on the grid: not a tight loop
    assert 0 < cpu_ms < 50  # measured (not a placeholder), and one thread cannot spend more than its 50 ms cycle
    if options == ["--no-commit"]:
        # ten samples a cycle at most, the first one's wait the slot's (a late sample skips its sleep, so a
        # loaded machine counts fewer); each wake-up costs CPU, and together never more than the whole cycle's
        assert 0 < result["wakeups_per_cycle"] <= 10
        assert 0 < result["wakeup_cpu_us"] * result["wakeups_per_cycle"] / 1000 <= cpu_ms
    else:
        assert "wakeup_cpu_us" not in result  # measured only where the timing cannot weigh on a compared floor


HEADLINE_KEYS = ("daemon_cpu_ms_per_cycle", "simulator_cpu_ms_per_cycle", "seed2023_cpu_ms_per_cycle",
                 "seed2023_requests_per_cycle", "seed2023_bytes_per_cycle", "drain_points_per_s_v2",
                 "drain_points_per_s_v1", "drain_ceiling_points_per_s_v1", "disk_bytes_per_day",
                 "schedule_p99_error_ms", "overruns")


@pytest.mark.slow  # three daemon processes at real time
def test_the_as_the_pi_runs_it_daemons_include_one_with_mqtt_and_metrics_scraped(victoria, tmp_path):
    """process_cpu's third daemon (issue 15: the CPU per cycle with MQTT and /metrics on) really publishes and
    is really scraped: 5 state messages a cycle (3 houses, the plant, the logger) seen by another process's
    MQTT client, and /metrics answered on a kept-alive connection about every 5 cycles."""
    from servers import Mosquitto, mqtt_binaries_available, require

    require(mqtt_binaries_available())
    with bench_proc.ProxyProcess() as proxies, Mosquitto() as broker:
        figures = bench.process_cpu(victoria.url, proxies, 10, tmp_path, broker.port)
    assert figures["outputs_mqtt_messages_per_cycle"] == pytest.approx(5, abs=0.5)
    assert 0 < figures["outputs_scrapes_per_cycle"] <= 0.4
    assert figures["daemon_cpu_ms_per_cycle_with_outputs"] > 0 and figures["daemon_cpu_ms_per_cycle"] > 0
    assert "daemon_cpu_ms_per_cycle_with_outputs" in bench.TARGETS
    assert "`daemon_cpu_ms_per_cycle_with_outputs`" in bench.markdown(figures)


def test_the_readme_performance_table_shows_every_headline_key():
    readme = (bench.ROOT / "README.md").read_text()
    start = readme.index("## Performance")
    section = readme[start:readme.index("\n## ", start + 3)]
    for key in HEADLINE_KEYS:
        assert f"`{key}`" in section, f"{key} is not in the README's Performance section"
    table = bench.markdown(dict.fromkeys(HEADLINE_KEYS, 1.0))
    for key in HEADLINE_KEYS:
        assert f"`{key}`" in table, f"bench.markdown() has no row for {key}"


def test_the_table_says_met_or_not_met_against_the_targets():
    rows = bench.markdown({"daemon_cpu_ms_per_cycle": 3.1, "drain_points_per_s_v2": 120_000.0}).splitlines()
    daemon = next(r for r in rows if "`daemon_cpu_ms_per_cycle`" in r)
    drain = next(r for r in rows if "`drain_points_per_s_v2`" in r)
    assert "≤ 2.5" in daemon and daemon.rstrip(" |").endswith("**not met**")
    assert "≥ 100,000" in drain and drain.rstrip(" |").endswith("met") and "not met" not in drain


def test_a_fleet_site_that_cannot_start_stops_the_sites_already_running(tmp_path, monkeypatch):
    """No daemon outlives a fleet run that failed while starting its sites (here the second proxy)."""
    import bench_fleet

    started = []

    class Daemon(bench_proc.DaemonProcess):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    class Proxies:
        calls = 0

        def start(self, url):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("the proxy helper died")
            return "http://127.0.0.1:9"  # nothing listens: the first site runs and keeps its readings

    monkeypatch.setattr(bench_proc, "DaemonProcess", Daemon)
    with pytest.raises(RuntimeError, match="proxy helper died"):
        bench_fleet.start_sites(3, "http://127.0.0.1:9", Proxies(), tmp_path, scale=10.0)
    assert len(started) == 1 and started[0].proc.poll() is not None  # stopped, not orphaned


def test_fleet_of_three_sites_arrives_under_each_sites_own_tag_and_the_figures_agree(own_victoria, tmp_path):
    """bench.py --fleet 3, shortened: three daemon processes, one VictoriaMetrics (slow: real processes)."""
    import bench_fleet

    with bench_proc.ProxyProcess() as proxies:
        fig = bench_fleet.fleet_figures(3, own_victoria.url, proxies, tmp_path, scale=10.0, measure_s=12.0,
                                        export=own_victoria.export)
    assert fig["fleet_sites"] == 3 and fig["fleet_exit_statuses_nonzero"] == 0
    # each site's points are on the server under its own site tag, every one of them, no other tag
    assert fig["fleet_server_site_tags"] == 3
    assert fig["fleet_sites_all_points_under_own_tag"] == 3
    assert fig["fleet_electricity_points_on_server"] == fig["fleet_electricity_points_delivered"] > 0
    series = own_victoria.export('{__name__="electricity_power_w"}')
    assert {s["metric"]["site"] for s in series} == {"site001", "site002", "site003"}
    assert len(series) == 3 * 4  # four channels per site
    # both readings at a settled moment (every answered line marked), so the server's own counter saw
    # exactly the points the sites' stores marked sent in the measured span
    assert fig["fleet_snapshots_settled"] == 2
    assert fig["fleet_server_points_in_span"] == fig["fleet_points_sent_in_span"] > 0
    assert fig["fleet_server_points_per_s"] == pytest.approx(fig["fleet_server_points_in_span"]
                                                             / fig["fleet_measured_s"])
    assert fig["fleet_server_points_per_s_at_default"] == pytest.approx(fig["fleet_server_points_per_s"] / 10)
    assert 5 < fig["fleet_server_samples_per_s"] / fig["fleet_server_points_per_s"] < 25  # fields per point
    assert fig["fleet_points_per_cycle"] == 5  # four channels and the system point
    # per site, at the default cadence: one request per 50 s flush (16-17 cycles of 3 s), so about 72 an hour
    assert 60 <= fig["fleet_requests_per_site_per_hour_min"] <= fig["fleet_requests_per_site_per_hour_max"] <= 80
    per_request = fig["fleet_bytes_per_site_per_day"] / (fig["fleet_requests_per_site_per_hour"] * 24)
    assert 700 < per_request < 6_000  # headers (~300 B) and a gzip'd body of ~83 points
    assert fig["fleet_mb_per_site_per_month"] == pytest.approx(fig["fleet_bytes_per_site_per_day"] * 30 / 1e6)
