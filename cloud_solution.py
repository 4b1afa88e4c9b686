"""Writer for InfluxDB Cloud: https only, token, org and bucket, through influxdb-client."""
from __future__ import annotations

from collections.abc import Mapping

from config import InfluxConfig, cloud_url_problem
from credentials import TOKEN_ENV, Secret
from influx_http import V2Writer


class InsecureURLError(ValueError):
    """InfluxDB Cloud was configured with a URL that is not https (the token would travel in clear)."""


def make_writer(influx: InfluxConfig, environ: Mapping[str, str] | None = None) -> V2Writer:
    """The writer for `[influx] kind = "cloud"`. Raises InsecureURLError for a non-https URL."""
    problem = cloud_url_problem(influx.url)
    if problem:
        raise InsecureURLError(f"[influx] url {influx.url!r}: {problem}")
    token = Secret(TOKEN_ENV, influx.token_file, environ)
    return V2Writer(influx.url, influx.org, influx.bucket, token, influx.timeout_s,
                    label=f"InfluxDB Cloud at {influx.url}, bucket {influx.bucket!r}", ca_file=influx.ca_file)
