"""MQTT with Home Assistant discovery: every cycle as one JSON state message per device.

`MqttOutput` is a listener of the measuring loop (daemon.Daemon). The listener only hands the cycle's
report to the publisher thread (the latest cycle wins, nothing queues up); paho-mqtt's own network
thread (loop_start) connects, reconnects with backoff (1 s doubling to 60 s) and sends. A broker that is
down, slow or refusing the login never delays a cycle, and never touches the store.

Topics (README "Home Assistant"):
  <topic_prefix>/availability                     `online` (retained) while running; `offline` (the last
                                                  will, retained) when the daemon dies or stops
  <topic_prefix>/<node>/state                     one JSON object per device (model unit, `logger`) per cycle
  <discovery_prefix>/sensor/<node_id>/<object>/config   one retained discovery config per entity, sent on
                                                  every connect and when Home Assistant publishes `online`
                                                  on <discovery_prefix>/status
"""
from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Mapping

from config import Config
from credentials import Secret, scrub
from rpi_errors import ConnectionFailedError, ErrorHandler, ShortError

log = logging.getLogger(__name__)

PASSWORD_ENV = "MQTT_PASSWORD"
KEEPALIVE_S = 60
CONNECT_TIMEOUT_S = 5.0
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 60
MAX_QUEUED_MESSAGES = 1000  # paho's own queue while a publish waits for the broker (bounded)
MANUFACTURER = "Brampton2Zero"
LOGGER_NODE = "logger"
_SLUG = re.compile(r"[^A-Za-z0-9_-]+")

# Per channel: field -> (name suffix, device_class, unit, state_class). Energy counters are what Home
# Assistant's Energy dashboard accepts: device_class energy, state_class total_increasing, Wh.
CHANNEL_SENSORS: Mapping[str, tuple[str, str, str, str]] = {
    "bus_voltage_v": ("voltage", "voltage", "V", "measurement"),
    "current_ma": ("current", "current", "mA", "measurement"),
    "power_w": ("power", "power", "W", "measurement"),
    "energy_in_wh": ("energy in", "energy", "Wh", "total_increasing"),
    "energy_out_wh": ("energy out", "energy", "Wh", "total_increasing"),
}
# The logger's own health; device_class None where Home Assistant has none that fits.
LOGGER_SENSORS: Mapping[str, tuple[str, str | None, str, str]] = {
    "cpu_percent": ("CPU", None, "%", "measurement"),
    "cpu_temp_c": ("CPU temperature", "temperature", "°C", "measurement"),
    "memory_used_mb": ("memory used", "data_size", "MB", "measurement"),
    "disk_free_mb": ("disk free", "data_size", "MB", "measurement"),
    "uptime_s": ("uptime", "duration", "s", "measurement"),
    "queue_depth": ("points waiting", None, "points", "measurement"),
}
LED_FIELD = "led"  # the text sensor: what the status LED means now


def slug(text: str) -> str:
    """`text` as a topic level / discovery id: letters, digits, _ and - only."""
    return _SLUG.sub("_", text).strip("_") or "_"


