"""Shared fixtures: a fake clock (tests never sleep for real) and the project on sys.path."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# `slow` (README "Tests and CI": ./test.sh -m "not slow"): every test using a real server, and these files
# whole (git, venv and installer runs, a browser, whole daemon processes under kill -9 and outages).
SERVER_FIXTURES = {"influxdb1", "victoria", "own_influxdb1", "own_victoria", "make_proxy"}
SLOW_FILES = {"test_end_to_end.py", "test_install.py", "test_network_lies.py", "test_page_screens.py",
              "test_servers.py", "test_updater.py", "test_mqtt_output.py"}


PINNED_DAY = "speed = 600\nstart = 2026-06-21T11:00:00  # pinned: the same sun whatever the hour CI runs"


def simulated_config(path: Path, site: str, store: Path, *, interval_s: float, simulation: str = PINNED_DAY,
                     tables: str = "") -> Path:
    """A config for the real daemon on the simulated model (0.05 s window, no LED), written 0600:
    `simulation` is the [simulation] table's lines besides `enabled`, `tables` what follows [led]."""
    path.write_text(f"""
[site]
name = "{site}"
[sampling]
interval_s = {interval_s}
window_s = 0.05
[store]
dir = "{store}"
[simulation]
enabled = true
{simulation}
[led]
enabled = false
{tables}""")
    path.chmod(0o600)
    return path


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


class FakeClock:
    """Monotonic seconds that only move when told; `sleep` and `wait` advance it."""

    def __init__(self, start: float = 1000.0, wall_start_s: float = 1_780_000_000.0) -> None:
        self.now = start
        self.wall_offset = wall_start_s - start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(seconds, 0.0)

    def wait(self, seconds: float) -> bool:
        self.sleep(seconds)
        return False

    def wall_ms(self) -> int:
        return round((self.now + self.wall_offset) * 1000)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- real servers (tests/servers.py) and the fault-injecting proxy (tests/proxy.py) --------------------------
# Skipped with a visible reason when influxd / victoria-metrics are missing; a failure instead when CI=true.

@pytest.fixture(scope="session")
def influxdb1():
    """One InfluxDB 1.6.7 for the whole session (create your own database names per test)."""
    from servers import InfluxDB1, require_binaries

    require_binaries()
    with InfluxDB1() as server:
        yield server


@pytest.fixture(scope="session")
def victoria():
    """One VictoriaMetrics 1.79.5 for the whole session (use victoria.delete_all() or unique metric names)."""
    from servers import VictoriaMetrics, require_binaries

    require_binaries()
    with VictoriaMetrics() as server:
        yield server


@pytest.fixture(scope="module")
def own_influxdb1():
    """A private InfluxDB 1.6.7 for one module, with a database "test": its tests may stop, restart or pause it."""
    from servers import InfluxDB1, require_binaries

    require_binaries()
    with InfluxDB1() as server:
        server.create_database("test")
        yield server


@pytest.fixture(scope="module")
def own_victoria():
    """A private VictoriaMetrics for one module: its tests may stop, restart or pause it."""
    from servers import VictoriaMetrics, require_binaries

    require_binaries()
    with VictoriaMetrics() as server:
        yield server


@pytest.fixture(scope="module")
def http():
    """A urllib3 pool without retries (a test sees every answer), short timeouts."""
    import urllib3

    with urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2, read=5)) as pm:
        yield pm


@pytest.fixture
def make_proxy():
    """Factory: make_proxy(upstream_url) -> a started FaultProxy, stopped after the test."""
    from proxy import FaultProxy

    proxies = []

    def factory(upstream_url: str, **kwargs) -> FaultProxy:
        proxy = FaultProxy(upstream_url, **kwargs).start()
        proxies.append(proxy)
        return proxy

    yield factory
    for proxy in proxies:
        proxy.stop()
