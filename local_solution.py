"""Writer for a locally hosted InfluxDB.

`api = "v2"`: InfluxDB 2.x/3.x or 1.8+ through influxdb-client (token, org,
bucket). `api = "v1"`: InfluxDB 1.x's /write (database, retention policy,
username/password) - the only InfluxDB that runs on a 32-bit Pi Zero, and
what Debian packages.
"""
from __future__ import annotations

import base64
import logging
from collections.abc import Mapping, Sequence
from urllib.parse import urlencode

from config import InfluxConfig
from credentials import Secret
from influx_http import V2Writer, error_for_exception, error_for_status, gzip_lines, network_errors, secret_value

log = logging.getLogger(__name__)


class V1Writer:
    """POST /write?db=&rp=&precision=ms to InfluxDB 1.x, gzip'd, with basic auth when a username is set.

    Not thread-safe: one sender thread owns it.
    """

    def __init__(self, url: str, database: str, retention_policy: str, username: str, password: Secret,
                 timeout_s: float) -> None:
        import urllib3  # comes with influxdb-client

        self.url = url
        self.database = database
        self.username = username
        self.password = password
        self.secret = password if username else None  # what main checks at start
        self.timeout_s = timeout_s
        params = {"db": database, "precision": "ms"}
        if retention_policy:
            params["rp"] = retention_policy
        self._write_url = f"{url}/write?{urlencode(params)}"
        self.label = f"InfluxDB 1.x at {url}, database {database!r}"
        # retries=False: retry policy belongs to the sender, not to urllib3.
        self._pool = urllib3.PoolManager(timeout=urllib3.Timeout(total=timeout_s), retries=False)

    def write(self, lines: Sequence[str]) -> int:
        """Send one batch. Returns request-body bytes sent. Raises a delivery error."""
        body = gzip_lines(lines)
        headers = {"Content-Type": "text/plain; charset=utf-8", "Content-Encoding": "gzip"}
        password = ""
        if self.username:
            password = secret_value(self.password)
            pair = f"{self.username}:{password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        try:
            response = self._pool.request("POST", self._write_url, body=body, headers=headers)
        except network_errors() as exc:
            raise error_for_exception(exc, self.url, self.timeout_s) from None
        error = error_for_status(response.status, response.data, response.headers, self.url,
                                 f"database {self.database!r}", (password,))
        if error:
            error.bytes_sent = len(body)
            raise error
        return len(body)

    def close(self) -> None:
        self._pool.clear()


def make_writer(influx: InfluxConfig, environ: Mapping[str, str] | None = None):
    """The writer for `[influx] kind = "local"`: V1Writer or V2Writer by `api`."""
    if influx.api == "v1":
        password = Secret("INFLUXDB_PASSWORD", influx.password_file, environ)
        return V1Writer(influx.url, influx.database, influx.retention_policy, influx.username, password,
                        influx.timeout_s)
    token = Secret("INFLUXDB_TOKEN", influx.token_file, environ)
    return V2Writer(influx.url, influx.org, influx.bucket, token, influx.timeout_s,
                    label=f"InfluxDB at {influx.url}, bucket {influx.bucket!r}")
