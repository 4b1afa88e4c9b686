"""MQTT with Home Assistant discovery: every cycle as one JSON state message per device.

`MqttOutput` is a listener of the measuring loop (daemon.Daemon). The listener only hands the cycle's
report to the MQTT thread (the latest cycle wins, nothing queues up). That one thread drives paho-mqtt
(its loop_read/loop_write/loop_misc, not loop_start): connects, reconnects with backoff (1 s doubling to
60 s), sends each cycle's messages in one burst and reads the broker's answers, waking about once per cycle.
A broker that is down, slow or refusing the login never delays a cycle, and never touches the store.

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
import math
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from config import Config
from config_check import MQTT_LOGGER_NODE as LOGGER_NODE, slug
from credentials import MQTT_PASSWORD_ENV, Secret, SecretError, scrub
from rpi_errors import ConnectionFailedError, ErrorHandler, ShortError
from schema import SYSTEM, typed_fields
from transport import call_within

log = logging.getLogger(__name__)

KEEPALIVE_S = 60
CONNECT_TIMEOUT_S = 5.0
LOGIN_TIMEOUT_S = 10.0  # from the TCP (and TLS) connection to the broker's answer to the login (CONNACK)
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 60
MAX_QUEUED_MESSAGES = 1000  # paho's own queue while a publish waits for the broker (bounded)
IDLE_WAKE_S = 15.0  # the MQTT thread's longest sleep while listening: keepalive (60 s) checks in time
READ_CHUNK = 4096  # bytes read from the broker at once
# The largest packet taken from the broker: ours are acknowledgements and Home Assistant's few-byte status.
# A bigger one (a hostile retained message on the status topic) closes the connection before it is read.
MAX_PACKET_BYTES = 65536
QUIET_MAX_S = 5.0  # the longest the broker's answers wait for the next cycle to be read
MANUFACTURER = "Brampton2Zero"

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
    "memory_used_mb": ("memory used", "data_size", "MiB", "measurement"),  # the health readings' MB are MiB
    "disk_free_mb": ("disk free", "data_size", "MiB", "measurement"),
    "uptime_s": ("uptime", "duration", "s", "measurement"),
    "queue_depth": ("points waiting", None, "points", "measurement"),
}
LED_FIELD = "led"  # the text sensor: what the status LED means now


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


def _cork(sock, on: int) -> None:
    """TCP_CORK (Linux) on or off: while on, small writes wait to leave together."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, on)
    except (AttributeError, OSError):
        pass  # not Linux, or the socket just closed: the messages go out one by one


def make_client(client_id: str):
    """A paho-mqtt client (MQTT 3.1.1, callback API 2, pinned 2.2.0) made cheaper where every cycle pays.

    Reads: paho reads a packet in pieces of 1, 1 and n bytes, a system call each (a PUBACK is 4 bytes:
    3 calls, 5 PUBACKs a cycle at qos 1); this client reads what waits at once and hands paho the pieces
    from that buffer (`buffered()` says something is left: select() cannot see it).
    PUBACKs: paho 2.2 decodes every one into a fresh MQTT 5 reason code and property set (tables of ~40
    names built per packet: about 60 us each); a 3.1.1 PUBACK is only a message id. Anything else (MQTT 5,
    PUBCOMP, a malformed length) goes through paho's own code.
    Size: a packet whose stated length passes MAX_PACKET_BYTES ends the connection before its body is read
    (paho would read up to 256 MB); `oversize` keeps that length for the message.
    Not thread-safe: one thread drives it (MqttOutput's).
    """
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    class Client(paho.Client):
        _puback_success = ReasonCode(PacketTypes.PUBACK)  # read-only: only an on_publish callback sees them
        _puback_properties = Properties(PacketTypes.PUBACK)
        _read_buffer = b""
        oversize = 0
        QUEUE_FULL = paho.MQTTErrorCode.MQTT_ERR_QUEUE_SIZE  # the publish() code for "queue of MAX_QUEUED full"

        def buffered(self) -> bool:
            return bool(self._read_buffer)

        def unacknowledged(self) -> int:
            return len(self._out_messages)  # qos 1/2 messages without their PUBACK/PUBCOMP yet

        def _sock_recv(self, bufsize):
            packet = self._in_packet
            if packet["have_remaining"] and packet["remaining_length"] > MAX_PACKET_BYTES:
                self.oversize = packet["remaining_length"]
                raise ConnectionAbortedError(f"packet of {self.oversize} bytes refused")  # paho: connection lost
            data = self._read_buffer
            if not data:
                data = super()._sock_recv(max(bufsize, READ_CHUNK))  # BlockingIOError when nothing waits
                if len(data) <= bufsize:
                    return data  # b"" too: the broker closed the connection
            self._read_buffer = data[bufsize:]
            return data[:bufsize]

        def _sock_close(self):
            self._read_buffer = b""  # the rest of a closed connection's bytes mean nothing to the next
            super()._sock_close()

        def _handle_pubackcomp(self, cmd):
            packet = self._in_packet["packet"]
            if cmd != "PUBACK" or self._protocol == paho.MQTTv5 or len(packet) != 2:
                return super()._handle_pubackcomp(cmd)
            mid = packet[0] << 8 | packet[1]
            with self._out_message_mutex:
                if mid in self._out_messages:
                    return self._do_on_publish(mid, self._puback_success, self._puback_properties)
            return paho.MQTT_ERR_SUCCESS

    return Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)


