"""Configuration: TOML file -> frozen dataclasses, validated once at start.

Every problem in a file is collected and reported together, each with the key
path it concerns (``channel[2].address``), so a technician fixes them in one go.
Nothing here touches hardware, the network or the store.
"""
from __future__ import annotations

import datetime as dt
import math
import os
import re
import tomllib
import unicodedata
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SYSTEM_CONFIG_PATH = Path("/etc/solarpowerbrampton/config.toml")
LOCAL_CONFIG_PATH = Path("config.toml")
ENV_CONFIG = "SOLAR_CONFIG"
EMBEDDED_NAME = "<embedded default>"

ROLES = ("battery", "solar", "load", "exchange")
SCENARIOS = ("day", "constant")
INFLUX_KINDS = ("none", "local", "cloud")
INFLUX_APIS = ("v1", "v2")


@dataclass(frozen=True)
class ConstantTruth:
    """What the `constant` scenario pins a channel to (bus volts, signed mA)."""

    bus_voltage_v: float = 12.6
    current_ma: float = 250.0


@dataclass(frozen=True)
class ChannelConfig:
    """One INA219: where it is, its shunt, and what it measures."""

    name: str
    address: int
    shunt_ohms: float = 0.1
    max_current_a: float = 2.0
    tags: Mapping[str, str] = field(default_factory=dict)
    role: str = "battery"
    unit: str = ""  # the model unit it sits on (house, plant): the `unit` tag; empty means the channel's name
    constant: ConstantTruth = field(default_factory=ConstantTruth)

    @property
    def unit_name(self) -> str:
        return self.unit or self.name


@dataclass(frozen=True)
class SiteConfig:
    name: str = "brampton2zero"


@dataclass(frozen=True)
class SamplingConfig:
    interval_s: float = 3.0  # the 2023 cadence
    window_s: float = 1.0
    samples: int = 10
    adc_samples: int = 1  # INA219 hardware averaging: 1, 2, 4 ... 128 conversions


@dataclass(frozen=True)
class I2CConfig:
    bus: int = 1


@dataclass(frozen=True)
class LedConfig:
    pin: int = 18
    enabled: bool = True


@dataclass(frozen=True)
class StoreConfig:
    dir: str = "data"
    max_mb: float = 200.0
    retention_days: float = 7.0


@dataclass(frozen=True)
class SimulationConfig:
    enabled: bool = False
    scenario: str = "day"
    speed: float = 1.0
    seed: int = 1
    start: dt.datetime | None = None  # simulated start; None = the real local time
    plant: str = "power_plant"  # the unit that houses buy from / sell to


_MAX_PEM_BYTES = 1_000_000


@dataclass(frozen=True)
class InfluxConfig:
    kind: str = "none"
    api: str = "v2"
    url: str = ""
    org: str = ""
    bucket: str = ""
    database: str = ""
    retention_policy: str = ""
    username: str = ""
    token_file: str = ""
    password_file: str = ""
    ca_file: str = ""  # PEM: a private CA trusted for https besides the system's (verification is always on)
    timeout_s: float = 10.0
    # Below the 60 s after which cloud load balancers close an idle connection, so one TLS connection
    # carries every flush, and long enough that the per-request bytes are shared by ~17 cycles (README).
    flush_interval_s: float = 50.0
    batch_lines: int = 5000
    batch_bytes: int = 1_000_000
    max_upload_bytes_per_s: float = 0.0  # 0 = unlimited


@dataclass(frozen=True)
class UpdateConfig:
    """Safe self-update from a git remote (off by default)."""

    enabled: bool = False
    remote: str = ""
    branch: str = "main"
    require_signed: bool = True
    max_failed_starts: int = 3


@dataclass(frozen=True)
class ClockConfig:
    """When readings' timestamps may be trusted. "auto": wait for NTP sync on a Raspberry Pi
    (no RTC), trust the clock elsewhere; "sync": always wait for sync; "always": never wait."""

    trust: str = "auto"
    jump_threshold_s: float = 2.0


@dataclass(frozen=True)
class WebConfig:
    """The live energy-flow page served by the daemon (off by default)."""

    enabled: bool = False
    listen: str = "127.0.0.1:8080"


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    file: bool = False
    file_max_bytes: int = 1_000_000
    file_backups: int = 4


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


