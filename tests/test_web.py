"""The live energy-flow page (web.py): a real FlowPage on a free port, a real Outbox, a real browser."""
from __future__ import annotations

import datetime as dt
import http.client
import json
import math
import os
import shutil
import socket
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import ledger
import web
from config import ChannelConfig
from outbox import Outbox
from schema import ELECTRICITY, SYSTEM, Point, typed_fields
from servers import require

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]

# The model as the README describes it, with every role in use somewhere.
CHANNELS = (
    ChannelConfig("red_house", 0x40),
    ChannelConfig("red_trade", 0x48, role="exchange", unit="red_house"),
    ChannelConfig("red_solar", 0x49, role="solar", unit="red_house"),
    ChannelConfig("red_load", 0x4A, role="load", unit="red_house"),
    ChannelConfig("green_house", 0x41),
    ChannelConfig("green_trade", 0x4B, role="exchange", unit="green_house"),
    ChannelConfig("blue_house", 0x44),  # no exchange meter: its state comes from the battery
    ChannelConfig("power_plant", 0x45, max_current_a=3.2),
    ChannelConfig("plant_solar", 0x4C, role="solar", unit="power_plant"),
)
HOUR_MS = 3_600_000
NOW_S = 1_779_999_900.0  # a multiple of 300 s: bucket edges are easy to name


def reading(channel, volts, current_ma):
    """One snapshot row as the daemon builds it."""
    power = None if volts is None or current_ma is None else round(volts * current_ma / 1000, 4)
    return {"name": channel.name, "unit": channel.unit_name, "role": channel.role, "bus_voltage_v": volts,
            "current_ma": current_ma, "power_w": power, "energy_in_wh": 0.5, "energy_out_wh": 0.25}


def snapshot(currents, volts=None, *, time_ms=1_780_000_000_000, tier=None, summary="all well",
             meaning="All well: measuring and sending normally.", channels=CHANNELS):
    """A snapshot with `currents` (mA) per channel name; channels not named read 0 mA."""
    volts = volts or {}
    rows = []
    for c in channels:
        rows.append(reading(c, volts.get(c.unit_name, 12.3), currents.get(c.name, 0.0)))
    return {"time_ms": time_ms, "channels": rows, "status": {"tier": tier, "summary": summary, "meaning": meaning}}


class Clock:
    def __init__(self, now: float = NOW_S) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def store_history(directory):
    """The callable main passes: its own Outbox connection per call, closed when the export is read."""
    def history(since_ms):
        box = Outbox(directory, check_integrity=False)
        try:
            yield from box.export(since_ms)
        finally:
            box.close()
    return history


@pytest.fixture
def start_page():
    pages = []

    def start(**kwargs):
        kwargs.setdefault("channels", CHANNELS)
        kwargs.setdefault("site", "brampton2zero")
        page = web.FlowPage("127.0.0.1:0", **kwargs)
        page.start()
        pages.append(page)
        return page

    yield start
    for page in pages:
        page.stop()


@pytest.fixture
def page(start_page):
    return start_page()


def get(page, path, method="GET", headers=None):
    """(status, headers, body) without raising for error statuses."""
    host, port = page.url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def now_json(page):
    status, headers, body = get(page, "/api/now")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    return json.loads(body)


def unit(view, name):
    return next(u for u in view["units"] if u["name"] == name)


def flow(view, kind, unit_name):
    return next(f for f in view["flows"] if f["kind"] == kind and f["unit"] == unit_name)


# -- /api/now and the derived flows ---------------------------------------------------------------------
def test_now_before_the_first_update_shows_the_configured_units(page):
    view = now_json(page)
    assert view["time_ms"] is None and view["version"] == 0
    assert [u["name"] for u in view["units"]] == ["red_house", "green_house", "blue_house", "power_plant"]
    assert all(u["state"] == "unknown" and u["battery_pct"] is None for u in view["units"])
    assert unit(view, "power_plant")["is_plant"] is True
    assert isinstance(view["server_time_ms"], int)


