"""The daemon on the simulator, delivering to real servers: point for point, through an outage,
and through kill -9 at random moments."""
from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lp
from conftest import simulated_config
from outbox import Outbox
from servers import VictoriaMetrics

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "e2e-token-Secret"


def write_config(tmp_path, site, influx: str, *, interval_s=0.2, flush_interval_s=0.3, scenario="day", speed=600):
    return simulated_config(
        tmp_path / "config.toml", site, tmp_path / "store", interval_s=interval_s,
        simulation=f'scenario = "{scenario}"\nspeed = {speed}\nstart = 2026-06-21T11:00:00  # pinned: the same sun',
        tables=f"[influx]\nflush_interval_s = {flush_interval_s}\nbatch_lines = 40\ntimeout_s = 2\n{influx}\n")


def run_daemon(config, *args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "run", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "INFLUXDB_TOKEN": TOKEN})


def start_daemon(config):
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "INFLUXDB_TOKEN": TOKEN})


def stored_lines(store_dir):
    box = Outbox(store_dir, check_integrity=False)
    try:
        rows = list(box.export())
        return [line for _, line, _ in rows], [s for _, _, s in rows], box.stats()
    finally:
        box.close()


def vm_series(victoria, site):
    """{(name, tags, ts): [values...]} so duplicates stay visible."""
    out = collections.defaultdict(list)
    for row in victoria.export(match=f'{{site="{site}"}}'):
        labels = dict(row["metric"])
        name = labels.pop("__name__")
        for value, ts in zip(row["values"], row["timestamps"]):
            out[(name, tuple(sorted(labels.items())), ts)].append(float(value))
    return out


def influx_samples(influxdb1, db):
    out = {}
    for measurement in ("electricity", "system"):
        for series in influxdb1.query(db, f"SELECT * FROM {measurement} GROUP BY *"):
            tags = tuple(sorted((k, v) for k, v in series.get("tags", {}).items() if v != ""))
            columns = series["columns"]
            for row in series["values"]:
                ts = row[0]
                for name, value in zip(columns[1:], row[1:]):
                    if value is not None:
                        out[(f"{measurement}_{name}", tags, ts)] = float(value)
    return out


