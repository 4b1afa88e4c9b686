"""Real InfluxDB 1.x and VictoriaMetrics servers for tests and bench.py.

Each server runs as a child process on free 127.0.0.1 ports with its data in a private temp dir.
The binaries come from the Debian bookworm packages `influxdb` (1.6.7) and `victoria-metrics` (1.79.5);
scripts/install-test-tools.sh installs them. Plain module: stdlib only, no pytest import.

    with VictoriaMetrics() as vm:
        ...  # POST vm.url + "/api/v2/write?precision=ms" ...
        rows = vm.export()

Servers never outlive the Python process that started them: `atexit` kills every running one, and on
Linux each child also gets PR_SET_PDEATHSIG=SIGKILL (when started from the main thread), so even a
SIGKILLed test run leaves no daemon behind (only its temp dir).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["free_port", "wait_stopped", "binaries_available", "require_binaries", "InfluxDB1", "VictoriaMetrics",
           "Mosquitto", "Prometheus", "mqtt_binaries_available", "ServerError"]

INFLUXD = "influxd"
VICTORIA = "victoria-metrics"
_HTTP_TIMEOUT = 10.0


class ServerError(RuntimeError):
    """A server did not start, or an HTTP call to it failed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _task_states(pid: int) -> list[str]:
    """The scheduler state letter of every thread of `pid` ('T' = stopped by a signal); [] once it is gone."""
    states = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return states
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                # "pid (comm) S ...": comm may hold spaces and parentheses, so split after the last ')'.
                states.append(f.read().rsplit(b")", 1)[1].split()[0].decode())
        except (OSError, IndexError):
            continue  # a thread that just ended
    return states


def wait_stopped(pid: int, stopped: bool = True, timeout: float = 30.0) -> None:
    """Wait until every thread of `pid` is stopped by SIGSTOP (or, stopped=False, none is any more).

    SIGSTOP and SIGCONT are delivered asynchronously: on a busy machine a process may run on for a
    while after kill() returned. Raises ServerError after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = _task_states(pid)
        if states and all((s in "Tt") == stopped for s in states):
            return
        time.sleep(0.005)
    raise ServerError(f"process {pid} is not {'stopped' if stopped else 'running'} after {timeout:g} s: "
                      f"thread states {_task_states(pid)}")


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def binaries_available() -> str | None:
    """None when both `influxd` and `victoria-metrics` exist, else a reason to skip."""
    missing = [b for b in (INFLUXD, VICTORIA) if _which(b) is None]
    if not missing:
        return None
    return (f"{' and '.join(missing)} not installed "
            "(run scripts/install-test-tools.sh as root: Debian packages influxdb, victoria-metrics)")


def require(reason: str | None) -> None:
    """For tests: nothing when `reason` is None; else pytest.skip with it, or pytest.fail when CI=true (CI must
    run every test, so a missing part there is a failure, not a skip)."""
    if reason is None:
        return
    import pytest  # lazy: this module is also used by bench.py without pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def require_binaries() -> None:
    """For tests: require() influxd and victoria-metrics."""
    require(binaries_available())


# ---------------------------------------------------------------------------------------------------------
# process bookkeeping

_live: set["_Server"] = set()
_live_lock = threading.Lock()


def _kill_all() -> None:
    with _live_lock:
        servers = list(_live)
    for srv in servers:
        try:
            srv.stop(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
        try:
            srv._cleanup_dir()
        except Exception:  # noqa: BLE001
            pass


atexit.register(_kill_all)


def _pdeathsig_preexec():
    """preexec_fn: SIGKILL the child when its parent thread dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:  # parent already gone
            os._exit(1)

    return preexec