def test_now_shape_and_exchange_states(page):
    page.update(snapshot({"red_trade": 300.0, "green_trade": -300.0, "blue_house": 150.0, "red_solar": 400.0,
                          "red_load": -250.0, "plant_solar": 5.0},
                         volts={"red_house": 12.3, "green_house": 13.1, "blue_house": 11.5}))
    view = now_json(page)
    assert set(view) >= {"site", "plant", "time_ms", "version", "units", "flows", "status", "server_time_ms"}
    assert view["site"] == "brampton2zero" and view["plant"] == "power_plant"
    assert view["time_ms"] == 1_780_000_000_000 and view["version"] == 1

    red, green, blue = unit(view, "red_house"), unit(view, "green_house"), unit(view, "blue_house")
    assert (red["state"], red["state_source"]) == ("buying", "exchange")
    assert (green["state"], green["state_source"]) == ("selling", "exchange")
    assert (blue["state"], blue["state_source"]) == ("charging", "battery")
    assert "battery" in blue["state_text"].lower()
    # 12 V lead-acid at rest: 11.9 V = 0 %, 12.7 V = 100 %, clamped.
    assert (red["battery_pct"], green["battery_pct"], blue["battery_pct"]) == (50, 100, 0)
    assert red["battery_v"] == 12.3
    assert {c["name"] for c in red["channels"]} == {"red_house", "red_trade", "red_solar", "red_load"}
    assert set(red["channels"][0]) == {"name", "role", "bus_voltage_v", "current_ma", "power_w", "energy_in_wh",
                                       "energy_out_wh"}

    buy = flow(view, "exchange", "red_house")
    assert (buy["from"], buy["to"], buy["direction"], buy["active"]) == ("power_plant", "red_house", "to_unit", True)
    assert buy["watts"] == pytest.approx(3.69)
    sell = flow(view, "exchange", "green_house")
    assert (sell["from"], sell["to"], sell["direction"]) == ("green_house", "power_plant", "from_unit")
    assert sell["watts"] == pytest.approx(3.93)
    sun = flow(view, "solar", "red_house")
    assert (sun["from"], sun["to"], sun["direction"]) == ("sun", "red_house", "to_unit")
    load = flow(view, "load", "red_house")
    assert (load["from"], load["to"], load["direction"]) == ("red_house", "load", "from_unit")
    assert flow(view, "solar", "power_plant")["active"] is False  # 5 mA: inside the dead band
    assert not any(f["kind"] == "exchange" and f["unit"] in ("blue_house", "power_plant") for f in view["flows"])
    # Thickness follows |watts|.
    page.update(snapshot({"red_trade": 1500.0}))
    assert flow(now_json(page), "exchange", "red_house")["width"] > buy["width"] > 3


@pytest.mark.parametrize(("current", "state"), [(300.0, "buying"), (-300.0, "selling"), (5.0, "idle"),
                                                (-19.0, "idle"), (20.0, "buying")])
def test_house_state_from_exchange_current(page, current, state):
    page.update(snapshot({"red_trade": current}))
    view = now_json(page)
    assert unit(view, "red_house")["state"] == state
    link = flow(view, "exchange", "red_house")
    assert link["active"] is (state != "idle")
    assert link["direction"] == {"buying": "to_unit", "selling": "from_unit", "idle": "none"}[state]


@pytest.mark.parametrize(("current", "state"), [(200.0, "charging"), (-200.0, "using battery"), (3.0, "idle")])
def test_battery_only_house_says_charging_or_using_battery(page, current, state):
    page.update(snapshot({"blue_house": current}))
    blue = unit(now_json(page), "blue_house")
    assert (blue["state"], blue["state_source"], blue["has_exchange"]) == (state, "battery", False)


def test_a_failed_channel_shows_no_reading(page):
    snap = snapshot({"red_trade": 300.0})
    for row in snap["channels"]:
        if row["unit"] == "red_house":
            row.update(bus_voltage_v=None, current_ma=None, power_w=None, energy_in_wh=None, energy_out_wh=None)
    page.update(snap)
    view = now_json(page)
    red = unit(view, "red_house")
    assert (red["state"], red["battery_pct"], red["battery_v"]) == ("unknown", None, None)
    link = flow(view, "exchange", "red_house")
    assert (link["ok"], link["active"], link["watts"]) == (False, False, None)
    assert unit(view, "green_house")["state"] == "idle"


def test_status_is_passed_through_without_urls(page):
    page.update(snapshot({}, tier="CONNECTION",
                         summary="CONNECTION: cannot reach https://eu-central-1.example.com/api/v2/write?org=x",
                         meaning="The network or the database cannot be reached."))
    status = now_json(page)["status"]
    assert status["tier"] == "CONNECTION" and status["level"] == "fault"
    assert status["meaning"] == "The network or the database cannot be reached."
    assert "example.com" not in status["summary"] and "<server>" in status["summary"]
    # The MQTT broker's messages name it as host:port, and the login: neither reaches the page; times stay.
    for text, gone in (("SHORT: MQTT broker broker.example.net:8883 refused the login (Not authorized) for user "
                        "pi-logger-7", ("broker.example", "pi-logger-7")),
                       ("SHORT: MQTT broker 192.168.1.10:1883: connection lost", ("192.168",))):
        page.update(snapshot({}, tier="SHORT", summary=text + " at 2026-06-21T12:30:00Z", meaning="m"))
        summary = now_json(page)["status"]["summary"]
        assert not any(g in summary for g in gone) and "<server>" in summary, summary
        assert "2026-06-21T12:30:00Z" in summary


