"""Smoke tests for the real test servers (tests/servers.py) and the fault-injecting proxy (tests/proxy.py).

Each server is started once for this module (conftest's own_influxdb1 and own_victoria: these tests stop,
restart and pause them).
Skipped with a reason when influxd / victoria-metrics are missing, failed instead when CI=true.
"""
from __future__ import annotations

import gzip
import json
import socket
import time

import pytest
import urllib3

from proxy import FaultProxy
from servers import free_port

T0 = 1_700_000_000_000  # 2023-11-14, ms
LINES = (f"solar,channel=panel voltage=12.5,current=1.25 {T0}\n"
         f"solar,channel=panel voltage=12.75,current=1.5 {T0 + 3000}\n"
         f"solar,channel=battery voltage=13.0,current=0.5 {T0 + 6000}\n")


def _influx_rows(series: list[dict]) -> list[dict]:
    rows = []
    for s in series:
        for values in s["values"]:
            rows.append(dict(zip(s["columns"], values)))
    return sorted(rows, key=lambda r: r["time"])


# --- InfluxDB 1.6.7 -------------------------------------------------------------------------------------------

def test_influxdb1_write_and_query_ms(own_influxdb1, http):
    assert own_influxdb1.url == f"http://127.0.0.1:{own_influxdb1.port}"
    r = http.request("POST", f"{own_influxdb1.url}/write?db=test&precision=ms", body=LINES.encode())
    assert r.status == 204, r.data
    rows = _influx_rows(own_influxdb1.query("test", "SELECT * FROM solar"))
    assert [(r["time"], r["channel"], r["voltage"], r["current"]) for r in rows] == [
        (T0, "panel", 12.5, 1.25), (T0 + 3000, "panel", 12.75, 1.5), (T0 + 6000, "battery", 13.0, 0.5)]


def test_influxdb1_gzip_and_status_codes(own_influxdb1, http):
    body = gzip.compress(f"gz,t=a v=1i {T0}\n".encode())
    r = http.request("POST", f"{own_influxdb1.url}/write?db=test&precision=ms", body=body,
                     headers={"Content-Encoding": "gzip"})
    assert r.status == 204, r.data
    assert _influx_rows(own_influxdb1.query("test", "SELECT * FROM gz")) == [{"time": T0, "t": "a", "v": 1}]
    # unknown database 404, missing db 400, and no API v2 in 1.6.7
    assert http.request("POST", f"{own_influxdb1.url}/write?db=nope", body=b"m v=1").status == 404
    assert http.request("POST", f"{own_influxdb1.url}/write", body=b"m v=1").status == 400
    assert http.request("POST", f"{own_influxdb1.url}/api/v2/write?bucket=test&org=o", body=b"m v=1").status == 404


def test_influxdb1_partial_write_stores_good_lines(own_influxdb1, http):
    url = f"{own_influxdb1.url}/write?db=test&precision=ms"
    assert http.request("POST", url, body=f"pw,t=a v=1 {T0}\n".encode()).status == 204
    # a line that does not parse, and a type conflict with the stored float field
    batch = (f"pw,t=a v=2 {T0 + 1000}\n"
             "this is not line protocol\n"
             f"pw,t=b v=3i {T0 + 2000}\n"
             f"pw,t=c v=4 {T0 + 3000}\n")
    r = http.request("POST", url, body=batch.encode())
    assert r.status == 400
    err = json.loads(r.data)["error"]
    # both problems -> one 400; the message names only the type conflict (dropped counts it, not the bad line)
    assert err.startswith("partial write: field type conflict") and err.endswith("dropped=1"), err
    rows = _influx_rows(own_influxdb1.query("test", "SELECT * FROM pw"))
    assert [(r["time"], r["t"], r["v"]) for r in rows] == [(T0, "a", 1), (T0 + 1000, "a", 2), (T0 + 3000, "c", 4)]

    # type conflict alone: "partial write: field type conflict ... dropped=1", the other lines are kept
    r = http.request("POST", url, body=f"pw,t=d v=5i {T0 + 4000}\npw,t=e v=6 {T0 + 5000}\n".encode())
    assert r.status == 400
    err = json.loads(r.data)["error"]
    assert err.startswith("partial write: field type conflict") and err.endswith("dropped=1"), err
    assert len(own_influxdb1.query("test", "SELECT * FROM pw")[0]["values"]) == 4

    # A conflict inside one batch, shard already exists: partial write, good lines kept.
    r = http.request("POST", url, body=f"fresh v=1 {T0}\nfresh v=2i {T0 + 1000}\nfresh v=3 {T0 + 2000}\n".encode())
    assert r.status == 400 and json.loads(r.data)["error"].startswith("partial write: field type conflict")
    assert [v for _, v in own_influxdb1.query("test", "SELECT * FROM fresh")[0]["values"]] == [1, 3]
    # Surprise: the same batch aimed at a shard that does not exist yet (a time range not written before;
    # autogen shard groups span 7 days) is rejected WHOLE: no "partial write", nothing stored.
    t = 1_600_000_000_000
    r = http.request("POST", url, body=f"fresh2 v=1 {t}\nfresh2 v=2i {t + 1000}\nfresh2 v=3 {t + 2000}\n".encode())
    assert r.status == 400 and json.loads(r.data) == {"error": "field type conflict"}
    assert own_influxdb1.query("test", "SELECT * FROM fresh2") == []


