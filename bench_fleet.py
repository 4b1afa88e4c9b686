"""bench.py --fleet N: a cooperative of N simulated sites meeting in one VictoriaMetrics (issue 16 §3).

Each site is its own `main.py run --simulate` process (bench_proc.DaemonProcess) with its own config,
`[site] name` (site001, site002, ...), simulator seed and store, delivering (API v2, gzip) through its own
counting proxy (all proxies in one helper process, bench_proc.ProxyProcess) to one VictoriaMetrics.

Time scale: every time of a site (interval, sampling window, flush interval, simulated speed) is divided by
`scale`, so a run takes minutes and N processes stay cheap on two cores. The cycles per request and the points
per request stay those of the defaults (3 s, 50 s), so the per-cycle figures (request bytes, requests) are the
defaults' and are scaled to a day / an hour by the default cadence. The server's rate is measured at the run's
cadence (`fleet_server_points_per_s`) and stated at the default cadence as well (divided by `scale`).

Per-site figures are taken between two snapshots, per site, as request bytes and requests counted by its
proxy divided by the cycles the server received in between (delivered points / points per cycle), both of
which only change when a request is made, so the ratio does not depend on where a snapshot falls between
requests. The server's rate comes from VictoriaMetrics' own /metrics: `vm_protoparser_rows_read_total
{type="influx"}` (line-protocol lines, i.e. points) and `vm_rows_inserted_total{type="influx"}` (samples,
one per field), and its CPU from `process_cpu_seconds_total`. At the end every site is stopped and the
server's `electricity_power_w` samples under each `site` label are checked against that site's store.
"""
from __future__ import annotations

import datetime as dt
import math
import re
import sqlite3
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import bench_proc
import config as config_mod

DEFAULT_INTERVAL_S = config_mod.SamplingConfig().interval_s
DEFAULT_WINDOW_S = config_mod.SamplingConfig().window_s
DEFAULT_FLUSH_S = config_mod.InfluxConfig().flush_interval_s
SIM_START = dt.datetime(2026, 6, 21, 10, 0)  # a June morning: every panel and battery busy
_METRICS_MAX_BYTES = 4_000_000  # VictoriaMetrics' /metrics is ~100 kB; anything far bigger is not it


def site_name(k: int) -> str:
    return f"site{k:03d}"


@dataclass
class Site:
    name: str
    store: Path
    proxy_url: str
    daemon: bench_proc.DaemonProcess

    def _db_row(self, sql: str) -> tuple[int, ...]:
        """The first row of `sql` on the site's store (read-only), each value an int (NULL: 0)."""
        db = sqlite3.connect(f"file:{self.store / 'outbox.db'}?mode=ro", uri=True, timeout=10)
        try:
            cursor = db.execute(sql)
            row = cursor.fetchone() or (None,) * len(cursor.description)
        finally:
            db.close()
        return tuple(int(value or 0) for value in row)

    def _db_value(self, sql: str) -> int:
        return self._db_row(sql)[0]

    def delivered(self) -> int:
        """Points the server accepted (the store marks a point sent after the server's 2xx)."""
        return self._db_value("SELECT count(*) FROM points WHERE sent_ms IS NOT NULL")

    def delivered_electricity(self) -> int:
        return self._db_value("SELECT count(*) FROM points WHERE sent_ms IS NOT NULL AND line LIKE 'electricity,%'")

    def points_per_cycle(self) -> float:
        # One statement, so one read of the store: counted apart, a cycle committed in between would count
        # its points but not itself.
        points, cycles = self._db_row("SELECT count(*), count(CASE WHEN line LIKE 'system,%' THEN 1 END) FROM points")
        return points / cycles if cycles else math.nan