def test_update_is_cheap_and_never_encodes(page):
    """update() only stores the dict: even an unencodable value cannot fail the measuring loop."""
    snap = snapshot({"red_trade": 300.0})
    snap["channels"][0]["current_ma"] = object()
    started = time.perf_counter()
    for _ in range(10_000):
        page.update(snap)
    assert time.perf_counter() - started < 0.5
    view = now_json(page)
    assert view["version"] == 10_000 and unit(view, "red_house")["state"] == "buying"


@pytest.mark.parametrize("bad", [{}, {"channels": 5, "status": "x", "time_ms": "now"},
                                 {"channels": [None, {"name": "red_trade", "current_ma": "300"}]}])
def test_a_malformed_snapshot_cannot_break_the_page(page, bad):
    page.update(bad)
    view = now_json(page)
    assert view["time_ms"] is None and unit(view, "red_house")["state"] == "unknown"


# -- HTTP behaviour -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"])
def test_only_get_and_head(page, method):
    status, headers, _ = get(page, "/api/now", method=method)
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("path", ["/nope", "/static/missing.js", "/static/../web.py", "/static/%2e%2e/web.py",
                                  "/static/.hidden", "/api", "/static/"])
def test_unknown_paths_are_404(page, path):
    assert get(page, path)[0] == 404