def test_influxdb1_stop_start_keeps_data_and_port(own_influxdb1, http):
    url = f"{own_influxdb1.url}/write?db=test&precision=ms"
    assert http.request("POST", url, body=f"outage v=1 {T0}\n".encode()).status == 204
    port, pid = own_influxdb1.port, own_influxdb1.pid
    own_influxdb1.stop()
    assert not own_influxdb1.running
    with pytest.raises(urllib3.exceptions.HTTPError):
        http.request("GET", f"{own_influxdb1.url}/ping")
    own_influxdb1.start()
    assert own_influxdb1.port == port and own_influxdb1.pid != pid
    assert _influx_rows(own_influxdb1.query("test", "SELECT * FROM outage")) == [{"time": T0, "v": 1}]


def test_influxdb1_pause_resume(own_influxdb1, http):
    own_influxdb1.pause()
    try:
        with pytest.raises(urllib3.exceptions.ReadTimeoutError):
            http.request("GET", f"{own_influxdb1.url}/ping", timeout=urllib3.Timeout(connect=1, read=0.3))
    finally:
        own_influxdb1.resume()
    assert http.request("GET", f"{own_influxdb1.url}/ping").status == 204


# --- VictoriaMetrics 1.79.5 -----------------------------------------------------------------------------------

def test_victoria_v2_write_gzip_export(own_victoria, http):
    r = http.request("POST", f"{own_victoria.url}/api/v2/write?bucket=x&org=y&precision=ms", body=gzip.compress(LINES.encode()),
                     headers={"Content-Encoding": "gzip", "Authorization": "Token ignored"})
    assert r.status == 204, r.data
    got = {(row["metric"]["__name__"], row["metric"]["channel"]): list(zip(row["timestamps"], row["values"]))
           for row in own_victoria.export('{__name__=~"solar_.+"}')}
    assert got == {
        ("solar_current", "battery"): [(T0 + 6000, 0.5)],
        ("solar_current", "panel"): [(T0, 1.25), (T0 + 3000, 1.5)],
        ("solar_voltage", "battery"): [(T0 + 6000, 13.0)],
        ("solar_voltage", "panel"): [(T0, 12.5), (T0 + 3000, 12.75)],
    }


def test_victoria_timestamps_and_bad_lines(own_victoria, http):
    now = int(time.time() * 1000)
    body = (f"ts,when=epoch v=1 1000\n"
            f"ts,when=y2000 v=2 946684800000\n"
            "garbage line here\n"
            f"ts,when=tomorrow v=3 {now + 86_400_000}\n"
            f"ts,when=in3days v=4 {now + 3 * 86_400_000}\n")
    r = http.request("POST", f"{own_victoria.url}/write?precision=ms", body=body.encode())
    assert r.status == 204  # bad line and too-new sample: silently dropped
    kept = {row["metric"]["when"]: row["timestamps"] for row in own_victoria.export('{__name__="ts_v"}', end=now / 1000 + 10 * 86400)}
    assert kept == {"epoch": [1000], "y2000": [946684800000], "tomorrow": [now + 86_400_000]}


def test_victoria_stop_start_pause(own_victoria, http):
    r = http.request("POST", f"{own_victoria.url}/write?precision=ms", body=f"persist v=7 {T0}\n".encode())
    assert r.status == 204
    own_victoria.stop()
    own_victoria.start()
    assert [(row["timestamps"], row["values"]) for row in own_victoria.export('{__name__="persist_v"}')] == [([T0], [7])]
    own_victoria.pause()
    try:
        with pytest.raises(urllib3.exceptions.ReadTimeoutError):
            http.request("GET", f"{own_victoria.url}/health", timeout=urllib3.Timeout(connect=1, read=0.3))
    finally:
        own_victoria.resume()
    assert http.request("GET", f"{own_victoria.url}/health").status == 200


# --- FaultProxy ------------------------------------------------------------------------------------------

