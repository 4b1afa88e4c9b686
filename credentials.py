"""Secrets (the InfluxDB token, the v1 password) from the environment or a file.

A secret never appears in argv, the config file, a log line, an exception's
text or a repr. A secret file readable by group or others is refused, as ssh
refuses a private key. The file is re-read when it changes, so a fixed token
resumes delivery without a restart.
"""
from __future__ import annotations

import base64
import json
import os
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, quote_plus

from smallfile import FileTooLarge, NotRegularFile, read_regular

# Under systemd, LoadCredential= puts the token here: $CREDENTIALS_DIRECTORY/influx-token.
TOKEN_ENV = "INFLUXDB_TOKEN"
PASSWORD_ENV = "INFLUXDB_PASSWORD"
MQTT_PASSWORD_ENV = "MQTT_PASSWORD"
CREDENTIAL_NAMES = {TOKEN_ENV: "influx-token", PASSWORD_ENV: "influx-password"}  # those systemd can hand over
# Every environment variable that can hold a secret: child processes (git, pip, the installer) never get them.
SECRET_ENV_NAMES = (TOKEN_ENV, PASSWORD_ENV, MQTT_PASSWORD_ENV, "CREDENTIALS_DIRECTORY")
_MAX_SECRET_BYTES = 65536  # a token or password is far smaller: a bigger file is the wrong file


class SecretError(Exception):
    """The secret file cannot be used (missing, unreadable, too open). The text names the file, never the secret."""


class Secret:
    """One secret: `path` (the config's *_file key), else env var `env_name`, else the systemd credential.

    `value()` returns the current secret ("" when none is configured) and
    raises SecretError for a file that is missing, unreadable or readable by
    others. Thread-safe.
    """

    def __init__(self, env_name: str, path: str = "", environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.env_name = env_name
        self._env_value = environ.get(env_name, "")
        cred_dir = environ.get("CREDENTIALS_DIRECTORY", "")
        if not path and not self._env_value and cred_dir and env_name in CREDENTIAL_NAMES:
            candidate = Path(cred_dir) / CREDENTIAL_NAMES[env_name]
            path = str(candidate) if candidate.exists() else ""
        self.path = path
        self._lock = threading.Lock()
        self._cached: tuple[float, int, str] | None = None  # (mtime, size, value)

    @property
    def source(self) -> str:
        """Where the secret comes from, for messages (never the secret itself)."""
        if self.path:
            return f"file {_shown(self.path)}"
        if self._env_value:
            return f"${self.env_name}"
        return "nowhere (not configured)"

    def value(self) -> str:
        if not self.path:
            return _checked(self._env_value, f"${self.env_name}")
        with self._lock:
            try:
                st = os.stat(self.path)
            except OSError as exc:
                raise SecretError(f"secret file {_shown(self.path)}: {exc.strerror}") from None
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) \
                    and not _is_systemd_credential(self.path):
                raise SecretError(
                    f"secret file {self.path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                    f"run chmod 600 {self.path}"
                )
            key = (st.st_mtime, st.st_size)
            if self._cached is None or self._cached[:2] != key:
                try:
                    # A FIFO or a device would block the read, or never end; a big file is the wrong file.
                    text = read_regular(self.path, _MAX_SECRET_BYTES).decode("utf-8").strip()
                except NotRegularFile:
                    raise SecretError(f"secret file {self.path} is not a regular file") from None
                except FileTooLarge as exc:
                    raise SecretError(f"secret file {self.path} is {exc.size} bytes: too big for a token or "
                                      "password (is it the right file?)") from None
                except (OSError, UnicodeDecodeError) as exc:
                    raise SecretError(f"secret file {self.path} cannot be read: {type(exc).__name__}") from None
                self._cached = (*key, _checked(text, f"secret file {self.path}"))
            return self._cached[2]

    def __repr__(self) -> str:
        return f"Secret({self.source})"


def _shown(path: str) -> str:
    """`path` for a message, unless it names no existing file and has no '/': then it may well be the secret
    itself, pasted where its file's name belongs."""
    if "/" in path or os.path.lexists(path):
        return path
    return "(the value given is no file name: put the secret in a 0600 file and name that file)"


def _checked(secret: str, source: str) -> str:
    # A line break or other control character cannot go into an HTTP header, and the HTTP library's
    # error would quote the whole header, secret included: refuse it here, naming only the source.
    if any(ord(c) < 32 or ord(c) == 127 for c in secret):
        raise SecretError(f"{source} contains a line break or another control character")
    return secret


def _is_systemd_credential(path: str) -> bool:
    # systemd hands credentials over in a private, read-only directory it owns;
    # their modes are its business.
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    return bool(cred_dir) and Path(path).parent == Path(cred_dir)


def basic_auth(username: str, password: str) -> str:
    """The Authorization header value for HTTP Basic auth. Scrub it with scrub(text, password,
    basic_auth_pair(username, password))."""
    return "Basic " + base64.b64encode(basic_auth_pair(username, password).encode("utf-8")).decode("ascii")


def basic_auth_pair(username: str, password: str) -> str:
    """The `user:password` that Basic auth encodes: a secret of its own (its base64 is what travels)."""
    return f"{username}:{password}"


def secret_forms(secret: str) -> list[str]:
    """Every form in which `secret` may come back from a server or a library: as is, URL-encoded,
    HTML-escaped (an error page quoting a header), JSON-escaped (as Python writes it, and as Go does: & < >
    as \\u0026 \\u003c \\u003e, non-ASCII kept or escaped), and base64 (standard and URL-safe, with and
    without padding, also URL-encoded: + / = as %2B %2F %3D), longest first."""
    if not secret:
        return []
    raw = secret.encode("utf-8")
    # html.escape's forms, written out: importing html loads its entity table (a daemon's RSS, for an error path)
    html = secret.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    forms = {secret, quote(secret, safe=""), quote_plus(secret), html,
             html.replace('"', "&quot;").replace("'", "&#x27;")}
    for ascii_only in (True, False):
        escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
        forms.update((escaped, escaped.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")))
    for encoded in (base64.b64encode(raw).decode("ascii"), base64.urlsafe_b64encode(raw).decode("ascii")):
        forms.update((encoded, encoded.rstrip("="), encoded.replace("/", "\\/"), quote(encoded, safe="")))
    return sorted((f for f in forms if f), key=len, reverse=True)


def scrub(text: str, *secrets: str) -> str:
    """`text` with every form (secret_forms) of every non-empty secret replaced by '***'."""
    for secret in secrets:
        for form in secret_forms(secret):
            text = text.replace(form, "***")
    return text