def test_favicon_page_and_assets(page):
    status, headers, body = get(page, "/favicon.ico")
    assert status == 200 and headers["Content-Type"] == "image/svg+xml" and body.startswith(b"<svg")
    assert "max-age" in headers["Cache-Control"]
    status, headers, body = get(page, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache" and "default-src 'none'" in headers["Content-Security-Policy"]
    assert b"/static/flow.js" in body and b"http" not in body.replace(b"http-equiv", b"")  # nothing from outside
    for name, kind in [("flow.js", "text/javascript; charset=utf-8"), ("style.css", "text/css; charset=utf-8")]:
        status, headers, body = get(page, f"/static/{name}")
        assert status == 200 and headers["Content-Type"] == kind and int(headers["Content-Length"]) == len(body)
        assert b"://" not in body.replace(b"http://www.w3.org/2000/svg", b"")  # no CDN
        assert get(page, f"/static/{name}", headers={"If-None-Match": headers["ETag"]})[0] == 304


def test_head_has_headers_but_no_body(page):
    status, headers, body = get(page, "/api/now", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert get(page, "/api/events", method="HEAD")[:1] == (200,)


def test_no_config_secrets_on_the_page(page):
    page.update(snapshot({"red_trade": 300.0}))
    text = get(page, "/api/now")[2].decode()
    assert "address" not in text and "shunt_ohms" not in text and "0x40" not in text


def test_an_idle_page_server_sleeps_until_a_request_or_its_stop():
    """No polling: socketserver's loop woke ten times a second (30 wake-ups a cycle at the default 3 s, for a
    page nobody watches, on a Pi). Idle for a second, the server thread is not switched to at all; a request
    and stop() still wake it at once."""
    page = web.FlowPage("127.0.0.1:0", channels=CHANNELS, site="x")
    page.start()
    try:
        assert get(page, "/api/now")[0] in (200, 503)  # serving (503: no cycle yet)
        thread = page._thread

        def switches() -> int:
            status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
            return sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)

        # Settled first: back from answering the request (a GIL hand-over is a switch too), asleep in select().
        before, deadline = switches(), time.monotonic() + 10
        while True:
            time.sleep(0.1)
            if (now := switches()) == before or time.monotonic() > deadline:
                break
            before = now
        time.sleep(1.0)
        assert switches() - before <= 1  # socketserver's poll: 10
        assert get(page, "/api/now")[0] in (200, 503)
    finally:
        began = time.monotonic()
        page.stop()
    assert not thread.is_alive() and time.monotonic() - began < 2


def test_start_raises_when_the_port_is_taken(page):
    port = int(page.url.rstrip("/").rsplit(":", 1)[1])
    other = web.FlowPage(f"127.0.0.1:{port}", channels=CHANNELS, site="x")
    with pytest.raises(OSError):
        other.start()


def test_url_for_a_wildcard_address():
    assert web.FlowPage("0.0.0.0:8080", channels=CHANNELS, site="x").url == "http://127.0.0.1:8080/"
    assert web.FlowPage("[::]:8080", channels=CHANNELS, site="x").url == "http://[::1]:8080/"


def test_bad_listen_address():
    with pytest.raises(ValueError, match="HOST:PORT"):
        web.FlowPage("8080", channels=CHANNELS, site="x")


# -- server-sent events ---------------------------------------------------------------------------------
def read_event(response, deadline_s=5.0):
    """The next `data:` event's JSON, or the next comment line (as str)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        line = response.fp.readline()
        if not line:
            raise AssertionError("the event stream ended")
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            return json.loads(line[6:])
        if line.startswith(":"):
            return line
    raise AssertionError("no event in time")


def open_events(page):
    host, port = page.url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("GET", "/api/events")
    response = conn.getresponse()
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    return conn, response


def test_events_deliver_each_update(page):
    conn, response = open_events(page)
    try:
        timer = threading.Timer(0.2, page.update, args=(snapshot({"red_trade": 300.0}),))
        timer.start()
        event = read_event(response)
        assert event["version"] == 1 and unit(event, "red_house")["state"] == "buying"
        page.update(snapshot({"red_trade": -300.0}))
        event = read_event(response)
        assert event["version"] == 2 and unit(event, "red_house")["state"] == "selling"
    finally:
        conn.close()
    # A new client gets the latest snapshot at once.
    conn, response = open_events(page)
    try:
        assert read_event(response)["version"] == 2
    finally:
        conn.close()


def test_events_keep_alive_and_end_on_stop(start_page, monkeypatch):
    monkeypatch.setattr(web, "KEEPALIVE_S", 0.2)
    page = start_page()
    conn, response = open_events(page)
    try:
        assert read_event(response) == ": keep-alive"
        page.stop()
        assert response.fp.readline() in (b"", b"\n", b": keep-alive\n")
    finally:
        conn.close()


# -- history from a real store --------------------------------------------------------------------------
def electricity(name, time_ms, power_w, legacy=False, unit="some_house"):
    """A stored line of channel `name`; `legacy`: as stored before the `channel` tag (the name in `unit`)."""
    values = {"bus_voltage_v": 12.4, "shunt_voltage_mv": 1.0, "current_ma": power_w / 12.4 * 1000,
              "power_w": power_w, "samples": 10, "failed_samples": 0, "energy_in_wh": 0.0, "energy_out_wh": 0.0}
    tags = {"site": "brampton 2 zero", "colour": "red, really"}  # escaped on the way in and out
    tags.update({"unit": name} if legacy else {"channel": name, "unit": unit})
    return time_ms, Point(ELECTRICITY, tags, typed_fields(ELECTRICITY, values), time_ms).to_line()


def system_line(time_ms):
    return time_ms, Point(SYSTEM, {"site": "s"}, {"cpu_percent": 99.0}, time_ms).to_line()


def test_history_buckets_power_per_unit(start_page, tmp_path):
    now_ms = int(NOW_S * 1000)
    box = Outbox(tmp_path, wall_ms=lambda: now_ms)
    bucket = 300_000
    b1 = now_ms - 2 * HOUR_MS  # a bucket two hours ago
    box.append([electricity("red_house", b1 + 10_000, 1.0), electricity("red_house", b1 + 20_000, 3.0),
                # not the chart's channel for red_house, although its `unit` tag says red_house
                electricity("red_trade", b1 + 20_000, 9.0, unit="red_house"),
                electricity("blue_house", b1 + 30_000, -2.5), system_line(b1 + 30_000)])
    box.append([electricity("green_house", now_ms - 1000, 0.5, legacy=True)])  # stored before the channel tag
    box.append([electricity("green_house", b1 + 10_000, -0.0002)])  # night: ADC noise about 0 W
    box.append([electricity("red_house", now_ms - 25 * HOUR_MS, 50.0)])  # older than 24 h
    box.append([electricity("old_channel", b1 + 10_000, 7.0)])  # no longer configured
    box.append([electricity("blue_house", b1 + 40_000, 100.0)], held=True, boot_id="b", boot_ms=1)  # time unknown
    box.append([electricity("blue_house", b1 + 50_000, 200.0)])
    box.quarantine([p for p in box.pending(100, 10**6) if "200.0" in p.line], "HTTP 400")
    box.append([(b1 + 60_000, "not line protocol")])
    box.close()

    clock = Clock()
    page = start_page(history=store_history(tmp_path), clock=clock)
    status, headers, body = get(page, "/api/history?hours=24")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "max-age=60"
    data = json.loads(body)
    assert data["bucket_s"] == 300 and data["hours"] == 24
    assert len(data["series"][0]["values"]) == 288
    assert data["end_ms"] == now_ms + bucket and data["start_ms"] == data["end_ms"] - 24 * HOUR_MS
    series = {s["unit"]: s for s in data["series"]}
    assert [(s["unit"], s["channel"], s["role"]) for s in data["series"]] == [
        ("red_house", "red_house", "battery"), ("green_house", "green_house", "battery"),
        ("blue_house", "blue_house", "battery"), ("power_plant", "power_plant", "battery")]

    def value_at(name, time_ms):
        return series[name]["values"][(time_ms - data["start_ms"]) // bucket]

    assert value_at("red_house", b1) == 2.0  # the mean of 1.0 and 3.0
    assert value_at("blue_house", b1) == -2.5  # held and quarantined lines left out
    assert value_at("green_house", now_ms - 1000) == 0.5
    assert value_at("green_house", b1) == 0.0 and b"-0.0" not in body  # rounded to 0.0, never a negative zero
    assert sum(v is not None for s in data["series"] for v in s["values"]) == 4
    assert all(v is None for v in series["power_plant"]["values"])

    short = json.loads(get(page, "/api/history?hours=1")[2])
    assert len(short["series"][0]["values"]) == 12
    assert json.loads(get(page, "/api/history?hours=24")[2])["hours"] == 24

    # Cached: new data shows only after a minute, read incrementally.
    box = Outbox(tmp_path, wall_ms=lambda: now_ms)
    box.append([electricity("power_plant", now_ms + 30_000, 4.0)])
    box.close()
    clock.now += 30
    assert json.loads(get(page, "/api/history")[2]) == data
    clock.now += 31
    later = json.loads(get(page, "/api/history")[2])
    plant = next(s for s in later["series"] if s["unit"] == "power_plant")["values"]
    assert plant[-1] == 4.0
    assert next(s for s in later["series"] if s["unit"] == "red_house")["values"][
        (b1 - later["start_ms"]) // bucket] == 2.0


def today_for(directory, wall_ms, interval_s=120.0, site="brampton 2 zero"):
    """What service.py hands the page: ledger.Today over the store, the model's layout."""
    layout = ledger.Layout.from_channels(CHANNELS, "power_plant", interval_s, site)
    return ledger.Today(store_history(directory), layout, ledger.ZoneInfo("Europe/London"), wall_ms).totals


def test_today_totals_per_unit_beside_the_flows_from_the_store(start_page, tmp_path):
    """/api/now (and every event) carries today's generated, used, sold and bought per unit, integrated from the
    store since local midnight; what no channel measures is not measured, never 0; refreshed every 30 s."""
    now = {"ms": 1_782_043_200_000}  # 2026-06-21 13:00 in London
    midnight = 1_781_996_400_000  # 2026-06-21 00:00 BST
    box = Outbox(tmp_path, wall_ms=lambda: now["ms"])
    rows = []
    for k in range(31):  # 12:00 to 13:00, a cycle every 2 minutes
        t = midnight + 12 * HOUR_MS + k * 120_000
        rows += [electricity("red_solar", t, 6.0, unit="red_house"), electricity("red_load", t, 3.0, unit="red_house"),
                 electricity("red_trade", t, -1.5, unit="red_house"),
                 electricity("green_trade", t, 2.0, unit="green_house")]
    rows.append(electricity("red_solar", midnight - 60_000, 99.0, unit="red_house"))  # yesterday: not today's
    box.append(rows)
    box.close()
    page = start_page(history=store_history(tmp_path), today=today_for(tmp_path, lambda: now["ms"]))
    page.update(snapshot({"red_trade": -120.0}))
    today = now_json(page)["today"]
    assert today["day"] == "2026-06-21"
    red = today["units"]["red_house"]
    assert red["generated"]["wh"] == pytest.approx(6.0) and red["used"]["wh"] == pytest.approx(3.0)
    assert red["sold"]["wh"] == pytest.approx(1.5) and red["bought"]["wh"] == 0.0
    assert red["generated"]["coverage"] == pytest.approx(1 / 13, abs=1e-3)  # an hour of the 13 so far
    assert today["units"]["green_house"]["bought"]["wh"] == pytest.approx(2.0)
    assert today["units"]["green_house"]["generated"] == {"wh": None, "coverage": None, "not_measured": True}
    assert today["units"]["blue_house"]["sold"]["not_measured"] is True
    # Refreshed from the store at most every 30 s, incrementally.
    box = Outbox(tmp_path, wall_ms=lambda: now["ms"])
    box.append([electricity("red_solar", midnight + 13 * HOUR_MS + 120_000, 6.0, unit="red_house")])
    box.close()
    now["ms"] += 10_000
    page.update(snapshot({}))
    assert now_json(page)["today"]["units"]["red_house"]["generated"]["wh"] == pytest.approx(6.0)
    now["ms"] += 30_000
    page.update(snapshot({}))
    assert now_json(page)["today"]["units"]["red_house"]["generated"]["wh"] == pytest.approx(6.2)


def test_history_reads_the_store_once_per_minute(start_page):
    calls = []

    def history(since_ms):
        calls.append(since_ms)
        return [electricity("red_house", int(NOW_S * 1000) - 1000, 1.5) + ("unsent",)]

    clock = Clock()
    page = start_page(history=history, clock=clock)
    for _ in range(5):
        assert get(page, "/api/history?hours=24")[0] == 200
    assert len(calls) == 1 and calls[0] <= int(NOW_S * 1000) - 24 * HOUR_MS
    clock.now += 61
    get(page, "/api/history?hours=24")
    assert len(calls) == 2 and calls[1] == int(NOW_S * 1000) - 1000 + 1  # only what is new


def test_history_unavailable(start_page, page):
    status, _, body = get(page, "/api/history")  # no history source given
    assert status == 200 and json.loads(body)["available"] is False

    def broken(since_ms):
        raise OSError("database is locked")

    status, headers, _ = get(start_page(history=broken), "/api/history")
    assert status == 503 and headers["Retry-After"] == "60"


# -- a real browser -------------------------------------------------------------------------------------
def _browser_or_skip():
    reason = None
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing (apt-get install -y chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright is not installed (pip install -r requirements-dev.txt)"
    require(reason)


def demo_snapshot(t: float, time_ms: int) -> dict:
    """Values that move: red buys, green sells, blue (no trade meter) charges, a sunny plant."""
    wobble = math.sin(t * 2.1)
    snap = snapshot(
        {"red_house": -120 + 60 * wobble, "red_trade": 420 + 150 * wobble, "red_solar": 180 + 20 * wobble,
         "red_load": -560 - 40 * wobble, "green_house": 260 + 30 * wobble, "green_trade": -310 + 80 * wobble,
         "blue_house": 240 + 50 * wobble, "power_plant": 900 + 100 * wobble, "plant_solar": 1350 + 90 * wobble},
        volts={"red_house": 12.18, "green_house": 12.62, "blue_house": 12.41, "power_plant": 12.52},
        time_ms=time_ms)
    return snap


def fill_demo_history(directory, now_ms):
    """24 hours of a plausible day, one cycle every 2 minutes."""
    box = Outbox(directory, wall_ms=lambda: now_ms)
    rows = []
    for k in range(24 * 30):
        t = now_ms - k * 120_000
        hour = (t / HOUR_MS) % 24
        sun = max(0.0, math.sin((hour - 6) / 12 * math.pi))
        evening = 1.0 if 17 <= hour <= 22 else 0.3
        rows += [electricity("plant_solar", t, round(15 * sun, 3), unit="power_plant"),
                 electricity("red_trade", t, -1.2, unit="red_house"),
                 electricity("red_house", t, round(6 * sun - 2.5 * evening, 3), unit="red_house"),
                 electricity("green_house", t, round(4 * sun - 1.5 * evening + 0.3, 3), unit="green_house"),
                 electricity("blue_house", t, round(5 * sun - 3 * evening - 0.4, 3), unit="blue_house"),
                 electricity("power_plant", t, round(14 * sun - 5 * evening, 3), unit="power_plant")]
    box.append(rows)
    box.close()


@pytest.mark.slow
def test_browser_shows_live_flows(start_page, tmp_path):
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    now_ms = int(time.time() * 1000)
    fill_demo_history(tmp_path / "store", now_ms)
    # "Today" as of the last 14:00 in London (within the 24 h filled): its panels have generated, at any hour
    # the suite runs (before dawn, today so far would rightly be 0.00).
    london = ledger.ZoneInfo("Europe/London")
    afternoon = dt.datetime.now(london).replace(hour=14, minute=0, second=0, microsecond=0)
    if afternoon.timestamp() * 1000 > now_ms:
        afternoon = (afternoon - dt.timedelta(days=1)).replace(hour=14)
    page = start_page(history=store_history(tmp_path / "store"),
                      today=today_for(tmp_path / "store", lambda: int(afternoon.timestamp() * 1000)))
    stop = threading.Event()

    def feed():
        started = time.monotonic()
        while not stop.is_set():
            page.update(demo_snapshot(time.monotonic() - started, int(time.time() * 1000)))
            stop.wait(0.3)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    problems = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                tab = browser.new_page(viewport={"width": 1280, "height": 720})
                tab.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                       if m.type in ("error", "warning") else None)
                tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                tab.goto(page.url)
                tab.wait_for_selector('#diagram [data-unit="red_house"]')
                tab.wait_for_function("() => document.body.dataset.live === 'sse'", timeout=5000)
                tab.evaluate("window.__sameDocument = true")
                label = tab.locator('[data-flow-label="exchange:red_house"]')
                first = label.text_content()
                assert first.endswith(" W")
                tab.wait_for_function(
                    "(before) => document.querySelector('[data-flow-label=\"exchange:red_house\"]')"
                    ".textContent !== before", arg=first, timeout=5000)
                assert tab.evaluate("window.__sameDocument") is True  # live update, no reload
                states = {u: tab.locator(f'#diagram [data-unit="{u}"] .state-text').text_content()
                          for u in ("red_house", "green_house", "blue_house", "power_plant")}
                assert states == {"red_house": "BUYING", "green_house": "SELLING", "blue_house": "CHARGING",
                                  "power_plant": "CHARGING"}
                assert tab.locator('[data-flow-label="exchange:blue_house"]').text_content() == "trade not metered"
                assert tab.locator("#status").get_attribute("class") == "status level-ok"
                assert "All well" in tab.locator("#status-meaning").text_content()
                # Today's energy beside the diagram: a row per unit; a figure no channel measures says so ("–").
                tab.wait_for_selector('#today tr[data-unit="red_house"]', timeout=5000)
                cells = tab.eval_on_selector_all(
                    "#today tbody tr", "rows => rows.map(r => [r.dataset.unit, ...[...r.cells].slice(1)"
                    ".map(c => c.textContent)])")
                assert [row[0] for row in cells] == ["red_house", "green_house", "blue_house", "power_plant"]
                by_unit = {row[0]: row[1:] for row in cells}
                assert by_unit["blue_house"] == ["–", "–", "–", "–"]  # a battery meter only
                assert by_unit["power_plant"][0] not in ("–", "?", "0.00")  # its panel generates
                assert by_unit["red_house"][2] not in ("–", "?")  # red sells (its trade meter)
                tab.wait_for_selector("#chart path.series", timeout=5000)
                assert tab.locator("#chart path.series").count() == 4
                tab.wait_for_timeout(400)  # let the dashes move a little for the picture
                shot = Path(os.environ.get("SPB_SCREENSHOT") or tmp_path / "flow.png")
                tab.screenshot(path=str(shot))
                if os.environ.get("SPB_UPDATE_SCREENSHOT") == "1":
                    docs = ROOT / "docs"
                    docs.mkdir(exist_ok=True)
                    shutil.copyfile(shot, docs / "flow-page.png")

                # A fault shows in words in the banner.
                stop.set()
                feeder.join()
                page.update(snapshot({"red_trade": 300.0}, tier="MEASURING",
                                     summary="MEASURING: red_solar (INA219 at 0x49): no answer",
                                     meaning="A sensor did not answer or gave a bad reading."))
                tab.wait_for_function("() => document.getElementById('status').className === 'status level-fault'",
                                      timeout=5000)
                assert tab.locator("#status-meaning").text_content() == \
                    "A sensor did not answer or gave a bad reading."

                # Without server-sent events the page polls /api/now.
                tab2 = browser.new_page(viewport={"width": 1280, "height": 720})
                tab2.on("pageerror", lambda e: problems.append(f"page error (polling): {e}"))
                tab2.route("**/api/events", lambda route: route.fulfill(status=204, body=""))
                tab2.goto(page.url)
                tab2.wait_for_function("() => document.body.dataset.live === 'poll'", timeout=5000)
                version = int(tab2.evaluate("document.body.dataset.version"))
                page.update(snapshot({"red_trade": -300.0}))
                tab2.wait_for_function("(v) => Number(document.body.dataset.version) > v", arg=version, timeout=8000)
                assert tab2.locator('#diagram [data-unit="red_house"] .state-text').text_content() == "SELLING"
            finally:
                browser.close()
    finally:
        stop.set()
        feeder.join()
    assert problems == []


def _address(page):
    host, port = page.url.split("//")[1].rstrip("/").rsplit(":", 1)
    return host, int(port)


def _page_loads(page, timeout_s=5):
    with urllib.request.urlopen(page.url, timeout=timeout_s) as response:
        return response.status == 200 and b"<html" in response.read().lower()


@pytest.mark.parametrize("hours", ["abc", "", "-1", "0", "25", "1.5", "nan", "inf", "1e3", "0x10", " 3",
                                   "99999999999999999999", "\u00b2", "\u0663"])
def test_history_with_a_bad_hours_value_is_400(start_page, hours):
    page = start_page(history=lambda since_ms: [])
    status, headers, body = get(page, "/api/history?" + urllib.parse.urlencode({"hours": hours}))
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"error": "hours must be a whole number from 1 to 24"}
    assert get(page, "/api/history?hours=24")[0] == 200 and get(page, "/api/history?hours=1")[0] == 200


