"""HTTP to InfluxDB: outcome -> typed error, and the v2 write client.

Shared by local_solution.py and cloud_solution.py so that both writers map
every HTTP outcome the same way. A writer only writes: `write(lines)` sends
one batch and returns the request-body bytes it put on the wire, or raises one
of rpi_errors' delivery errors. Retry policy lives in sender.py.
"""
from __future__ import annotations

import email.utils
import gzip
import json
import logging
import time
from collections.abc import Mapping, Sequence

from credentials import Secret, SecretError, scrub
from rpi_errors import (
    AuthError,
    NotFoundError,
    RefusedError,
    RejectedError,
    SolarError,
    ThrottledError,
    TooLargeError,
    UnreachableError,
)

log = logging.getLogger(__name__)

GZIP_LEVEL = 6  # zlib's default: most of level 9's saving on line protocol at a third of the CPU
_MAX_DETAIL = 200


def gzip_lines(lines: Sequence[str]) -> bytes:
    """The batch as one gzip'd line-protocol body."""
    return gzip.compress("\n".join(lines).encode("utf-8"), compresslevel=GZIP_LEVEL, mtime=0)


def retry_after_s(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not headers:
        return None
    value = None
    for key, item in headers.items():
        if key.lower() == "retry-after":
            value = str(item).strip()
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


# What InfluxDB (1.x, 2.x, 3.x, Cloud) says when it refuses particular lines, as opposed to a 400 from
# something else on the way (a proxy, a captive portal, http sent to an https port): only these send the
# batch through the halving search that quarantines lines.
_LINE_ERRORS = ("unable to parse", "partial write", "field type conflict", "invalid field",
                "invalid tag", "invalid measurement", "missing field", "missing tag", "bad timestamp",
                "invalid timestamp", "beyond retention", "max-values-per-tag", "parsing failed", "line protocol",
                "invalid number", "invalid boolean", "unbalanced quotes")


def error_for_status(status: int, body: str | bytes | None, headers: Mapping[str, str] | None,
                     target: str, what: str, secrets: Sequence[str] = ()) -> SolarError | None:
    """The typed error for an HTTP response, or None when the write was acknowledged.

    Every InfluxDB (and VictoriaMetrics) acknowledges a write with 204; a 200 with a body is something
    else answering (a captive portal's "top up your plan" page) and must not count as delivered.
    `target` names the server (URL without credentials), `what` the bucket or database, so the message
    says what to fix.
    """
    text = _detail(body)
    if status == 204 or (200 <= status < 300 and not text):
        return None
    detail = scrub(text, *secrets)
    said = f"HTTP {status} from {target}" + (f": {detail}" if detail else "")
    if 200 <= status < 300:
        return RefusedError(f"{said} (not an InfluxDB write acknowledgement: is the URL right?)", status=status)
    if status == 422 or (status == 400 and any(marker in text.lower() for marker in _LINE_ERRORS)):
        return RejectedError(f"{said} (lines refused)", status=status)
    if status == 400:
        return RefusedError(f"{said} (request refused: check the URL and settings)", status=status)
    if status in (401, 403):
        why = "the token or password was refused" if status == 401 else "no permission to write"
        return AuthError(f"{said} ({why} for {what})", status=status)
    if status == 404 or (status == 500 and "retention policy not found" in text.lower()):
        # InfluxDB 1.x answers a misspelt retention policy with a 500: a setting, not an outage.
        return NotFoundError(f"{said} ({what} not found)", status=status)
    if status == 413:
        return TooLargeError(f"{said} (request too large)", status=status)
    if status in (429, 503):
        wait = retry_after_s(headers)
        hint = f", retry after {wait:g} s" if wait is not None else ""
        return ThrottledError(f"{said} (throttled{hint})", status=status, retry_after_s=wait)
    if status >= 500 or status == 408:
        return UnreachableError(said, status=status)
    return RefusedError(said, status=status)


def error_for_exception(exc: BaseException, target: str, timeout_s: float) -> UnreachableError:
    """A network-level failure (refused, DNS, timeout, reset, TLS) as UnreachableError."""
    import urllib3.exceptions as ux  # urllib3 comes with influxdb-client

    reason = exc.reason if isinstance(exc, ux.MaxRetryError) and exc.reason else exc
    # Order matters: in urllib3 2.x NewConnectionError subclasses ConnectTimeoutError.
    if isinstance(reason, ux.NameResolutionError):
        text = "DNS lookup failed"
    elif isinstance(reason, (ux.NewConnectionError, ConnectionRefusedError)):
        text = "connection refused or no route"
    elif isinstance(reason, (ux.ConnectTimeoutError, ux.ReadTimeoutError, TimeoutError)):
        text = f"no answer within {timeout_s:g} s"
    elif isinstance(reason, ux.SSLError):
        text = "TLS error"
    elif isinstance(reason, (ux.ProtocolError, ConnectionError)):
        text = "connection broken"
    else:
        text = type(reason).__name__
    return UnreachableError(f"cannot reach {target}: {text}")


def network_errors() -> tuple[type[BaseException], ...]:
    import urllib3.exceptions as ux

    return (ux.HTTPError, OSError)


def _detail(body: str | bytes | None) -> str:
    if not body:
        return ""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    text = body.strip()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            text = str(data.get("error") or data.get("message") or text)
    except ValueError:
        pass
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def secret_value(secret: Secret) -> str:
    """The secret's value; a secret file problem is an AuthError naming the file."""
    try:
        return secret.value()
    except SecretError as exc:
        raise AuthError(str(exc)) from None


class V2Writer:
    """Writes to the InfluxDB v2 API (/api/v2/write) through influxdb-client.

    InfluxDB 2.x/3.x, 1.8+ and InfluxDB Cloud. The token is re-read from its
    source before every write, so a fixed token works without a restart. Not
    thread-safe: one sender thread owns it.
    """

    def __init__(self, url: str, org: str, bucket: str, token: Secret, timeout_s: float, *,
                 label: str) -> None:
        self.url = url
        self.org = org
        self.bucket = bucket
        self.token = token
        self.secret = token  # what main checks at start
        self.timeout_s = timeout_s
        self.label = label
        self._client = None
        self._service = None
        self._client_token: str | None = None

    def _connect(self, token: str) -> None:
        from influxdb_client import InfluxDBClient  # ~0.2 s to import: only when a v2 writer is used
        from influxdb_client.service.write_service import WriteService

        self.close()
        # enable_gzip stays off: we compress ourselves, so the body size we rate-limit is what goes on the wire.
        self._client = InfluxDBClient(url=self.url, token=token, org=self.org,
                                      timeout=int(self.timeout_s * 1000), enable_gzip=False)
        self._service = WriteService(self._client.api_client)
        self._client_token = token

    def write(self, lines: Sequence[str]) -> int:
        """Send one batch. Returns request-body bytes sent. Raises a delivery error."""
        from influxdb_client.rest import ApiException

        token = secret_value(self.token)
        if not token:
            raise AuthError(f"no InfluxDB token: set INFLUXDB_TOKEN or [influx] token_file ({self.label})")
        if token != self._client_token:
            self._connect(token)
        body = gzip_lines(lines)
        what = f"bucket {self.bucket!r} in org {self.org!r}"
        try:
            self._service.post_write(org=self.org, bucket=self.bucket, body=body, precision="ms",
                                     content_encoding="gzip", content_type="text/plain; charset=utf-8")
        except ApiException as exc:
            if not exc.status:  # raised for TLS failures before any response
                raise UnreachableError(f"cannot reach {self.url}: TLS error") from None
            error = error_for_status(exc.status, exc.body, exc.headers, self.url, what, (token,))
            if error is None:
                return len(body)
            error.bytes_sent = len(body)
            raise error from None
        except network_errors() as exc:
            raise error_for_exception(exc, self.url, self.timeout_s) from None
        except ValueError:
            # http.client refuses a header with a line break; its message would quote the token.
            raise AuthError(f"the token for {self.label} contains a character that cannot be sent") from None
        return len(body)

    def close(self) -> None:
        """Release the HTTP connections (idempotent)."""
        if self._client is not None:
            self._client.close()
        self._client = None
        self._service = None
        self._client_token = None
