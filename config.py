"""Configuration: TOML file -> frozen dataclasses, validated once at start.

Every problem in a file is collected and reported together, each with the key
path it concerns (``channel[2].address``), so a technician fixes them in one go.
Nothing here touches hardware, the network or the store.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config_check import INVALID, Validator, slug_clashes

SYSTEM_CONFIG_PATH = Path("/etc/solarpowerbrampton/config.toml")
LOCAL_CONFIG_PATH = Path("config.toml")
ENV_CONFIG = "SOLAR_CONFIG"
EMBEDDED_NAME = "<embedded default>"

ROLES = ("battery", "solar", "load", "exchange")
SCENARIOS = ("day", "constant")
STAMPS = ("real", "simulated")
INFLUX_KINDS = ("none", "local", "cloud")
INFLUX_APIS = ("v1", "v2")
ADC_SAMPLES = (1, 2, 4, 8, 16, 32, 64, 128)  # the INA219's hardware averaging: conversions per result
# One ADC result per hardware-averaging setting, s (SBOS448); a chip converts shunt, then bus.
ADC_TIME_S = dict(zip(ADC_SAMPLES, (532e-6, 1.06e-3, 2.13e-3, 4.26e-3, 8.51e-3, 17.02e-3, 34.05e-3, 68.10e-3)))


def key(default: Any = None, check: Callable[[Validator], Callable] | None = None, doc: str = "", *,
        factory: Callable[[], Any] | None = None) -> Any:
    """Declare one config key, once: its default, its check (given the Validator: type and bounds) and a
    one-line doc. Validation (parse_config), the README's configuration reference and config.example.toml
    follow these declarations (tests/test_config.py checks the last two against them)."""
    metadata = {"check": check, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def declared(cls: type) -> dict[str, dataclasses.Field]:
    """The declared keys of a config table (a dataclass made of key() fields), by name."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("check") is not None}


def _checks(v: Validator, cls: type) -> dict[str, Callable]:
    return {name: f.metadata["check"](v) for name, f in declared(cls).items()}


@dataclass(frozen=True)
class ConstantTruth:
    """What the `constant` scenario pins a channel to (bus volts, signed mA)."""

    bus_voltage_v: float = key(12.6, lambda v: v.between(0, 32), "bus voltage of the constant scenario, V")
    current_ma: float = key(250.0, lambda v: v.between(-1e6, 1e6), "signed current of the constant scenario, mA")


@dataclass(frozen=True)
class ChannelConfig:
    """One INA219: where it is, its shunt, and what it measures."""

    name: str = key(dataclasses.MISSING, lambda v: v.identifier, "the sensor's name: the `channel` tag (required)")
    address: int = key(dataclasses.MISSING, lambda v: v.i2c_address, "I2C address 0x40-0x4F (required)")
    shunt_ohms: float = key(0.1, lambda v: v.between(0.0001, 100), "shunt resistance, ohms")
    max_current_a: float = key(2.0, lambda v: v.between(0.0001, 1000), "largest expected current, A")
    tags: Mapping[str, str] = key(check=lambda v: v.tags, doc="extra tags", factory=dict)
    role: str = key("battery", lambda v: v.choice(ROLES), "what the sensor measures")
    # The model unit it sits on (house, plant): the `unit` tag; empty means the channel's name.
    unit: str = key("", lambda v: v.identifier, "which unit of the model the sensor sits on")
    constant: ConstantTruth = key(check=lambda v: lambda value, path: v.table(value, path, ConstantTruth,
                                                                              _checks(v, ConstantTruth)),
                                  doc="the values of the `constant` scenario", factory=ConstantTruth)

    @property
    def unit_name(self) -> str:
        return self.unit or self.name


MAX_INTERVAL_S = 86_400  # [sampling] interval_s's upper bound
MAX_SPEED = 100_000  # [simulation] speed's upper bound


@dataclass(frozen=True)
class SiteConfig:
    name: str = key("brampton2zero", lambda v: v.name_text, "the `site` tag")


