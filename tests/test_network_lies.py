"""The network lies: captive portals, endless and trickled answers, stalled uploads, echoed credentials,
and SIGTERM while a server stalls. Every case runs against a real server (InfluxDB 1.6.7 or
VictoriaMetrics) behind the fault proxy (tests/proxy.py), through the real writers."""
from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from config import parse_config
from local_solution import make_writer
from outbox import Outbox
from rpi_errors import ErrorHandler, Tier, UnreachableError
from sender import Policy, Sender
from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok-Lies-Secret-987"
USER, PASSWORD = "logger", "pa55-Lies-Secret"


def writer_for(kind, server, url, *, timeout_s=1.0):
    """A real writer of `kind` ("v1": InfluxDB 1.x /write with Basic auth, "v2": /api/v2/write, which the
    Cloud writer is too) pointed at `url` (the proxy)."""
    if kind == "v1":
        server.create_database("lies")
        influx = {"api": "v1", "database": "lies", "username": USER}
    else:
        influx = {"api": "v2", "org": "coop", "bucket": "solar"}
    cfg = parse_config({"influx": {"kind": "local", "url": url, "timeout_s": timeout_s, **influx}})
    return make_writer(cfg.influx, environ={"INFLUXDB_TOKEN": TOKEN, "INFLUXDB_PASSWORD": PASSWORD})


@pytest.fixture(params=["v1", "v2"])
def kind(request):
    return request.param


@pytest.fixture
def server(kind, request):
    return request.getfixturevalue("influxdb1" if kind == "v1" else "victoria")


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(tmp_path / "store")
    yield box
    box.close()


def fill(outbox, n, unit, *, noisy=False):
    """`n` points; `noisy` makes them compress badly (random tag and values) so a batch is big on the wire."""
    rng = random.Random(n)
    start_ms = int(time.time() * 1000) - n * 10
    rows = []
    for i in range(n):
        t = start_ms + i * 10
        extra = f",noise={rng.getrandbits(64):016x}" if noisy else ""
        rows.append((t, f"electricity,site=test,unit={unit}{extra} current_ma={rng.random() * 1000:.6f},"
                        f"bus_voltage_v={rng.random() * 14:.6f},samples={i}i {t}"))
    outbox.append(rows)
    return rows


def make_sender(writer, outbox, clock):
    """A sender whose policy waits run on the fake clock; HTTP and its deadlines are real."""
    return Sender(writer, outbox, ErrorHandler(None, clock=clock), Policy(), clock=clock, sleep=clock.sleep,
                  rng=random.Random(3))


def stored_count(kind, server, unit):
    if kind == "v1":
        series = server.query("lies", f"SELECT count(current_ma) FROM electricity WHERE unit='{unit}'")
        return series[0]["values"][0][1] if series else 0
    return sum(len(row["values"]) for row in server.export(match=f'{{__name__="electricity_current_ma",unit="{unit}"}}'))


# -- success means the API's own success answer --------------------------------------------------------------
@pytest.mark.parametrize("answer", ["portal", "empty-200", "json-201"])
def test_a_2xx_that_is_not_influxdbs_204_is_not_a_delivery(kind, server, make_proxy, outbox, clock, answer):
    proxy = make_proxy(server.url)
    if answer == "portal":
        proxy.portal()
    elif answer == "empty-200":
        proxy.fail_always(200)
    else:
        proxy.fail_always(201, body={"status": "ok"})
    unit = f"portal-{kind}-{answer}"
    fill(outbox, 20, unit)
    sender = make_sender(writer_for(kind, server, proxy.url), outbox, clock)
    result = sender.flush()
    assert isinstance(result.error, UnreachableError)
    assert "captive portal or proxy answered" in str(result.error)
    assert sender.handler.top_tier == Tier.CONNECTION
    assert outbox.stats().queue_depth == 20 and result.delivered == 0
    assert "captive portal" in outbox.state()["last_error"]
    proxy.clear()  # the SIM was topped up
    assert sender.flush().delivered == 20
    assert stored_count(kind, server, unit) == 20