def vm_counters(url: str) -> dict[str, float]:
    """The VictoriaMetrics /metrics counters the fleet figures use (bounded read, 10 s timeout)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read(_METRICS_MAX_BYTES + 1)
    if len(text) > _METRICS_MAX_BYTES:
        raise RuntimeError(f"{url}/metrics is larger than {_METRICS_MAX_BYTES} bytes: not VictoriaMetrics")
    wanted = {"points": r'vm_protoparser_rows_read_total\{type="influx"\}',
              "samples": r'vm_rows_inserted_total\{type="influx"\}',
              "cpu_s": r"process_cpu_seconds_total", "rss_bytes": r"process_resident_memory_bytes"}
    page = text.decode("utf-8", "replace")
    found = {}
    for key, pattern in wanted.items():
        m = re.search(rf"^{pattern} ([0-9.eE+-]+)$", page, re.MULTILINE)
        if not m:
            raise RuntimeError(f"{url}/metrics has no {pattern.replace(chr(92), '')}")
        found[key] = float(m.group(1))
    return found


def _snapshot(sites: list[Site], proxies: bench_proc.ProxyProcess, vm_url: str, tries: int = 40) -> dict:
    """Every site's counters and the server's, taken at a settled moment: no site has a request in flight,
    each store has marked sent exactly the lines its proxy saw answered 2xx (a store's sent rows are all
    still there: a run is far shorter than retention and far below the size cap), and the server's point
    counter is unchanged across the reading, so the proxies', the stores' and the server's figures cover
    the same span. Tries again until then; after `tries`, the last reading with "settled" False (a large
    fleet may never be idle all at once)."""
    for _ in range(tries):
        before = vm_counters(vm_url)
        per_site = {}
        settled = True
        for site in sites:
            counts = proxies.counts(site.proxy_url, lines=True)  # read before the store: a later mark shows
            delivered = site.delivered()
            settled = settled and counts["in_flight"] == 0 and counts["ok_lines"] == delivered
            per_site[site.name] = {"delivered": delivered, "cpu_ms": bench_proc.proc_cpu_ms(site.daemon.pid),
                                   "cycles": site.daemon.cycles(), **counts}
        after = vm_counters(vm_url)
        settled = settled and after["points"] == before["points"]
        if settled:
            break
        time.sleep(0.1)
    return {"t": time.monotonic(), "vm": after, "sites": per_site, "settled": settled}


def _wait(what: str, done, timeout_s: float, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"fleet: {what} not reached within {timeout_s:.0f} s")
        time.sleep(poll_s)


def start_sites(n: int, vm_url: str, proxies: bench_proc.ProxyProcess, tmp: Path, scale: float) -> list[Site]:
    """N daemons, each with its own config, site name, seed, store and counting proxy. If one cannot be
    started, those already running are stopped before the error goes on (no daemon outlives the run)."""
    interval_s, flush_s = DEFAULT_INTERVAL_S / scale, DEFAULT_FLUSH_S / scale
    sites: list[Site] = []
    try:
        for k in range(1, n + 1):
            name = site_name(k)
            store = tmp / name
            url = proxies.start(vm_url)
            influx = {"kind": "local", "api": "v2", "url": url, "org": "cooperative", "bucket": "solar"}
            tables = bench_proc.daemon_tables(store, interval_s=interval_s, window_s=DEFAULT_WINDOW_S / scale,
                                              scenario="day", influx=influx, flush_interval_s=flush_s)
            tables["site"] = {"name": name}
            tables["simulation"].update({"seed": k, "start": SIM_START, "speed": scale})
            cfg = bench_proc.write_config(tmp / f"{name}.toml", tables)
            sites.append(Site(name, store, url, bench_proc.DaemonProcess(cfg, store, interval_s,
                                                                         log_path=tmp / f"{name}.log")))
    except BaseException:
        for site in sites:
            try:
                site.daemon.stop()
            except Exception:  # noqa: BLE001 - stop the others; the start's error is the one to report
                pass
        raise
    return sites


def fleet_figures(n: int, vm_url: str, proxies: bench_proc.ProxyProcess, tmp: Path, *, scale: float = 10.0,
                  measure_s: float = 120.0, export=None) -> dict:
    """Run N sites, measure for `measure_s` seconds of wall time, stop them and check the server's data.

    `export(match)` returns the server's series (tests.servers.VictoriaMetrics.export); without it the
    per-site check is skipped. Raises TimeoutError when sites do not start or deliver in time.
    """
    t_start = time.monotonic()
    flush_s = DEFAULT_FLUSH_S / scale
    sites = start_sites(n, vm_url, proxies, tmp, scale)
    try:
        # Warm-up: every site has made two requests (its first one loads the database client).
        _wait("two deliveries from every site", lambda: all(proxies.counts(s.proxy_url)["requests"] >= 2
                                                            for s in sites), 120 + n * 3 + 3 * flush_s)
        started_s = time.monotonic() - t_start
        a = _snapshot(sites, proxies, vm_url)
        time.sleep(measure_s)  # a benchmark's measured span, not a wait for a state
        b = _snapshot(sites, proxies, vm_url)
        points_per_cycle = [s.points_per_cycle() for s in sites]
        peak_rss = [bench_proc.proc_peak_rss_mb(s.daemon.pid) for s in sites]
    finally:
        statuses = [s.daemon.stop() for s in sites]
    per_cycle = []  # (bytes, requests) per cycle the server received, per site
    for site, ppc in zip(sites, points_per_cycle):
        sa, sb = a["sites"][site.name], b["sites"][site.name]
        cycles = (sb["delivered"] - sa["delivered"]) / ppc
        if cycles <= 0:
            raise RuntimeError(f"fleet: {site.name} delivered nothing in {measure_s:.0f} s (log {site.store}.log)")
        per_cycle.append(((sb["bytes_in"] - sa["bytes_in"]) / cycles, (sb["requests"] - sa["requests"]) / cycles))
    seconds = b["t"] - a["t"]
    points = b["vm"]["points"] - a["vm"]["points"]
    cycles_per_day, cycles_per_hour = 86_400 / DEFAULT_INTERVAL_S, 3_600 / DEFAULT_INTERVAL_S
    bytes_day = [bpc * cycles_per_day for bpc, _ in per_cycle]
    requests_hour = [rpc * cycles_per_hour for _, rpc in per_cycle]
    figures = {
        "fleet_sites": n,
        "fleet_time_scale": scale,
        "fleet_default_interval_s": DEFAULT_INTERVAL_S, "fleet_default_flush_interval_s": DEFAULT_FLUSH_S,
        "fleet_run_interval_s": DEFAULT_INTERVAL_S / scale, "fleet_run_flush_interval_s": flush_s,
        "fleet_measured_s": seconds, "fleet_startup_s": started_s,
        "fleet_points_per_cycle": sum(points_per_cycle) / n,
        "fleet_bytes_per_site_per_day": sum(bytes_day) / n,
        "fleet_bytes_per_site_per_day_min": min(bytes_day), "fleet_bytes_per_site_per_day_max": max(bytes_day),
        "fleet_mb_per_site_per_month": sum(bytes_day) / n * 30 / 1e6,
        "fleet_requests_per_site_per_hour": sum(requests_hour) / n,
        "fleet_requests_per_site_per_hour_min": min(requests_hour),
        "fleet_requests_per_site_per_hour_max": max(requests_hour),
        "fleet_server_points_per_s": points / seconds,
        "fleet_server_samples_per_s": (b["vm"]["samples"] - a["vm"]["samples"]) / seconds,
        "fleet_server_points_per_s_at_default": points / seconds / scale,
        "fleet_server_cpu_cores": (b["vm"]["cpu_s"] - a["vm"]["cpu_s"]) / seconds,
        "fleet_server_rss_mb": b["vm"]["rss_bytes"] / 1_048_576,
        "fleet_site_peak_rss_mb_max": max(peak_rss), "fleet_sites_rss_mb_total": sum(peak_rss),
        "fleet_site_cpu_ms_per_cycle": sum(b["sites"][s.name]["cpu_ms"] - a["sites"][s.name]["cpu_ms"] for s in sites)
        / sum(b["sites"][s.name]["cycles"] - a["sites"][s.name]["cycles"] for s in sites),
        "fleet_sites_cpu_cores": sum(b["sites"][s.name]["cpu_ms"] - a["sites"][s.name]["cpu_ms"] for s in sites)
        / 1000 / seconds,
        "fleet_points_sent_in_span": sum(b["sites"][s.name]["delivered"] - a["sites"][s.name]["delivered"]
                                         for s in sites),
        "fleet_server_points_in_span": points,
        "fleet_exit_statuses_nonzero": sum(1 for s in statuses if s != 0),
        "fleet_snapshots_settled": int(a["settled"]) + int(b["settled"]),
    }
    if export is not None:
        figures.update(check_sites(sites, export))
    figures["fleet_wall_s"] = time.monotonic() - t_start
    return figures


def check_sites(sites: list[Site], export) -> dict:
    """Every site's electricity points on the server, under its own `site` label, as many as it delivered."""
    on_server: dict[str, int] = {}
    for series in export('{__name__="electricity_power_w"}'):
        site = series["metric"].get("site")
        on_server[site] = on_server.get(site, 0) + len(series["values"])
    delivered = {s.name: s.delivered_electricity() for s in sites}
    return {"fleet_sites_all_points_under_own_tag": sum(1 for s in sites if delivered[s.name]
                                                        and on_server.get(s.name) == delivered[s.name]),
            "fleet_server_site_tags": len(on_server),
            "fleet_electricity_points_delivered": sum(delivered.values()),
            "fleet_electricity_points_on_server": sum(on_server.values())}