@dataclass(frozen=True)
class SamplingConfig:
    interval_s: float = key(3.0, lambda v: v.between(0.01, MAX_INTERVAL_S), "seconds between cycle starts (2023: 3 s)")
    window_s: float = key(1.0, lambda v: v.between(0.001, 3600), "the samples are spread over this window, s")
    samples: int = key(10, lambda v: v.whole_between(1, 1000), "samples per channel per cycle")
    adc_samples: int = key(1, lambda v: v.count, "INA219 hardware averaging per sample: one of ADC_SAMPLES")


@dataclass(frozen=True)
class I2CConfig:
    bus: int = key(1, lambda v: v.whole_between(0, 255), "I2C bus number (/dev/i2c-N)")


@dataclass(frozen=True)
class LedConfig:
    pin: int = key(18, lambda v: v.gpio_pin, "GPIO (BCM) of the status LED")
    enabled: bool = key(True, lambda v: v.boolean, "drive the status LED")


@dataclass(frozen=True)
class StoreConfig:
    dir: str = key("data", lambda v: v.path_text, "the store directory (default: $STATE_DIRECTORY, else data)")
    max_mb: float = key(200.0, lambda v: v.between(0.01, 1_000_000), "size cap of the store, MB")
    retention_days: float = key(7.0, lambda v: v.between(0, 3650), "how long delivered points stay, days")


@dataclass(frozen=True)
class SimulationConfig:
    enabled: bool = key(False, lambda v: v.boolean, "measure the simulated model")
    scenario: str = key("day", lambda v: v.choice(SCENARIOS), "day (the model) or constant (pinned channels)")
    speed: float = key(1.0, lambda v: v.between(0.001, MAX_SPEED), "simulated time runs this much faster")
    seed: int = key(1, lambda v: v.whole_between(0, 2**63 - 1), "seed of clouds, loads and initial charge")
    start: dt.datetime | None = key(None, lambda v: v.datetime, "simulated start (UK local); none: now")
    plant: str = key("power_plant", lambda v: v.identifier, "the unit that houses buy from / sell to")
    # "simulated": points carry the model's time (start + elapsed x speed), so a simulated day is a calendar
    # day in `report`; "real": the wall clock, as a real model's points do.
    stamp: str = key("real", lambda v: v.choice(STAMPS), "points' time: real (the clock) or simulated")


@dataclass(frozen=True)
class InfluxConfig:
    # Keys that do not apply to the chosen kind/api are accepted and unused (README).
    kind: str = key("none", lambda v: v.choice(INFLUX_KINDS), "none (keep everything local), local or cloud")
    api: str = key("v2", lambda v: v.choice(INFLUX_APIS), "local only: v2 (token, org, bucket) or v1")
    url: str = key("", lambda v: v.url, "the database's URL (cloud: https:// only)")
    org: str = key("", lambda v: v.name_text, "v2/cloud: the organisation")
    bucket: str = key("", lambda v: v.name_text, "v2/cloud: the bucket")
    database: str = key("", lambda v: v.name_text, "v1: the database")
    retention_policy: str = key("", lambda v: v.name_text, "v1: the retention policy")
    username: str = key("", lambda v: v.name_text, "v1 basic auth user")
    token_file: str = key("", lambda v: v.path_text, "file holding the token")
    password_file: str = key("", lambda v: v.path_text, "file holding the v1 password")
    ca_file: str = key("", lambda v: v.pem_file, "PEM: a private CA trusted for https besides the system's")
    timeout_s: float = key(10.0, lambda v: v.between(0.1, 600), "deadline for connecting and the answer, s")
    # Below the 60 s after which cloud load balancers close an idle connection, so one TLS connection
    # carries every flush, and long enough that the per-request bytes are shared by ~17 cycles (README).
    flush_interval_s: float = key(50.0, lambda v: v.between(0.01, 86_400), "deliver at least this often, s")
    batch_lines: int = key(5000, lambda v: v.whole_between(1, 1_000_000), "lines per request at most")
    batch_bytes: int = key(1_000_000, lambda v: v.whole_between(1, 50_000_000), "bytes per request at most")
    max_upload_bytes_per_s: float = key(0.0, lambda v: v.upload_rate, "upload rate cap, bytes/s (0: none)")


