"""Benchmark of the outputs beside InfluxDB (issue 15): the CPU MQTT adds per cycle, and one /metrics scrape.

    python bench_outputs.py [--cycles N]     # prints the figures as JSON (bench.py includes them)

The loop runs in this process on the simulated model and a fake clock, with a real mosquitto (Debian's,
started like the tests start it) on loopback: process CPU per cycle (the measuring thread and the MQTT
thread, all in process_time) without and with [mqtt]; what MQTT costs, counted directly (its listener's
thread time plus the CPU of its thread from /proc); and the CPU of rendering
/metrics (prometheus_client) for the same daemon.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

TARGETS = {"mqtt_cpu_ms_per_cycle": ("<=", 1.0), "mqtt_cpu_ms_per_cycle_at_3s": ("<=", 1.0)}
DEFAULT_INTERVAL_S = 3.0  # [sampling] interval_s's default
PACED_CYCLES = 10  # 30 s of real time (`bench.py --quick`: 5, so the quick run keeps within its 4 minutes)


def _per_cycle(tmp: Path, cycles: int, broker_port: int | None, qos: int = 1,
               spacing_s: float = 0.003) -> tuple[float, float | None, float | None]:
    """(median process CPU ms per cycle, median CPU ms per /metrics render, MQTT's CPU ms per cycle counted
    directly: its listener in the measuring thread plus the MQTT thread; None without MQTT). Cycles start
    `spacing_s` apart (the default: back to back, time for the MQTT thread to send; the config's interval:
    as the daemon runs, idle wake-ups between cycles included)."""
    import config as config_mod
    from daemon import Daemon
    from metrics import DaemonMetrics
    from mqtt_output import MqttOutput
    from outbox import Outbox
    from rpi_errors import ErrorHandler
    from simulator import build_simulated_bus
    from tools import read_data
    from health import SystemMonitor

    doc = {"simulation": {"enabled": True, "speed": 60}, "led": {"enabled": False},
           "store": {"dir": str(tmp / f"outputs-{broker_port is not None}-{qos}")}}
    if broker_port is not None:
        doc["mqtt"] = {"enabled": True, "host": "127.0.0.1", "port": broker_port, "qos": qos}
    cfg = config_mod.parse_config(doc, "bench")
    from bench_proc import FakeClock

    clock = FakeClock()
    outbox = Outbox(cfg.store.dir, wall_ms=clock.wall_ms)
    reader = read_data(build_simulated_bus(cfg, clock), cfg.channels, cfg.sampling, clock=clock,
                       sleep=clock.sleep, wall_ms=clock.wall_ms)
    handler = ErrorHandler(None, clock=clock)
    listeners, mqtt, metrics = [], None, None
    if broker_port is not None:
        mqtt = MqttOutput(cfg, handler, meaning=lambda: "all well", environ={})
        metrics = DaemonMetrics(cfg, top_tier=lambda: handler.top_tier)
        listeners += [mqtt.after_cycle, metrics.after_cycle]
        mqtt.start()
        deadline = time.monotonic() + 30
        while not mqtt.connected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no MQTT connection: {mqtt.problem}")
            time.sleep(0.01)
    listener_s = [0.0]
    if mqtt is not None:
        def timed(report, listen=mqtt.after_cycle):
            t0 = time.thread_time()
            listen(report)
            listener_s[0] += time.thread_time() - t0

        listeners[0] = timed
    daemon = Daemon(cfg, reader, outbox, handler, monitor=SystemMonitor(str(tmp)), clock=clock, wait=clock.wait,
                    listeners=listeners)
    for _ in range(3):
        daemon.run_cycle()
    process_ms = []
    # MQTT's own threads (the MQTT thread; paho's network thread too, had loop_start() been used).
    threads = [t.native_id for t in threading.enumerate() if t.name.startswith(("mqtt", "paho"))]
    listener_s[0] = 0.0
    threads_ns = [_thread_cpu_ns(t) for t in threads]
    published0 = mqtt.states_published if mqtt is not None else 0
    for i in range(cycles):
        p0, t0 = time.process_time(), time.monotonic()
        daemon.run_cycle()
        time.sleep(max(spacing_s - (time.monotonic() - t0), 0.0))  # the MQTT thread sends meanwhile
        if mqtt is not None:  # on a busy machine it may need longer: the next cycle would replace this one
            deadline = time.monotonic() + 1.0
            while mqtt.states_published < published0 + i + 1 and time.monotonic() < deadline:
                time.sleep(0.001)
        process_ms.append((time.process_time() - p0) * 1000)
    render_ms = direct_ms = None
    if mqtt is not None:
        direct_ms = (listener_s[0] * 1e3 + sum(_thread_cpu_ns(t) - n for t, n in zip(threads, threads_ns)) / 1e6) / cycles
    if metrics is not None:
        samples = []
        for _ in range(50):
            p0 = time.process_time()
            metrics.render()
            samples.append((time.process_time() - p0) * 1000)
        render_ms = statistics.median(samples)
        published = mqtt.states_published
        mqtt.stop()
        if published < cycles:
            raise RuntimeError(f"only {published} of {cycles + 3} cycles published")
    outbox.close()
    return statistics.median(process_ms), render_ms, direct_ms


def _thread_cpu_ns(tid: int) -> int:
    """CPU time of one thread of this process so far (Linux: /proc/self/task/TID/schedstat, ns)."""
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def output_figures(cycles: int, tmp: Path, paced_cycles: int = PACED_CYCLES) -> dict:
    """The figures, with a private mosquitto on loopback; `paced_cycles` cycles 3 s apart for the `_at_3s` one."""
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import Mosquitto

    with Mosquitto() as broker:
        without, _, _ = _per_cycle(tmp, cycles, None)
        with_mqtt, render_ms, direct_ms = _per_cycle(tmp, cycles, broker.port)
        _, _, qos0_ms = _per_cycle(tmp, cycles, broker.port, qos=0)
        # At the default 3 s interval: what the MQTT thread does between cycles (keepalive, reading the
        # broker's answers) counts too.
        _, _, paced_ms = _per_cycle(tmp, paced_cycles, broker.port, spacing_s=DEFAULT_INTERVAL_S)
    # The difference of two medians is noisy on a shared machine: the headline is the direct count.
    return {"cycle_process_cpu_ms_without_mqtt": without, "cycle_process_cpu_ms_with_mqtt": with_mqtt,
            "mqtt_cpu_ms_per_cycle": direct_ms, "mqtt_qos0_cpu_ms_per_cycle": qos0_ms,
            "mqtt_cpu_ms_per_cycle_at_3s": paced_ms, "metrics_cpu_ms_per_scrape": render_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=500)
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(output_figures(args.cycles, Path(tmp)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
