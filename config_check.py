"""The config validator: checks a parsed TOML table against the declared keys, collecting every problem.

Each check returns the value or INVALID after recording `at 'key.path': message` (control characters
shown escaped, so one problem is one line). config.py declares the keys (with the check each one uses)
and builds the frozen dataclasses; this module knows no key.
"""
from __future__ import annotations

import datetime as dt
import math
import re
import stat
import unicodedata
import urllib.parse
from collections.abc import Mapping
from typing import Any

from smallfile import FileTooLarge, NotRegularFile, read_regular

INVALID = object()
_IDENT = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_MAX_PEM_BYTES = 1_000_000  # a file of CA certificates is far smaller



_SLUG = re.compile(r"[^A-Za-z0-9_-]+")
MQTT_LOGGER_NODE = "logger"  # the MQTT device of the logger itself: no unit may take its slug


def slug(text: str) -> str:
    """`text` as an MQTT topic level / Home Assistant id: letters, digits, _ and - only."""
    return _SLUG.sub("_", text).strip("_") or "_"


_BAD_HOST = ("is not a usable host name (an empty part between dots, a part over 63 characters, or a character a "
             "host name cannot hold)")


def _encodable_host(host: str) -> bool:
    """Whether the socket library can look `host` up at all: it encodes a name with the IDNA codec first,
    whose UnicodeError (not an OSError) no network code expects."""
    try:
        host.strip("[]").encode("idna")
    except UnicodeError:
        return False
    return True


def slug_clashes(channels) -> list[tuple[str, str]]:
    """(key path, problem) for names Home Assistant would take as one: two channels whose ids, `<unit>_<channel>`
    slugged, are equal (`pv.1` and `pv_1` of one unit; `pv` of unit `house_a` and `a_pv` of unit `house`: one
    entity), two units with one slug (one state topic), or a unit slugged as the logger."""
    problems: list[tuple[str, str]] = []
    channel_ids: dict[str, int] = {}
    unit_slugs: dict[str, tuple[str, int]] = {}
    for i, channel in enumerate(channels):
        entity = f"{slug(channel.unit_name)}_{slug(channel.name)}"  # in every unique_id of the channel
        first = channel_ids.setdefault(entity, i)
        if first != i:
            problems.append((f"channel[{i}].name", f"{channel.name!r} and channel[{first}]'s "
                             f"{channels[first].name!r} are the same MQTT id {entity!r}"))
        unit, unit_slug = channel.unit_name, slug(channel.unit_name)
        if unit_slug == MQTT_LOGGER_NODE:
            problems.append((f"channel[{i}].unit", f"{unit!r} is the MQTT id of the logger's own device"))
        elif unit_slugs.setdefault(unit_slug, (unit, i))[0] != unit:
            other, j = unit_slugs[unit_slug]
            problems.append((f"channel[{i}].unit", f"{unit!r} and channel[{j}]'s unit {other!r} are the same MQTT id "
                             f"{unit_slug!r}"))
    return problems