@dataclass(frozen=True)
class UpdateConfig:
    """Safe self-update from a git remote (off by default)."""

    enabled: bool = key(False, lambda v: v.boolean, "safe self-update from git")
    remote: str = key("", lambda v: v.git_remote, "where updates come from (required when enabled)")
    branch: str = key("main", lambda v: v.name_text, "the branch followed")
    require_signed: bool = key(True, lambda v: v.boolean, "accept only commits signed by a trusted key")
    max_failed_starts: int = key(3, lambda v: v.at_most(v.count, 4, " (systemd stops restarting after 5 starts)"),
                                 "a new release failing to start this often is rolled back")


@dataclass(frozen=True)
class ClockConfig:
    """When readings' timestamps may be trusted. "auto": wait for NTP sync on a Raspberry Pi
    (no RTC), trust the clock elsewhere; "sync": always wait for sync; "always": never wait."""

    trust: str = key("auto", lambda v: v.choice(("auto", "sync", "always")), "when timestamps are trusted")
    jump_threshold_s: float = key(2.0, lambda v: v.between(0.001, 86_399), "a larger wall-clock step is a jump, s")


@dataclass(frozen=True)
class WebConfig:
    """The live energy-flow page served by the daemon (off by default)."""

    enabled: bool = key(False, lambda v: v.boolean, "serve the live energy-flow page")
    listen: str = key("127.0.0.1:8080", lambda v: v.listen, "address:port of the page")


@dataclass(frozen=True)
class MqttConfig:
    """MQTT with Home Assistant discovery (off by default): an output beside the InfluxDB delivery (README
    "Home Assistant"). The password comes from $MQTT_PASSWORD or `password_file`, never from this file."""

    enabled: bool = key(False, lambda v: v.boolean, "publish every cycle to an MQTT broker")
    host: str = key("", lambda v: v.host, "the broker's host name or address (required when enabled)")
    port: int = key(0, lambda v: v.whole_between(0, 65535), "the broker's port (0: 1883, or 8883 with tls)")
    tls: bool = key(False, lambda v: v.boolean, "connect with TLS, checking the broker's certificate and name")
    ca_file: str = key("", lambda v: v.pem_file, "PEM: a private CA trusted for the broker besides the system's")
    username: str = key("", lambda v: v.name_text, "the broker login (empty: anonymous)")
    password_file: str = key("", lambda v: v.path_text, "file holding the broker password (or $MQTT_PASSWORD)")
    client_id: str = key("", lambda v: v.name_text, "the MQTT client id (empty: solarpowerbrampton-<site>)")
    topic_prefix: str = key("", lambda v: v.mqtt_topic, "state topics' prefix (empty: solarpowerbrampton/<site>)")
    discovery_prefix: str = key("homeassistant", lambda v: v.mqtt_topic, "Home Assistant's discovery prefix")
    qos: int = key(1, lambda v: v.whole_between(0, 2), "MQTT quality of service of every message (0, 1 or 2)")

    @property
    def effective_port(self) -> int:
        return self.port or (8883 if self.tls else 1883)


@dataclass(frozen=True)
class LogConfig:
    level: str = key("INFO", lambda v: v.choice(("DEBUG", "INFO", "WARNING", "ERROR")), "the log level")
    file: bool = key(False, lambda v: v.boolean, "also log to a file in the store directory")
    file_max_bytes: int = key(1_000_000, lambda v: v.whole_between(1000, 1_000_000_000), "log file size, bytes")
    file_backups: int = key(4, lambda v: v.whole_between(0, 100), "rotated log files kept")


# The config file's tables, in the order they are checked (and their problems listed); [[channel]] apart.
SECTIONS = {"site": SiteConfig, "sampling": SamplingConfig, "i2c": I2CConfig, "led": LedConfig, "store": StoreConfig,
            "simulation": SimulationConfig, "influx": InfluxConfig, "log": LogConfig, "update": UpdateConfig,
            "clock": ClockConfig, "web": WebConfig, "mqtt": MqttConfig}


