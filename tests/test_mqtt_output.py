"""MQTT and Home Assistant discovery against Debian's real mosquitto on loopback: what Home Assistant needs in
every discovery message, state values equal to the store's, the last will on kill -9, discovery back after a
broker restart and a Home Assistant birth message, a refused login and a TLS broker with a self-signed CA."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import lp
from conftest import simulated_config
from config import parse_config
from mqtt_output import CHANNEL_SENSORS, LOGGER_SENSORS, MqttOutput
from outbox import Outbox
from rpi_errors import ErrorHandler, Tier
from servers import Mosquitto, mqtt_binaries_available, require

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "mqtt-Secret-pw"
SITE = "mqtt-test"
PREFIX = f"solarpowerbrampton/{SITE}"
HA_SENSOR_KEYS = {"name", "state_topic", "unique_id", "value_template", "availability_topic", "device"}
# Full key names only (Home Assistant also takes abbreviations such as stat_t, uniq_id, dev_cla: not used).
HA_FULL_KEYS = HA_SENSOR_KEYS | {"default_entity_id", "payload_available", "payload_not_available", "device_class",
                                 "unit_of_measurement", "state_class"}
HA_DEVICE_KEYS = {"identifiers", "name", "manufacturer", "model"}
# Home Assistant's sensor device classes used here, and the units it accepts for each.
HA_UNITS = {"voltage": {"V", "mV"}, "current": {"A", "mA"}, "power": {"W", "kW"}, "energy": {"Wh", "kWh", "MWh"},
            "temperature": {"°C", "°F"}, "data_size": {"MB", "kB", "GB", "MiB", "KiB", "GiB"}, "duration": {"s", "min", "h", "d"}}
DEADLINE_S = 60.0


@pytest.fixture(autouse=True)
def _need_mosquitto():
    reason = mqtt_binaries_available()
    require(reason)


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker():
    if mqtt_binaries_available():
        pytest.skip(mqtt_binaries_available())
    with Mosquitto() as server:
        yield server


class Subscriber:
    """A test client on the broker: every message kept as (topic, payload, retain), waits with a deadline."""

    def __init__(self, port: int, topics=("#",), **tls) -> None:
        import paho.mqtt.client as paho

        self.messages: list[tuple[str, bytes, bool]] = []
        self.cond = threading.Condition()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: [c.subscribe(t, qos=1) for t in topics]
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        with self.cond:
            self.messages.append((message.topic, message.payload, bool(message.retain)))
            self.cond.notify_all()

    def wait_for(self, what, predicate, timeout=DEADLINE_S):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                assert left > 0, f"no {what} within {timeout} s; got {[m[0] for m in self.messages][-20:]}"
                self.cond.wait(min(left, 0.5))
            return list(self.messages)

    def latest(self) -> dict[str, tuple[bytes, bool]]:
        with self.cond:
            return {topic: (payload, retain) for topic, payload, retain in self.messages}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def configs(messages) -> dict[str, dict]:
    return {t: json.loads(p) for t, p, _ in messages if t.startswith("homeassistant/sensor/") and p}


def expected_config_count(config) -> int:
    return len(config.channels) * len(CHANNEL_SENSORS) + len(LOGGER_SENSORS) + 1  # + the LED's text sensor


def write_config(tmp_path, port, *, extra="", interval_s=0.3, influx=""):
    return simulated_config(tmp_path / "config.toml", SITE, tmp_path / "store", interval_s=interval_s,
                            tables=f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n{extra}\n{influx}\n')


def start_daemon(config_path, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", "--config", str(config_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def stop(proc) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return err


def test_discovery_has_what_home_assistant_requires_and_states_equal_the_store(broker, tmp_path):
    cfg_path = write_config(tmp_path, broker.port)
    config = parse_config(__import__("tomllib").loads(cfg_path.read_text()))
    sub = Subscriber(broker.port, ("homeassistant/#", f"{PREFIX}/#"))
    proc = start_daemon(cfg_path)
    try:
        n = expected_config_count(config)
        logger_topic = f"{PREFIX}/logger/state"
        sub.wait_for("discovery and 3 cycles", lambda ms: len(configs(ms)) >= n
                     and sum(t == logger_topic for t, _, _ in ms) >= 3)
    finally:
        err = stop(proc)
        sub.close()
    assert proc.returncode == 0, err
    found = configs(sub.messages)
    assert len(found) == n
    unique_ids = set()
    for topic, config_msg in found.items():
        _, component, node, obj, last = topic.split("/")
        assert (component, last) == ("sensor", "config")
        assert HA_SENSOR_KEYS <= set(config_msg), topic
        assert set(config_msg) <= HA_FULL_KEYS, f"{topic}: keys beyond the full names: {set(config_msg) - HA_FULL_KEYS}"
        assert HA_DEVICE_KEYS <= set(config_msg["device"]), topic
        # Not `object_id` (deprecated in Home Assistant 2025.10, gone in 2026.4): the platform-qualified id.
        assert config_msg["default_entity_id"] == f"sensor.{node}_{obj}", topic
        unique_ids.add(config_msg["unique_id"])
        if "device_class" in config_msg:
            assert config_msg["unit_of_measurement"] in HA_UNITS[config_msg["device_class"]], topic
        if config_msg["state_topic"] != logger_topic or "'led'" not in config_msg["value_template"]:
            assert config_msg["state_class"] in ("measurement", "total_increasing"), topic
        if config_msg.get("device_class") == "energy":  # what the Energy dashboard accepts
            assert (config_msg["state_class"], config_msg["unit_of_measurement"]) == ("total_increasing", "Wh")
    assert len(unique_ids) == n
    devices = {c["device"]["name"] for c in found.values()}
    assert devices == {f"{SITE} {c.unit_name}" for c in config.channels} | {f"{SITE} logger"}
    led = [c for c in found.values() if c["value_template"] == "{{ value_json['led'] }}"]
    assert len(led) == 1 and "unit_of_measurement" not in led[0] and "device_class" not in led[0]

    box = Outbox(tmp_path / "store", check_integrity=False)
    try:
        stored = lp.samples(line for _, line, _ in box.export())
    finally:
        box.close()
    compared = health = 0
    for topic, payload, _ in sub.messages:
        if topic == logger_topic:  # the Pi's health equals the cycle's stored `system` point
            state = json.loads(payload)
            for field in LOGGER_SENSORS:
                if field != "queue_depth" and state.get(field) is not None:
                    assert state[field] == pytest.approx(stored[(f"system_{field}", (("site", SITE),),
                                                                 state["time_ms"])], rel=1e-12), field
                    health += 1
            continue
        if not topic.endswith("/state"):
            continue
        state = json.loads(payload)
        for channel in config.channels:
            if f"{channel.name}_power_w" not in state:
                continue
            tags = (("channel", channel.name), ("site", SITE), ("unit", channel.unit_name))
            for field in CHANNEL_SENSORS:
                assert state[f"{channel.name}_{field}"] == pytest.approx(
                    stored[(f"electricity_{field}", tags, state["time_ms"])], rel=1e-12), (topic, field)
                compared += 1
    assert compared >= 3 * len(config.channels) * len(CHANNEL_SENSORS)
    assert health >= 3 * 4  # cpu_percent, memory_used_mb, disk_free_mb, uptime_s (and cpu_temp_c where it is read)
    # Discovery is retained: a Home Assistant subscribing later (here: after the daemon stopped) gets it all.
    late = Subscriber(broker.port, ("homeassistant/#",))
    try:
        got = late.wait_for("retained discovery", lambda ms: len(configs(ms)) >= n)
    finally:
        late.close()
    assert configs(got) == found and all(r for t, _, r in got if t in found)



def test_every_value_template_reads_a_key_of_its_state_message_whatever_the_channel_is_called():
    """Channel names the config accepts (`pv-1`, `pv.2`, `12v_battery`) would make `value_json.pv-1_power_w` a
    subtraction (Home Assistant's templates are Jinja): every template subscripts the key, and every key is in
    its state topic's message."""
    import re

    from daemon import CycleReport
    from tools import ChannelReading, Cycle
    from health import SystemReading

    config = parse_config({"site": {"name": SITE}, "mqtt": {"enabled": True, "host": "localhost"},
                           "channel": [{"name": "pv-1", "address": 0x40, "unit": "house.a"},
                                       {"name": "pv.2", "address": 0x41, "unit": "house.a"},
                                       {"name": "12v_battery", "address": 0x44, "role": "battery", "unit": "plant"}]})
    out = MqttOutput(config, ErrorHandler(None), environ={})
    readings = tuple(ChannelReading(c.name, c.address, 12.5, 1.0, 10.0, 0.125, 10, 0, 0.5, 0.25)
                     for c in config.channels)
    system = SystemReading(cpu_percent=3.5, cpu_temp_c=45.0, memory_used_mb=300.0, disk_free_mb=9000.0,
                           net_sent_bytes=10, net_recv_bytes=20, uptime_s=100.0)
    report = CycleReport(Cycle(1_780_000_000_000, 1.0, readings), system, True, 0, 1, None, 0.01)
    states = {topic: json.loads(payload) for topic, payload in out.states(report, "all well").items()}
    templates = 0
    for topic, discovery in out.discovery().items():
        match = re.fullmatch(r"\{\{ value_json\['([A-Za-z0-9_.\-]+)'\] \}\}", discovery["value_template"])
        assert match, discovery["value_template"]
        assert match[1] in states[discovery["state_topic"]], (topic, match[1])
        templates += 1
    assert templates == 3 * len(CHANNEL_SENSORS) + len(LOGGER_SENSORS) + 1
    assert states[f"{PREFIX}/house_a/state"]["pv-1_power_w"] == 0.125


def test_names_home_assistant_would_take_as_one_are_refused_with_mqtt_enabled():
    """`pv.1` and `pv_1` are distinct channels but one MQTT id (one entity, one unique_id: the second overwrites
    the first); units alike share one state topic; a unit slugged `logger` is the logger's own device. With
    [mqtt] enabled each is a config problem naming its key; without MQTT the names are fine."""
    from config import ConfigError

    channels = [{"name": "pv.1", "address": 0x40, "unit": "house.a"},
                {"name": "pv_1", "address": 0x41, "unit": "house_a"},
                {"name": "plant_pv", "address": 0x44, "unit": ".logger."}]
    parse_config({"channel": channels})  # no MQTT: accepted
    # Channels of different units may share a slug: their unique_ids and state topics carry the unit's.
    parse_config({"mqtt": {"enabled": True, "host": "localhost"},
                  "channel": [{"name": "pv.1", "address": 0x40, "unit": "red"},
                              {"name": "pv_1", "address": 0x41, "unit": "blue"}]})
    with pytest.raises(ConfigError) as caught:
        parse_config({"mqtt": {"enabled": True, "host": "localhost"}, "channel": channels})
    text = str(caught.value)
    assert "channel[1].name" in text and "'pv_1' and channel[0]'s 'pv.1' are the same MQTT id 'house_a_pv_1'" in text
    assert "channel[1].unit" in text and "'house_a' and channel[0]'s unit 'house.a' are the same MQTT id" in text
    assert "channel[2].unit" in text and "the MQTT id of the logger's own device" in text
    # Across units too: `pv` of `house_a` and `a_pv` of `house` make one unique_id, ..._house_a_pv_...
    with pytest.raises(ConfigError, match=r"channel\[1\].name.*'a_pv' and channel\[0\]'s 'pv' are the same MQTT id "
                                          r"'house_a_pv'"):
        parse_config({"mqtt": {"enabled": True, "host": "localhost"},
                      "channel": [{"name": "pv", "address": 0x40, "unit": "house_a"},
                                  {"name": "a_pv", "address": 0x41, "unit": "house"}]})

def test_kill_9_makes_the_broker_publish_offline(broker, tmp_path):
    sub = Subscriber(broker.port, (f"{PREFIX}/availability",))
    cfg_path = write_config(tmp_path, broker.port)
    proc = start_daemon(cfg_path)
    try:
        sub.wait_for("online", lambda ms: ms and ms[-1][1] == b"online")
        deadline = time.monotonic() + DEADLINE_S
        while True:  # `status` says so (stored by the loop at the first cycle after the connection)
            status = subprocess.run([sys.executable, str(ROOT / "main.py"), "status", "--json", "--config",
                                     str(cfg_path)], capture_output=True, text=True, timeout=60)
            if json.loads(status.stdout or "{}").get("mqtt") == f"connected to 127.0.0.1:{broker.port}":
                break
            assert time.monotonic() < deadline, status.stdout + status.stderr
            time.sleep(0.1)
        proc.kill()
        proc.wait(30)
        sub.wait_for("offline (the last will)", lambda ms: ms[-1][1] == b"offline")
    finally:
        stop(proc)
        sub.close()
    # Retained: a Home Assistant starting later sees the logger as unavailable at once.
    late = Subscriber(broker.port, (f"{PREFIX}/availability",))
    try:
        late.wait_for("the retained offline", lambda ms: ms and ms[-1][1:] == (b"offline", True))
    finally:
        late.close()


def test_broker_restart_and_home_assistant_birth_bring_discovery_back(tmp_path):
    with Mosquitto() as own:  # no persistence: a restart forgets every retained message
        cfg_path = write_config(tmp_path, own.port)
        n = expected_config_count(parse_config(__import__("tomllib").loads(cfg_path.read_text())))
        proc = start_daemon(cfg_path)
        try:
            sub = Subscriber(own.port, ("homeassistant/#",))
            sub.wait_for("discovery", lambda ms: len(configs(ms)) >= n)
            sub.close()
            own.restart()
            sub = Subscriber(own.port, ("homeassistant/#",))
            sub.wait_for("discovery after the broker restart", lambda ms: len(configs(ms)) >= n)
            # Home Assistant's birth message: everything again (a config removed meanwhile comes back).
            victim = sorted(configs(sub.messages))[0]
            sub.client.publish(victim, b"", qos=1, retain=True).wait_for_publish(10)
            removed = len(sub.wait_for("the removal", lambda ms: ms[-1][0] == victim and ms[-1][1] == b""))
            sub.client.publish("homeassistant/status", b"online", qos=1).wait_for_publish(10)
            sub.wait_for("discovery after the birth message",
                         lambda ms: any(t == victim and p for t, p, _ in ms[removed:]))
            sub.close()
        finally:
            err = stop(proc)
        assert proc.returncode == 0, err


def _output(text: str, handler, environ=None) -> MqttOutput:
    config = parse_config(__import__("tomllib").loads(text))
    return MqttOutput(config, handler, only_output=config.influx.kind == "none", environ=environ or {})


def _wait(predicate, what, timeout=DEADLINE_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def test_a_wrong_password_is_reported_naming_the_broker_never_the_password(tmp_path, caplog):
    import mqtt_output

    with Mosquitto(users={"logger": PASSWORD}) as secured:
        pw = tmp_path / "pw"
        pw.write_text("not-the-" + PASSWORD)
        pw.chmod(0o600)
        handler = ErrorHandler(None)
        out = _output(f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {secured.port}\nusername = "logger"\n'
                      f'password_file = "{pw}"\n[influx]\nkind = "local"\nurl = "http://127.0.0.1:9"\n'
                      'api = "v1"\ndatabase = "x"', handler)
        out.start()
        try:
            _wait(lambda: out.problem, "reported problem")
            assert f"127.0.0.1:{secured.port}" in out.problem and "refused the login" in out.problem
            # InfluxDB stays the data of record: a Short error on the LED.
            assert handler.active["mqtt"].tier == Tier.SHORT
            # The file is re-read before each login, like InfluxDB's token: one others can read is refused
            # (no login tried with it), and the corrected file logs in without a restart.
            pw.chmod(0o644)
            _wait(lambda: "readable by others" in (out.problem or ""), "refused password file",
                  timeout=mqtt_output.RECONNECT_MAX_S + DEADLINE_S)
            assert out.problem.startswith(f"MQTT broker 127.0.0.1:{secured.port}: no login tried: secret file")
            pw.write_text(PASSWORD)
            pw.chmod(0o600)
            _wait(lambda: out.connected, "login with the corrected file",
                  timeout=mqtt_output.RECONNECT_MAX_S + DEADLINE_S)
            assert out.problem is None and "mqtt" not in handler.active
        finally:
            out.stop()
        # The right password (from $MQTT_PASSWORD) connects; with kind = "none" a fault would be Connection.
        handler = ErrorHandler(None)
        good = _output(f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {secured.port}\nusername = "logger"',
                       handler, environ={"MQTT_PASSWORD": PASSWORD})
        good.start()
        try:
            _wait(lambda: good.connected, "connection with the right password")
            assert "mqtt" not in handler.active and good.status.startswith("connected to")
        finally:
            good.stop()
    assert PASSWORD not in caplog.text and "not-the-" not in caplog.text


def test_an_oversized_retained_message_is_refused_unread_and_reported(tmp_path):
    """A retained message of 200 KB on Home Assistant's status topic (anyone allowed to publish there, or a
    hostile broker): the client closes the connection once the packet's length is known, never holding
    the body, and says why; once the message is gone it connects again by itself."""
    import paho.mqtt.client as paho

    with Mosquitto() as server:
        publisher = paho.Client(paho.CallbackAPIVersion.VERSION2)
        publisher.connect("127.0.0.1", server.port)
        publisher.loop_start()
        publisher.publish("homeassistant/status", b"x" * 200_000, qos=1, retain=True).wait_for_publish(DEADLINE_S)
        handler = ErrorHandler(None)
        out = _output(f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {server.port}', handler)
        out.start()
        try:
            # Read once per look: each reconnect (after a backoff of 1 s and more) clears the problem until the
            # retained message closes the connection again.
            seen: list[str] = []

            def oversize_reported() -> bool:
                seen.append(out.problem or "")
                return "sent a packet of" in seen[-1]

            _wait(oversize_reported, "the oversized packet reported")
            assert f"MQTT broker 127.0.0.1:{server.port} sent a packet of 200" in seen[-1]
            assert "more than 64 KB" in seen[-1] and "homeassistant/status" in seen[-1]
            _wait(lambda: getattr(handler.active.get("mqtt"), "tier", None) == Tier.CONNECTION,
                  "a Connection error (MQTT is the only output here)")
            publisher.publish("homeassistant/status", b"", qos=1, retain=True).wait_for_publish(DEADLINE_S)
            _wait(lambda: out.connected and out.problem is None, "a connection once the message is gone",
                  timeout=DEADLINE_S + 60)
        finally:
            out.stop()
            publisher.disconnect()
            publisher.loop_stop()


def test_check_probes_the_broker_naming_it_and_never_the_password(tmp_path):
    """`main.py check` connects to the broker and waits for its CONNACK: accepted, refused login (a warning
    while InfluxDB is the data of record), unreachable (a failure when MQTT is the only output)."""
    with Mosquitto(users={"logger": PASSWORD}) as secured:
        where = f"127.0.0.1:{secured.port}"
        pw = tmp_path / "pw"
        pw.write_text("not-the-" + PASSWORD)
        pw.chmod(0o600)
        influx = '[influx]\nkind = "local"\nurl = "http://127.0.0.1:9"\napi = "v1"\ndatabase = "x"'
        cfg = write_config(tmp_path, secured.port, extra=f'username = "logger"\npassword_file = "{pw}"',
                           influx=influx)
        wrong = check(cfg)
        assert wrong.returncode == 0, wrong.stdout + wrong.stderr  # a warning: InfluxDB keeps the record
        assert f"WARN  mqtt: MQTT broker {where} refused the login (Not authorized) for user logger" in wrong.stdout
        right = check(write_config(tmp_path, secured.port, extra='username = "logger"', influx=influx),
                      env={"MQTT_PASSWORD": PASSWORD})
        assert f"OK    mqtt: MQTT broker {where} accepted the login (user logger)" in right.stdout, right.stdout
        leaked = [r for r in (wrong, right) if PASSWORD in r.stdout + r.stderr or "not-the-" in r.stdout + r.stderr]
        assert not leaked
    unreachable = check(write_config(tmp_path, secured.port))  # stopped now; kind = "none": the only output
    assert unreachable.returncode == 1
    assert (f"FAIL  mqtt: MQTT broker {where} unreachable: connection refused (is the broker running on that port?)"
            in unreachable.stdout), unreachable.stdout
    pw.chmod(0o644)  # what `run` refuses at start (exit 78), `check` names as a failure
    exposed = check(write_config(tmp_path, secured.port, extra=f'username = "logger"\npassword_file = "{pw}"'))
    assert exposed.returncode == 1
    assert "FAIL  mqtt:" in exposed.stdout and "mqtt.password_file" in exposed.stdout, exposed.stdout
    assert "readable by others" in exposed.stdout and "not-the-" not in exposed.stdout + exposed.stderr


def check(config_path, env=None):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "check", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in {**os.environ, **(env or {})}.items() if k != "SOLAR_CONFIG"})


def test_acknowledgements_are_read_with_the_next_cycle_and_none_pile_up(broker):
    """The MQTT thread writes a cycle's messages and reads their PUBACKs when the next cycle wakes it (or
    after `quiet_s` without one): never more than one cycle's waiting, none left once the cycles stop."""
    from types import SimpleNamespace

    from tools import Cycle

    out = _output(f'[sampling]\ninterval_s = 0.3\nwindow_s = 0.05\n[mqtt]\nenabled = true\nhost = "127.0.0.1"\n'
                  f'port = {broker.port}', ErrorHandler(None))
    out.start()
    try:
        _wait(lambda: out.connected and out.unacknowledged() == 0, "connection, discovery acknowledged")
        devices = len(out.units) + 1
        for i in range(15):
            out.after_cycle(SimpleNamespace(cycle=Cycle(time_ms=1_780_000_000_000 + i, monotonic_s=i, channels=()),
                                            system=None, queue_depth=0))
            _wait(lambda: out.states_published == i + 1, f"cycle {i} published")
            # This cycle's; the last one's were read when this one woke the thread (or, had the broker not
            # answered by then, once `quiet_s` has passed).
            _wait(lambda: out.unacknowledged() <= devices, f"cycle {i - 1}'s PUBACKs read")
        _wait(lambda: out.unacknowledged() == 0, "the last cycle's PUBACKs read", timeout=out.quiet_s + DEADLINE_S)
        assert out.states_skipped == 0
    finally:
        out.stop()


def test_a_password_file_others_can_read_is_refused_at_start(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    pw.chmod(0o644)
    cfg = write_config(tmp_path, 1883, extra=f'username = "logger"\npassword_file = "{pw}"')
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "run", "--config", str(cfg), "--cycles", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert "mqtt.password_file" in result.stderr and "readable by others" in result.stderr
    assert PASSWORD not in result.stderr


def test_an_unreachable_broker_is_connection_when_mqtt_is_the_only_output():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        handler = ErrorHandler(None)
        out = _output(f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {port}', handler)
        out.start()
        try:
            _wait(lambda: out.problem, "reported problem")
            assert out.problem == (f"MQTT broker 127.0.0.1:{port} unreachable: connection refused "
                                   "(is the broker running on that port?)")
            assert handler.active["mqtt"].tier == Tier.CONNECTION  # kind = "none": MQTT is the only output
        finally:
            out.stop()



def test_a_broker_that_never_answers_the_login_is_reported_and_tried_again():
    """A stalled broker (SIGSTOP: the kernel still completes the TCP connection) never answers the login:
    within LOGIN_TIMEOUT_S it is reported naming the broker (log, `status`, the LED: Connection when MQTT is
    the only output), and tried again once it answers."""
    import mqtt_output

    with Mosquitto() as stalled:
        stalled.pause()
        handler = ErrorHandler(None)
        out = _output(f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {stalled.port}', handler)
        started = time.monotonic()
        out.start()
        try:
            _wait(lambda: out.problem, "reported problem", timeout=mqtt_output.LOGIN_TIMEOUT_S + 30)
            assert out.problem.startswith(f"MQTT broker 127.0.0.1:{stalled.port}: no answer to the login within"), \
                out.problem
            assert time.monotonic() - started >= mqtt_output.LOGIN_TIMEOUT_S
            assert handler.active["mqtt"].tier == Tier.CONNECTION and not out.connected
            stalled.resume()
            _wait(lambda: out.connected, "connected once the broker answers", timeout=mqtt_output.RECONNECT_MAX_S + 30)
            assert out.problem is None and "mqtt" not in handler.active
        finally:
            stalled.resume()
            out.stop()


def test_two_loggers_with_one_client_id_back_off_instead_of_taking_the_session_every_second(broker):
    """The broker closes a session when another client logs in with its client_id (two Pis left on the default
    site name, or a hand-run `main.py run` beside the service). A login closed this soon keeps doubling the
    wait: each logger reconnects a few times a minute at most, not every second, each time resending discovery."""
    config = f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\nclient_id = "twin"'
    outs = [_output(config, ErrorHandler(None)) for _ in range(2)]
    for out in outs:
        out.start()
    try:
        # Each take-over doubles the closed logger's wait (1, 2, 4, 8 s). A wait that went back to 1 s after
        # each login (a retry every second) would never reach 8 s.
        _wait(lambda: max(out._delay_s for out in outs) >= 8, "reconnect wait of 8 s", timeout=120)
        logins = [out.discovery_sent for out in outs]
    finally:
        for out in outs:
            out.stop()
    # Four take-overs of one logger and as many of the other at most, each login resending discovery.
    assert all(n >= 1 for n in logins) and sum(logins) <= 10, logins


def test_states_paho_refuses_while_the_broker_acknowledges_nothing_are_counted_skipped_and_reported(monkeypatch):
    """A broker that stalls after the login acknowledges no qos 1 message: paho's queue of messages waiting
    for it fills (MAX_QUEUED_MESSAGES, small here) and refuses the next publishes. Those cycles count as skipped,
    not published, and the problem is reported naming the broker."""
    import mqtt_output
    from daemon import CycleReport
    from tools import ChannelReading, Cycle

    with Mosquitto() as stalling:
        handler = ErrorHandler(None)
        out = _output(f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {stalling.port}', handler)
        # Room for the discovery (`online` and every config) and two cycles more, so it fills in a few cycles.
        monkeypatch.setattr(mqtt_output, "MAX_QUEUED_MESSAGES", len(out.discovery()) + 1 + 10)
        config = out.config
        readings = tuple(ChannelReading(c.name, c.address, 12.5, 1.0, 10.0, 0.125, 10, 0, 0.5, 0.25)
                         for c in config.channels)
        out.start()
        try:
            _wait(lambda: out.connected, "connection")
            stalling.pause()
            deadline = time.monotonic() + DEADLINE_S
            n = 0
            while not out.states_skipped:
                assert time.monotonic() < deadline, "no cycle was counted skipped"
                n += 1
                out.after_cycle(CycleReport(Cycle(1_780_000_000_000 + n, 1.0, readings), None, True, 0, n, None, 0.01))
                time.sleep(0.05)
            assert out.problem.startswith(f"MQTT broker 127.0.0.1:{stalling.port} acknowledges nothing"), out.problem
            assert handler.active["mqtt"].tier == Tier.CONNECTION
            # The broker catches up (the same connection): the next published cycle clears the problem.
            stalling.resume()
            published = out.states_published
            while out.states_published == published or out.problem is not None:
                assert time.monotonic() < deadline + DEADLINE_S, (out.problem, out.states_published)
                n += 1
                out.after_cycle(CycleReport(Cycle(1_780_000_000_000 + n, 1.0, readings), None, True, 0, n, None, 0.01))
                time.sleep(0.05)
            assert "mqtt" not in handler.active
        finally:
            stalling.resume()
            out.stop()

def test_a_connection_lost_while_publishing_is_reported_as_lost_not_as_a_full_queue():
    """A write that fails mid-burst (the link went: paho answers the publish with a lost connection, not with
    its queue-full code) leaves the cause _on_disconnect reported; the cycle counts as skipped, and the
    next connection publishes again. The broker is stopped first, so nothing but the failed write can
    tell the MQTT thread the connection is gone."""
    import socket

    import mqtt_output
    from daemon import CycleReport
    from tools import ChannelReading, Cycle

    with Mosquitto() as broker:
        handler = ErrorHandler(None)
        out = _output(f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}', handler)
        readings = tuple(ChannelReading(c.name, c.address, 12.5, 1.0, 10.0, 0.125, 10, 0, 0.5, 0.25)
                         for c in out.config.channels)

        def cycle(n: int) -> None:
            out.after_cycle(CycleReport(Cycle(1_780_000_000_000 + n, 1.0, readings), None, True, 0, n, None, 0.01))

        out.start()
        try:
            _wait(lambda: out.connected, "connection")
            broker.pause()
            out._client.socket().shutdown(socket.SHUT_WR)  # the next write fails (EPIPE)
            cycle(1)
            _wait(lambda: out.states_skipped, "cycle counted skipped")
            assert out.problem.startswith(f"MQTT broker 127.0.0.1:{broker.port}: connection lost"), out.problem
            assert out.states_published == 0 and not out.connected
            broker.resume()
            _wait(lambda: out.connected, "connected again", timeout=mqtt_output.RECONNECT_MAX_S + DEADLINE_S)
            n, deadline = 1, time.monotonic() + DEADLINE_S
            while not out.states_published:
                assert time.monotonic() < deadline, "no cycle published after the reconnection"
                n += 1
                cycle(n)
                time.sleep(0.05)
            assert out.problem is None and "mqtt" not in handler.active
        finally:
            broker.resume()
            out.stop()


def test_discovery_paho_refuses_after_a_stall_is_reported_and_sent_again_once_the_broker_catches_up(monkeypatch):
    """paho keeps a stall's unacknowledged messages across a reconnect, so the discovery sent at the new login
    can find its queue full: that is reported (never counted as sent), and the discovery and `online` go
    again after the next cycle that goes out whole."""
    import socket

    import mqtt_output
    from daemon import CycleReport
    from tools import ChannelReading, Cycle

    with Mosquitto() as broker:
        handler = ErrorHandler(None)
        out = _output(f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}', handler)
        monkeypatch.setattr(mqtt_output, "MAX_QUEUED_MESSAGES", len(out.discovery()) + 1 + 10)
        readings = tuple(ChannelReading(c.name, c.address, 12.5, 1.0, 10.0, 0.125, 10, 0, 0.5, 0.25)
                         for c in out.config.channels)
        n = 0

        def cycle() -> None:
            nonlocal n
            n += 1
            out.after_cycle(CycleReport(Cycle(1_780_000_000_000 + n, 1.0, readings), None, True, 0, n, None, 0.01))
            time.sleep(0.05)

        out.start()
        try:
            _wait(lambda: out.discovery_sent == 1 and out.problem is None, "first discovery")
            broker.pause()
            deadline = time.monotonic() + DEADLINE_S
            while not out.states_skipped:  # the queue fills: cycles refused
                assert time.monotonic() < deadline, "the queue never filled"
                cycle()
            out._client.socket().shutdown(socket.SHUT_RDWR)  # the connection goes; the queue stays
            _wait(lambda: not out.connected, "connection lost")
            broker.resume()
            _wait(lambda: "discovery message(s) not sent" in (out.problem or ""), "discovery refusal reported",
                  timeout=mqtt_output.RECONNECT_MAX_S + DEADLINE_S)
            assert out.connected and out.discovery_sent == 1 and handler.active["mqtt"].tier == Tier.CONNECTION
            deadline = time.monotonic() + DEADLINE_S
            while out.discovery_sent < 2 or out.problem is not None:
                assert time.monotonic() < deadline, (out.problem, out.discovery_sent)
                cycle()
            assert "mqtt" not in handler.active
        finally:
            broker.resume()
            out.stop()


def test_check_keeps_to_its_deadline_when_the_name_lookup_hangs(monkeypatch):
    """paho bounds the TCP connect and the TLS handshake, not the name lookup, which a SIM link's DNS can
    hold for tens of seconds. No resolver that hangs can run here, so the system's getaddrinfo is replaced
    by one that answers only when the test lets it: the probe must give up at its own deadline first, and
    the connection made after it gave up must be closed, not left open on the broker (a real listening
    socket here, reading what paho sends)."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    answered = threading.Event()
    real = socket.getaddrinfo

    def hanging(host, *args, **kwargs):
        if host == "broker.example":
            if not answered.wait(30):  # set only after probe() returned: a probe that waits fails the test
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            return real("127.0.0.1", port, *args[1:], **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    out = _output(f'[mqtt]\nenabled = true\nhost = "broker.example"\nport = {port}', ErrorHandler(None))
    try:
        problem = out.probe(0.5)
    finally:
        answered.set()
    assert problem == f"MQTT broker broker.example:{port} unreachable: no answer to the login within 0.5 s"
    with listener, listener.accept()[0] as late:  # the lookup answered: paho connects after all
        late.settimeout(10)
        received = b""
        while chunk := late.recv(4096):  # until the probe's thread closes it (a timeout fails the test)
            received += chunk
    assert received[:1] == b"\x10" and received.endswith(b"\xe0\x00")  # CONNECT ... DISCONNECT, then closed


def test_tls_with_a_self_signed_ca(tmp_path):
    from tls import make_pki, openssl_available

    assert openssl_available() is None
    pki = make_pki(tmp_path / "pki")
    with Mosquitto(tls=(str(pki.good.cert_file), str(pki.good.key_file))) as tls_broker:
        base = f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {tls_broker.port}\ntls = true\n'
        handler = ErrorHandler(None)
        untrusting = _output(base, handler)
        assert untrusting.probe().startswith(f"MQTT broker 127.0.0.1:{tls_broker.port}: TLS failure: "
                                             "the broker's certificate is not trusted")  # `main.py check`
        untrusting.start()
        try:
            _wait(lambda: untrusting.problem, "TLS failure")
            assert untrusting.problem.startswith(f"MQTT broker 127.0.0.1:{tls_broker.port}: TLS failure: "
                                                 "the broker's certificate is not trusted")
        finally:
            untrusting.stop()
        trusting = _output(base + f'ca_file = "{pki.ca_file}"', ErrorHandler(None))
        assert trusting.probe() is None
        trusting.start()
        try:
            _wait(lambda: trusting.connected and trusting.discovery_sent, "TLS connection with ca_file")
            assert trusting.problem is None
        finally:
            trusting.stop()


def test_a_stalled_broker_never_delays_a_cycle(tmp_path):
    with Mosquitto() as stalled:
        stalled.pause()  # SIGSTOP: the kernel still accepts the TCP connection, nothing ever answers
        try:
            cfg = write_config(tmp_path, stalled.port, interval_s=0.2)
            result = subprocess.run([sys.executable, str(ROOT / "main.py"), "run", "--config", str(cfg),
                                     "--cycles", "10"], capture_output=True, text=True, timeout=120)
        finally:
            stalled.resume()
    assert result.returncode == 0, result.stderr
    box = Outbox(tmp_path / "store", check_integrity=False)
    try:
        times = {t for t, _, _ in box.export()}
    finally:
        box.close()
    assert len(times) == 10  # every cycle measured and stored; none waited for the broker
    assert "stopped after 10 cycles" in result.stderr