def _default_store_dir() -> str:
    # systemd's StateDirectory= hands us the place; elsewhere the working directory.
    return os.environ.get("STATE_DIRECTORY", "").split(":")[0] or StoreConfig.dir


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
    v = _Validator()
    known = {"site", "sampling", "i2c", "channel", "led", "store", "simulation", "influx", "log", "update", "clock", "web"}
    v.unknown(data, known, "")
    # Every number has a finite range (README, "Configuration reference"): beyond it a value would
    # overflow a timer, SQLite or the chip, or start a daemon that then fails every cycle.
    site = v.section(data, "site", SiteConfig, {"name": v.name_text})
    sampling = v.section(
        data,
        "sampling",
        SamplingConfig,
        {"interval_s": v.between(0.01, 86_400), "window_s": v.between(0.001, 3600),
         "samples": v.whole_between(1, 1000), "adc_samples": v.count},
    )
    i2c = v.section(data, "i2c", I2CConfig, {"bus": v.whole_between(0, 255)})
    led = v.section(data, "led", LedConfig, {"pin": v.gpio_pin, "enabled": v.boolean})
    store = v.section(
        data,
        "store",
        StoreConfig,
        {"dir": v.path_text, "max_mb": v.between(0.01, 1_000_000), "retention_days": v.between(0, 3650)},
        defaults={"dir": _default_store_dir()},
    )
    simulation = v.section(
        data,
        "simulation",
        SimulationConfig,
        {
            "enabled": v.boolean,
            "scenario": v.choice(SCENARIOS),
            "speed": v.between(0.001, 100_000),
            "seed": v.whole_between(0, 2**63 - 1),
            "start": v.datetime,
            "plant": v.identifier,
        },
    )
    influx = v.section(
        data,
        "influx",
        InfluxConfig,
        {
            "kind": v.choice(INFLUX_KINDS),
            "api": v.choice(INFLUX_APIS),
            "url": v.url,
            "org": v.name_text,
            "bucket": v.name_text,
            "database": v.name_text,
            "retention_policy": v.name_text,
            "username": v.name_text,
            "token_file": v.path_text,
            "password_file": v.path_text,
            "ca_file": v.pem_file,
            "timeout_s": v.between(0.1, 600),
            "flush_interval_s": v.between(0.01, 86_400),
            "batch_lines": v.whole_between(1, 1_000_000),
            "batch_bytes": v.whole_between(1, 50_000_000),
            "max_upload_bytes_per_s": v.upload_rate,
        },
    )
    log = v.section(
        data,
        "log",
        LogConfig,
        {
            "level": v.choice(("DEBUG", "INFO", "WARNING", "ERROR")),
            "file": v.boolean,
            "file_max_bytes": v.whole_between(1000, 1_000_000_000),
            "file_backups": v.whole_between(0, 100),
        },
    )
    update = v.section(
        data,
        "update",
        UpdateConfig,
        {"enabled": v.boolean, "remote": v.name_text, "branch": v.name_text, "require_signed": v.boolean,
         "max_failed_starts": v.at_most(v.count, 4, " (systemd stops restarting after 5 starts)")},
    )
    clock = v.section(
        data, "clock", ClockConfig,
        {"trust": v.choice(("auto", "sync", "always")), "jump_threshold_s": v.between(0.001, 86_399)},
    )
    web = v.section(data, "web", WebConfig, {"enabled": v.boolean, "listen": v.listen})
    channels = _channels(v, data)
    if update.enabled and not update.remote:
        v.problem("update.remote", "required when [update] enabled = true")

    if sampling.window_s >= sampling.interval_s:
        v.problem(
            "sampling.window_s",
            f"the sampling window ({sampling.window_s} s) must be shorter than the interval "
            f"({sampling.interval_s} s)",
        )
    if sampling.adc_samples not in (1, 2, 4, 8, 16, 32, 64, 128):
        v.problem("sampling.adc_samples", f"{sampling.adc_samples} is not one of 1, 2, 4, 8, 16, 32, 64, 128")
    if influx.kind == "cloud":
        if influx.url and not influx.url.startswith("https://"):
            v.problem("influx.url", "InfluxDB Cloud needs an https:// URL")
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
        warnings=tuple(f"{source}: {w}" for w in v.warnings),
    )


