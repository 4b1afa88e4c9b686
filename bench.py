"""Benchmarks: how light the daemon is on a Pi and on a SIM data plan, measured, not claimed.

    python bench.py                 # full run (a few minutes), prints a table
    python bench.py --quick         # smaller counts, under a minute
    python bench.py --json FILE     # also write the figures as JSON

Uses the simulated model and real servers (VictoriaMetrics and InfluxDB 1.6.7, started like the tests
start them). Where a figure is not about time, simulated time runs on a fake clock with no real sleeps.
Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import config as config_mod  # noqa: E402
from daemon import Daemon, load_energy  # noqa: E402
from outbox import Outbox  # noqa: E402
from rpi_errors import ErrorHandler  # noqa: E402
from sender import Policy, Sender  # noqa: E402
from simulator import build_simulated_bus  # noqa: E402
from tools import SystemMonitor, read_data  # noqa: E402

TARGETS = {  # figure: (comparison, target)
    "bytes_ratio": (">=", 20), "requests_ratio": (">=", 50), "cpu_ratio": (">=", 5),
    "drain_points_per_s_v2": (">=", 50_000), "drain_points_per_s_v1": (">=", 50_000),
    "drain_peak_rss_mb": ("<=", 100), "steady_rss_mb": ("<=", 60), "rss_growth_mb": ("<=", 2),
    "schedule_p99_error_ms": ("<=", 5), "schedule_drift_ms": ("<=", 1),
}


class FakeClock:
    """Monotonic seconds that move only when slept on: no real waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)

    def wait(self, seconds: float) -> bool:
        self.sleep(seconds)
        return False

    def wall_ms(self) -> int:
        return 1_780_000_000_000 + round(self.now * 1000)


def bench_config(store: Path, *, influx: dict | None = None, interval_s=None, window_s=1.0, scenario="day"):
    """The daemon's defaults (interval_s 3 s unless given) on the simulated model."""
    sampling = {"window_s": window_s} if interval_s is None else {"interval_s": interval_s, "window_s": window_s}
    doc = {"simulation": {"enabled": True, "scenario": scenario, "speed": 60},
           "sampling": sampling,
           "store": {"dir": str(store)}, "led": {"enabled": False}}
    if influx:
        doc["influx"] = influx
    return config_mod.parse_config(doc, "bench")


def make_writer(cfg):
    import local_solution

    return local_solution.make_writer(cfg.influx, environ={"INFLUXDB_TOKEN": "bench"})


# -- CPU per cycle: ours vs one request per field ------------------------------------------------
def cycle_cpu(vm_url: str, cycles: int, tmp: Path) -> dict:
    """Our pipeline at the default flush and interval (30 s, 3 s), against VictoriaMetrics via a counting proxy."""
    from tests.proxy import FaultProxy

    with FaultProxy(vm_url) as proxy:
        cfg = bench_config(tmp / "ours", influx={"kind": "local", "api": "v2", "url": proxy.url, "org": "o",
                                                 "bucket": "b"})
        clock = FakeClock()
        outbox = Outbox(cfg.store.dir, wall_ms=clock.wall_ms)
        reader = read_data(build_simulated_bus(cfg, clock), cfg.channels, cfg.sampling, energy=load_energy(outbox),
                           clock=clock, sleep=clock.sleep, wall_ms=clock.wall_ms)
        handler = ErrorHandler(None, clock=clock)
        sender = Sender(make_writer(cfg), Outbox(cfg.store.dir), handler, Policy(), clock=clock, sleep=clock.sleep)
        daemon = Daemon(cfg, reader, outbox, handler, monitor=SystemMonitor(str(tmp)), clock=clock, wait=clock.wait)
        per_flush = round(Policy().flush_interval_s / cfg.sampling.interval_s)
        measure_ms, pipeline_ms, total_ms = [], [], []
        for _ in range(3):  # warm up: imports, first connection
            daemon.run_cycle()
        sender.flush()
        proxy.reset_counts()
        done = 0
        while done < cycles:
            period = 0.0
            for _ in range(per_flush):
                t0 = time.process_time()
                cycle = reader.measure()
                t1 = time.process_time()
                daemon.reader = _Replay(cycle)
                daemon.run_cycle()
                daemon.reader = reader
                t2 = time.process_time()
                measure_ms.append((t1 - t0) * 1000)
                pipeline_ms.append((t2 - t1) * 1000)
                period += t2 - t0
                done += 1
            t3 = time.process_time()
            sender.flush()
            period += time.process_time() - t3
            total_ms.append(period * 1000 / per_flush)
        sender.writer.close()
        return {
            "cpu_ms_per_cycle": statistics.median(total_ms),
            "measure_cpu_ms_per_cycle": statistics.median(measure_ms),
            "pipeline_cpu_ms_per_cycle": statistics.median(pipeline_ms),
            "bytes_per_cycle": proxy.bytes_in / done,
            "interval_s": cfg.sampling.interval_s,
            # what the default cadence costs on a SIM data plan: a 30-day month of cycles
            "mb_per_month": proxy.bytes_in / done * 30 * 86_400 / cfg.sampling.interval_s / 1e6,
            "requests_per_cycle": proxy.requests / done,
            "cycles": done,
        }