def test_a_request_header_has_a_deadline_however_slowly_it_trickles(start_page):
    page = start_page(header_deadline_s=1.0)
    slow = socket.create_connection(_address(page))
    try:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        slow.settimeout(0.2)
        began = time.monotonic()
        closed = False
        while time.monotonic() - began < 10:  # a header line every 0.2 s: no single read waits long
            try:
                slow.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = True
                break
            try:
                if slow.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed and time.monotonic() - began < 3.0  # the 1 s deadline, not the 30 s idle timeout
    finally:
        slow.close()
    assert _page_loads(page)


def test_a_request_header_larger_than_32_kb_is_cut_off_unread(start_page):
    """http.server alone takes 100 header lines of 64 KB (and ~50 MB to parse them, per request): past
    32 KB of header the connection is closed, the rest never read, and nothing is answered."""
    page = start_page()
    big = socket.create_connection(_address(page))
    answer = b""
    try:
        big.settimeout(10)
        try:
            big.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            for _ in range(41):  # within http.server's own limits (100 lines of 64 KB), far past ours
                big.sendall(b"X-Big: " + b"a" * 60_000 + b"\r\n")
            big.sendall(b"\r\n")
            answer = big.recv(65536)
        except OSError:
            pass  # reset: the server closed the connection with our bytes unread
    finally:
        big.close()
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:80]
    assert _page_loads(page)
    ok = socket.create_connection(_address(page))
    try:  # an ordinary request with a few KB of header is served as before
        ok.settimeout(10)
        ok.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 4000 + b"\r\n\r\n")
        assert ok.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        ok.close()