# -- bounded answers ----------------------------------------------------------------------------------------
def test_an_endless_answer_is_read_only_up_to_64_kb(kind, server, make_proxy, outbox, clock):
    proxy = make_proxy(server.url)
    proxy.endless_body(200)
    fill(outbox, 5, f"endless-{kind}")
    result = make_sender(writer_for(kind, server, proxy.url, timeout_s=5), outbox, clock).flush()
    assert isinstance(result.error, UnreachableError)
    assert "answer longer than 64 KB" in str(result.error) and "captive portal" in str(result.error)
    assert len(str(result.error)) < 600  # the page is not copied into the message
    assert outbox.stats().queue_depth == 5


# -- deadlines ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_trickling_server_is_reported_within_a_few_timeouts(kind, server, make_proxy, outbox, clock, part):
    proxy = make_proxy(server.url)
    # A byte every 0.2 s: far below any per-read timeout, so only a deadline on the whole answer ends it.
    proxy.trickle(part, status=204 if part == "headers" else 400, body=b'{"error":"' + b"x" * 200 + b'"}',
                  bytes_per_s=5)
    fill(outbox, 5, f"trickle-{kind}-{part}")
    sender = make_sender(writer_for(kind, server, proxy.url, timeout_s=1.0), outbox, clock)
    began = time.monotonic()
    result = sender.flush()
    took = time.monotonic() - began
    assert isinstance(result.error, UnreachableError)
    assert "no answer within 1 s after the upload" in str(result.error)
    assert took < 4.0, took  # a few timeout_s, not the 40+ s the trickle would last
    assert sender.handler.top_tier == Tier.CONNECTION  # the LED shows it
    assert "no answer within" in outbox.state()["last_error"]  # `status` shows it
    assert outbox.stats().queue_depth == 5  # nothing unacknowledged counts as delivered


def test_a_big_batch_over_a_slow_link_still_goes_through(victoria, make_proxy, outbox, clock):
    proxy = make_proxy(victoria.url, rcvbuf=16 * 1024)
    proxy.slow_upload(40_000)  # bytes/s: far above the 2 KB/s minimum, yet the upload outlasts timeout_s
    fill(outbox, 5000, "slow-link", noisy=True)
    sender = make_sender(writer_for("v2", victoria, proxy.url, timeout_s=1.0), outbox, clock)
    result = sender.flush()
    assert result.error is None and result.delivered == 5000
    assert len(proxy.log[0].body) > 100_000  # more than 2.5 s of upload at 40 KB/s: > timeout_s
    assert stored_count("v2", victoria, "slow-link") == 5000


def test_a_stalled_upload_is_an_error_and_nothing_is_lost(kind, server, make_proxy, outbox, clock):
    proxy = make_proxy(server.url, rcvbuf=16 * 1024)
    proxy.stall_upload(after_bytes=4096)
    fill(outbox, 5000, f"stall-{kind}", noisy=True)
    sender = make_sender(writer_for(kind, server, proxy.url, timeout_s=1.0), outbox, clock)
    began = time.monotonic()
    result = sender.flush()
    assert isinstance(result.error, UnreachableError) and "stalled" in str(result.error)
    assert time.monotonic() - began < 5.0
    assert sender.handler.top_tier == Tier.CONNECTION
    assert outbox.stats().queue_depth == 5000
    proxy.clear()
    assert sender.flush().delivered == 5000


