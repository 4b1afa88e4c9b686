"""Writer for a locally hosted InfluxDB.

`api = "v2"`: InfluxDB 2.x/3.x or 1.8+ through influxdb-client (token, org,
bucket). `api = "v1"`: InfluxDB 1.x's /write (database, retention policy,
username/password) - the only InfluxDB that runs on a 32-bit Pi Zero, and
what Debian packages.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from urllib.parse import urlencode

from config import InfluxConfig
from credentials import PASSWORD_ENV, TOKEN_ENV, Secret, basic_auth, basic_auth_pair
from influx_http import Prepared, V2Writer, error_for_answer, prepare, request_body, secret_value
from transport import MIN_UPLOAD_BYTES_PER_S, Transport

log = logging.getLogger(__name__)


class V1Writer:
    """POST /write?db=&rp=&precision=ms to InfluxDB 1.x, gzip'd, with basic auth when a username is set,
    through a Transport (deadlines, bounded answer).

    Not thread-safe: one sender thread owns it (abort() may come from any thread).
    """

    def __init__(self, url: str, database: str, retention_policy: str, username: str, password: Secret,
                 timeout_s: float, *, min_upload_bytes_per_s: float = MIN_UPLOAD_BYTES_PER_S,
                 ca_file: str = "") -> None:
        self.url = url
        self.database = database
        self.username = username
        self.password = password
        self.secret = password if username else None  # what main checks at start
        self.timeout_s = timeout_s
        params = {"db": database, "precision": "ms"}
        if retention_policy:
            params["rp"] = retention_policy
        self._target = f"/write?{urlencode(params)}"
        self.label = f"InfluxDB 1.x at {url}, database {database!r}"
        self.transport = Transport(url, timeout_s, min_upload_bytes_per_s=min_upload_bytes_per_s, ca_file=ca_file)

    prepare = staticmethod(prepare)  # the body built ahead, in the sender's helper thread

    def write(self, lines: Sequence[str] | Prepared) -> int:
        """Send one batch (lines, or prepare()'s body). Returns request-body bytes sent. Raises a delivery error."""
        body = request_body(lines)
        headers = {"Content-Type": "text/plain; charset=utf-8", "Content-Encoding": "gzip"}
        secrets: tuple[str, ...] = ()
        if self.username:
            password = secret_value(self.password)
            headers["Authorization"] = basic_auth(self.username, password)
            secrets = (password, basic_auth_pair(self.username, password))
        answer = self.transport.post(self._target, body, headers)
        error = error_for_answer(answer, self.url, f"database {self.database!r}", secrets)
        if error:
            error.bytes_sent = len(body)
            raise error
        return len(body)

    def abort(self) -> None:
        """Cut the write in flight (shutdown). Thread-safe."""
        self.transport.abort()

    def close(self) -> None:
        self.transport.close()


def make_writer(influx: InfluxConfig, environ: Mapping[str, str] | None = None):
    """The writer for `[influx] kind = "local"`: V1Writer or V2Writer by `api`."""
    if influx.api == "v1":
        password = Secret(PASSWORD_ENV, influx.password_file, environ)
        return V1Writer(influx.url, influx.database, influx.retention_policy, influx.username, password,
                        influx.timeout_s, ca_file=influx.ca_file)
    token = Secret(TOKEN_ENV, influx.token_file, environ)
    return V2Writer(influx.url, influx.org, influx.bucket, token, influx.timeout_s,
                    label=f"InfluxDB at {influx.url}, bucket {influx.bucket!r}", ca_file=influx.ca_file)