def test_slowloris_cannot_make_the_page_unreachable(start_page):
    page = start_page()  # the default 10 s header deadline: the attack outlasts it only by numbers
    slow = []
    try:
        for _ in range(3 * web.MAX_CONNECTIONS):  # more slow clients than there are slots
            s = socket.create_connection(_address(page))
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        for _ in range(3):
            assert _page_loads(page)  # each load takes the slot of the slowest client
        assert threading.active_count() < 2 * web.MAX_CONNECTIONS + 20  # threads stay bounded
    finally:
        for s in slow:
            s.close()


def test_event_streams_are_capped_apart_from_page_loads(start_page):
    page = start_page(header_deadline_s=2.0)
    streams = [open_events(page) for _ in range(web.MAX_EVENT_CLIENTS)]
    try:
        assert get(page, "/api/events")[0] == 503  # one stream too many
        idle = [socket.create_connection(_address(page)) for _ in range(web.MAX_CONNECTIONS - 1)]
        try:
            assert _page_loads(page)  # the streams hold none of the page's slots
            assert get(page, "/api/now")[0] == 200
        finally:
            for s in idle:
                s.close()
    finally:
        for conn, _ in streams:
            conn.close()


# -- the real model: one meter on each panel, nothing else measured -------------------------------------
def panel_snapshot(pi=None):
    """The default model at a June noon: two panels charging, one battery full, one panel dark."""
    from config import DEFAULT_CHANNELS

    values = {"red_house": (13.3, 256.0), "green_house": (21.2, 0.4), "blue_house": (13.6, 310.0),
              "power_plant": (0.0, 0.1)}
    rows = [reading(c, *values[c.name]) for c in DEFAULT_CHANNELS]
    return {"time_ms": 1_780_000_000_000, "channels": rows,
            "status": {"tier": None, "summary": "all well", "meaning": "All well"}, "pi": pi or {}}


