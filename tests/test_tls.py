"""https in the suite: a test CA (made with openssl) and a TLS-terminating proxy (tests/tls.py) in front of the
real servers. The good path arrives point for point; every bad certificate or TLS setup is refused before a
request (or the token) crosses, and nothing is marked delivered.

The client trusts the test CA through SSL_CERT_FILE: urllib3 (under influxdb-client and the v1 writer) loads
OpenSSL's default verify paths when it is given no CA file, and OpenSSL reads that variable for them.
`[influx] ca_file` replaces this once the writers have it (issue 14, section 3).
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

import lp
from config import parse_config
from outbox import Outbox
from rpi_errors import ErrorHandler, UnreachableError
from sender import Policy, Sender
from test_end_to_end import ROOT, assert_same, influx_samples, stored_lines, vm_series, write_config
from tls import CONNECTIONS, LEGACY_TLS, ByteRelay, TLSProxy, make_pki, openssl_available

TOKEN = "tls-token-Very-Secret-42"


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """Root CA, intermediate and server chains (good, expired, mismatch, unknown issuer) for the session."""
    reason = openssl_available()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def https_proxy():
    """Factory: https_proxy(upstream_url, chain, **options) -> a started TLSProxy, stopped after the test."""
    proxies = []

    def factory(upstream_url, chain, **options) -> TLSProxy:
        proxy = TLSProxy(upstream_url, chain, **options).start()
        proxies.append(proxy)
        return proxy

    yield factory
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def trust_test_ca(pki, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))


def run_daemon(config, pki, cycles: int):
    env = {**os.environ, "INFLUXDB_TOKEN": TOKEN, "SSL_CERT_FILE": str(pki.ca_file)}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "run", "--config", str(config),
                           "--cycles", str(cycles)], capture_output=True, text=True, timeout=120, env=env)


# -- the good path --------------------------------------------------------------------------------------
def test_cloud_over_https_point_for_point(victoria, pki, https_proxy, tmp_path):
    site = "tls-cloud"
    proxy = https_proxy(victoria.url, pki.good)
    cfg = write_config(tmp_path, site, f'kind = "cloud"\nurl = "{proxy.url}"\norg = "coop"\nbucket = "solar"')
    result = run_daemon(cfg, pki, 12)
    assert result.returncode == 0, result.stderr
    lines, statuses, _ = stored_lines(tmp_path / "store")
    assert len(lines) == 12 * 5 and set(statuses) == {"sent"}
    assert_same(lp.samples(lines), {k: v[0] for k, v in vm_series(victoria, site).items()})
    writes = [r for r in proxy.log if r.path.startswith("/api/v2/write")]
    assert writes and all(r.status == 204 for r in writes)
    assert all(r.header("Content-Encoding") == "gzip" for r in writes)
    assert all(r.header("Authorization") == f"Token {TOKEN}" for r in writes)
    assert proxy.handshakes >= 1 and proxy.handshake_failures == 0
    assert TOKEN not in result.stderr


def test_influxdb_1_over_https_point_for_point(influxdb1, pki, https_proxy, tmp_path):
    influxdb1.create_database("tls_v1")
    proxy = https_proxy(influxdb1.url, pki.good)
    cfg = write_config(tmp_path, "tls-v1", f'kind = "local"\napi = "v1"\nurl = "{proxy.url}"\ndatabase = "tls_v1"')
    result = run_daemon(cfg, pki, 10)
    assert result.returncode == 0, result.stderr
    lines, statuses, _ = stored_lines(tmp_path / "store")
    assert len(lines) == 10 * 5 and set(statuses) == {"sent"}
    assert_same(lp.samples(lines), influx_samples(influxdb1, "tls_v1"))
    assert proxy.handshakes >= 1 and proxy.handshake_failures == 0


def test_the_relay_counts_tls_bytes_both_ways_and_the_proxy_closes_idle_connections(
        victoria, pki, https_proxy, trust_test_ca):
    proxy = https_proxy(victoria.url, pki.good, idle_timeout_s=0.3)
    with ByteRelay(proxy.port) as relay:
        writer = make_writer(relay.url, "cloud")
        try:
            writer.write(["electricity,site=tls-relay,unit=a current_ma=1.5 1780000000000"])
            # A full handshake sends the leaf and the intermediate down: more than the chain file's DER.
            assert relay.down > 2000 and relay.up > 300
            assert _wait_for(lambda: proxy.idle_closes == 1)
            writer.write(["electricity,site=tls-relay,unit=a current_ma=2.5 1780000001000"])
        finally:
            writer.close()
        assert proxy.handshakes == 2 and relay.counters[CONNECTIONS] == 2  # the idle close cost a second handshake
    assert len(vm_series(victoria, "tls-relay")) == 2


def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- bad certificates and TLS setups are refused ---------------------------------------------------------
BAD = {
    "expired": ("expired", {}),
    "hostname_mismatch": ("mismatch", {}),
    "unknown_issuer": ("unknown", {}),
    "tls_1_0_and_1_1_only": ("good", {"versions": LEGACY_TLS}),
    "handshake_cut": ("good", {"cut_handshake": True}),
}


def make_writer(url: str, kind: str):
    if kind == "cloud":
        from cloud_solution import make_writer as make

        cfg = parse_config({"influx": {"kind": "cloud", "url": url, "org": "coop", "bucket": "solar", "timeout_s": 5}})
        return make(cfg.influx, environ={"INFLUXDB_TOKEN": TOKEN})
    from local_solution import make_writer as make

    cfg = parse_config({"influx": {"kind": "local", "api": "v1", "url": url, "database": "tls_bad",
                                   "username": "logger", "timeout_s": 5}})
    return make(cfg.influx, environ={"INFLUXDB_PASSWORD": TOKEN})


@pytest.mark.parametrize("kind", ["cloud", "v1"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_tls_is_refused_and_nothing_is_marked_delivered(case, kind, victoria, influxdb1, pki, https_proxy,
                                                             trust_test_ca, clock, tmp_path):
    chain_name, options = BAD[case]
    upstream = victoria if kind == "cloud" else influxdb1
    proxy = https_proxy(upstream.url, getattr(pki, chain_name), **options)
    outbox = Outbox(tmp_path / "store")
    unit = f"tls-bad-{case}-{kind}"
    outbox.append([(1_780_000_000_000 + i, f"electricity,site=tls-bad,unit={unit} current_ma={i}.5 "
                                           f"{1_780_000_000_000 + i}") for i in range(20)])
    sender = Sender(make_writer(proxy.url, kind), outbox, ErrorHandler(None, clock=clock), Policy(), clock=clock,
                    sleep=clock.sleep, rng=random.Random(3))
    try:
        result = sender.flush()
    finally:
        sender.writer.close()
    assert isinstance(result.error, UnreachableError), result
    assert result.delivered == 0
    assert outbox.stats().queue_depth == 20  # nothing marked delivered
    assert proxy.requests == 0  # no HTTP request, so no token, crossed the refused connection
    if options.get("cut_handshake"):
        assert proxy.handshakes_cut >= 1
    else:
        assert proxy.handshakes == 0 and proxy.handshake_failures >= 1
    if kind == "cloud":
        assert not any(dict(key[1]).get("unit") == unit for key in vm_series(victoria, "tls-bad"))
    outbox.close()
