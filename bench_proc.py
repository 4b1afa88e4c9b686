"""bench.py's process-level parts: the daemon measured as the Pi runs it.

The daemon runs as its own process (`main.py run`) at real time; CPU comes from /proc/PID/stat
(utime + stime), disk writes from /proc/PID/io (write_bytes), peak RSS from /proc/PID/status (VmHWM).
Cycles are counted in its store. Every helper (counting proxy, busy loop, bare HTTP client) is another
process, so nothing but the daemon is in the figures.

Child entry points (used by bench.py, not by people):

    python bench_proc.py daemon [--replay] [--trace FILE] -- run --config FILE ...   # main.py, optionally
                                                            # on a register-replay bus, cycle starts traced
    python bench_proc.py proxy        # counting proxies (tests/proxy.py), driven by JSON lines on stdin
    python bench_proc.py busy         # one core of background load, until killed
    python bench_proc.py ceiling URL DB STORE BATCH_LINES BATCH_BYTES [--handshake]   # bare-client replay
                                                            # to InfluxDB 1.x
    python bench_proc.py floor CYCLES INTERVAL_S WINDOW_S [--warmup N] [--emulated] [--no-commit]   # the
                                                            # least a cycle can cost here
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_CPUCLOCK_SCHED = 2  # a process CPU-time clock id: (~pid << 3) | 2, as linux/posix-timers.h makes it
# Registers whose value comes from the emulated ADC (shunt, bus, power, current): the costly ones to emulate.
_MEASURED_REGISTERS = frozenset((1, 2, 3, 4))


# -- /proc ------------------------------------------------------------------------------------------
def proc_cpu_ms(pid: int) -> float:
    """CPU time (user + system) the process has used so far, every thread of it (ended ones too), in ms.

    From the kernel's CPU-time clock of the process, in ns (the clock id clock_getcpuclockid() gives, made
    as glibc makes it). /proc/PID/stat, the fallback, counts in 1/CLK_TCK s: 10 ms, which over a
    `--quick` run's 60 cycles is 0.17 ms a cycle of rounding on a figure with a 2.5 ms goal."""
    try:
        return time.clock_gettime_ns(((~pid) << 3) | _CPUCLOCK_SCHED) / 1e6
    except OSError:  # a kernel without these clock ids (a process that is gone fails in /proc too)
        return proc_stat_cpu_ms(pid)


def proc_stat_cpu_ms(pid: int) -> float:
    """utime + stime from /proc/PID/stat, ms (resolution 1/CLK_TCK s): what `ps` and `top` show."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the name may contain spaces: split after it
    return (int(fields[11]) + int(fields[12])) * 1000 / _CLK_TCK  # utime, stime (fields 14 and 15)


def proc_write_bytes(pid: int) -> int:
    """Bytes the process caused to be written to the block layer (/proc/PID/io write_bytes)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise OSError(f"/proc/{pid}/io has no write_bytes")


