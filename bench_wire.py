"""What a SIM plan bills: bytes on the wire per cycle, TLS included, from the real daemon over https.

bench.py calls `wire_figures()`. Each measurement runs the real daemon (`main.py run`, Cloud writer, the
simulator's day at a pinned June noon) against https://127.0.0.1:PORT, where a byte-counting relay (its own
process) passes everything to a TLS-terminating proxy (its own process; leaf + intermediate, RSA 2048, made
with openssl) in front of the real VictoriaMetrics (/api/v2/write). The proxy closes keep-alive connections
idle for 60 s, as cloud load balancers do, or 5 s, the worst case.

A figure is TCP payload both ways (TLS records, handshakes, close_notify) between two quiet moments a whole
number of flushes apart after the first flush (start-up is reported apart), divided by the cycles the server
received in between. The measurements run side by side (bytes, not time, are measured). Every time of a
measurement (cadence, sampling window, flush, idle timeout) may be scaled by one factor: the cycles per flush
and whether the server closes the connection between flushes stay the same, and so does the per-cycle figure.

MB here are 10^6 bytes (what SIM plans bill); a month is 30 days.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import config as config_mod

ROOT = Path(__file__).resolve().parent
IDLE_S = 60.0  # what cloud load balancers commonly close idle keep-alive connections after
IDLE_WORST_S = 5.0
FLUSHES_S = (10.0, 30.0, 60.0, 120.0, 300.0)  # and the default, whatever it is
SECONDS_PER_MONTH = 30 * 86_400
TARGETS = {"wire_bytes_per_cycle": ("<=", 200)}  # issue 14's goal, at the default cadence and flush, 60 s idle
# A token as long as InfluxDB Cloud's (88 characters): its header goes with every request.
_TOKEN = "b" * 86 + "=="
_SIM_START = "2026-06-21T12:00:00"  # noon in June: every panel and battery busy, values with many digits


@dataclass(frozen=True)
class Setup:
    """One measurement: real-time values of the daemon's settings and the server's idle timeout, in seconds."""

    interval_s: float
    window_s: float
    flush_s: float
    idle_s: float
    scale: float = 1.0
    min_flushes: int = 3
    min_cycles: int = 12

    def scaled(self, name: str) -> float:
        return getattr(self, name) * self.scale

    @property
    def flushes(self) -> int:
        """Flush periods to measure over: at least `min_flushes` and `min_cycles` cycles."""
        return max(self.min_flushes, math.ceil(self.min_cycles * self.interval_s / self.flush_s))


def measure(setup: Setup, vm_url: str, pki: tls.Pki, workdir: Path) -> dict:
    """Run the daemon through relay and proxy for `setup`; bytes per cycle and what happened on the wire.

    Raises RuntimeError when the daemon does not deliver (a write not acknowledged, no write in time).
    """
    from tests import tls  # here, not at import: bench.py's memory figures must not carry it
    workdir.mkdir(parents=True)
    proxy = tls.in_process("tls", upstream=vm_url, chain=pki.good, idle_timeout_s=setup.scaled("idle_s"))
    relay = None
    daemon = None
    try:
        relay = tls.in_process("relay", upstream_port=proxy.port)
        cfg = workdir / "config.toml"
        cfg.write_text(
            f'[simulation]\nenabled = true\nscenario = "day"\nstart = {_SIM_START}\n'
            f'[sampling]\ninterval_s = {setup.scaled("interval_s")}\nwindow_s = {setup.scaled("window_s")}\n'
            f'[influx]\nkind = "cloud"\nurl = "https://127.0.0.1:{relay.port}"\norg = "brampton2zero"\n'
            f'bucket = "solar"\nflush_interval_s = {setup.scaled("flush_s")}\nca_file = "{pki.ca_file}"\n'
            f'[store]\ndir = "{workdir / "store"}"\n[led]\nenabled = false\n[web]\nenabled = false\n')
        cfg.chmod(0o600)
        # The test CA is trusted as a user trusts a private one, through `[influx] ca_file`.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("INFLUXDB_", "SOLAR_")) and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
        env["INFLUXDB_TOKEN"] = _TOKEN
        log = open(workdir / "daemon.log", "wb")
        with log:
            daemon = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", "--config", str(cfg)],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        # A quiet moment: after a write was answered, before the server's idle close and the next flush.
        settle_s = min(setup.scaled("idle_s"), setup.scaled("flush_s")) / 2

        def after_write(n: int) -> tuple[list[int], list[int], float]:
            patience_s = 60 + (n + 2) * setup.scaled("flush_s")  # start-up, then one flush per write
            deadline = time.monotonic() + patience_s
            while proxy.snapshot()[tls.WRITES] < n:
                if not (proxy.process.is_alive() and relay.process.is_alive()):
                    raise RuntimeError("the TLS proxy or the relay process died")
                if daemon.poll() is not None:
                    raise RuntimeError(f"the daemon exited ({daemon.returncode}); see {workdir / 'daemon.log'}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no write {n} within {patience_s:g} s; see {workdir / 'daemon.log'}")
                time.sleep(0.01)
            time.sleep(settle_s)
            return proxy.snapshot(), relay.snapshot(), time.monotonic()

        p0, r0, t0 = after_write(1)
        p1, r1, t1 = after_write(1 + setup.flushes)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(5)
        for child in (relay, proxy):
            if child is not None:
                child.stop()
    if p1[tls.NOT_ACKED]:
        raise RuntimeError(f"{p1[tls.NOT_ACKED]} writes not acknowledged; see {workdir / 'daemon.log'}")
    cycles = p1[tls.WRITE_CYCLES] - p0[tls.WRITE_CYCLES]
    up = r1[tls.UP] - r0[tls.UP]
    down = r1[tls.DOWN] - r0[tls.DOWN]
    return {
        "bytes_per_cycle": (up + down) / cycles,
        "up_bytes_per_cycle": up / cycles,
        "down_bytes_per_cycle": down / cycles,
        "cycles": cycles,
        "flushes": setup.flushes,
        "handshakes_per_flush": (p1[tls.HANDSHAKES] - p0[tls.HANDSHAKES]) / setup.flushes,
        "resumed_per_flush": (p1[tls.RESUMED] - p0[tls.RESUMED]) / setup.flushes,
        "connections_per_flush": (r1[tls.CONNECTIONS] - r0[tls.CONNECTIONS]) / setup.flushes,
        "startup_bytes": r0[tls.UP] + r0[tls.DOWN],  # the start-up probe and the first flush
        "seconds": t1 - t0,
    }


def mb_per_month(bytes_per_cycle: float, interval_s: float) -> float:
    return bytes_per_cycle * SECONDS_PER_MONTH / interval_s / 1e6


def wire_figures(vm_url: str, tmp: Path, quick: bool) -> dict:
    """The `wire_*` keys of `bench.py --json`, measured against VictoriaMetrics at `vm_url`.

    Full run about 5 minutes (the default cadence and flush in real time; the flush series at a fifth of real
    time so a 300 s flush fits); `quick` runs everything at a tenth of real time, about 1.5 minutes.
    """
    from tests import tls

    sampling, influx = config_mod.SamplingConfig(), config_mod.InfluxConfig()
    interval_s, window_s, flush_s = sampling.interval_s, sampling.window_s, influx.flush_interval_s
    scale, series_scale = (0.1, 0.1) if quick else (1.0, 0.2)
    flushes = 3 if quick else 6
    setups = {
        "default": Setup(interval_s, window_s, flush_s, IDLE_S, scale, flushes),
        "idle5": Setup(interval_s, window_s, flush_s, IDLE_WORST_S, scale, flushes),
    }
    series = sorted({*FLUSHES_S, flush_s})
    for f in series:
        if f != flush_s:
            setups[f"flush{f:g}"] = Setup(interval_s, window_s, f, IDLE_S, series_scale, 2 if quick else 3)
    pki = tls.make_pki(tmp / "wire-pki")
    results: dict[str, dict] = {}
    errors: list[str] = []

    def run(name: str, setup: Setup) -> None:
        try:
            results[name] = measure(setup, vm_url, pki, tmp / f"wire-{name}")
        except Exception as exc:  # noqa: BLE001 - reported below with the measurement's name
            errors.append(f"{name}: {exc}")

    threads = [threading.Thread(target=run, args=item, name=f"wire-{item[0]}") for item in setups.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError("wire measurement failed: " + "; ".join(errors))
    default, idle5 = results["default"], results["idle5"]
    by_flush = {f"{f:g}": mb_per_month(results["default" if f == flush_s else f"flush{f:g}"]["bytes_per_cycle"],
                                       interval_s) for f in series}
    return {
        "wire_bytes_per_cycle": default["bytes_per_cycle"],
        "wire_mb_per_month": mb_per_month(default["bytes_per_cycle"], interval_s),
        "wire_bytes_per_cycle_idle5": idle5["bytes_per_cycle"],
        "wire_mb_per_month_idle5": mb_per_month(idle5["bytes_per_cycle"], interval_s),
        "wire_mb_per_month_by_flush": by_flush,
        "wire_bytes_per_cycle_by_flush": {
            f"{f:g}": results["default" if f == flush_s else f"flush{f:g}"]["bytes_per_cycle"] for f in series},
        "wire_handshakes_per_flush_by_flush": {
            f"{f:g}": results["default" if f == flush_s else f"flush{f:g}"]["handshakes_per_flush"]
            for f in series},
        "wire_resumed_per_flush_by_flush": {  # of those handshakes, TLS session resumptions (no chain sent)
            f"{f:g}": results["default" if f == flush_s else f"flush{f:g}"]["resumed_per_flush"]
            for f in series},
        "wire_up_bytes_per_cycle": default["up_bytes_per_cycle"],
        "wire_down_bytes_per_cycle": default["down_bytes_per_cycle"],
        "wire_handshakes_per_flush": default["handshakes_per_flush"],
        "wire_handshakes_per_flush_idle5": idle5["handshakes_per_flush"],
        "wire_resumed_per_flush_idle5": idle5["resumed_per_flush"],
        "wire_startup_bytes": default["startup_bytes"],
        "wire_interval_s": interval_s,
        "wire_flush_interval_s": flush_s,
        "wire_time_scale": scale,
        "wire_by_flush_time_scale": series_scale,
        "wire_cycles": default["cycles"],
        "wire_cert_chain_bytes": pki.good.cert_file.stat().st_size,
    }


def main(argv: list[str] | None = None) -> int:
    """`python bench_wire.py [--quick]`: the wire figures alone, as JSON (bench.py includes them)."""
    from tests.servers import VictoriaMetrics

    quick = "--quick" in (argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp, VictoriaMetrics() as vm:
        figures = wire_figures(vm.url, Path(tmp), quick)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