class _Replay:
    """A reader that hands over an already measured cycle, so measuring and the rest are timed apart."""

    def __init__(self, cycle) -> None:
        self.cycle = cycle
        self.energy = {}

    def measure(self):
        return self.cycle


def naive_cpu(vm_url: str, cycles: int, tmp: Path) -> dict:
    """What simple scripts do: one synchronous influxdb-client request per field, on the same data and server."""
    from influxdb_client import InfluxDBClient
    from influxdb_client.client.write_api import SYNCHRONOUS

    from daemon import cycle_points
    from tests.proxy import FaultProxy

    with FaultProxy(vm_url) as proxy:
        cfg = bench_config(tmp / "naive")
        clock = FakeClock()
        reader = read_data(build_simulated_bus(cfg, clock), cfg.channels, cfg.sampling, clock=clock,
                           sleep=clock.sleep, wall_ms=clock.wall_ms)
        monitor = SystemMonitor(str(tmp))
        client = InfluxDBClient(url=proxy.url, token="bench", org="o")
        write = client.write_api(write_options=SYNCHRONOUS)
        per_cycle = []
        write_one = _naive_cycle(cfg, reader, monitor, write, cycle_points)
        write_one()
        proxy.reset_counts()
        for _ in range(cycles):
            t0 = time.process_time()
            write_one()
            per_cycle.append((time.process_time() - t0) * 1000)
        client.close()
        return {"naive_cpu_ms_per_cycle": statistics.median(per_cycle),
                "naive_bytes_per_cycle": proxy.bytes_in / cycles,
                "naive_requests_per_cycle": proxy.requests / cycles}


def _naive_cycle(cfg, reader, monitor, write, cycle_points):
    def run() -> None:
        cycle = reader.measure()
        for point in cycle_points(cfg, cycle, monitor.read()):
            tags = ",".join(f"{k}={v}" for k, v in sorted(point.tags.items()))
            for name, value in point.fields.items():
                if value is None:
                    continue
                record = f"{point.measurement},{tags} {name}={value!r}{'i' if isinstance(value, int) else ''} " \
                         f"{point.time_ms}"
                write.write(bucket="b", org="o", record=record, write_precision="ms")
    return run


# -- draining a 24-hour backlog -------------------------------------------------------------------
def fill_backlog(store: Path, seconds: int) -> int:
    """A backlog of `seconds` cycles at a 1 s interval, shaped like real cycles (5 lines each)."""
    cfg = bench_config(store, interval_s=1.0, window_s=0.1)
    clock = FakeClock()
    outbox = Outbox(store, wall_ms=clock.wall_ms)
    daemon = Daemon(cfg, read_data(build_simulated_bus(cfg, clock), cfg.channels, cfg.sampling, clock=clock,
                                   sleep=clock.sleep, wall_ms=clock.wall_ms),
                    outbox, ErrorHandler(None, clock=clock), monitor=SystemMonitor(str(store)), clock=clock,
                    wait=clock.wait)
    daemon.run_cycle()
    template = [line for _, line, _ in outbox.export()]
    base_ms = int(time.time() * 1000) - seconds * 1000  # recent: every server keeps it
    rows = []
    for s in range(seconds):
        t = base_ms + s * 1000
        rows.extend((t, line[: line.rindex(" ")] + f" {t}") for line in template)
        if len(rows) >= 50_000:
            outbox.append(rows)
            rows = []
    if rows:
        outbox.append(rows)
    total = outbox.stats().queue_depth
    outbox.close()
    return total


def drain_worker(store: str, influx_json: str) -> None:
    """Child process: drain the backlog, print points/s and peak RSS (MB) as JSON."""
    cfg = config_mod.parse_config({"influx": json.loads(influx_json), "store": {"dir": store}}, "bench")
    outbox = Outbox(store, check_integrity=False)
    sender = Sender(make_writer(cfg), outbox, ErrorHandler(None), Policy())
    total = outbox.stats().queue_depth
    t0 = time.perf_counter()
    while True:
        result = sender.flush()
        if result.error:
            raise SystemExit(f"drain failed: {result.error}")
        if result.delivered == 0:
            break
    elapsed = time.perf_counter() - t0
    print(json.dumps({"points": total, "seconds": elapsed, "points_per_s": total / elapsed,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "left": outbox.stats().queue_depth}))