# -- the daemon as a process --------------------------------------------------------------------------------
def daemon_config(tmp_path, influx: str, *, web_port: int | None = None, level: str = "INFO") -> Path:
    path = tmp_path / "config.toml"
    web = f'[web]\nenabled = true\nlisten = "127.0.0.1:{web_port}"\n' if web_port else ""
    path.write_text(f"""
[site]
name = "lies"
[sampling]
interval_s = 0.2
window_s = 0.05
[store]
dir = "{tmp_path / 'store'}"
[simulation]
enabled = true
start = 2026-06-21T12:00:00
[led]
enabled = false
[log]
level = "{level}"
{web}[influx]
kind = "local"
flush_interval_s = 0.5
{influx}
""")
    path.chmod(0o600)
    return path


def start_daemon(config: Path, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "INFLUXDB_TOKEN": TOKEN, "INFLUXDB_PASSWORD": PASSWORD}
    with open(log_path, "w") as log_file:
        return subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=log_file, env=env, cwd=ROOT)


def stop_daemon(proc: subprocess.Popen, deadline_s: float = 30.0) -> float:
    """SIGTERM, then wait (with a deadline) for the exit; returns the seconds it took."""
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(deadline_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the daemon did not stop within {deadline_s} s of SIGTERM")
    return time.monotonic() - began


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def wait_for_write(proxy, tmp_path):
    """The first write (POST) the daemon sent through `proxy` (its boot probe is a GET /ping)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        posts = [r for r in list(proxy.log) if r.method == "POST"]
        if posts:
            return posts[0]
        time.sleep(0.05)
    pytest.fail("the daemon never tried to deliver:\n" + (tmp_path / "daemon.log").read_text())


def status_json(config: Path) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), "status", "--json", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_sigterm_ends_the_daemon_within_10_s_while_the_server_stalls(influxdb1, victoria, make_proxy, tmp_path,
                                                                      api):
    proxy = make_proxy(influxdb1.url if api == "v1" else victoria.url)
    proxy.delay(3600)  # takes the request, never answers
    influx = ('api = "v1"\ndatabase = "lies"' if api == "v1" else 'api = "v2"\norg = "coop"\nbucket = "solar"')
    config = daemon_config(tmp_path, f'{influx}\nurl = "{proxy.url}"\ntimeout_s = 600')  # the longest timeout_s allowed
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_for_write(proxy, tmp_path)
        took = stop_daemon(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "daemon.log").read_text()
    assert proc.returncode == 0, log
    assert took < 10.0, f"SIGTERM took {took:.1f} s"
    assert "stopped after" in log
    box = Outbox(tmp_path / "store", readonly=True)
    try:
        stats = box.stats()
    finally:
        box.close()
    assert stats.stored_total > 0 and stats.queue_depth == stats.stored_total  # nothing counted as delivered



def _syn_sent_to(port: int) -> set[str]:
    """The local ends of the TCP connections to 127.0.0.1:`port` whose SYN is not answered yet
    (/proc/net/tcp: state SYN_SENT)."""
    import socket
    import struct

    # The kernel prints the address as a number in this machine's byte order, the port in hex.
    peer = f"{struct.unpack('=I', socket.inet_aton('127.0.0.1'))[0]:08X}:{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)
        rows = [row.split()[1:4] for row in table]
    return {local for local, remote, state in rows if remote == peer and state == "02"}


def test_sigterm_ends_the_daemon_within_10_s_while_the_server_and_the_mqtt_broker_hang(victoria, make_proxy,
                                                                                       tmp_path):
    """A dead SIM link: the database takes the request and never answers, and the broker's connection attempt
    hangs (a listener whose accept queue is full drops the SYN, as a link that lost its route does). The
    outputs stop side by side, so the daemon still ends within 10 s."""
    import socket

    proxy = make_proxy(victoria.url)
    proxy.delay(3600)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers = [socket.create_connection(listener.getsockname(), timeout=5)]  # the queue is full after it
        try:
            config = daemon_config(tmp_path, f'api = "v2"\norg = "coop"\nbucket = "solar"\nurl = "{proxy.url}"\n'
                                             f'timeout_s = 600\n[mqtt]\nenabled = true\nhost = "127.0.0.1"\n'
                                             f'port = {listener.getsockname()[1]}')
            proc = start_daemon(config, tmp_path / "daemon.log")
            try:
                wait_for_write(proxy, tmp_path)
                deadline = time.monotonic() + 60
                while "no answer within 5 s" not in (tmp_path / "daemon.log").read_text():  # the first attempt
                    assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
                    time.sleep(0.05)
                # The next attempt begins after the 1 s backoff: stopped as it begins, the MQTT thread has its
                # 5 s still to wait, the sender its final flush (one after the other: over 10 s).
                port = listener.getsockname()[1]
                first = _syn_sent_to(port)  # the first attempt's socket, if it lingers
                while not _syn_sent_to(port) - first:  # the kernel's view: a new connection being tried
                    assert time.monotonic() < deadline, "no second attempt to reach the broker"
                    time.sleep(0.02)
                took = stop_daemon(proc)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        finally:
            for filler in fillers:
                filler.close()
    log = (tmp_path / "daemon.log").read_text()
    assert proc.returncode == 0, log
    assert took < 10.0, f"SIGTERM took {took:.1f} s"
    assert "MQTT broker 127.0.0.1" in log  # the broker's connection really hung (and was reported)

def test_an_endless_answer_keeps_the_daemon_under_200_mb(victoria, make_proxy, tmp_path):
    proxy = make_proxy(victoria.url)
    proxy.endless_body(200)
    config = daemon_config(tmp_path, f'api = "v2"\norg = "coop"\nbucket = "solar"\nurl = "{proxy.url}"\ntimeout_s = 30')
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        # The boot probe and two writes (backoff 2 s between them), each met with an endless page.
        assert proxy.wait_for_requests(3, timeout=60), (tmp_path / "daemon.log").read_text()
        peak = peak_rss_mb(proc.pid)
        stop_daemon(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "daemon.log").read_text()
    assert "answer longer than 64 KB" in log
    assert peak < 200, f"peak RSS {peak:.0f} MB"
    assert proxy.bytes_out > 64 * 1024  # the proxy really sent more than the bound


# -- secrets in every form ----------------------------------------------------------------------------------
def secret_forms_sent(api: str) -> list[str]:
    if api == "v1":
        pair = f"{USER}:{PASSWORD}"
        return [PASSWORD, pair, base64.b64encode(pair.encode()).decode()]
    return [TOKEN, f"Token {TOKEN}", base64.b64encode(TOKEN.encode()).decode()]


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_an_echoed_credential_never_reaches_the_log_status_or_the_live_page(influxdb1, victoria, make_proxy,
                                                                             tmp_path, api):
    proxy = make_proxy(influxdb1.url if api == "v1" else victoria.url)
    proxy.echo_authorization(401)
    if api == "v1":
        influxdb1.create_database("lies")
        influx = f'api = "v1"\ndatabase = "lies"\nusername = "{USER}"'
    else:
        influx = 'api = "v2"\norg = "coop"\nbucket = "solar"'
    web_port = free_port()
    config = daemon_config(tmp_path, f'{influx}\nurl = "{proxy.url}"\ntimeout_s = 5', web_port=web_port,
                           level="DEBUG")
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        write = wait_for_write(proxy, tmp_path)
        # The echo really carried the credential back (the test would prove nothing otherwise).
        assert any(form in write.header("Authorization", "") for form in secret_forms_sent(api)[1:])
        status = wait_until(lambda: (s := status_json(config))["last_error"] and s, 60, "last_error in status")

        def live_now():
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/now", timeout=5) as response:
                text = response.read().decode()
            return text if "refused" in text else None

        now = wait_until(live_now, 30, "the error on /api/now")
        stop_daemon(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "daemon.log").read_text()
    assert "DEBUG" in log and "HTTP 401" in log and "***" in log  # the echo was logged, scrubbed
    status_text = json.dumps(status)
    assert "HTTP 401" in status_text
    for form in secret_forms_sent(api):
        assert form not in log, f"{form!r} in the log"
        assert form not in status_text, f"{form!r} in status --json"
        assert form not in now, f"{form!r} in /api/now"


def test_the_transport_watchdog_closed_from_its_own_expiry_and_armed_again_leaves_one_thread():
    # A deadline that expires may close the connection, and with it the watchdog, from the watchdog's own
    # thread; the next request arms it again. The thread that ran the expiry must then end, not serve on
    # beside the new one.
    from transport import _Watchdog

    fired = threading.Event()
    watchdog = None

    def expire(token):
        if token == "first":
            watchdog.close()
            watchdog.arm(3600, "second")
            fired.set()

    def watchdogs():  # this test's only: another test's writer may still be alive
        return [t for t in threading.enumerate()
                if t.name == "transport-watchdog" and t.is_alive() and t not in others]

    others = set(threading.enumerate())
    watchdog = _Watchdog(expire)
    watchdog.arm(0.01, "first")
    assert fired.wait(10), "the first deadline never expired"

    deadline = time.monotonic() + 10
    while len(watchdogs()) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert len(watchdogs()) == 1
    finally:
        watchdog.close()
    assert not watchdogs()


def test_a_transport_dropped_without_close_leaves_no_watchdog_thread():
    """A transport dropped without close() (a writer replaced, a probe's) must not leave its watchdog thread
    serving on for the life of the process: the thread holds it only weakly and ends once it is collected.
    (The test proxy answers the request that starts the thread.)"""
    import gc

    from proxy import FaultProxy
    from transport import Transport

    with FaultProxy("http://127.0.0.1:9") as server:
        server.fail_always(204)  # InfluxDB's ping answer, from the proxy itself
        transport = Transport(server.url, 5)
        assert transport.request("GET", "/ping").status == 204
        thread = transport._watchdog._thread
        assert thread is not None and thread.is_alive()
        del transport
        gc.collect()
        thread.join(10)
        assert not thread.is_alive()


@pytest.fixture
def hanging_lookup(monkeypatch):
    """No resolver that hangs can run here: the system's getaddrinfo is replaced by one that holds a lookup of
    influx.example until the test ends (30 s at most: a caller that waits for it fails the test)."""
    import socket

    answered = threading.Event()
    real = socket.getaddrinfo

    def hanging(host, *args, **kwargs):
        if host == "influx.example":
            answered.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    yield
    answered.set()


def test_a_delivery_whose_name_lookup_hangs_fails_within_timeout_s_as_a_connection_problem(hanging_lookup):
    """A SIM link's stalled resolver held a flush for as long as it liked (getaddrinfo has no timeout): the
    lookup now runs under `timeout_s` too, and the request fails as a Connection problem that says so."""
    from rpi_errors import UnreachableError
    from transport import Transport

    transport = Transport("http://influx.example:8086", timeout_s=0.5)
    began = time.monotonic()
    try:
        with pytest.raises(UnreachableError, match="DNS lookup gave no answer within 0.5 s"):
            transport.post("/api/v2/write", b"m f=1 1", {})
    finally:
        transport.close()
    assert time.monotonic() - began < 10


def test_the_influx_check_keeps_to_its_deadline_when_the_name_lookup_hangs(hanging_lookup):
    """`main.py check` on a SIM link whose DNS stalls: the check ends within its deadline, and says the name
    lookup is what hung (the Transport bounds it by its timeout_s)."""
    import autostart

    influx = parse_config({"influx": {"kind": "local", "api": "v2", "url": "http://influx.example:8086",
                                      "org": "o", "bucket": "b"}}).influx
    finding = autostart.influx_finding(influx, timeout_s=0.5)
    assert finding.detail == ("http://influx.example:8086 is not reachable (cannot reach http://influx.example:8086: "
                              "DNS lookup gave no answer within 0.5 s)")
    assert finding.error is not None
