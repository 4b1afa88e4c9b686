"""HTTP to InfluxDB: outcome -> typed error, and the v2 write client (over transport.py's bounded Transport).

Shared by local_solution.py and cloud_solution.py so that both writers send
through the same deadlines and bounds and map every HTTP outcome the same way. A writer only writes: `write(lines)` sends
one batch and returns the request-body bytes it put on the wire, or raises one
of rpi_errors' delivery errors. Retry policy lives in sender.py.
"""
from __future__ import annotations

import email.utils
import gzip
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from credentials import Secret, SecretError, scrub
from transport import MAX_ANSWER_BYTES, MIN_UPLOAD_BYTES_PER_S, Answer, Transport
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
# Full batches of a backlog: 2.5x less CPU than level 6 for 22 % more bytes (measured on a simulated 24 h
# backlog: 0.99 vs 2.47 us and 16.7 vs 13.7 B per point, 7.2 vs 5.9 MB for the day). gzip is then about a
# third of the drain's CPU, which on a small machine competes with the server or the link; everyday
# requests (a part batch every flush) keep level 6, so the steady bytes on a SIM do not change.
GZIP_LEVEL_BACKLOG = 3
_MAX_DETAIL = 200


def gzip_lines(lines: Sequence[str]) -> bytes:
    """The batch as one gzip'd line-protocol body."""
    return gzip_text("\n".join(lines).encode("utf-8"))


def gzip_text(text: bytes, level: int = GZIP_LEVEL) -> bytes:
    """Newline-joined UTF-8 line protocol as one gzip'd body (zlib runs without the GIL: another thread
    can compress the next batch while a request is in flight)."""
    return gzip.compress(text, compresslevel=level, mtime=0)


@dataclass(frozen=True)
class Prepared:
    """One batch's request body built ahead of its request (a writer's prepare()): gzip'd line protocol."""

    body: bytes


def prepare(text: bytes, *, backlog: bool = False) -> Prepared:
    """The body for `text` (newline-joined UTF-8 lines); `backlog`: a full batch of a backlog, compressed
    at the faster GZIP_LEVEL_BACKLOG. Pure and thread-safe: the sender calls it in its helper thread while
    the previous request is in flight."""
    return Prepared(gzip_text(text, GZIP_LEVEL_BACKLOG if backlog else GZIP_LEVEL))


def request_body(lines: "Sequence[str] | Prepared") -> bytes:
    """What write() sends: the prepared body, or the lines gzip'd now."""
    return lines.body if isinstance(lines, Prepared) else gzip_lines(lines)


def header(headers: Mapping[str, str] | None, name: str) -> str:
    """The value of header `name` (`name` lower-case; any case in `headers`), the last one when repeated;
    "" when absent."""
    value = ""
    for key, item in (headers or {}).items():
        if key.lower() == name:
            value = str(item)
    return value