@dataclass(frozen=True)
class Config:
    """The whole validated configuration. `source` names where it came from."""

    source: str = EMBEDDED_NAME
    site: SiteConfig = field(default_factory=SiteConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    i2c: I2CConfig = field(default_factory=I2CConfig)
    channels: tuple[ChannelConfig, ...] = ()
    led: LedConfig = field(default_factory=LedConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    influx: InfluxConfig = field(default_factory=InfluxConfig)
    log: LogConfig = field(default_factory=LogConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    web: WebConfig = field(default_factory=WebConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    # Deprecated keys found (still honoured or ignored as the text says): logged once at start, never fatal,
    # since an installed config is never overwritten and exit 78 would also fail every self-update.
    warnings: tuple[str, ...] = ()


# What the real model measures: "an INA219 module is connected to a solar panel", one per house and one
# on the plant. Battery, load and trade meters are extra channels a fuller model may add.
DEFAULT_CHANNELS = (
    ChannelConfig("red_house", 0x40, role="solar"),
    ChannelConfig("green_house", 0x41, role="solar"),
    ChannelConfig("blue_house", 0x44, role="solar"),
    ChannelConfig("power_plant", 0x45, max_current_a=3.2, role="solar"),
)


class ConfigError(Exception):
    """The configuration cannot be used. `problems` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def embedded_default() -> Config:
    """The config used when no file exists: the simulated model, storing in ./data, with the live
    page on 127.0.0.1:8080 (only this machine can see it) so a first run shows something at once."""
    return Config(
        channels=DEFAULT_CHANNELS,
        simulation=SimulationConfig(enabled=True),
        web=WebConfig(enabled=True),
        store=StoreConfig(dir=_default_store_dir()),
    )


def cloud_url_problem(url: str) -> str | None:
    """Why `url` cannot be InfluxDB Cloud's (the token would travel in clear), or None."""
    return None if url.startswith("https://") else "InfluxDB Cloud needs an https:// URL"


def _default_store_dir() -> str:
    # systemd's StateDirectory= hands us the place; elsewhere the working directory.
    from release import state_dir_from_env

    state_dir = state_dir_from_env()
    return str(state_dir) if state_dir else StoreConfig.dir


def find_config(explicit: str | None, env: Mapping[str, str] | None = None) -> Path | None:
    """Where the config lives: --config, $SOLAR_CONFIG, /etc/..., ./config.toml, or None."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG])
    for candidate in (SYSTEM_CONFIG_PATH, LOCAL_CONFIG_PATH):
        if candidate.is_file():
            return candidate
    return None


def check_permissions(path: Path) -> None:
    """Refuse a config file that group or others can write (they could point the daemon anywhere).

    A config holds no secret (tokens and passwords live in their own 0600 files), so one that others
    can read is fine: every file git checks out and every `cp` of the example is 0644.
    Raises ConfigError naming the file, its mode and the fix.
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # load_config reports an unreadable file
    if mode & 0o022:
        who = "group and others" if mode & 0o022 == 0o022 else "others" if mode & 0o002 else "its group"
        raise ConfigError(str(path), [
            f"the file is writable by {who} (mode {mode & 0o777:04o}): run chmod go-w {path}"
        ])


def load_config(path: Path | None) -> Config:
    """Read and validate `path` (None = the embedded default).

    Raises ConfigError listing every problem found, each with its key path.
    """
    if path is None:
        return embedded_default()
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"not UTF-8 text (byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    return parse_config(data, source)


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate a parsed TOML document. Raises ConfigError with every problem."""
    v = Validator()
    v.unknown(data, {*SECTIONS, "channel"}, "")
    # Every number has a finite range (README, "Configuration reference"): beyond it a value would
    # overflow a timer, SQLite or the chip, or start a daemon that then fails every cycle.
    tables = {name: v.section(data, name, cls, _checks(v, cls),
                              defaults={"dir": _default_store_dir()} if cls is StoreConfig else None)
              for name, cls in SECTIONS.items()}
    site, sampling, i2c, led, store, simulation, influx, log, update, clock, web, mqtt = tables.values()
    channels = _channels(v, data)
    if mqtt.enabled and not mqtt.host:
        v.problem("mqtt.host", "required when [mqtt] enabled = true")
    for where, problem in slug_clashes(channels) if mqtt.enabled else ():
        v.problem(where, f"{problem} (with [mqtt] enabled: rename one)")
    if update.enabled and not update.remote:
        v.problem("update.remote", "required when [update] enabled = true")

    if sampling.window_s >= sampling.interval_s:
        v.problem(
            "sampling.window_s",
            f"the sampling window ({sampling.window_s} s) must be shorter than the interval "
            f"({sampling.interval_s} s)",
        )
    if sampling.adc_samples not in ADC_SAMPLES:
        v.problem("sampling.adc_samples", f"{sampling.adc_samples} is not one of {', '.join(map(str, ADC_SAMPLES))}")
    elif (apart_s := sampling.window_s / sampling.samples) < (result_s := 2 * ADC_TIME_S[sampling.adc_samples]):
        # CNVR stays set (nothing reads the power register), so a repeated result could not be told apart.
        v.problem("sampling.samples", f"{sampling.samples} samples over {sampling.window_s} s are "
                  f"{apart_s * 1000:.3g} ms apart, less than the {result_s * 1000:.3g} ms one result of both ADCs "
                  f"takes at adc_samples = {sampling.adc_samples}: samples would repeat a conversion (take fewer "
                  "samples, a longer window_s or a lower adc_samples)")
    if influx.kind == "cloud":
        if influx.url and cloud_url_problem(influx.url):
            v.problem("influx.url", cloud_url_problem(influx.url))
        for key in ("url", "org", "bucket"):
            if not getattr(influx, key):
                v.problem(f"influx.{key}", "required when kind = \"cloud\"")
    if influx.kind == "local":
        if not influx.url:
            v.problem("influx.url", "required when kind = \"local\"")
        if influx.api == "v2":
            for key in ("org", "bucket"):
                if not getattr(influx, key):
                    v.problem(f"influx.{key}", "required when kind = \"local\" and api = \"v2\"")
        elif not influx.database:
            v.problem("influx.database", "required when kind = \"local\" and api = \"v1\"")
    if v.problems:
        raise ConfigError(source, v.problems)
    return Config(
        source=source,
        site=site,
        sampling=sampling,
        i2c=i2c,
        channels=channels,
        led=led,
        store=store,
        simulation=simulation,
        influx=influx,
        log=log,
        update=update,
        clock=clock,
        web=web,
        mqtt=mqtt,
        warnings=tuple(f"{source}: {w}" for w in v.warnings),
    )


def _channels(v: Validator, data: Mapping[str, Any]) -> tuple[ChannelConfig, ...]:
    raw = data.get("channel")
    if raw is None:
        return DEFAULT_CHANNELS
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        v.problem("channel", "must be an array of tables ([[channel]])")
        return ()
    if not raw:
        v.problem("channel", "at least one [[channel]] is needed")
    channels = []
    names: dict[str, int] = {}
    addresses: dict[int, int] = {}
    for i, item in enumerate(raw):
        where = f"channel[{i}]"
        checks = _checks(v, ChannelConfig)
        v.unknown(item, set(checks), where)
        name = v.required(item, "name", where, checks.pop("name"))
        address = v.required(item, "address", where, checks.pop("address"))
        values, ok = v.values(item, where, checks)
        if name is INVALID or address is INVALID:
            continue
        if name in names:
            v.problem(f"{where}.name", f"{name!r} is already used by channel[{names[name]}]")
        names.setdefault(name, i)
        if address in addresses:
            v.problem(f"{where}.address", f"0x{address:02X} is already used by channel[{addresses[address]}]")
        addresses.setdefault(address, i)
        if ok:
            channel = ChannelConfig(name=name, address=address, **values)
            full_scale_mv = channel.max_current_a * channel.shunt_ohms * 1000
            if full_scale_mv > 320 + 1e-6:
                v.problem(
                    f"{where}.max_current_a",
                    f"{channel.max_current_a} A through {channel.shunt_ohms} ohm is {full_scale_mv:.0f} mV, "
                    "beyond the INA219's 320 mV shunt range",
                )
            elif full_scale_mv < 0.1:
                v.problem(
                    f"{where}.max_current_a",
                    f"{channel.max_current_a} A through {channel.shunt_ohms} ohm is {full_scale_mv:.3g} mV, "
                    "below what the INA219 can measure (0.1 mV, ten steps of its 10 uV shunt register)",
                )
            channels.append(channel)
    return tuple(channels)