def _channels(v: _Validator, data: Mapping[str, Any]) -> tuple[ChannelConfig, ...]:
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
        v.unknown(item, {"name", "address", "shunt_ohms", "max_current_a", "tags", "role", "unit", "constant"}, where)
        ok = True
        name = v.required(item, "name", where, v.identifier)
        address = v.required(item, "address", where, v.i2c_address)
        values: dict[str, Any] = {}
        for key, check in (
            ("shunt_ohms", v.between(0.0001, 100)),
            ("max_current_a", v.between(0.0001, 1000)),
            ("tags", v.tags),
            ("role", v.choice(ROLES)),
            ("unit", v.identifier),
        ):
            if key in item:
                value = check(item[key], f"{where}.{key}")
                if value is _INVALID:
                    ok = False
                else:
                    values[key] = value
        if "constant" in item:
            constant = v.table(item["constant"], f"{where}.constant", ConstantTruth,
                               {"bus_voltage_v": v.between(0, 32), "current_ma": v.between(-1e6, 1e6)})
            if constant is _INVALID:
                ok = False
            else:
                values["constant"] = constant
        if name is _INVALID or address is _INVALID:
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


_INVALID = object()
_IDENT = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class _Validator:
    """Collects problems as `at 'key.path': message` lines."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, path: str, message: str) -> object:
        # Keys come from the file too: control characters shown escaped keep one problem on one line.
        self.problems.append(f"at '{_escape(path)}': {_escape(message)}")
        return _INVALID

    def unknown(self, table: Mapping[str, Any], known: set[str], where: str) -> None:
        for key in table:
            if key not in known:
                path = f"{where}.{key}" if where else key
                self.problem(path, f"unknown key (expected one of: {', '.join(sorted(known))})")

    def section(self, data, name, cls, checks, defaults=None):
        raw = data.get(name, {})
        result = self.table(raw, name, cls, checks, defaults)
        return cls(**(defaults or {})) if result is _INVALID else result

    def table(self, raw, where, cls, checks, defaults=None):
        if not isinstance(raw, dict):
            return self.problem(where, f"must be a table, not {_kind(raw)}")
        self.unknown(raw, set(checks), where)
        values = dict(defaults or {})
        bad = False
        for key, check in checks.items():
            if key in raw:
                value = check(raw[key], f"{where}.{key}")
                if value is _INVALID:
                    bad = True
                else:
                    values[key] = value
        if bad:
            return _INVALID
        return cls(**values)

    def required(self, table, key, where, check):
        if key not in table:
            return self.problem(f"{where}.{key}", "is required")
        return check(table[key], f"{where}.{key}")

    # Checks: each returns the value or _INVALID after recording a problem.
    def text(self, value, path):
        if not isinstance(value, str):
            return self.problem(path, f"must be a string, not {_kind(value)}")
        if len(value) > 4096:
            return self.problem(path, f"is {len(value)} characters long, more than 4096")
        return value

    def name_text(self, value, path):
        """A string that ends up in a tag, a URL or a log line: no control characters (NUL, newline...)."""
        value = self.text(value, path)
        if value is _INVALID:
            return value
        bad = _control_character(value)
        if bad is not None:
            return self.problem(path, f"{value!r} contains the control character {bad!r}")
        if len(value) > 256:
            return self.problem(path, f"is {len(value)} characters long, more than 256")
        return value

    def path_text(self, value, path):
        """A file or directory path (up to 4096 characters, Linux's PATH_MAX): no NUL (the OS cannot
        take it) and no other control character."""
        value = self.text(value, path)
        if value is _INVALID:
            return value
        bad = _control_character(value)
        if bad is not None:
            return self.problem(path, f"{value!r} contains the control character {bad!r}")
        return value

    def pem_file(self, value, path):
        """A file of PEM CA certificates (empty: none): it exists, this user can read it, and OpenSSL
        parses at least one certificate from it. Read up to 1 MB (a CA bundle is far smaller)."""
        value = self.path_text(value, path)
        if value is _INVALID or not value:
            return value
        try:
            with open(value, "rb") as file:
                data = file.read(_MAX_PEM_BYTES + 1)
        except FileNotFoundError:
            return self.problem(path, f"{value!r}: no such file")
        except IsADirectoryError:
            return self.problem(path, f"{value!r} is a directory, not a PEM file")
        except PermissionError:
            return self.problem(path, f"{value!r} cannot be read by this user (permission denied)")
        except OSError as exc:
            return self.problem(path, f"{value!r} cannot be read ({exc.strerror or type(exc).__name__})")
        if len(data) > _MAX_PEM_BYTES:
            return self.problem(path, f"{value!r} is larger than 1 MB: not a file of CA certificates")
        if b"-----BEGIN CERTIFICATE-----" not in data:
            return self.problem(path, f"{value!r} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        import ssl

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))
        except (UnicodeDecodeError, ssl.SSLError, ValueError):
            return self.problem(path, f"{value!r}: a PEM certificate in it does not parse")
        return value

    def identifier(self, value, path):
        if not isinstance(value, str):
            return self.problem(path, f"must be a string, not {_kind(value)}")
        if not _IDENT.match(value):
            return self.problem(path, f"{value!r} must be 1-64 letters, digits, '_', '-' or '.'")
        return value

    def boolean(self, value, path):
        if not isinstance(value, bool):
            return self.problem(path, f"must be true or false, not {_kind(value)}")
        return value

    def integer(self, value, path):
        if isinstance(value, bool) or not isinstance(value, int):
            return self.problem(path, f"must be a whole number, not {_kind(value)}")
        return value

    def number(self, value, path):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return self.problem(path, f"must be a number, not {_kind(value)}")
        if not math.isfinite(value):
            return self.problem(path, f"must be a finite number, not {value}")
        return float(value)

    def positive(self, value, path):
        value = self.number(value, path)
        if value is not _INVALID and value <= 0:
            return self.problem(path, f"must be greater than 0, not {_fmt(value)}")
        return value

    def non_negative(self, value, path):
        value = self.number(value, path)
        if value is not _INVALID and value < 0:
            return self.problem(path, f"must not be negative, not {_fmt(value)}")
        return value

    def between(self, low: float, high: float):
        """A finite number from `low` to `high` inclusive."""
        def bounded(value, path):
            value = self.number(value, path)
            if value is not _INVALID and not low <= value <= high:
                return self.problem(path, f"{_fmt(value)} is outside {_fmt(low)} to {_fmt(high)}")
            return value
        return bounded

    def whole_between(self, low: int, high: int):
        """A whole number from `low` to `high` inclusive."""
        def bounded(value, path):
            value = self.integer(value, path)
            if value is not _INVALID and not low <= value <= high:
                return self.problem(path, f"{value} is outside {low} to {high}")
            return value
        return bounded

    def at_most(self, check, limit: float, why: str = ""):
        """`check`, then at most `limit`: beyond it a value would overflow a timer or SQLite later."""
        def bounded(value, path):
            value = check(value, path)
            if value is not _INVALID and value > limit:
                return self.problem(path, f"{_fmt(value)} is more than {_fmt(limit)}{why}")
            return value
        return bounded

    def upload_rate(self, value, path):
        value = self.non_negative(value, path)
        if value is not _INVALID and 0 < value < 100:
            return self.problem(path, f"{_fmt(value)} bytes/s would stall delivery: use 0 (no limit) or 100 or more")
        if value is not _INVALID and value > 1e9:
            return self.problem(path, f"{_fmt(value)} is more than 1000000000 bytes/s (use 0 for no limit)")
        return value

    def count(self, value, path):
        value = self.integer(value, path)
        if value is not _INVALID and value < 1:
            return self.problem(path, f"must be 1 or more, not {value}")
        return value

    def non_negative_int(self, value, path):
        value = self.integer(value, path)
        if value is not _INVALID and value < 0:
            return self.problem(path, f"must not be negative, not {value}")
        return value

    def gpio_pin(self, value, path):
        value = self.integer(value, path)
        if value is not _INVALID and not 0 <= value <= 27:
            return self.problem(path, f"GPIO {value} does not exist on a Raspberry Pi header (0-27)")
        return value

    def i2c_address(self, value, path):
        if isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                return self.problem(path, f"{value!r} is not an I2C address (e.g. 0x40)")
        value = self.integer(value, path)
        if value is not _INVALID and not 0x40 <= value <= 0x4F:
            return self.problem(path, f"0x{value:02X} is not an INA219 address (0x40-0x4F)")
        return value

    def tags(self, value, path):
        if not isinstance(value, dict):
            return self.problem(path, f"must be a table of strings, not {_kind(value)}")
        bad = False
        for key, tag in value.items():
            if not key or _control_character(key) is not None or len(key) > 256:
                self.problem(f"{path}.{key}", "a tag key must be 1-256 characters without control characters")
                bad = True
            elif not isinstance(tag, str) or not tag:
                self.problem(f"{path}.{key}", f"a tag value must be a non-empty string, not {_kind(tag)}")
                bad = True
            elif self.name_text(tag, f"{path}.{key}") is _INVALID:
                bad = True
            elif key in ("site", "unit"):
                self.problem(f"{path}.{key}", "is set by the daemon and cannot be overridden")
                bad = True
        if "channel" in value and not bad:
            # Before the channel's name had its own `channel` tag, a user's tag could be called so.
            self.warnings.append(
                f"at '{path}.channel': deprecated and ignored: the daemon now sets the `channel` tag to the "
                "channel's name; rename this tag")
            value = {k: t for k, t in value.items() if k != "channel"}
        return _INVALID if bad else dict(value)

    def url(self, value, path):
        value = self.text(value, path)
        if value is _INVALID or not value:
            return value
        if not re.match(r"^https?://[^/\s]+", value):
            return self.problem(path, f"{value!r} is not an http:// or https:// URL")
        if "@" in value.split("/", 3)[2]:
            # user:password@ would end up in logs and messages: credentials have their own keys.
            return self.problem(path, "must not contain a user or password (use username / password_file)")
        if _control_character(value) is not None or not value.isascii() or " " in value:
            return self.problem(path, f"{value!r} has characters a URL cannot hold (spaces, control "
                                      "characters, non-ASCII: write a host name in its xn-- form)")
        netloc = value.split("/", 3)[2]
        host, sep, port = netloc.rpartition(":") if not netloc.endswith("]") else (netloc, "", "")
        if not sep:
            host = netloc
        if not host or host == "[]":
            return self.problem(path, f"{value!r} has no host")
        if sep and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            return self.problem(path, f"{value!r}: the port must be a number from 1 to 65535")
        try:
            urllib.parse.urlsplit(value).port  # noqa: B018 - what the HTTP libraries will do with it
        except ValueError as exc:
            return self.problem(path, f"{value!r} is not a usable URL ({exc})")
        return value.rstrip("/")

    def listen(self, value, path):
        value = self.text(value, path)
        if value is _INVALID:
            return value
        host, sep, port = value.rpartition(":")
        if (not sep or not host or not port.isascii() or not port.isdigit() or not 0 <= int(port) < 65536
                or not host.isascii() or _control_character(host) is not None or " " in host):
            return self.problem(path, f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8080 or 0.0.0.0:8080; port 0 picks a free one)")
        return value

    def datetime(self, value, path):
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            value = dt.datetime(value.year, value.month, value.day, 12, 0)
        if not isinstance(value, dt.datetime):
            return self.problem(path, f"must be a TOML date-time such as 2026-06-21T12:00:00, not {_kind(value)}")
        if value.tzinfo is not None:
            return self.problem(path, f"{value.isoformat()} has a UTC offset: write the UK local time "
                                      "without one, e.g. 2026-06-21T12:00:00")
        if not dt.datetime(1970, 1, 1) <= value <= dt.datetime(2100, 12, 31, 23, 59, 59):
            return self.problem(path, f"{value.isoformat()} is outside 1970-01-01 to 2100-12-31")
        return value

    def choice(self, options):
        def check(value, path):
            if value not in options:
                return self.problem(path, f"{value!r} is not one of: {', '.join(map(repr, options))}")
            return value

        return check


def _control_character(text: str) -> str | None:
    """The first control character (NUL, newline, DEL, C1...) in `text`, or None."""
    for char in text:
        if unicodedata.category(char) == "Cc":
            return char
    return None


def _escape(text: str) -> str:
    """`text` with control characters (and line/paragraph separators) as Python escapes."""
    if all(char.isprintable() or char == " " for char in text):
        return text
    return "".join(char if char.isprintable() or char == " " else repr(char)[1:-1] for char in text)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _fmt(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(float(value)) if isinstance(value, float) else str(value)