def retry_after_s(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    value = header(headers, "retry-after").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:  # "nan" and "inf" parse too: a NaN wait compares false with everything and disables the throttle
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


_DROPPED = re.compile(r"\bdropped=(\d{1,9})\b")
# What InfluxDB (1.x, 2.x, 3.x, Cloud) says when it refuses particular lines, as opposed to a 400 from
# something else on the way (a proxy, a captive portal, http sent to an https port): only these send the
# batch through the halving search that quarantines lines.
_LINE_ERRORS = ("unable to parse", "partial write", "field type conflict", "invalid field",
                "invalid tag", "invalid measurement", "missing field", "missing tag", "bad timestamp",
                "invalid timestamp", "beyond retention", "max-values-per-tag", "parsing failed", "line protocol",
                "invalid number", "invalid boolean", "unbalanced quotes")


def error_for_status(status: int, body: str | bytes | None, headers: Mapping[str, str] | None,
                     target: str, what: str, secrets: Sequence[str] = (), *, truncated: bool = False
                     ) -> SolarError | None:
    """The typed error for an HTTP response, or None when the write was acknowledged.

    Every InfluxDB (1.x, 2.x, 3.x, Cloud) and VictoriaMetrics acknowledges a write with 204 No Content
    and an empty body: nothing else is a delivery. Any other 2xx (a captive portal's "top up your plan"
    page, a proxy's login page, a 200 from something that is not InfluxDB) is a Connection problem.
    `target` names the server (URL without credentials), `what` the bucket or database, so the message
    says what to fix. The server's text is scrubbed of every form of `secrets` before it goes into the
    message (an echoing server must not carry a credential into the log, `status` or the live page).
    """
    if status == 204 and not body:
        return None
    raw = _text(body)
    text = _detail(scrub(raw, *secrets), secrets)
    said = f"HTTP {status} from {target}" + (f": {text}" if text else "")
    if truncated:
        said += f" (answer longer than {MAX_ANSWER_BYTES // 1024} KB: not read further)"
    low = text.lower()
    if 200 <= status < 300:
        return UnreachableError(
            f"{said} (not InfluxDB's write answer, 204 No Content: a captive portal or proxy answered; "
            f"check the network, e.g. the SIM's data plan, and the URL)", status=status)
    if 300 <= status < 400:
        # InfluxDB never redirects a write: a captive portal sends the browser to its login page this way,
        # and a web server in front of the database sends http:// on to https://.
        location = _detail(header(headers, "location"), secrets)
        return UnreachableError(
            f"{said} (a redirect{f' to {location}' if location else ''}, which InfluxDB never answers to a "
            "write: a captive portal or proxy answered, or the URL should be https://; check the network, e.g. "
            "the SIM's data plan, and the URL)", status=status)
    if truncated and status not in (429, 503):  # no InfluxDB answer is this long: not the database's verdict
        return UnreachableError(f"{said} (not an answer InfluxDB gives)", status=status)
    if status == 422 or (status == 400 and any(marker in low for marker in _LINE_ERRORS)):
        rejected = RejectedError(f"{said} (lines refused)", status=status)
        counted = _DROPPED.search(raw[-200:])  # where InfluxDB 1.x puts it: past any cut of the message
        rejected.dropped = int(counted.group(1)) if counted else None
        return rejected
    if status == 400:
        return RefusedError(f"{said} (request refused: check the URL and settings)", status=status)
    if status in (401, 403):
        why = "the token or password was refused" if status == 401 else "no permission to write"
        return AuthError(f"{said} ({why} for {what})", status=status)
    if status == 404 or (status == 500 and "retention policy not found" in low):
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


def error_for_answer(answer: "Answer", target: str, what: str, secrets: Sequence[str] = ()) -> SolarError | None:
    """error_for_status for a Transport's Answer."""
    return error_for_status(answer.status, answer.body, answer.headers, target, what, secrets,
                            truncated=answer.truncated)


def _text(body: str | bytes | None) -> str:
    if not body:
        return ""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return body


def _detail(text: str, secrets: Sequence[str] = ()) -> str:
    """The server's message, one line, at most _MAX_DETAIL characters; scrubbed again after the JSON is
    decoded (which may reveal a secret its escapes hid) and before it is cut (which could leave a part)."""
    text = text.strip()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            text = str(data.get("error") or data.get("message") or text)
    except ValueError:
        pass
    text = " ".join(scrub(text, *secrets).split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def secret_value(secret: Secret) -> str:
    """The secret's value; a secret file problem is an AuthError naming the file."""
    try:
        return secret.value()
    except SecretError as exc:
        raise AuthError(str(exc)) from None


_WRITE_HEADERS = frozenset({"authorization", "content-type", "content-encoding"})


class _TransportRest:
    """Stands in for influxdb-client's REST client (`ApiClient.rest_client`): influxdb-client composes
    the request (URL, query, token header, user agent) and this sends it through a Transport, so
    its deadlines and bounded reads hold for the v2 writer too. It never raises for a status: the
    writer decides what an answer means."""

    pool_manager = None  # ApiClient.__del__ looks for it

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def POST(self, url, headers=None, query_params=None, post_params=None, body=None,  # noqa: N802
             _preload_content=True, _request_timeout=None, **_urlopen_kw):
        parts = urlsplit(url)
        # influxdb-client already put the configured URL's path in front (`http://host/influx` ->
        # /influx/api/v2/write); the transport adds it too, so it goes here once, not twice.
        path, prefix = parts.path, self.transport.path_prefix
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            path = path[len(prefix):]
        target = path + ("?" + urlencode(query_params) if query_params else "")
        # Only what the server needs: influxdb-client's User-Agent, Accept and the like go with every
        # request on a metered link for nobody (http.client adds Host and Content-Length).
        kept = {name: value for name, value in (headers or {}).items() if name.lower() in _WRITE_HEADERS}
        return _RestAnswer(self.transport.post(target, body or b"", kept))

    def request(self, method, url, **kwargs):
        if method != "POST":
            raise ValueError(f"only POST goes through the write transport, not {method}")
        return self.POST(url, **kwargs)


class _RestAnswer:
    """What influxdb-client expects back from its REST client."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.status = answer.status
        self.reason = answer.reason
        self.data = answer.body

    def getheaders(self) -> dict[str, str]:
        return self.answer.headers

    def getheader(self, name: str, default=None):
        return self.answer.headers.get(name.lower(), default)


class V2Writer:
    """Writes to the InfluxDB v2 API (/api/v2/write): influxdb-client composes the request, a
    Transport sends it (deadlines, bounded answer).

    InfluxDB 2.x/3.x, 1.8+ and InfluxDB Cloud. The token is re-read from its
    source before every write, so a fixed token works without a restart. Not
    thread-safe (one sender thread owns it), except abort().
    """

    def __init__(self, url: str, org: str, bucket: str, token: Secret, timeout_s: float, *,
                 label: str, min_upload_bytes_per_s: float = MIN_UPLOAD_BYTES_PER_S, ca_file: str = "") -> None:
        self.url = url
        self.org = org
        self.bucket = bucket
        self.token = token
        self.secret = token  # what main checks at start
        self.timeout_s = timeout_s
        self.label = label
        self.transport = Transport(url, timeout_s, min_upload_bytes_per_s=min_upload_bytes_per_s, ca_file=ca_file)
        self._client = None
        self._service = None
        self._client_token: str | None = None

    def _connect(self, token: str) -> None:
        from influxdb_client import InfluxDBClient  # ~0.2 s to import: only when a v2 writer is used
        from influxdb_client.service.write_service import WriteService

        self._forget_client()
        # enable_gzip stays off: we compress ourselves, so the body size we rate-limit is what goes on the wire.
        self._client = InfluxDBClient(url=self.url, token=token, org=self.org,
                                      timeout=int(self.timeout_s * 1000), enable_gzip=False)
        self._client.api_client.rest_client = _TransportRest(self.transport)
        self._service = WriteService(self._client.api_client)
        self._client_token = token

    prepare = staticmethod(prepare)  # the body built ahead, in the sender's helper thread

    def write(self, lines: Sequence[str] | Prepared) -> int:
        """Send one batch (lines, or prepare()'s body). Returns request-body bytes sent. Raises a delivery error."""
        token = secret_value(self.token)
        if not token:
            raise AuthError(f"no InfluxDB token: set INFLUXDB_TOKEN or [influx] token_file ({self.label})")
        if token != self._client_token:
            self._connect(token)
        body = request_body(lines)
        what = f"bucket {self.bucket!r} in org {self.org!r}"
        response = self._service.post_write_with_http_info(
            org=self.org, bucket=self.bucket, body=body, precision="ms", content_encoding="gzip",
            content_type="text/plain; charset=utf-8", _return_http_data_only=False, _preload_content=False)
        answer = response[0].answer
        error = error_for_answer(answer, self.url, what, (token,))
        if error is not None:
            error.bytes_sent = len(body)
            raise error
        return len(body)

    def abort(self) -> None:
        """Cut the write in flight (shutdown). Thread-safe."""
        self.transport.abort()

    def _forget_client(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None
        self._service = None
        self._client_token = None

    def close(self) -> None:
        """Release the connection (idempotent)."""
        self._forget_client()
        self.transport.close()