def test_proxy_counts_exact_wire_bytes(own_victoria):
    with FaultProxy(own_victoria.url) as proxy:
        raw = (b"POST /write?precision=ms HTTP/1.1\r\nHost: x\r\nContent-Length: 23\r\n\r\n"
               + f"wire v=1 {T0}\n".encode())
        assert len(f"wire v=1 {T0}\n") == 23
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(raw * 2)  # two pipelined requests on one keep-alive connection
            data = b""
            while data.count(b"HTTP/1.1 204") < 2:
                chunk = s.recv(4096)
                assert chunk, data
                data += chunk
        assert proxy.requests == 2 and proxy.bytes_in == 2 * len(raw)
        assert [e.bytes_in for e in proxy.log] == [len(raw), len(raw)]
        assert proxy.log[0].method == "POST" and proxy.log[0].path == "/write?precision=ms"
        assert proxy.log[0].query == {"precision": "ms"} and proxy.log[0].header("content-length") == "23"
        proxy.reset_counts()
        assert (proxy.requests, proxy.bytes_in, proxy.log) == (0, 0, [])


def test_proxy_passthrough_keepalive_and_429(own_victoria, http):
    with FaultProxy(own_victoria.url) as proxy:
        url = f"{proxy.url}/api/v2/write?bucket=b&org=o&precision=ms"
        proxy.fail_next(429, headers={"Retry-After": "7"}, body={"code": "too many requests"})
        r = http.request("POST", url, body=gzip.compress(f"px v=1 {T0}\n".encode()),
                         headers={"Content-Encoding": "gzip"})
        assert r.status == 429 and r.headers["Retry-After"] == "7"
        assert json.loads(r.data) == {"code": "too many requests"}
        for i in range(1, 4):  # same pooled connection: keep-alive through the proxy
            r = http.request("POST", url, body=gzip.compress(f"px v={i} {T0 + i}\n".encode()),
                             headers={"Content-Encoding": "gzip"})
            assert r.status == 204, r.data
        assert http.request("GET", f"{proxy.url}/health").data == b"OK"
        assert proxy.requests == 5
        assert [e.status for e in proxy.log] == [429, 204, 204, 204, 200]
        assert [e.injected for e in proxy.log] == [True, False, False, False, False]
        assert proxy.log[0].body[:2] == b"\x1f\x8b"  # raw body kept gzipped
        assert proxy.decoded_bodies()[:2] == [f"px v=1 {T0}\n", f"px v=1 {T0 + 1}\n"]
        # the 429'd request never reached the server
        assert [row["timestamps"] for row in own_victoria.export('{__name__="px_v"}')] == [[T0 + 1, T0 + 2, T0 + 3]]


def test_proxy_fail_when_always_delay_refuse(own_influxdb1, http):
    with FaultProxy(own_influxdb1.url) as proxy:
        url = f"{proxy.url}/write?db=test&precision=ms"
        proxy.fail_when(lambda text: "REFUSE_ME" in text, 400,
                        body={"error": 'partial write: unable to parse "REFUSE_ME": dropped=1'})
        r = http.request("POST", url, body=b"fw,m=REFUSE_ME v=1 1000\n")
        assert r.status == 400 and json.loads(r.data)["error"].startswith("partial write")
        assert http.request("POST", url, body=f"fw,m=ok v=2 {T0}\n".encode()).status == 204
        assert _influx_rows(own_influxdb1.query("test", "SELECT * FROM fw")) == [{"time": T0, "m": "ok", "v": 2}]

        proxy.fail_always(503, headers={"Retry-After": "1"})
        assert [http.request("POST", url, body=b"x v=1").status for _ in range(3)] == [503] * 3
        proxy.clear()

        proxy.delay(0.5)
        with pytest.raises(urllib3.exceptions.ReadTimeoutError):
            http.request("GET", f"{proxy.url}/ping", timeout=urllib3.Timeout(connect=1, read=0.2))
        proxy.clear()
        assert http.request("GET", f"{proxy.url}/ping").status == 204

        proxy.refuse()
        with pytest.raises(urllib3.exceptions.ProtocolError):
            http.request("GET", f"{proxy.url}/ping")
        assert proxy.refused >= 1
        proxy.refuse(False)
        assert http.request("GET", f"{proxy.url}/ping").status == 204


def test_proxy_upstream_down_is_502(http):
    with FaultProxy(f"http://127.0.0.1:{free_port()}") as proxy:
        r = http.request("GET", f"{proxy.url}/ping")
        assert r.status == 502 and proxy.requests == 1


def test_conftest_fixtures(influxdb1, victoria, make_proxy, http):
    proxy = make_proxy(victoria.url)
    assert http.request("POST", f"{proxy.url}/write", body=f"fx v=1 {T0}\n".encode()).status == 204
    assert proxy.wait_for_requests(1, timeout=1)
    assert victoria.export('{__name__="fx_v"}')[0]["values"] == [1]
    victoria.delete_all('{__name__="fx_v"}')
    assert victoria.export('{__name__="fx_v"}') == []
    assert http.request("GET", f"{influxdb1.url}/ping").status == 204
