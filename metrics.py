"""Prometheus metrics of the daemon: the latest cycle and the delivery counters, for `/metrics`.

`DaemonMetrics` is a listener of the measuring loop (daemon.Daemon) and a prometheus_client custom
collector in a registry of its own (no module-level default registry): each scrape renders the latest
CycleReport in the Prometheus text format. Names follow Prometheus' conventions: base units (volts,
amperes, watts, joules, seconds) and `_total` on counters (README "Prometheus").
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from config import Config

PREFIX = "solarpowerbrampton"
JOULES_PER_WH = 3600.0


class DaemonMetrics:
    """The metrics of one daemon. `after_cycle` (the listener, measuring thread) keeps the report under a
    lock; `collect`/`render` run in the web server's threads. `top_tier()` is the LED's tier now (None: all
    well); `delivered()` the points the sender delivered this run (None without a writer)."""

    def __init__(self, config: Config, *, top_tier: Callable[[], object] = lambda: None,
                 delivered: Callable[[], int | None] = lambda: None) -> None:
        from prometheus_client import CollectorRegistry

        self.site = config.site.name
        self.units = {c.name: c.unit_name for c in config.channels}
        self.top_tier = top_tier
        self.delivered = delivered
        self._lock = threading.Lock()
        self._report = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def after_cycle(self, report) -> None:
        """The listener: keep the latest cycle (cheap: the work is done at scrape time)."""
        with self._lock:
            self._report = report

    def render(self) -> tuple[bytes, str]:
        """(body, Content-Type) of a scrape in the Prometheus text format."""
        from prometheus_client import generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

        # Text format 0.0.4: what every Prometheus 2.x (Debian's 2.42) negotiates; the names here are
        # plain ASCII, so the body is the same in both versions.
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    def collect(self) -> Iterator:
        """prometheus_client's Collector interface: one family per metric, from the latest cycle."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            report = self._report
        tier = self.top_tier()
        yield GaugeMetricFamily(f"{PREFIX}_error_tier", "the status LED's tier: 0 all well, 1 Short ... "
                                "6 Critical (README, the blink codes)", value=int(tier) if tier is not None else 0)
        delivered = self.delivered()
        if delivered is not None:
            yield CounterMetricFamily(f"{PREFIX}_delivered_points", "points delivered to InfluxDB since the start",
                                      value=delivered)
        if report is None:
            return
        cycle = report.cycle
        labels = ["site", "unit", "channel"]
        families = {
            "bus_voltage_volts": GaugeMetricFamily(f"{PREFIX}_bus_voltage_volts", "bus voltage", labels=labels),
            "current_amperes": GaugeMetricFamily(f"{PREFIX}_current_amperes", "current (signed)", labels=labels),
            "power_watts": GaugeMetricFamily(f"{PREFIX}_power_watts", "power (signed)", labels=labels),
            "energy_in": CounterMetricFamily(f"{PREFIX}_energy_in_joules", "energy in since the store began",
                                             labels=labels),
            "energy_out": CounterMetricFamily(f"{PREFIX}_energy_out_joules", "energy out since the store began",
                                              labels=labels),
        }
        for r in cycle.channels:
            if not r.ok:
                continue  # a failed channel has no value this cycle: its series goes stale
            values = [self.site, self.units.get(r.name, r.name), r.name]
            families["bus_voltage_volts"].add_metric(values, r.bus_voltage_v)
            families["current_amperes"].add_metric(values, r.current_ma / 1000.0)
            families["power_watts"].add_metric(values, r.power_w)
            families["energy_in"].add_metric(values, (r.energy_in_wh or 0.0) * JOULES_PER_WH)
            families["energy_out"].add_metric(values, (r.energy_out_wh or 0.0) * JOULES_PER_WH)
        yield from families.values()
        yield GaugeMetricFamily(f"{PREFIX}_cycle_timestamp_seconds", "Unix time of the latest cycle",
                                value=cycle.time_ms / 1000.0)
        yield GaugeMetricFamily(f"{PREFIX}_cycle_duration_seconds", "how long the latest cycle took",
                                value=report.duration_s)
        yield CounterMetricFamily(f"{PREFIX}_cycles", "cycles finished since the start", value=report.cycles_done)
        stats = report.stats
        if stats is not None:  # else the store could not count: no figure rather than a wrong one
            yield GaugeMetricFamily(f"{PREFIX}_outbox_depth_points", "points in the store not yet delivered",
                                    value=report.queue_depth)
            yield GaugeMetricFamily(f"{PREFIX}_quarantined_points", "points the database refused, kept apart",
                                    value=stats.quarantined)
            yield CounterMetricFamily(f"{PREFIX}_dropped_points", "points lost before delivery (size cap)",
                                      value=stats.dropped)