def drain(influx: dict, seconds: int, tmp: Path, name: str) -> dict:
    store = tmp / f"drain-{name}"
    fill_backlog(store, seconds)
    out = subprocess.run([sys.executable, __file__, "--drain-worker", str(store), json.dumps(influx)],
                         capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- memory over many cycles ----------------------------------------------------------------------
def rss_worker(cycles: int, vm_url: str, tmp: str) -> None:
    """Child process: the daemon's loop (fake clock, v2 writer to VictoriaMetrics), RSS at 10 % and at the end."""
    cfg = bench_config(Path(tmp) / "rss", influx={"kind": "local", "api": "v2", "url": vm_url, "org": "o",
                                                  "bucket": "b"})
    clock = FakeClock()
    outbox = Outbox(cfg.store.dir, wall_ms=clock.wall_ms)
    handler = ErrorHandler(None, clock=clock)
    sender = Sender(make_writer(cfg), Outbox(cfg.store.dir), handler, Policy(), clock=clock, sleep=clock.sleep)
    reader = read_data(build_simulated_bus(cfg, clock), cfg.channels, cfg.sampling, clock=clock, sleep=clock.sleep,
                       wall_ms=clock.wall_ms)
    daemon = Daemon(cfg, reader, outbox, handler, monitor=SystemMonitor(tmp), clock=clock, wait=clock.wait)
    marks = {}
    for n in range(1, cycles + 1):
        daemon.run_cycle()
        if n % 3 == 0:
            sender.flush()
        if n in (cycles // 10, cycles):
            marks[n] = _rss_mb()
    print(json.dumps({"early_cycle": cycles // 10, "early_rss_mb": marks[cycles // 10],
                      "steady_rss_mb": marks[cycles], "rss_growth_mb": marks[cycles] - marks[cycles // 10]}))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1_048_576


# -- the schedule on the real clock ---------------------------------------------------------------
def schedule(cycles: int, tmp: Path, interval_s: float = 0.05) -> dict:
    cfg = bench_config(tmp / "schedule", interval_s=interval_s, window_s=interval_s / 5, scenario="constant")
    outbox = Outbox(cfg.store.dir)
    reader = read_data(build_simulated_bus(cfg, time.monotonic), cfg.channels, cfg.sampling)
    starts = []
    daemon = Daemon(cfg, reader, outbox, ErrorHandler(None), monitor=SystemMonitor(str(tmp)),
                    listeners=[lambda r: starts.append(r.cycle.monotonic_s - cfg.sampling.window_s / 2)])
    daemon.run(cycles)
    t0 = starts[0]
    errors_ms = [(s - (t0 + k * interval_s)) * 1000 for k, s in enumerate(starts)]
    tail = max(len(errors_ms) // 10, 1)
    # Drift: how far the last cycles' starts moved against the first ones' (absolute, ms).
    drift = abs(statistics.mean(errors_ms[-tail:]) - statistics.mean(errors_ms[:tail]))
    return {"schedule_p99_error_ms": statistics.quantiles(errors_ms, n=100)[98],
            "schedule_drift_ms": drift, "schedule_cycles": len(starts), "schedule_interval_s": interval_s,
            "schedule_overruns": daemon.overruns}


# -- the live page's cost ------------------------------------------------------------------------
def web_cost(cycles: int, tmp: Path) -> dict:
    """CPU per cycle without and with the live page and an SSE client connected: in the measuring thread
    (what the page adds to a cycle) and in the whole process (also the page's server thread, and the
    client thread that stands in for the browser, which on the model runs on another machine)."""
    import urllib.request

    from service import ServiceHooks

    def per_cycle(with_page: bool) -> tuple[float, float]:
        doc = {"simulation": {"enabled": True, "speed": 60}, "store": {"dir": str(tmp / f"web-{with_page}")},
               "led": {"enabled": False}}
        if with_page:
            doc["web"] = {"enabled": True, "listen": "127.0.0.1:0"}
        cfg = config_mod.parse_config(doc, "bench")
        clock = FakeClock()
        outbox = Outbox(cfg.store.dir, wall_ms=clock.wall_ms)
        reader = read_data(build_simulated_bus(cfg, clock), cfg.channels, cfg.sampling, clock=clock,
                           sleep=clock.sleep, wall_ms=clock.wall_ms)
        handler = ErrorHandler(None, clock=clock)
        hooks = ServiceHooks(cfg, handler, Path(cfg.store.dir))
        daemon = Daemon(cfg, reader, outbox, handler, monitor=SystemMonitor(str(tmp)), clock=clock,
                        wait=clock.wait, listeners=[hooks.after_cycle])
        hooks.start()
        stream = None
        if with_page:
            stream = urllib.request.urlopen(hooks.page.url + "api/events", timeout=10)
            threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()
        for _ in range(3):
            daemon.run_cycle()
        thread_ms, process_ms = [], []
        for _ in range(cycles):
            t0, p0 = time.thread_time(), time.process_time()
            daemon.run_cycle()
            t1 = time.thread_time()
            time.sleep(0.002)  # let the server thread push the event (its CPU counts in process_time)
            thread_ms.append((t1 - t0) * 1000)
            process_ms.append((time.process_time() - p0) * 1000)
        hooks.stop()
        if stream:
            stream.close()
        outbox.close()
        return statistics.median(thread_ms), statistics.median(process_ms)

    without, with_page = per_cycle(False), per_cycle(True)
    return {"cycle_cpu_ms_without_page": without[0], "cycle_cpu_ms_with_page": with_page[0],
            "page_cpu_ms_per_cycle": with_page[0] - without[0],
            "page_process_cpu_ms_per_cycle": with_page[1] - without[1]}


# -- start-up -------------------------------------------------------------------------------------
def startup(tmp: Path) -> dict:
    store = tmp / "startup"
    cfg = tmp / "startup.toml"
    cfg.write_text(f'[store]\ndir = "{store}"\n[simulation]\nenabled = true\n[led]\nenabled = false\n'
                   '[sampling]\nwindow_s = 1\n')
    cfg.chmod(0o600)
    db = store / "outbox.db"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", "--config", str(cfg), "--cycles", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = None
    while first is None and time.perf_counter() - t0 < 60:
        if db.exists():
            try:
                box = Outbox(store, check_integrity=False)
                if box.stats().stored_total:
                    first = time.perf_counter() - t0
                box.close()
            except Exception:  # noqa: BLE001 - the file may be half-created while we look
                pass
        time.sleep(0.005)
    proc.wait(timeout=60)
    return {"startup_s": first}


# -- report ---------------------------------------------------------------------------------------
def run(quick: bool) -> dict:
    from tests.servers import InfluxDB1, VictoriaMetrics

    n = {"cycles": 300 if quick else 1500, "naive": 60 if quick else 300, "backlog_s": 7200 if quick else 86_400,
         "rss": 2000 if quick else 10_000, "schedule": 300 if quick else 1200, "web": 200 if quick else 1000}
    figures: dict = {"quick": quick, "machine": _machine()}
    with tempfile.TemporaryDirectory() as tmp_name, VictoriaMetrics() as vm, InfluxDB1() as influx:
        tmp = Path(tmp_name)
        figures.update(cycle_cpu(vm.url, n["cycles"], tmp))
        figures.update(naive_cpu(vm.url, n["naive"], tmp))
        figures["bytes_ratio"] = figures["naive_bytes_per_cycle"] / figures["bytes_per_cycle"]
        figures["requests_ratio"] = figures["naive_requests_per_cycle"] / figures["requests_per_cycle"]
        figures["cpu_ratio"] = figures["naive_cpu_ms_per_cycle"] / figures["cpu_ms_per_cycle"]
        v2 = drain({"kind": "local", "api": "v2", "url": vm.url, "org": "o", "bucket": "b"}, n["backlog_s"], tmp, "v2")
        influx.create_database("bench")
        v1 = drain({"kind": "local", "api": "v1", "url": influx.url, "database": "bench"}, n["backlog_s"], tmp, "v1")
        figures.update({"drain_points": v2["points"], "drain_points_per_s_v2": v2["points_per_s"],
                        "drain_points_per_s_v1": v1["points_per_s"],
                        "drain_peak_rss_mb": max(v1["peak_rss_mb"], v2["peak_rss_mb"])})
        out = subprocess.run([sys.executable, __file__, "--rss-worker", str(n["rss"]), vm.url, str(tmp)],
                             capture_output=True, text=True, check=True, timeout=1800)
        figures.update(json.loads(out.stdout.strip().splitlines()[-1]))
        figures["rss_cycles"] = n["rss"]
        figures.update(schedule(n["schedule"], tmp))
        figures.update(web_cost(n["web"], tmp))
        figures.update(startup(tmp))
    return figures


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def table(figures: dict) -> str:
    rows = [("figure", "value", "target", "")]
    for key, value in figures.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        target = TARGETS.get(key)
        verdict = ""
        if target:
            op, limit = target
            verdict = "met" if (value >= limit if op == ">=" else value <= limit) else "MISSED"
        rows.append((key, f"{value:,.3f}" if isinstance(value, float) else f"{value:,}",
                     f"{target[0]} {target[1]:,}" if target else "", verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"machine: {figures['machine']}{' (quick)' if figures['quick'] else ''}"]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, under a minute")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--drain-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--rss-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drain_worker:
        drain_worker(*args.drain_worker)
        return 0
    if args.rss_worker:
        rss_worker(int(args.rss_worker[0]), args.rss_worker[1], args.rss_worker[2])
        return 0
    import logging

    logging.basicConfig(level=logging.ERROR)
    figures = run(args.quick)
    print(table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