def _doubled(delay_s: float) -> float:
    """The next reconnect backoff after `delay_s` (0: none yet): from RECONNECT_MIN_S doubling to RECONNECT_MAX_S."""
    return min(max(delay_s * 2, RECONNECT_MIN_S), RECONNECT_MAX_S)


def refusal(reason_code, where: str, username: str) -> str:
    """The problem for a CONNACK that refused the connection (paho's ReasonCode `reason_code`)."""
    why = str(reason_code)
    cause = "refused the login" if why in ("Bad user name or password", "Not authorized") else "refused the connection"
    return f"MQTT broker {where} {cause} ({why}) for user {username or '(anonymous)'}"


class MqttOutput:
    """Publishes each cycle to an MQTT broker, with Home Assistant discovery. See the module docstring.

    `handler`: problems go to the LED as Short (InfluxDB or the store remains the data of record) or,
    with `only_output`, as Connection; `meaning()` says what the LED means now (the text sensor);
    `environ`: where $MQTT_PASSWORD is read; `stored_state()` is what the loop stores with each cycle for
    `status` (never written from here). `after_cycle` is the loop's listener (cheap);
    `start`/`stop` from the main thread. Raises credentials.SecretError from start() for a password file
    that is missing or readable by others.
    """

    def __init__(self, config: Config, handler: ErrorHandler, *, meaning: Callable[[], str] = lambda: "",
                 only_output: bool = False, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.mqtt = config.mqtt
        self.handler = handler
        self.meaning = meaning
        self.only_output = only_output
        site = slug(config.site.name)
        self.site = site
        self.prefix = self.mqtt.topic_prefix or f"solarpowerbrampton/{site}"
        self.availability_topic = f"{self.prefix}/availability"
        self.status_topic = f"{self.mqtt.discovery_prefix}/status"
        self.where = f"{self.mqtt.host}:{self.mqtt.effective_port}"
        self.client_id = self.mqtt.client_id or f"solarpowerbrampton-{site}"
        self.secret = Secret(MQTT_PASSWORD_ENV, self.mqtt.password_file, environ)
        self.units: dict[str, list[str]] = {}  # unit -> its channels, in config order
        for channel in config.channels:
            self.units.setdefault(channel.unit_name, []).append(channel.name)
        # Per unit: its state topic and, per channel, (JSON key, ChannelReading field) of each sensor.
        self._layout = [(self.state_topic(unit),
                         [(channel, [(f"{channel}_{field}", field) for field in CHANNEL_SENSORS])
                          for channel in channels]) for unit, channels in self.units.items()]
        self._logger_topic = self.state_topic(LOGGER_NODE)
        self._encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps would build one per call
        self.problem: str | None = None  # what is wrong now (None: connected, or not yet tried)
        self.connected = False
        self.states_published = 0  # cycles published
        self.states_skipped = 0  # cycles not published: no connection to the broker at the time
        self.discovery_sent = 0  # times the whole discovery was (re)sent
        self._password = ""
        self._client = None
        # After a cycle's burst, the broker's answers wait this long for the next cycle to read them.
        self.quiet_s = min(1.5 * config.sampling.interval_s, QUIET_MAX_S)
        self._lock = threading.Lock()
        self._pending = None  # (report, led meaning) of the latest cycle not yet published
        self._woken = False  # a wake-up byte for _pending is on its way
        self._stopping = False
        self._stop_timeout_s = 2.0
        self._delay_s = 0.0  # the reconnect backoff now (0: the last connection stayed up for a keepalive)
        self._connected_at = 0.0  # monotonic time of the last accepted login
        self._login_by = 0.0  # while not logged in on an open socket: the broker must have answered by then
        self._refusing = False  # paho refused the last cycle's publishes (its queue for the broker is full)
        self._discovery_due = False  # paho refused part of the last discovery: send it again
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = None  # socket pair: a cycle or stop() wakes the MQTT thread

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
                  # The entity id Home Assistant gives it at first (`object_id`, which said the same, stopped
                  # working in Home Assistant 2026.4).
                  "default_entity_id": f"sensor.{node_id}_{object_id}", "state_topic": self.state_topic(node),
                  "value_template": f"{{{{ value_json['{field}'] }}}}", "availability_topic": self.availability_topic,
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
        encode = self._encode
        messages = {}
        for topic, channels in self._layout:  # topics and keys made once: this runs every cycle
            state: dict = {"time_ms": cycle.time_ms}
            for channel, keys in channels:
                reading = by_name.get(channel)
                for key, field in keys:
                    state[key] = getattr(reading, field, None)
            messages[topic] = encode(state).encode()
        state = {"time_ms": cycle.time_ms, LED_FIELD: led, "queue_depth": report.queue_depth}
        system = report.system
        if system is not None:  # rounded as the stored `system` point is: the same values in both
            state.update(typed_fields(SYSTEM, {f: getattr(system, f) for f in LOGGER_SENSORS if hasattr(system, f)}))
            state["undervoltage"] = system.undervoltage
            state["throttled"] = system.throttled
        messages[self._logger_topic] = encode(state).encode()
        return messages

    # -- the loop's side ----------------------------------------------------------------------------------
    def after_cycle(self, report) -> None:
        """The listener: hand the cycle to the MQTT thread (the latest wins). Never blocks on the broker: at
        most one byte on a local socket pair wakes that thread."""
        with self._lock:
            self._pending = (report, self.meaning())
            wake, self._woken = not self._woken, True
        if wake:
            self._wake()

    def stored_state(self) -> dict[str, str]:
        """What the store keeps for `main.py status` ({"mqtt": status}): the measuring loop commits it with
        each cycle, in the cycle's own transaction (this output never writes to the store itself)."""
        return {"mqtt": self.status}

    @property
    def status(self) -> str:
        """One line for `status`: connected, or what is wrong."""
        if self.problem:
            return self.problem
        return f"connected to {self.where}" if self.connected else f"connecting to {self.where}"

    def unacknowledged(self) -> int:
        """Messages (qos 1 or 2) whose acknowledgement has not been read yet: at most the last cycle's while
        connected, as the next cycle reads them (or the MQTT thread after `quiet_s`). Any thread."""
        client = self._client
        return client.unacknowledged() if client is not None else 0

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background (never waits for the broker). Raises SecretError for a bad password file."""
        client = self._new_client(self.client_id)
        client.will_set(self.availability_topic, "offline", qos=self.mqtt.qos, retain=True)
        client.max_queued_messages_set(MAX_QUEUED_MESSAGES)
        client.max_inflight_messages_set(0)  # no limit: a cycle's burst and discovery leave at once
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        # Sets host, port and keepalive only: the MQTT thread connects (paho's reconnect()).
        client.connect_async(self.mqtt.host, self.mqtt.effective_port, keepalive=KEEPALIVE_S)
        self._client = client
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()
        log.info("MQTT: publishing to %s under %s (discovery under %s)", self.where, self.prefix,
                 self.mqtt.discovery_prefix)

    def _new_client(self, client_id: str):
        """A client with the login and TLS of [mqtt]; raises SecretError for a bad password file."""
        self._password = self.secret.value() if (self.mqtt.password_file or self.mqtt.username) else ""
        client = make_client(client_id)
        if self.mqtt.username:
            client.username_pw_set(self.mqtt.username, self._password or None)
        if self.mqtt.tls:
            context = ssl.create_default_context()
            if self.mqtt.ca_file:
                context.load_verify_locations(self.mqtt.ca_file)
            client.tls_set_context(context)
        client.connect_timeout = CONNECT_TIMEOUT_S
        return client

    def _refresh_login(self, client) -> bool:
        """Before each connection: the password as its file holds it now, as InfluxDB's token is re-read (a
        corrected file is used without a restart). False, reported, when the file cannot be used now (gone,
        readable by others): no login is tried with it. MQTT thread only."""
        if not self.mqtt.username:
            return True
        try:
            password = self.secret.value()
        except SecretError as exc:
            self._report(f"MQTT broker {self.where}: no login tried: {exc}")
            return False
        if password != self._password:
            self._password = password
            client.username_pw_set(self.mqtt.username, password or None)
        return True

    def probe(self, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
        """Connect once and wait for the broker's CONNACK (`main.py check`), about `timeout_s` at most.

        None when the broker accepted the login, else why not, naming the broker (never the password).
        Its own client id (`<client_id>-check`, so a running daemon is not pushed off the broker) and no
        last will (a probe cut short must not mark the logger offline). Raises SecretError for a bad
        password file. Blocks the calling thread."""
        client = self._new_client(f"{self.client_id}-check")
        client.connect_timeout = min(CONNECT_TIMEOUT_S, timeout_s)
        answers = []
        client.on_connect = lambda _client, _userdata, _flags, reason_code, _properties: answers.append(reason_code)
        deadline = time.monotonic() + timeout_s
        silent = f"MQTT broker {self.where} unreachable: no answer to the login within {timeout_s:g} s"
        # paho bounds the TCP connect and the TLS handshake each (per address, where a name has several) and
        # the name lookup not at all (a SIM link's DNS can hang for tens of seconds).
        try:
            connected, _ = call_within(
                lambda: client.connect(self.mqtt.host, self.mqtt.effective_port, keepalive=KEEPALIVE_S),
                timeout_s, name="mqtt-probe", on_late=lambda _: client.disconnect())
        except OSError as exc:  # refused, unknown host, no answer, TLS failure
            return scrub(describe_failure(exc, self.where), self._password)
        if not connected:
            return silent
        try:
            while not answers:
                sock, left = client.socket(), deadline - time.monotonic()
                if sock is None:
                    return f"MQTT broker {self.where} closed the connection without answering the login"
                if left <= 0:
                    return silent
                if not client.buffered():
                    select.select([sock], [sock] if client.want_write() else [], [], left)
                if client.want_write():
                    client.loop_write()
                client.loop_read()
            if answers[0].is_failure:
                return scrub(refusal(answers[0], self.where, self.mqtt.username), self._password)
            return None
        finally:
            if client.socket() is not None:
                client.disconnect()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Say `offline` (retained) if connected, disconnect, end the MQTT thread. Bounded by about
        `timeout_s` (plus a connection attempt in progress, at most CONNECT_TIMEOUT_S)."""
        self._stop_timeout_s = timeout_s
        self._stopping = True
        self._wake()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s + CONNECT_TIMEOUT_S)
            if not thread.is_alive():
                self._wake_r.close()
                self._wake_w.close()
        self._client = None

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (AttributeError, OSError):
            pass  # not started, stopped, or a byte is already waiting: the thread wakes anyway

    # -- the MQTT thread ----------------------------------------------------------------------------------
    # paho's loop_start() thread polls with a 1 s timeout and is woken by every publish; this thread drives
    # paho itself (loop_read/loop_write/loop_misc) and wakes about once per cycle: it reads what arrived
    # (the last cycle's PUBACKs, a Home Assistant birth message), writes the cycle's messages in one burst,
    # then leaves the socket alone for a while so the PUBACKs are read with the next cycle instead of each
    # waking it (bench_outputs.py: the CPU MQTT adds per cycle).
    def _run(self) -> None:
        client = self._client
        retry_at = 0.0  # monotonic time of the next connection attempt
        had_socket = False
        quiet_until = 0.0  # until then only a cycle (or stop) wakes the thread, not the broker's answers
        while not self._stopping:
            try:
                sock = client.socket()
                now = time.monotonic()
                if sock is None:
                    if had_socket:  # lost, refused or closed for a missed keepalive: back off, try again
                        had_socket = False
                        retry_at = now + self._next_delay()
                    if now >= retry_at:
                        if not self._refresh_login(client):
                            retry_at = time.monotonic() + self._next_delay()
                            continue
                        try:
                            client.reconnect()  # blocking, bounded by CONNECT_TIMEOUT_S (TLS handshake too)
                        except OSError as exc:
                            self._report(describe_failure(exc, self.where))
                            retry_at = time.monotonic() + self._next_delay()
                        else:
                            had_socket, quiet_until = True, 0.0
                            self._login_by = time.monotonic() + LOGIN_TIMEOUT_S
                        continue
                    self._select([], [], retry_at - now)
                    self._take_cycle(client)
                    continue
                if not self.connected and now >= self._login_by:
                    # Connected but never logged in: a stalled broker, or TLS's port without `tls = true`.
                    self._report(f"MQTT broker {self.where}: no answer to the login within {LOGIN_TIMEOUT_S:g} s "
                                 "(a stalled broker, or a TLS port without `tls = true`?); reconnecting")
                    self._login_by = math.inf  # reported: its closing is not "closed before answering"
                    client.disconnect()  # closes the socket: the next pass backs off and tries again
                    continue
                listening = now >= quiet_until
                # Bytes already read (ours, or TLS's decrypted ones) are invisible to select(): don't wait.
                waiting = client.buffered() or (hasattr(sock, "pending") and sock.pending())
                timeout = 0.0 if waiting else (IDLE_WAKE_S if listening else quiet_until - now)
                if not self.connected:
                    timeout = min(timeout, max(self._login_by - now, 0.0))  # the login deadline is kept
                _, writable = self._select([sock] if listening else [],
                                           [sock] if client.want_write() else [], timeout)
                # One recv when nothing came; with qos 1 this reads the last cycle's PUBACKs.
                if client.loop_read() or client.socket() is None:
                    continue
                if writable and (client.loop_write() or client.socket() is None):
                    continue
                client.loop_misc()  # keepalive: PINGREQ when due, closes when the broker went silent
                if self._take_cycle(client) and client.socket() is not None:
                    quiet_until = time.monotonic() + self.quiet_s
            except Exception:  # noqa: BLE001 - the thread must outlive any surprise; the store is unaffected
                log.exception("MQTT: unexpected error in the MQTT thread")
                self._select([], [], RECONNECT_MIN_S)
        self._shutdown(client)

    def _select(self, rlist: list, wlist: list, timeout_s: float) -> tuple[list, list]:
        """Wait for `rlist`/`wlist` or a wake-up (cycle, stop), at most `timeout_s`; (readable, writable)."""
        readable, writable, _ = select.select([self._wake_r, *rlist], wlist, [], max(timeout_s, 0.0))
        if self._wake_r in readable:
            try:
                self._wake_r.recv(64)
            except BlockingIOError:
                pass
        return readable, writable

    def _take_cycle(self, client) -> bool:
        """Publish the pending cycle (True), or count it skipped while not connected."""
        with self._lock:
            pending, self._pending, self._woken = self._pending, None, False
        if pending is None:
            return False
        sock = client.socket()
        if not self.connected or sock is None:
            self.states_skipped += 1
            return False
        report, led = pending
        # Corked, the burst leaves in one TCP segment instead of one per message: cheaper on both ends.
        _cork(sock, 1)
        try:
            refused = self._publish(client, self.states(report, led).items())
        finally:
            _cork(sock, 0)
        if not self.connected:
            self.states_skipped += 1
            return False
        if refused:
            self.states_skipped += 1
            self._refusing = True
            self._report(f"MQTT broker {self.where} acknowledges nothing: {refused} state message(s) of this cycle "
                         f"not sent ({MAX_QUEUED_MESSAGES} still wait for the broker)")
            return True
        if self._discovery_due:
            self._send_discovery(client)
        if self._refusing and not self._discovery_due:  # the broker caught up: what the refusals reported is over
            self._refusing = False
            log.info("MQTT: %s acknowledges again", self.where)
            self.problem = None
            self.handler.clear("mqtt")
        self.states_published += 1
        return True

    def _next_delay(self) -> float:
        self._delay_s = _doubled(self._delay_s)
        return self._delay_s

    def _shutdown(self, client) -> None:
        """`offline` (retained), waited for up to the stop timeout, then DISCONNECT."""
        if self.connected:
            info = client.publish(self.availability_topic, "offline", qos=self.mqtt.qos, retain=True)
            deadline = time.monotonic() + self._stop_timeout_s
            try:
                while not info.is_published() and client.socket() is not None and time.monotonic() < deadline:
                    sock = client.socket()
                    self._select([sock], [sock] if client.want_write() else [], deadline - time.monotonic())
                    if client.loop_read() or client.socket() is None:
                        break
                    if client.want_write():
                        client.loop_write()
            except (RuntimeError, ValueError):
                pass  # paho: the `offline` could not be queued or the connection is gone; DISCONNECT anyway
        if client.socket() is not None:
            client.disconnect()  # sent at once (no loop thread); closes the socket
        self.connected = False

    # -- paho's callbacks (in the MQTT thread, from loop_read) ----------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._login_by = math.inf  # answered: no login deadline, and its closing is not "before answering"
        if reason_code.is_failure:
            self._report(refusal(reason_code, self.where, self.mqtt.username))
            return
        self.connected = True
        self._connected_at = time.monotonic()
        client.subscribe(self.status_topic, qos=self.mqtt.qos)
        if self.problem is not None:
            log.info("MQTT: connected to %s again", self.where)
        else:
            log.info("MQTT: connected to %s", self.where)
        self.problem = None
        self._refusing = False
        self.handler.clear("mqtt")
        self._send_discovery(client)  # after the clear: what it cannot send is reported

    def _publish(self, client, messages: Iterable[tuple[str, str | bytes]], *, retain: bool = False) -> int:
        """Publish each (topic, payload) at [mqtt] qos, written at once (this thread runs paho's loop). Returns
        how many paho refused because its queue of messages waiting for the broker's acknowledgement is full
        (MAX_QUEUED_MESSAGES: the broker acknowledges none). Stops at a failed write: paho closed the
        connection and _on_disconnect said why (`connected` is then False)."""
        refused = 0
        for topic, payload in messages:
            rc = client.publish(topic, payload, qos=self.mqtt.qos, retain=retain).rc
            if rc == client.QUEUE_FULL:
                refused += 1
            elif rc:
                break
        return refused

    def _send_discovery(self, client) -> None:
        """`online` and every entity's config, retained. Refused by paho (its queue still full of a stall's
        messages, which it keeps across a reconnect) or cut by a lost connection: reported, and sent again
        after the next cycle published whole (a new connection sends it anyway)."""
        messages = [(self.availability_topic, "online"),
                    *((topic, json.dumps(config, separators=(",", ":"))) for topic, config in self.discovery().items())]
        failed = self._publish(client, messages, retain=True)
        self._discovery_due = bool(failed) or not self.connected  # (a lost connection: the next login sends it)
        if failed and self.connected:
            self._refusing = True  # cleared, like a cycle's refusal, once a cycle and this went out whole
            self._report(f"MQTT broker {self.where}: {failed} Home Assistant discovery message(s) not sent "
                         f"({MAX_QUEUED_MESSAGES} messages still wait for the broker); sent again once it catches up")
        elif not failed:
            self.discovery_sent += 1

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected, self.connected = self.connected, False
        if was_connected and time.monotonic() - self._connected_at >= KEEPALIVE_S:
            self._delay_s = 0.0  # it held: reconnect soon. A login closed at once (another client with our
            # client_id takes the session over, say) keeps doubling the wait, not retrying every second.
        oversize, client.oversize = client.oversize, 0
        # The broker sends a retained message again at every connection: each one succeeds, yet the same packet
        # closes it within seconds, so the backoff above keeps doubling (to RECONNECT_MAX_S) for these too.
        if oversize and not self._stopping:
            self._report(f"MQTT broker {self.where} sent a packet of {oversize} bytes, more than "
                         f"{MAX_PACKET_BYTES // 1024} KB (a retained message on {self.status_topic}?): "
                         "connection closed; reconnecting")
        elif was_connected and not self._stopping:
            self._report(f"MQTT broker {self.where}: connection lost ({reason_code}); reconnecting")
        elif not self._stopping and self._login_by != math.inf:
            self._report(f"MQTT broker {self.where}: closed the connection before answering the login "
                         f"({reason_code}; a TLS port without `tls = true`?); reconnecting")

    def _on_message(self, client, userdata, message) -> None:
        # Home Assistant announces its start with `online`: it has forgotten nothing retained, but a
        # broker without persistence has; send discovery (and availability) again either way.
        if message.topic == self.status_topic and message.payload[:16].strip() == b"online":
            log.info("MQTT: Home Assistant came online: sending discovery again")
            self._send_discovery(client)

    def _report(self, message: str) -> None:
        message = scrub(message, self._password)
        if message != self.problem and self.problem is not None:
            log.warning("%s", message)  # the handler logs only a condition's start, not a new cause
        self.problem = message
        error = ConnectionFailedError if self.only_output else ShortError
        self.handler.report(error(message, key="mqtt"))