def _http(method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
          timeout: float = _HTTP_TIMEOUT) -> tuple[int, bytes]:
    """One HTTP request; returns (status, body) for every status, raises OSError on network failure."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    # Never go through an environment proxy for loopback servers.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


class _Server:
    """Shared life cycle: a child process with a temp dir, readiness probe, stop/start/pause/resume."""

    binary = ""
    ready_path = ""
    ready_status = 200
    startup_timeout = 30.0

    def __init__(self, *, port: int | None = None, workdir: str | os.PathLike[str] | None = None,
                 startup_timeout: float | None = None) -> None:
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        if startup_timeout is not None:
            self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    # -- to override ----------------------------------------------------------------------------------
    name = "server"

    def _command(self, exe: str) -> list[str]:
        raise NotImplementedError

    # -- public ---------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> "_Server":
        """Start (or restart after stop(): same port, same data). Blocks until the server answers."""
        if self.running:
            return self
        exe = _which(self.binary)
        if exe is None:
            raise ServerError(f"{self.binary} not installed (scripts/install-test-tools.sh)")
        cmd = self._command(exe)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(cmd)}\n".encode())
            log.flush()
            preexec = _pdeathsig_preexec() if threading.current_thread() is threading.main_thread() else None
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, start_new_session=True, preexec_fn=preexec)
        self.paused = False
        with _live_lock:
            _live.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (after SIGCONT if paused), wait up to `timeout`, then SIGKILL. Data dir is kept."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                if self.paused:
                    proc.send_signal(signal.SIGCONT)
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            except ProcessLookupError:
                pass
        elif proc is not None:
            proc.wait()  # reap
        self.paused = False
        with _live_lock:
            _live.discard(self)

    def kill(self) -> None:
        """SIGKILL, like a crash or power cut (unflushed data may be lost)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.paused = False
        with _live_lock:
            _live.discard(self)

    def restart(self) -> "_Server":
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts TCP connections (kernel backlog) but nothing answers."""
        if not self.running:
            raise ServerError(f"{self.name} is not running")
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True
        wait_stopped(self.proc.pid)  # returns only once nothing in it can answer any more

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self.running:
            self.proc.send_signal(signal.SIGCONT)
            wait_stopped(self.proc.pid, stopped=False)
        self.paused = False

    def close(self) -> None:
        """stop() and delete the temp dir (if this object created it)."""
        self.stop()
        self._cleanup_dir()

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self.paused else ("running" if self.running else "stopped")
        return f"<{type(self).__name__} {self.url} {state} dir={self.workdir}>"

    # -- internals ------------------------------------------------------------------------------------
    def _cleanup_dir(self) -> None:
        if self._own_dir and not self.running:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer"
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with code {self.proc.returncode} during start-up; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            try:
                status, _ = _http("GET", self.url + self.ready_path, timeout=2)
                if status == self.ready_status:
                    return
                last = f"HTTP {status}"
            except OSError as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name} not ready on {self.url} after {self.startup_timeout:.0f} s "
                                  f"({last}); log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.05)

    def _request(self, method: str, path: str, params: dict[str, Any] | list[tuple[str, Any]] | None = None,
                 data: bytes | None = None, headers: dict[str, str] | None = None,
                 ok: tuple[int, ...] = (200, 204), timeout: float = _HTTP_TIMEOUT) -> bytes:
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = _http(method, url, data=data, headers=headers, timeout=timeout)
        if status not in ok:
            raise ServerError(f"{method} {path} -> HTTP {status}: {body[:500]!r}")
        return body


class InfluxDB1(_Server):
    """InfluxDB 1.x (`influxd -config FILE`): HTTP API v1 on `port`, RPC (backup) on `rpc_port`.

    Debian's 1.6.7 has no /api/v2/write (404). Writes: POST /write?db=&precision=ms -> 204.
    """

    binary = INFLUXD
    name = "influxdb1"
    ready_path = "/ping"
    ready_status = 204

    def __init__(self, *, port: int | None = None, rpc_port: int | None = None,
                 workdir: str | os.PathLike[str] | None = None, startup_timeout: float | None = None) -> None:
        super().__init__(port=port, workdir=workdir, startup_timeout=startup_timeout)
        self.rpc_port = rpc_port or free_port()
        while self.rpc_port == self.port:
            self.rpc_port = free_port()
        self.config_path = self.workdir / "influxdb.conf"

    def _config(self) -> str:
        d = self.workdir
        return f"""\
