"""Starting like an appliance: boot checks that never block measuring, and the installer's entry point.

`boot_checks()` runs when the daemon starts (before the first cycle): config,
I2C bus, which sensors answer, state dir, disk space and clock. Each finding
is logged with its tier and shown on the LED; only a Critical one stops the
start, and the caller decides that. Whether InfluxDB is reachable is probed
in a background thread, so no network is needed to start measuring.

    sudo python autostart.py install      # = sudo ./install.sh
    sudo python autostart.py uninstall [--purge]
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clock import NOT_SYNCED
from rpi_errors import CriticalError, ErrorHandler, MeasuringError, ShortError, SilentError, SolarError, Tier

log = logging.getLogger(__name__)

LOW_DISK_MB = 100.0
_ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Finding:
    """One boot check. `error` is None when it passed."""

    name: str
    detail: str
    error: SolarError | None = None

    @property
    def tier(self) -> Tier | None:
        return None if self.error is None else self.error.tier


def boot_checks(config, *, bus, bus_note: str, store_path: Path, clock_trusted: bool,
                scan: Callable[[object], list[int]], store_error: str | None = None) -> list[Finding]:
    """Check what can be checked without the network (at every start, and by `main.py check`).

    `store_error` says why the store at `store_path` could not be opened (None: it was). Never raises
    for a finding.
    """
    findings = [
        Finding("config", f"{config.source}: {len(config.channels)} channels"),
        Finding("i2c", bus_note),
        Finding("store", f"{store_path} is writable") if store_error is None
        else Finding("store", store_error, CriticalError(store_error, key="store")),
    ]
    try:
        answering = set(scan(bus))
        findings.append(Finding("scan", "addresses answering: "
                                + (", ".join(f"0x{a:02X}" for a in sorted(answering)) or "none")))
    except OSError as exc:
        answering = set()
        findings.append(Finding("sensors", f"bus scan failed: {exc}", MeasuringError(f"I2C bus scan failed: {exc}")))
    for channel in config.channels:
        if channel.address in answering:
            findings.append(Finding(f"sensor {channel.name}", f"0x{channel.address:02X} answers"))
        else:
            text = f"{channel.name}: no INA219 answers at 0x{channel.address:02X} (check wiring and address jumpers)"
            findings.append(Finding(f"sensor {channel.name}", text, MeasuringError(text, key=f"measure:{channel.name}")))
    if store_error is None:
        findings.append(disk_finding(store_path.parent))
    if clock_trusted:
        findings.append(Finding("clock", "trusted"))
    else:
        findings.append(Finding("clock", NOT_SYNCED, ShortError(NOT_SYNCED, key="clock")))
    return findings


def disk_finding(path: Path, low_mb: float = LOW_DISK_MB) -> Finding:
    """Free space where the store lives; below `low_mb` MiB it is a Short error (the size cap still protects)."""
    from outbox import format_mb

    free = shutil.disk_usage(path).free
    free_mb = free / 1_048_576
    if free_mb < low_mb:
        text = f"only {format_mb(free)} free on the store's disk ({path})"
        return Finding("disk", text, ShortError(text, key="disk"))
    return Finding("disk", f"{format_mb(free)} free")


def report(findings: list[Finding], handler: ErrorHandler) -> bool:
    """Log every finding with its tier and hand problems to the LED. True when none is Critical."""
    for finding in findings:
        if finding.error is None:
            log.info("boot check %s: ok (%s)", finding.name, finding.detail)
        else:
            handler.report(finding.error)
    return all(f.tier != Tier.CRITICAL for f in findings)


def probe_influx(url: str, timeout_s: float, *, transport=None, ca_file: str = "") -> str | None:
    """GET {url}/ping (InfluxDB 1.x, 2.x and Cloud answer 204). None when reachable, else why not
    (a TLS failure says which: expired certificate, hostname mismatch, unknown issuer, ...).

    Through the writer's Transport when `transport` is given (its connection, kept alive, and its TLS
    session then serve the first flush: no second handshake at start-up), else through one of its own
    trusting `ca_file`. Either way a server that trickles or sends an endless page cannot hold the
    probe or fill memory."""
    from transport import Transport
    from rpi_errors import UnreachableError

    own = transport is None
    if own:
        transport = Transport(url, timeout_s, ca_file=ca_file)
    try:
        answer = transport.request("GET", "/ping", timeout_s=timeout_s)
    except UnreachableError as exc:
        return f"{url} is not reachable ({exc})"
    finally:
        if own:
            transport.close()
    if answer.status >= 500:
        return f"{url}/ping answered HTTP {answer.status}"
    if 200 <= answer.status < 300 and (answer.status != 204 or answer.body):
        return f"{url}/ping answered HTTP {answer.status} with a page, not InfluxDB's 204: a captive portal or proxy?"
    return None


def influx_finding(influx, timeout_s: float = 5.0) -> Finding:
    """The boot check of `[influx]` for `main.py check`: /ping answers (Silent when not: readings are kept).
    Within twice `timeout_s` (connect, then answer) whatever hangs: the Transport's deadlines do not reach
    a name lookup."""
    from transport import call_within

    timeout_s = min(influx.timeout_s, timeout_s)
    done, problem = call_within(lambda: probe_influx(influx.url, timeout_s, ca_file=influx.ca_file),
                                2 * timeout_s, name="influx-check")
    if not done:
        problem = f"{influx.url} is not reachable (no answer within {2 * timeout_s:g} s)"
    if problem:
        return Finding("influx", problem, SilentError(f"boot check influx: {problem}", key="boot:influx"))
    return Finding("influx", f"{influx.url} answers")


def start_influx_probe(url: str, timeout_s: float, handler: ErrorHandler, *, transport=None,
                       ca_file: str = "") -> threading.Thread:
    """Probe InfluxDB in the background (through the writer's `transport` when given); a failure is
    logged as Silent (the sender shows real delivery errors)."""

    def run() -> None:
        problem = probe_influx(url, timeout_s, transport=transport, ca_file=ca_file)
        if problem:
            handler.report(SilentError(f"boot check influx: {problem}; readings are kept until it is",
                                       key="boot:influx"))
        else:
            log.info("boot check influx: %s answers", url)

    thread = threading.Thread(target=run, name="influx-probe", daemon=True)
    thread.start()
    return thread


def _installer(args: list[str]) -> int:
    script = _ROOT / "install.sh"
    from credentials import SECRET_ENV_NAMES

    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV_NAMES}
    return subprocess.call(["bash", str(script), *args], env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autostart.py", description="install or remove the boot service")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="install and start the systemd service (as root; same as ./install.sh)")
    remove = sub.add_parser("uninstall", help="stop and remove the service; keeps data unless --purge")
    remove.add_argument("--purge", action="store_true", help="also remove /etc/solarpowerbrampton and the data")
    args = parser.parse_args(argv)
    if args.command == "install":
        return _installer([])
    return _installer(["--uninstall", *(["--purge"] if args.purge else [])])


if __name__ == "__main__":
    sys.exit(main())