def test_panel_only_model_says_not_measured_and_what_each_controller_does(start_page):
    from config import DEFAULT_CHANNELS

    page = start_page(channels=DEFAULT_CHANNELS)
    page.update(panel_snapshot())
    view = now_json(page)
    red, green, plant = unit(view, "red_house"), unit(view, "green_house"), unit(view, "power_plant")
    for u in view["units"]:
        # the panel's 13-21 V is not the battery's voltage: no charge is shown, never a 0 or a 100 %
        assert u["battery_measured"] is False and u["battery_pct"] is None and u["battery_v"] is None
        assert not u["has_exchange"]
    assert (red["state"], red["state_source"], red["panel_v"]) == ("generating", "solar", 13.3)
    assert red["panel_power_w"] == pytest.approx(13.3 * 0.256, abs=1e-3)
    assert (green["state"], plant["state"]) == ("full", "no sun")
    assert "stopped charging" in green["state_text"]
    assert flow(view, "solar", "green_house")["idle_text"] == "battery full"
    assert flow(view, "solar", "power_plant")["idle_text"] == "no sun"
    assert view["pi"] == {"undervoltage": None, "throttled": None, "undervoltage_since_boot": None,
                          "throttled_since_boot": None}


@pytest.mark.slow
def test_browser_shows_the_panel_only_model_and_the_pis_supply(start_page):
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    from config import DEFAULT_CHANNELS

    page = start_page(channels=DEFAULT_CHANNELS)
    page.update(panel_snapshot(pi={"undervoltage": True, "throttled": False, "undervoltage_since_boot": True,
                                   "throttled_since_boot": False}))
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 720})
            tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            tab.goto(page.url)
            tab.wait_for_selector('#diagram [data-unit="red_house"]')
            tab.wait_for_function("() => document.getElementById('pi-power') !== null", timeout=5000)
            states = {u: tab.locator(f'#diagram [data-unit="{u}"] .state-text').text_content()
                      for u in ("red_house", "green_house", "blue_house", "power_plant")}
            assert states == {"red_house": "CHARGING", "green_house": "BATTERY FULL", "blue_house": "CHARGING",
                              "power_plant": "NO SUN"}
            pcts = {tab.locator(f'#diagram [data-unit="{u}"] .battery-pct').text_content()
                    for u in ("red_house", "green_house", "blue_house", "power_plant")}
            assert pcts == {"not measured"}
            assert tab.locator('[data-flow-label="solar:green_house"]').text_content() == "battery full"
            assert tab.locator('[data-flow-label="exchange:red_house"]').text_content() == "trade not metered"
            assert "panel 13.3 V" in tab.locator('#diagram [data-unit="red_house"] .unit-detail').text_content()
            assert tab.locator("#pi-power").text_content().startswith("Pi supply: UNDER-VOLTAGE")
        finally:
            browser.close()
    assert problems == []