def describe_failure(exc: BaseException | None, where: str) -> str:
    """Why a connection to the broker at `where` failed, for the log, `status` and the LED."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"MQTT broker {where}: TLS failure: the broker's certificate is not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"MQTT broker {where}: TLS failure ({exc.reason or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return f"MQTT broker {where} unreachable: connection refused (is the broker running on that port?)"
    if isinstance(exc, socket.gaierror):
        return f"MQTT broker {where} unreachable: the host name cannot be resolved"
    if isinstance(exc, TimeoutError):
        return f"MQTT broker {where} unreachable: no answer within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(exc, OSError):
        return f"MQTT broker {where} unreachable: {exc.strerror or type(exc).__name__}"
    return f"MQTT broker {where} unreachable: {type(exc).__name__ if exc else 'connection failed'}"


class MqttOutput:
    """Publishes each cycle to an MQTT broker, with Home Assistant discovery. See the module docstring.

    `handler`: problems go to the LED as Short (InfluxDB or the store remains the data of record) or,
    with `only_output`, as Connection; `meaning()` says what the LED means now (the text sensor);
    `environ`: where $MQTT_PASSWORD is read; `save_state(dict)` keeps the connection's state for `status`
    (called in the measuring thread, only when it changed). `after_cycle` is the loop's listener (cheap);
    `start`/`stop` from the main thread. Raises credentials.SecretError from start() for a password file
    that is missing or readable by others.
    """

    def __init__(self, config: Config, handler: ErrorHandler, *, meaning: Callable[[], str] = lambda: "",
                 only_output: bool = False, environ: Mapping[str, str] | None = None,
                 save_state: Callable[[dict[str, str]], None] | None = None) -> None:
        self.config = config
        self.mqtt = config.mqtt
        self.handler = handler
        self.meaning = meaning
        self.only_output = only_output
        self.save_state = save_state
        self._saved_status = ""
        site = slug(config.site.name)
        self.site = site
        self.prefix = self.mqtt.topic_prefix or f"solarpowerbrampton/{site}"
        self.availability_topic = f"{self.prefix}/availability"
        self.status_topic = f"{self.mqtt.discovery_prefix}/status"
        self.where = f"{self.mqtt.host}:{self.mqtt.effective_port}"
        self.secret = Secret(PASSWORD_ENV, self.mqtt.password_file, environ)
        self.units: dict[str, list[str]] = {}  # unit -> its channels, in config order
        for channel in config.channels:
            self.units.setdefault(channel.unit_name, []).append(channel.name)
        self.problem: str | None = None  # what is wrong now (None: connected, or not yet tried)
        self.connected = False
        self.states_published = 0  # cycles published
        self.states_skipped = 0  # cycles not published: no connection to the broker at the time
        self.discovery_sent = 0  # times the whole discovery was (re)sent
        self._password = ""
        self._client = None
        self._cond = threading.Condition()
        self._pending = None  # (report, led meaning) of the latest cycle not yet published
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- topics and payloads ------------------------------------------------------------------------------
    def state_topic(self, node: str) -> str:
        return f"{self.prefix}/{slug(node)}/state"

    def discovery(self) -> dict[str, dict]:
        """Every entity's discovery config, by its config topic (full key names, not abbreviations)."""
        configs = {}
        for unit, channels in self.units.items():
            device = self._device(unit, "model unit")
            for channel in channels:
                for field, (suffix, device_class, unit_of_measurement, state_class) in CHANNEL_SENSORS.items():
                    configs.update(self._entity(unit, f"{channel}_{field}", f"{channel} {suffix}", device,
                                                device_class, unit_of_measurement, state_class))
        device = self._device(LOGGER_NODE, "data logger (Raspberry Pi)")
        for field, (name, device_class, unit_of_measurement, state_class) in LOGGER_SENSORS.items():
            configs.update(self._entity(LOGGER_NODE, field, name, device, device_class, unit_of_measurement,
                                        state_class))
        configs.update(self._entity(LOGGER_NODE, LED_FIELD, "status LED", device, None, None, None))
        return configs

    def _device(self, node: str, model: str) -> dict:
        return {"identifiers": [f"solarpowerbrampton_{self.site}_{slug(node)}"],
                "name": f"{self.config.site.name} {node}", "manufacturer": MANUFACTURER, "model": model}

    def _entity(self, node: str, field: str, name: str, device: dict, device_class: str | None,
                unit_of_measurement: str | None, state_class: str | None) -> dict[str, dict]:
        node_id = f"spb_{self.site}_{slug(node)}"
        object_id = slug(field)
        config = {"name": name, "unique_id": f"solarpowerbrampton_{self.site}_{slug(node)}_{object_id}",
                  "object_id": f"{node_id}_{object_id}", "state_topic": self.state_topic(node),
                  "value_template": f"{{{{ value_json.{field} }}}}", "availability_topic": self.availability_topic,
                  "payload_available": "online", "payload_not_available": "offline", "device": device}
        if device_class:
            config["device_class"] = device_class
        if unit_of_measurement:
            config["unit_of_measurement"] = unit_of_measurement
        if state_class:
            config["state_class"] = state_class
        return {f"{self.mqtt.discovery_prefix}/sensor/{node_id}/{object_id}/config": config}

    def states(self, report, led: str) -> dict[str, bytes]:
        """The state messages of one cycle (tools.Cycle in `report.cycle`), by topic. Failed channels: null."""
        cycle = report.cycle
        by_name = {r.name: r for r in cycle.channels}
        messages = {}
        for unit, channels in self.units.items():
            state: dict = {"time_ms": cycle.time_ms}
            for channel in channels:
                reading = by_name.get(channel)
                for field in CHANNEL_SENSORS:
                    state[f"{channel}_{field}"] = getattr(reading, field, None) if reading else None
            messages[self.state_topic(unit)] = json.dumps(state, separators=(",", ":")).encode()
        state = {"time_ms": cycle.time_ms, LED_FIELD: led, "queue_depth": report.queue_depth}
        system = report.system
        if system is not None:
            for field in LOGGER_SENSORS:
                if hasattr(system, field):
                    state[field] = getattr(system, field)
            state["undervoltage"] = system.undervoltage
            state["throttled"] = system.throttled
        messages[self.state_topic(LOGGER_NODE)] = json.dumps(state, separators=(",", ":")).encode()
        return messages

    # -- the loop's side ----------------------------------------------------------------------------------
    def after_cycle(self, report) -> None:
        """The listener: hand the cycle to the publisher thread (the latest wins). Never blocks on the broker."""
        with self._cond:
            self._pending = (report, self.meaning())
            self._cond.notify()
        status = self.status
        if self.save_state is not None and status != self._saved_status:
            self._saved_status = status
            self.save_state({"mqtt": status})

    @property
    def status(self) -> str:
        """One line for `status`: connected, or what is wrong."""
        if self.problem:
            return self.problem
        return f"connected to {self.where}" if self.connected else f"connecting to {self.where}"

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background (never waits for the broker). Raises SecretError for a bad password file."""
        import paho.mqtt.client as paho

        self._password = self.secret.value() if (self.mqtt.password_file or self.mqtt.username) else ""
        client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                             client_id=self.mqtt.client_id or f"solarpowerbrampton-{self.site}")
        if self.mqtt.username:
            client.username_pw_set(self.mqtt.username, self._password or None)
        if self.mqtt.tls:
            context = ssl.create_default_context()
            if self.mqtt.ca_file:
                context.load_verify_locations(self.mqtt.ca_file)
            client.tls_set_context(context)
        client.will_set(self.availability_topic, "offline", qos=self.mqtt.qos, retain=True)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.max_queued_messages_set(MAX_QUEUED_MESSAGES)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        client.connect_async(self.mqtt.host, self.mqtt.effective_port, keepalive=KEEPALIVE_S)
        client.loop_start()
        self._thread = threading.Thread(target=self._publisher, name="mqtt-publisher", daemon=True)
        self._thread.start()
        log.info("MQTT: publishing to %s under %s (discovery under %s)", self.where, self.prefix,
                 self.mqtt.discovery_prefix)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Say `offline` (retained) if connected, disconnect, end both threads. Bounded by about `timeout_s`."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        client = self._client
        if client is None:
            return
        if self.connected:
            info = client.publish(self.availability_topic, "offline", qos=self.mqtt.qos, retain=True)
            try:
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError):
                pass  # the connection went meanwhile: the broker publishes the will instead
        client.disconnect()
        client.loop_stop()
        self._client = None

    # -- the publisher thread -----------------------------------------------------------------------------
    def _publisher(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                (report, led), self._pending = self._pending, None
            if not self.connected:
                self.states_skipped += 1
                continue
            for topic, payload in self.states(report, led).items():
                self._client.publish(topic, payload, qos=self.mqtt.qos)
            self.states_published += 1

    # -- paho's callbacks (its network thread) ------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            why = str(reason_code)
            cause = ("refused the login" if why in ("Bad user name or password", "Not authorized")
                     else "refused the connection")
            self._report(f"MQTT broker {self.where} {cause} ({why}) for user {self.mqtt.username or '(anonymous)'}")
            return
        self.connected = True
        client.subscribe(self.status_topic, qos=self.mqtt.qos)
        client.publish(self.availability_topic, "online", qos=self.mqtt.qos, retain=True)
        self._send_discovery(client)
        if self.problem is not None:
            log.info("MQTT: connected to %s again", self.where)
        else:
            log.info("MQTT: connected to %s", self.where)
        self.problem = None
        self.handler.clear("mqtt")

    def _send_discovery(self, client) -> None:
        for topic, config in self.discovery().items():
            client.publish(topic, json.dumps(config, separators=(",", ":")), qos=self.mqtt.qos, retain=True)
        self.discovery_sent += 1

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its `except OSError` around the connect: the exception says why.
        self._report(describe_failure(sys.exc_info()[1], self.where))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected, self.connected = self.connected, False
        if was_connected and not self._stopping:
            self._report(f"MQTT broker {self.where}: connection lost ({reason_code}); reconnecting")

    def _on_message(self, client, userdata, message) -> None:
        # Home Assistant announces its start with `online`: it has forgotten nothing retained, but a
        # broker without persistence has; send discovery (and availability) again either way.
        if message.topic == self.status_topic and message.payload[:16].strip() == b"online":
            log.info("MQTT: Home Assistant came online: sending discovery again")
            client.publish(self.availability_topic, "online", qos=self.mqtt.qos, retain=True)
            self._send_discovery(client)

    def _report(self, message: str) -> None:
        message = scrub(message, self._password)
        if message != self.problem and self.problem is not None:
            log.warning("%s", message)  # the handler logs only a condition's start, not a new cause
        self.problem = message
        error = ConnectionFailedError if self.only_output else ShortError
        self.handler.report(error(message, key="mqtt"))