class Validator:
    """Collects problems as `at 'key.path': message` lines."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, path: str, message: str) -> object:
        # Keys come from the file too: control characters shown escaped keep one problem on one line.
        self.problems.append(f"at '{escape_controls(path)}': {escape_controls(message)}")
        return INVALID

    def unknown(self, table: Mapping[str, Any], known: set[str], where: str) -> None:
        for key in table:
            if key not in known:
                path = f"{where}.{key}" if where else key
                self.problem(path, f"unknown key (expected one of: {', '.join(sorted(known))})")

    def section(self, data, name, cls, checks, defaults=None):
        raw = data.get(name, {})
        result = self.table(raw, name, cls, checks, defaults)
        return cls(**(defaults or {})) if result is INVALID else result

    def table(self, raw, where, cls, checks, defaults=None):
        if not isinstance(raw, dict):
            return self.problem(where, f"must be a table, not {_kind(raw)}")
        self.unknown(raw, set(checks), where)
        values, ok = self.values(raw, where, checks, defaults)
        return cls(**values) if ok else INVALID

    def values(self, raw, where, checks, defaults=None) -> tuple[dict, bool]:
        """(the checked values of the keys `raw` has, over `defaults`; False if any was invalid)."""
        values = dict(defaults or {})
        ok = True
        for key, check in checks.items():
            if key in raw:
                value = check(raw[key], f"{where}.{key}")
                if value is INVALID:
                    ok = False
                else:
                    values[key] = value
        return values, ok

    def required(self, table, key, where, check):
        if key not in table:
            return self.problem(f"{where}.{key}", "is required")
        return check(table[key], f"{where}.{key}")

    # Checks: each returns the value or INVALID after recording a problem.
    def text(self, value, path):
        if not isinstance(value, str):
            return self.problem(path, f"must be a string, not {_kind(value)}")
        if len(value) > 4096:
            return self.problem(path, f"is {len(value)} characters long, more than 4096")
        return value

    def name_text(self, value, path):
        """A string that ends up in a tag, a URL or a log line: no control characters (NUL, newline...)."""
        value = self.plain_text(value, path)
        if value is INVALID:
            return value
        if len(value) > 256:
            return self.problem(path, f"is {len(value)} characters long, more than 256")
        return value

    def git_remote(self, value, path):
        """A git remote (URL, user@host:path or a path) without a password or token in it: git would put
        it in its argv and its config file. Not quoted back, for the same reason."""
        value = self.name_text(value, path)
        if value is INVALID or "://" not in value:
            return value
        scheme, rest = value.split("://", 1)
        if scheme.lower() in ("http", "https"):
            hidden = _has_user_part(rest)  # any user part: a token goes there too
        else:
            hidden = ":" in rest.split("/", 1)[0].rpartition("@")[0]  # ssh://user@host is fine, user:pw@ not
        if hidden:
            return self.problem(path, "must not contain a password or token (it would show in every process "
                                      "list): use an ssh key or a public https URL")
        return value

    def host(self, value, path):
        """A host name or address alone (empty allowed): no scheme, user, password, path, port or space.
        Not quoted back: a broker URL with its login pasted here would carry the password."""
        value = self.name_text(value, path)
        if value is INVALID or not value:
            return value
        if any(c in value for c in "@/ \t") or "://" in value or value.count(":") == 1:
            return self.problem(path, "must be a host name or IP address alone (no scheme, login, path or port: "
                                      "the port has its own key)")
        if not _encodable_host(value):
            return self.problem(path, f"{value!r} {_BAD_HOST}")
        return value

    def mqtt_topic(self, value, path):
        """An MQTT topic prefix (empty: the default): no wildcard (+ #), no empty level, no control character."""
        value = self.name_text(value, path)
        if value is INVALID or not value:
            return value
        if "+" in value or "#" in value:
            return self.problem(path, f"{value!r}: a topic prefix cannot hold the wildcards + or #")
        if "" in value.split("/"):
            return self.problem(path, f"{value!r}: a topic prefix cannot start or end with / or hold //")
        return value

    def plain_text(self, value, path):
        """A string with no NUL (the OS cannot take it) and no other control character."""
        value = self.text(value, path)
        if value is INVALID:
            return value
        bad = _control_character(value)
        if bad is not None:
            return self.problem(path, f"{value!r} contains the control character {bad!r}")
        return value

    def path_text(self, value, path):
        """A file or directory path (up to 4096 characters, Linux's PATH_MAX; each name up to 255 bytes)."""
        value = self.plain_text(value, path)
        if value is INVALID:
            return value
        longest = max((len(part.encode("utf-8", "surrogateescape")) for part in value.split("/")), default=0)
        if longest > 255:  # NAME_MAX: no file system takes a longer name; the first open would fail every start
            return self.problem(path, f"has a name of {longest} bytes between slashes, more than 255")
        return value

    def pem_file(self, value, path):
        """A file of PEM CA certificates (empty: none): it exists, this user can read it, and OpenSSL
        parses at least one certificate from it. Read up to 1 MB."""
        value = self.path_text(value, path)
        if value is INVALID or not value:
            return value
        try:
            data = read_regular(value, _MAX_PEM_BYTES)  # a FIFO put there would otherwise hold the start
        except NotRegularFile as exc:
            if stat.S_ISDIR(exc.mode):
                return self.problem(path, f"{value!r} is a directory, not a PEM file")
            return self.problem(path, f"{value!r} is not a regular file")
        except FileTooLarge:
            return self.problem(path, f"{value!r} is larger than 1 MB: not a file of CA certificates")
        except FileNotFoundError:
            return self.problem(path, f"{value!r}: no such file")
        except PermissionError:
            return self.problem(path, f"{value!r} cannot be read by this user (permission denied)")
        except OSError as exc:
            return self.problem(path, f"{value!r} cannot be read ({exc.strerror or type(exc).__name__})")
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
        if value is not INVALID and value <= 0:
            return self.problem(path, f"must be greater than 0, not {_fmt(value)}")
        return value

    def non_negative(self, value, path):
        value = self.number(value, path)
        if value is not INVALID and value < 0:
            return self.problem(path, f"must not be negative, not {_fmt(value)}")
        return value

    def between(self, low: float, high: float):
        """A finite number from `low` to `high` inclusive."""
        return self._in_range(self.number, low, high)

    def whole_between(self, low: int, high: int):
        """A whole number from `low` to `high` inclusive."""
        return self._in_range(self.integer, low, high)

    def _in_range(self, check, low: float, high: float):
        def bounded(value, path):
            value = check(value, path)
            if value is not INVALID and not low <= value <= high:
                return self.problem(path, f"{_fmt(value)} is outside {_fmt(low)} to {_fmt(high)}")
            return value
        return bounded

    def at_most(self, check, limit: float, why: str = ""):
        """`check`, then at most `limit`: beyond it a value would overflow a timer or SQLite later."""
        def bounded(value, path):
            value = check(value, path)
            if value is not INVALID and value > limit:
                return self.problem(path, f"{_fmt(value)} is more than {_fmt(limit)}{why}")
            return value
        return bounded

    def upload_rate(self, value, path):
        value = self.non_negative(value, path)
        if value is not INVALID and 0 < value < 100:
            return self.problem(path, f"{_fmt(value)} bytes/s would stall delivery: use 0 (no limit) or 100 or more")
        if value is not INVALID and value > 1e9:
            return self.problem(path, f"{_fmt(value)} is more than 1000000000 bytes/s (use 0 for no limit)")
        return value

    def count(self, value, path):
        value = self.integer(value, path)
        if value is not INVALID and value < 1:
            return self.problem(path, f"must be 1 or more, not {value}")
        return value

    def non_negative_int(self, value, path):
        value = self.integer(value, path)
        if value is not INVALID and value < 0:
            return self.problem(path, f"must not be negative, not {value}")
        return value

    def gpio_pin(self, value, path):
        value = self.integer(value, path)
        if value is not INVALID and not 0 <= value <= 27:
            return self.problem(path, f"GPIO {value} does not exist on a Raspberry Pi header (0-27)")
        return value

    def i2c_address(self, value, path):
        if isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                return self.problem(path, f"{value!r} is not an I2C address (e.g. 0x40)")
        value = self.integer(value, path)
        if value is not INVALID and not 0x40 <= value <= 0x4F:
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
            elif self.name_text(tag, f"{path}.{key}") is INVALID:
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
        return INVALID if bad else dict(value)

    def url(self, value, path):
        value = self.text(value, path)
        if value is INVALID or not value:
            return value
        if _has_user_part(value):
            # user:password@ would end up in logs and messages: credentials have their own keys. Checked
            # first, and not quoted: a password may hold '/' or follow a mistyped scheme.
            return self.problem(path, "must not contain a user or password (use username / password_file)")
        if not re.match(r"^https?://[^/\s]+", value):
            return self.problem(path, f"{value!r} is not an http:// or https:// URL")
        if _control_character(value) is not None or not value.isascii() or " " in value:
            return self.problem(path, f"{value!r} has characters a URL cannot hold (spaces, control "
                                      "characters, non-ASCII: write a host name in its xn-- form)")
        netloc = value.split("/", 3)[2]
        host, sep, port = netloc.rpartition(":") if not netloc.endswith("]") else (netloc, "", "")
        if not sep:
            host = netloc
        if not host or host == "[]":
            return self.problem(path, f"{value!r} has no host")
        if not _encodable_host(host):
            return self.problem(path, f"{value!r}: the host {_BAD_HOST}")
        if sep and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            return self.problem(path, f"{value!r}: the port must be a number from 1 to 65535")
        try:
            urllib.parse.urlsplit(value).port  # noqa: B018 - what the HTTP libraries will do with it
        except ValueError as exc:
            return self.problem(path, f"{value!r} is not a usable URL ({exc})")
        return value.rstrip("/")

    def listen(self, value, path):
        value = self.text(value, path)
        if value is INVALID:
            return value
        host, sep, port = value.rpartition(":")
        if (not sep or not host or not port.isascii() or not port.isdigit() or not 0 <= int(port) < 65536
                or not host.isascii() or _control_character(host) is not None or " " in host
                or not _encodable_host(host)):
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


def _has_user_part(url: str) -> bool:
    """An '@' before the query or fragment: a user (or user:password, which may hold '/') in a URL."""
    return "@" in re.split(r"[?#]", url, maxsplit=1)[0]


def _control_character(text: str) -> str | None:
    """The first control character (NUL, newline, DEL, C1...) in `text`, or None."""
    for char in text:
        if unicodedata.category(char) == "Cc":
            return char
    return None


def escape_controls(text: str) -> str:
    """`text` with control characters (and line/paragraph separators) as Python escapes: how a value from a
    file is shown in a message or a table without a terminal obeying it."""
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