def assert_same(stored: dict, server: dict):
    assert set(server) == set(stored), (len(server), len(stored))
    for key, value in stored.items():
        assert server[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_daemon_to_victoriametrics_point_for_point(victoria, tmp_path):
    site = "e2e-vm"
    cfg = write_config(tmp_path, site, f'kind = "local"\napi = "v2"\nurl = "{victoria.url}"\n'
                                      'org = "coop"\nbucket = "solar"')
    result = run_daemon(cfg, "--cycles", "15")
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stderr
    lines, statuses, stats = stored_lines(tmp_path / "store")
    assert len(lines) == 15 * 5 and set(statuses) == {"sent"}
    server = {k: v[0] for k, v in vm_series(victoria, site).items()}
    assert_same(lp.samples(lines), server)


def test_daemon_to_influxdb_1_point_for_point(influxdb1, tmp_path):
    influxdb1.create_database("e2e")
    cfg = write_config(tmp_path, "e2e-v1", f'kind = "local"\napi = "v1"\nurl = "{influxdb1.url}"\ndatabase = "e2e"')
    result = run_daemon(cfg, "--cycles", "15")
    assert result.returncode == 0, result.stderr
    lines, statuses, _ = stored_lines(tmp_path / "store")
    assert len(lines) == 75 and set(statuses) == {"sent"}
    assert_same(lp.samples(lines), influx_samples(influxdb1, "e2e"))


def test_final_delivery_at_shutdown_and_status(victoria, tmp_path):
    cfg = write_config(tmp_path, "e2e-final", f'kind = "local"\napi = "v2"\nurl = "{victoria.url}"\n'
                                             'org = "coop"\nbucket = "solar"', flush_interval_s=3600)
    assert run_daemon(cfg, "--cycles", "3").returncode == 0
    lines, statuses, _ = stored_lines(tmp_path / "store")
    assert set(statuses) == {"sent"} and len(vm_series(victoria, "e2e-final")) == len(lp.samples(lines))
    status = subprocess.run([sys.executable, str(ROOT / "main.py"), "status", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=60)
    assert "queue depth" in status.stdout and f"InfluxDB at {victoria.url}" in status.stdout


def wait_until(predicate, timeout_s, step_s=0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return False


def test_outage_keeps_measuring_and_delivers_everything_in_time_order(tmp_path, make_proxy):
    from servers import require_binaries

    require_binaries()
    with VictoriaMetrics() as vm:
        proxy = make_proxy(vm.url)
        cfg = write_config(tmp_path, "outage", f'kind = "local"\napi = "v2"\nurl = "{proxy.url}"\n'
                                               'org = "coop"\nbucket = "solar"')
        daemon = start_daemon(cfg)
        try:
            db = tmp_path / "store" / "outbox.db"
            assert wait_until(lambda: db.exists() and stored_lines(db.parent)[2].stored_total >= 20, 30)
            vm.stop()
            before = stored_lines(db.parent)[2].stored_total
            time.sleep(4)
            during = stored_lines(db.parent)[2]
            assert during.stored_total >= before + 5 * 10  # measuring went on: >= 10 more cycles
            assert during.queue_depth > 0
            vm.start()
            assert wait_until(lambda: stored_lines(db.parent)[2].queue_depth == 0, 40)
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, err = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, err
        assert "cannot reach" in err or "HTTP 502" in err  # the outage was noticed and logged
        lines, statuses, _ = stored_lines(tmp_path / "store")
        assert set(statuses) == {"sent"}
        server = vm_series(vm, "outage")
        assert_same(lp.samples(lines), {k: v[0] for k, v in server.items()})
        delivered = [r for r in proxy.log if r.status == 204]
        stamps = [lp.parse(line)[3] for r in delivered for line in r.text.splitlines()]
        assert stamps == sorted(stamps)  # oldest first, also across the outage


@pytest.mark.parametrize("api,kills", [("v2", 20), ("v1", 10)])
def test_kill_9_at_random_moments_loses_nothing(tmp_path, make_proxy, api, kills):
    """30 kills in all: every point committed to the outbox reaches the server; re-sends are exact copies."""
    from servers import InfluxDB1, require_binaries

    require_binaries()
    rng = random.Random(2026 + kills)
    with (VictoriaMetrics() if api == "v2" else InfluxDB1()) as server:
        proxy = make_proxy(server.url)
        proxy.delay(0.3)  # each request is held a while, so a kill can land while one is in flight
        if api == "v2":
            target = f'kind = "local"\napi = "v2"\nurl = "{proxy.url}"\norg = "coop"\nbucket = "solar"'
        else:
            server.create_database("crash")
            target = f'kind = "local"\napi = "v1"\nurl = "{proxy.url}"\ndatabase = "crash"'
        cfg = write_config(tmp_path, "crash", target, interval_s=0.1, flush_interval_s=0.2)
        in_flight = 0
        for k in range(kills):
            seen = len(proxy.log)
            daemon = start_daemon(cfg)

            def pending():  # a request of this run that the proxy has not answered yet
                return any(r.status is None for r in proxy.log[seen:])

            if k % 2:  # during sending: wait until a batch is on its way
                wait_until(pending, 15, step_s=0.005)
            else:  # at a random moment, mostly while measuring
                time.sleep(rng.uniform(0.8, 2.0))
            in_flight += pending()
            daemon.kill()
            daemon.wait(timeout=10)
            assert daemon.returncode == -signal.SIGKILL
        proxy.delay(0)
        result = run_daemon(cfg, "--cycles", "5")
        assert result.returncode == 0, result.stderr
        lines, statuses, stats = stored_lines(tmp_path / "store")
        assert set(statuses) == {"sent"} and stats.quarantined == 0 and stats.dropped == 0
        assert len(lines) >= kills * 5  # every run stored at least one cycle
        stored = lp.samples(lines)
        if api == "v2":
            held = vm_series(server, "crash")  # VictoriaMetrics keeps every copy: duplicates stay visible
            assert set(held) == set(stored)
            for key, values in held.items():
                # a point re-sent after a kill is an exact copy (InfluxDB would simply overwrite it)
                assert all(v == pytest.approx(stored[key], rel=1e-12, abs=1e-12) for v in values), key
        else:
            assert_same(stored, influx_samples(server, "crash"))
        assert in_flight >= kills // 2, in_flight  # at least every other kill hit a batch in flight