# written by tests/servers.py
# Upstream's key is reporting-disabled; Debian's build renamed it reporting-enabled. Unknown keys are ignored.
reporting-disabled = true
reporting-enabled = false
bind-address = "127.0.0.1:{self.rpc_port}"

[meta]
  dir = "{d / 'meta'}"
  retention-autocreate = true
  logging-enabled = false

[data]
  dir = "{d / 'data'}"
  wal-dir = "{d / 'wal'}"
  query-log-enabled = false
  trace-logging-enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false
  log-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{self.port}"
  auth-enabled = false
  log-enabled = false
  suppress-write-log = true
  pprof-enabled = false
  unix-socket-enabled = false

[ifql]
  enabled = false

[logging]
  level = "warn"
  suppress-logo = true
"""

    def _command(self, exe: str) -> list[str]:
        for sub in ("meta", "data", "wal"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self.config_path.write_text(self._config())
        return [exe, "-config", str(self.config_path)]

    def create_database(self, name: str) -> None:
        self._request("POST", "/query", data=urllib.parse.urlencode({"q": f'CREATE DATABASE "{name}"'}).encode(),
                      headers={"Content-Type": "application/x-www-form-urlencoded"})

    def drop_database(self, name: str) -> None:
        self._request("POST", "/query", data=urllib.parse.urlencode({"q": f'DROP DATABASE "{name}"'}).encode(),
                      headers={"Content-Type": "application/x-www-form-urlencoded"})

    def query(self, db: str, influxql: str) -> list[dict[str, Any]]:
        """POST /query?db=&epoch=ms; returns results[0]["series"] (each {"name","columns","values",...}) or [].

        Raises ServerError when InfluxDB reports an error for the statement.
        """
        body = self._request("POST", "/query", params={"db": db, "epoch": "ms"},
                             data=urllib.parse.urlencode({"q": influxql}).encode(),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
        doc = json.loads(body)
        if "error" in doc:
            raise ServerError(f"query {influxql!r}: {doc['error']}")
        results = doc.get("results") or [{}]
        if "error" in results[0]:
            raise ServerError(f"query {influxql!r}: {results[0]['error']}")
        return results[0].get("series", [])

    def write(self, db: str, lines: str | bytes, precision: str = "ms") -> tuple[int, bytes]:
        """POST /write (helper for seeding data); returns (status, body) without raising."""
        data = lines.encode() if isinstance(lines, str) else lines
        return _http("POST", f"{self.url}/write?" + urllib.parse.urlencode({"db": db, "precision": precision}),
                     data=data)


class VictoriaMetrics(_Server):
    """VictoriaMetrics single node, started with `-retentionPeriod 100y`.

    Line protocol goes to /write or /api/v2/write (db/bucket/org/token ignored, gzip accepted); each field is
    stored as `{measurement}_{field}` with the tags as labels; ms timestamps.

    Timestamps (checked on 1.79.5): with 100y retention anything from 1 ms after the epoch up to now + 2 days
    is stored; samples later than now + 2 days are DROPPED SILENTLY (still 204), and with a short retention
    (default 1 month) so are samples older than now - retention. Bad lines are skipped with 204 as well.
    Duplicate samples (same series and timestamp) are all kept: there is no dedup unless
    -dedup.minScrapeInterval is set. With default flags /api/v1/export without start/end hid future samples
    and, for ~30 s, the newest ones (-search.latencyOffset); so export() passes start=0 and end=now+3 days
    and the server runs with -search.latencyOffset=0s -search.disableCache.
    """

    binary = VICTORIA
    name = "victoria-metrics"
    ready_path = "/health"
    ready_status = 200

    def _command(self, exe: str) -> list[str]:
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        return [exe,
                f"-storageDataPath={data}",
                f"-httpListenAddr=127.0.0.1:{self.port}",
                "-retentionPeriod=100y",
                "-loggerLevel=ERROR",
                "-search.disableCache",          # queries always see fresh data
                "-search.latencyOffset=0s",      # ... including the last 30 s
                "-memory.allowedPercent=20",
                "-http.shutdownDelay=0s"]

    def force_flush(self) -> None:
        """Make recently ingested samples visible to queries (GET /internal/force_flush)."""
        self._request("GET", "/internal/force_flush")

    def export(self, match: str = '{__name__=~".+"}', *, start: float = 0,
               end: float | None = None) -> list[dict[str, Any]]:
        """force_flush(), then /api/v1/export; one dict per series: {"metric": {"__name__": ..., tags...},
        "values": [...], "timestamps": [ms, ...]}, sorted by metric name and labels."""
        self.force_flush()
        if end is None:
            end = time.time() + 3 * 86400
        body = self._request("GET", "/api/v1/export",
                             params=[("match[]", match), ("start", f"{start:.3f}"), ("end", f"{end:.3f}")])
        rows = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        rows.sort(key=lambda r: sorted(r["metric"].items()))
        return rows

    def query(self, promql: str, time_s: float | None = None) -> list[dict[str, Any]]:
        """Instant query (GET /api/v1/query); returns data.result."""
        self.force_flush()
        params = {"query": promql}
        if time_s is not None:
            params["time"] = f"{time_s:.3f}"
        doc = json.loads(self._request("GET", "/api/v1/query", params=params))
        return doc["data"]["result"]

    def delete_all(self, match: str = '{__name__=~".+"}') -> None:
        """Delete matching series (isolation between tests sharing one server); re-ingesting works after."""
        self._request("POST", "/api/v1/admin/tsdb/delete_series", params=[("match[]", match)])


class Mosquitto(_Server):
    """Debian's mosquitto 2.0 on 127.0.0.1:<port>, no persistence.

    `users`: {name: password} (then anonymous clients are refused); `tls`: (certfile, keyfile) for a TLS
    listener. Ready once the port accepts a TCP connection.
    """

    binary = "mosquitto"
    name = "mosquitto"

    def __init__(self, *, users: dict[str, str] | None = None, tls: tuple[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.users = users or {}
        self.tls = tls

    def _command(self, exe: str) -> list[str]:
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", "user root", "log_dest stdout",
                 "log_type error", "log_type warning", "log_type notice", "log_type information"]
        if self.users:
            pw = self.workdir / "passwd"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run([_which("mosquitto_passwd") or "mosquitto_passwd", "-b", str(pw), user, password],
                               check=True, capture_output=True, timeout=30)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls:
            lines += [f"certfile {self.tls[0]}", f"keyfile {self.tls[1]}"]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return [exe, "-c", str(conf)]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"mosquitto exited with code {self.proc.returncode} during start-up; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"mosquitto not ready on port {self.port}; log:\n{self.log_tail()}")
            time.sleep(0.05)


class Prometheus(_Server):
    """Debian's prometheus 2.42 on 127.0.0.1:<port> with its TSDB in the temp dir, scraping `targets`
    (host:port, path /metrics) every `scrape_interval_s`."""

    binary = "prometheus"
    name = "prometheus"
    ready_path = "/-/ready"

    def __init__(self, targets: list[str], *, scrape_interval_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.targets = targets
        self.scrape_interval_s = scrape_interval_s

    def _command(self, exe: str) -> list[str]:
        conf = self.workdir / "prometheus.yml"
        conf.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": f"{self.scrape_interval_s:g}s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "solarpowerbrampton", "metrics_path": "/metrics",
                                "static_configs": [{"targets": self.targets}]}]}))
        return [exe, f"--config.file={conf}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """GET /api/v1/query: the instant vector's results ([{metric: {...}, value: [t, "v"]}, ...])."""
        status, body = _http("GET", f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        if status != 200:
            raise ServerError(f"prometheus query {promql!r}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)["data"]["result"]


def mqtt_binaries_available() -> str | None:
    """None when mosquitto, mosquitto_passwd, prometheus and openssl exist, else a reason to skip."""
    missing = [b for b in ("mosquitto", "mosquitto_passwd", "prometheus", "openssl") if _which(b) is None]
    return (f"{', '.join(missing)} not installed (run scripts/install-test-tools.sh as root: Debian packages "
            "mosquitto, prometheus, openssl)") if missing else None