def proc_peak_rss_mb(pid: int) -> float:
    """Peak resident memory so far (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError(f"/proc/{pid}/status has no VmHWM")


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0-100), nearest rank: a value that occurred."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


# -- a bus without the emulated chip's cost ---------------------------------------------------------
class ReplayBus:
    """The simulated bus with its ADC registers recorded once and replayed.

    The first read of each measured register (shunt, bus, power, current) per device goes to the
    emulated chip; later reads hand back the same bytes. Config and calibration reads and writes still
    go to the chip (they are cheap), so the driver and the daemon see a real INA219's behaviour. What
    is left is the daemon's own cost: the work the Pi does too. Not thread-safe beyond what the
    wrapped bus offers (one measuring thread).
    """

    def __init__(self, bus) -> None:
        self._bus = bus
        self._pointer: dict[int, int] = {}
        self._recorded: dict[tuple[int, int, int], bytes] = {}
        self.model = getattr(bus, "model", None)

    def __getattr__(self, name: str):
        return getattr(self._bus, name)  # scan, deinit, inject ... as the simulator has them

    # The lock and the transfer run ten times a cycle: plain methods, not looked up through __getattr__,
    # so the stand-in for the kernel's I2C call costs as little as it can.
    def try_lock(self) -> bool:
        return self._bus.try_lock()

    def unlock(self) -> None:
        self._bus.unlock()

    def __enter__(self) -> ReplayBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bus.deinit()

    def writeto(self, address: int, buffer, *, start: int = 0, end: int | None = None) -> None:
        data = bytes(buffer[start:end])
        if data:
            self._pointer[address] = data[0]
        self._bus.writeto(address, buffer, start=start, end=end)

    def readfrom_into(self, address: int, buffer, *, start: int = 0, end: int | None = None) -> None:
        end = len(buffer) if end is None else end
        if not self._replay(address, self._pointer.get(address, 0), buffer, start, end):
            self._bus.readfrom_into(address, buffer, start=start, end=end)
            self._record(address, self._pointer.get(address, 0), buffer, start, end)

    def writeto_then_readfrom(self, address: int, buffer_out, buffer_in, *, out_start: int = 0,
                              out_end: int | None = None, in_start: int = 0, in_end: int | None = None) -> None:
        pointer = buffer_out[out_start]
        self._pointer[address] = pointer
        in_end = len(buffer_in) if in_end is None else in_end
        recorded = self._recorded.get((address, pointer, in_end - in_start))
        if recorded is not None:
            buffer_in[in_start:in_end] = recorded
            return
        self._bus.writeto_then_readfrom(address, buffer_out, buffer_in, out_start=out_start, out_end=out_end,
                                        in_start=in_start, in_end=in_end)
        self._record(address, pointer, buffer_in, in_start, in_end)

    def _replay(self, address: int, pointer: int, buffer, start: int, end: int) -> bool:
        recorded = self._recorded.get((address, pointer, end - start))
        if recorded is None:
            return False
        buffer[start:end] = recorded
        return True

    def _record(self, address: int, pointer: int, buffer, start: int, end: int) -> None:
        if pointer in _MEASURED_REGISTERS:
            self._recorded[(address, pointer, end - start)] = bytes(buffer[start:end])


# -- config files for the daemon process ------------------------------------------------------------
def _toml_value(value) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat()  # a TOML local date-time (no offset: the simulator's UK local time)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_config(path: Path, tables: dict[str, dict]) -> Path:
    """A TOML config of plain tables (no channels: the 4 default channels), mode 0600."""
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def daemon_tables(store: Path, *, interval_s: float, window_s: float, scenario: str = "constant",
                  influx: dict | None = None, flush_interval_s: float | None = None) -> dict[str, dict]:
    """The config of a benchmarked daemon: 4 default channels, no LED, quiet log."""
    tables = {"sampling": {"interval_s": interval_s, "window_s": window_s},
              "simulation": {"enabled": True, "scenario": scenario},
              "store": {"dir": str(store)}, "led": {"enabled": False}, "log": {"level": "WARNING"}}
    if influx:
        tables["influx"] = dict(influx)
        if flush_interval_s is not None:
            tables["influx"]["flush_interval_s"] = flush_interval_s
    return tables


# -- the daemon as a process ------------------------------------------------------------------------
class DaemonProcess:
    """`main.py run --simulate` (or the bench_proc wrapper with a replay bus / cycle trace) as a child.

    Cycles are counted from the store (one `system` point per cycle); /proc is sampled in the idle
    part of a cycle, so partial cycles do not blur the per-cycle figures.
    """

    def __init__(self, config_path: Path, store: Path, interval_s: float, *, replay: bool = False,
                 trace: Path | None = None, log_path: Path | None = None, token: str = "bench") -> None:
        self.config_path = config_path
        self.store = store
        self.interval_s = interval_s
        self.trace = trace
        args = ["run", "--config", str(config_path), "--simulate"]
        if replay or trace:
            wrapper = [sys.executable, str(ROOT / "bench_proc.py"), "daemon"]
            wrapper += ["--replay"] if replay else []
            wrapper += ["--trace", str(trace)] if trace else []
            command = [*wrapper, "--", *args]
        else:
            command = [sys.executable, str(ROOT / "main.py"), *args]
        env = {**os.environ, "INFLUXDB_TOKEN": token}
        env.pop("NOTIFY_SOCKET", None)
        self._log = open(log_path or os.devnull, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=self._log, env=env, cwd=str(ROOT))
        self._db: sqlite3.Connection | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _query(self, sql: str) -> int | None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with status {self.proc.returncode} (config {self.config_path})")
        path = self.store / "outbox.db"
        if self._db is None:
            if not path.exists():
                return None
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            row = self._db.execute(sql).fetchone()
        except sqlite3.OperationalError:
            return None  # the schema is not there yet
        return None if row is None or row[0] is None else int(row[0])

    def cycles(self, after_id: int = 0) -> int:
        """Cycles stored so far (with `after_id`: in rows after that id only, e.g. after a backlog, so the
        count does not scan the backlog while the daemon drains it)."""
        return self._query(f"SELECT count(*) FROM points WHERE id > {int(after_id)} AND line LIKE 'system,%'") or 0

    def unsent(self) -> int | None:
        """Unsent points (the store's running counter)."""
        value = self._query("SELECT value FROM state WHERE key = 'unsent_count'")
        return value if value is not None else self._query("SELECT count(*) FROM points WHERE sent_ms IS NULL")

    def wait_cycles(self, n: int, timeout_s: float) -> int:
        """Wait until `n` cycles are stored, then until the middle of the idle part of that cycle."""
        deadline = time.monotonic() + timeout_s
        seen = self.cycles()
        while seen < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {seen} of {n} cycles stored in {timeout_s:.0f} s ({self.config_path})")
            time.sleep(min(0.02, self.interval_s / 10))
            seen = self.cycles()
        time.sleep(self.interval_s * 0.4)
        return seen

    def sample(self) -> dict:
        return {"cycles": self.cycles(), "cpu_ms": proc_cpu_ms(self.pid), "write_bytes": proc_write_bytes(self.pid),
                "t": time.monotonic()}

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM, then wait; returns the exit status."""
        if self._db is not None:
            self._db.close()
            self._db = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            self._log.close()

    def trace_starts(self) -> tuple[float | None, list[float]]:
        """(where the loop's grid puts the first cycle's start, the monotonic start time of every cycle),
        after stop(), only with `trace`; (None, []) without one."""
        if not (self.trace and self.trace.exists()):
            return None, []
        traced = json.loads(self.trace.read_text())
        return traced["grid_s"], traced["starts"]


def measure_together(daemons: dict[str, tuple[DaemonProcess, Callable[[], dict] | None]], warmup: int,
                     cycles: int) -> dict[str, dict]:
    """CPU, disk writes, peak RSS and `counters()` deltas (e.g. a proxy's requests and bytes) per cycle of
    daemons started together, over the same `cycles` cycles after `warmup`, so they see the same machine."""
    def sample(daemon: DaemonProcess, counters) -> dict:
        values = daemon.sample()
        values.update(counters() if counters else {})
        return values

    start = {}
    for name, (daemon, counters) in daemons.items():
        daemon.wait_cycles(warmup, 60 + warmup * daemon.interval_s * 4)
        start[name] = sample(daemon, counters)
    results = {}
    for name, (daemon, counters) in daemons.items():
        a = start[name]
        daemon.wait_cycles(a["cycles"] + cycles, 60 + cycles * daemon.interval_s * 4)
        b = sample(daemon, counters)
        done = b["cycles"] - a["cycles"]
        result = {f"{key}_per_cycle": (b[key] - a[key]) / done for key in b if key not in ("cycles", "t", "cpu_ms")}
        result.update({"cycles": done, "cpu_ms_per_cycle": (b["cpu_ms"] - a["cpu_ms"]) / done,
                       "seconds": b["t"] - a["t"], "peak_rss_mb": proc_peak_rss_mb(daemon.pid)})
        results[name] = result
    return results


def schedule_errors(starts: list[float], interval_s: float, skip: int = 0, grid_s: float | None = None) -> dict:
    """How late cycles started against the daemon's grid, in ms (p50, p99, drift), and the slots skipped.

    `starts` is every cycle's start from the first on; `grid_s` is where the grid puts the first one (the
    loop's start plus the reader's lead: a start is never earlier, so each error is the lateness after the
    last grid slot). Without it the first start stands for the grid. The first `skip` cycles (warm-up)
    are left out of the figures. Raises ValueError for fewer than 3 starts.
    """
    if len(starts) - skip < 3:
        raise ValueError(f"{len(starts) - skip} cycle starts are too few to judge the schedule")
    t0 = starts[0] if grid_s is None else grid_s
    slots = [math.floor((s - t0) / interval_s + 1e-9) for s in starts[skip:]]
    errors_ms = [(s - (t0 + k * interval_s)) * 1000 for s, k in zip(starts[skip:], slots)]
    overruns = sum(1 for a, b in zip(slots, slots[1:]) if b - a > 1)
    tail = max(len(errors_ms) // 10, 1)
    drift_ms = abs(sum(errors_ms[-tail:]) / tail - sum(errors_ms[:tail]) / tail)
    return {"p50_ms": percentile(errors_ms, 50), "p99_ms": percentile(errors_ms, 99), "drift_ms": drift_ms,
            "overruns": overruns, "cycles": len(errors_ms)}


# -- helper processes -------------------------------------------------------------------------------
class ProxyProcess:
    """Counting proxies (tests/proxy.py FaultProxy) in their own process, so their CPU is not the daemon's."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench_proc.py"), "proxy"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=str(ROOT))

    def _call(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the proxy process exited (status {self.proc.poll()})")
        return json.loads(line)

    def start(self, upstream: str) -> str:
        """A new proxy in front of `upstream`; returns its URL."""
        return self._call(op="start", upstream=upstream)["url"]

    def counts(self, url: str, lines: bool = False) -> dict:
        """{"requests": n, "bytes_in": n} that clients sent through the proxy at `url`; with `lines` also
        "in_flight" (requests being handled) and "ok_lines" (distinct lines of the requests answered 2xx)."""
        return self._call(op="counts", url=url, lines=lines)

    def reset(self, url: str) -> None:
        self._call(op="reset", url=url)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_busy() -> subprocess.Popen:
    """One process that keeps one core busy (stop it with stop_busy)."""
    return subprocess.Popen([sys.executable, str(ROOT / "bench_proc.py"), "busy"])


def stop_busy(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(10)


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


# -- child entry points -----------------------------------------------------------------------------
def _run_daemon(replay: bool, trace: str | None, main_args: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    import main
    import simulator

    if replay:
        build = simulator.build_simulated_bus
        # main.open_bus imports build_simulated_bus when it runs, so it picks this one up.
        simulator.build_simulated_bus = lambda config, clock, **kw: ReplayBus(build(config, clock, **kw))
    starts: list[float] = []
    grid: list[float] = []
    if trace:
        run, run_cycle = main.Daemon.run, main.Daemon.run_cycle

        def traced_run(self, *args, **kwargs):
            # The loop's grid: its slots begin where run() starts, and each cycle at its first sample.
            grid.append(time.monotonic() + getattr(self.reader, "lead_s", 0.0))
            return run(self, *args, **kwargs)

        def traced(self, *args):
            starts.append(time.monotonic())
            return run_cycle(self, *args)

        main.Daemon.run, main.Daemon.run_cycle = traced_run, traced
    try:
        return main.main(main_args)
    finally:
        if trace:
            Path(trace).write_text(json.dumps({"grid_s": grid[0] if grid else None, "starts": starts}))


def _serve_proxies() -> None:
    sys.path.insert(0, str(ROOT))
    from tests.proxy import FaultProxy

    proxies: dict[str, FaultProxy] = {}
    try:
        for line in sys.stdin:
            request = json.loads(line)
            if request["op"] == "start":
                proxy = FaultProxy(request["upstream"]).start()
                proxies[proxy.url] = proxy
                answer = {"url": proxy.url}
            elif request["op"] == "counts":
                proxy = proxies[request["url"]]
                answer = (proxy.answered_counts() if request.get("lines")
                          else {"requests": proxy.requests, "bytes_in": proxy.bytes_in})
            else:
                proxies[request["url"]].reset_counts()
                answer = {}
            print(json.dumps(answer), flush=True)
    finally:
        for proxy in proxies.values():
            proxy.stop()


def _floor(cycles: int, interval_s: float, window_s: float, emulated: bool, commit: bool = True,
           warmup: int = 10) -> None:
    """The least CPU a cycle can cost on this machine, whatever the code: only the work no daemon doing the
    job can skip, at the daemon's cadence. Per cycle: ten samples spread over the window, each a wake-up and
    the four channels' bus and shunt registers (8 transactions, through the same replay bus as the daemon's,
    or the emulated chip with `emulated`); the first sample's wake-up is the stoppable wait for the slot
    (daemon.StopFlag, the daemon's own, so a stop is seen at once), as the daemon wakes; and one durable
    commit (SQLite WAL, synchronous=FULL) of five lines into a table with no index (none without `commit`).
    Nothing is averaged, formatted or checked. Prints {"cpu_ms_per_cycle": ..}
    (this process's CPU, one thread, over `cycles` cycles after `warmup` cycles); without `commit` also
    "wakeup_cpu_us" and "wakeups_per_cycle": the CPU this machine charges for one timed wake-up (a sample's
    sleep or the slot's wait, read from the thread's CPU clock around each: a hypervisor's timer and idle
    exits land here), the part of the floor no code can shed."""
    import tempfile

    sys.path.insert(0, str(ROOT))
    import config as config_mod
    import simulator
    from daemon import StopFlag
    from tools import read_data

    config = config_mod.parse_config({"simulation": {"enabled": True, "scenario": "constant"},
                                      "sampling": {"interval_s": interval_s, "window_s": window_s}})
    bus = simulator.build_simulated_bus(config, time.monotonic)
    if not emulated:
        bus = ReplayBus(bus)
    read_data(bus, config.channels, config.sampling).measure()  # the real driver configures the chips
    addresses = [channel.address for channel in config.channels]
    samples = config.sampling.samples
    raw = {address: bytearray(4 * samples) for address in addresses}
    point_bus, point_shunt = bytes((2,)), bytes((1,))
    line = ("electricity,site=brampton,unit=house1,role=solar bus_voltage_v=13.52,shunt_voltage_mv=1.23,"
            "current_ma=123.4,power_w=1.667,energy_in_wh=12.3456,energy_out_wh=0 1700000000000")
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(os.path.join(tmp, "floor.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE points (id INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL, line TEXT NOT NULL)")
        stop = StopFlag()
        step_s = window_s / samples
        wakeups = [0, 0]  # timed waits, their CPU (ns): counted only without the commit (`commit` False)

        def wait(pause: Callable[[float], object], delay: float) -> None:
            if commit:
                pause(delay)
                return
            before = time.thread_time_ns()
            pause(delay)
            wakeups[0] += 1
            wakeups[1] += time.thread_time_ns() - before

        def cycle(slot_s: float) -> None:
            for k in range(samples):
                delay = slot_s + (k + 0.5) * step_s - time.monotonic()
                if delay > 0:
                    wait(stop.wait if k == 0 else time.sleep, delay)
                bus.try_lock()
                transfer = bus.writeto_then_readfrom
                for address in addresses:
                    transfer(address, point_bus, raw[address], in_start=4 * k, in_end=4 * k + 2)
                    transfer(address, point_shunt, raw[address], in_start=4 * k + 2, in_end=4 * k + 4)
                bus.unlock()
            if commit:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT INTO points (time_ms, line) VALUES (?, ?)", [(1700000000000, line)] * 5)
                db.execute("COMMIT")

        start = time.monotonic()
        cpu0 = 0.0
        for n in range(warmup + cycles):
            if n == warmup:
                cpu0 = time.process_time()
                wakeups[:] = [0, 0]
            cycle(start + n * interval_s)
        cpu_ms = (time.process_time() - cpu0) * 1000
        db.close()
    result = {"cpu_ms_per_cycle": cpu_ms / cycles}
    if not commit and wakeups[0]:
        result.update(wakeup_cpu_us=wakeups[1] / wakeups[0] / 1000, wakeups_per_cycle=wakeups[0] / cycles)
    print(json.dumps(result), flush=True)


def _busy() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def ceiling_batches(store: Path, batch_lines: int, batch_bytes: int) -> list[tuple[int, bytes]]:
    """The store's unsent lines cut into batches and given their bodies by the very calls the sender makes
    (Outbox.pending_batch, the writer's prepare, the policy's full batch): [(points, gzip body)]."""
    sys.path.insert(0, str(ROOT))
    from influx_http import prepare
    from outbox import Outbox
    from sender import Policy

    policy = Policy(batch_lines=batch_lines, batch_bytes=batch_bytes)

    box = Outbox(store, readonly=True)
    batches, after = [], 0
    try:
        while (batch := box.pending_batch(batch_lines, batch_bytes, after)) is not None:
            full = policy.full(len(batch), len(batch.text))
            batches.append((len(batch), prepare(batch.text, backlog=full).body))
            after = batch.last_id
    finally:
        box.close()
    return batches


def _ceiling(url: str, database: str, store: str, batch_lines: int, batch_bytes: int,
             handshake: bool) -> None:
    """Replay the backlog's gzip batches to InfluxDB 1.x /write with a bare keep-alive HTTP client;
    print {"points", "seconds", "points_per_s"}. Only the requests are timed. With `handshake`, print
    "ready" once the bodies are built and wait for a line on stdin before the first request (the caller
    samples the server's CPU in between)."""
    import http.client
    import urllib.parse

    batches = ceiling_batches(Path(store), batch_lines, batch_bytes)
    if handshake:
        print("ready", flush=True)
        sys.stdin.readline()
    target = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
    path = f"/write?{urllib.parse.urlencode({'db': database, 'precision': 'ms'})}"
    headers = {"Content-Type": "text/plain; charset=utf-8", "Content-Encoding": "gzip"}
    points = 0
    t0 = time.perf_counter()
    for n, body in batches:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        reply = response.read(10_000)
        if response.status != 204:
            raise SystemExit(f"ceiling replay: {url} answered {response.status}: {reply[:200]!r}")
        points += n
    seconds = time.perf_counter() - t0
    conn.close()
    print(json.dumps({"points": points, "seconds": seconds, "points_per_s": points / seconds}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bench.py's child processes")
    sub = parser.add_subparsers(dest="mode", required=True)
    daemon = sub.add_parser("daemon")
    daemon.add_argument("--replay", action="store_true")
    daemon.add_argument("--trace")
    daemon.add_argument("main_args", nargs=argparse.REMAINDER)
    sub.add_parser("proxy")
    sub.add_parser("busy")
    floor = sub.add_parser("floor")
    floor.add_argument("cycles", type=int)
    floor.add_argument("interval_s", type=float)
    floor.add_argument("window_s", type=float)
    floor.add_argument("--emulated", action="store_true")
    floor.add_argument("--no-commit", action="store_true")
    floor.add_argument("--warmup", type=int, default=10)
    ceiling = sub.add_parser("ceiling")
    ceiling.add_argument("url")
    ceiling.add_argument("database")
    ceiling.add_argument("store")
    ceiling.add_argument("batch_lines", type=int)
    ceiling.add_argument("batch_bytes", type=int)
    ceiling.add_argument("--handshake", action="store_true", help="print ready, wait for a line on stdin")
    args = parser.parse_args(argv)
    if args.mode == "daemon":
        main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
        return _run_daemon(args.replay, args.trace, main_args)
    if args.mode == "proxy":
        _serve_proxies()
    elif args.mode == "busy":
        _busy()
    elif args.mode == "floor":
        _floor(args.cycles, args.interval_s, args.window_s, args.emulated, not args.no_commit, args.warmup)
    else:
        _ceiling(args.url, args.database, args.store, args.batch_lines, args.batch_bytes, args.handshake)
    return 0


if __name__ == "__main__":
    sys.exit(main())
