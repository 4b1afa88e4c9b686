"""The README's fault table, row by row, where no other test file already proves the row."""
from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import main as main_mod
from config import parse_config
from local_solution import make_writer
from daemon import Daemon, load_energy
from outbox import Outbox
from rpi_errors import ErrorHandler, Tier, UnreachableError
from sender import Policy, Sender
from simulator import build_simulated_bus
from servers import free_port, wait_stopped
from tools import read_data
from health import SystemMonitor

ROOT = Path(__file__).resolve().parent.parent
BAD = sorted((Path(__file__).parent / "bad_configs").glob("*.toml"))


def test_the_corpus_has_at_least_30_broken_files():
    assert len(BAD) >= 30


@pytest.mark.parametrize("source", BAD, ids=[p.stem for p in BAD])
def test_each_broken_config_is_one_line_naming_the_key_and_exit_78(source, tmp_path, capsys):
    header = source.read_text().splitlines()
    expect = header[0].removeprefix("# expect: ")
    hidden = header[1].removeprefix("# never shown: ") if header[1].startswith("# never shown: ") else None
    path = tmp_path / source.name
    shutil.copy(source, path)
    path.chmod(0o600)
    assert main_mod.main(["check", "--config", str(path)]) == 78
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{path}: ") and expect in err[0], err
    assert hidden is None or hidden not in err[0], err  # a password in the value is not quoted back


def test_broken_config_through_the_real_cli_has_no_traceback(tmp_path):
    path = tmp_path / "bad.toml"
    shutil.copy(BAD[0], path)
    path.chmod(0o600)
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "run", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78 and "Traceback" not in result.stderr


def test_world_readable_token_file_is_refused_at_start(tmp_path):
    token = tmp_path / "token"
    token.write_text("secret-token-value")
    token.chmod(0o644)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[influx]\nkind = "local"\nurl = "http://127.0.0.1:9"\norg = "o"\nbucket = "b"\n'
                   f'token_file = "{token}"\n[store]\ndir = "{tmp_path / "s"}"\n')
    cfg.chmod(0o600)
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "run", "--config", str(cfg), "--simulate"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert f"at 'influx.token_file': secret file {token} is readable by others (mode 0644)" in result.stderr
    assert "secret-token-value" not in result.stderr


def fake_daemon(tmp_path, clock, **doc):
    cfg = parse_config({"simulation": {"enabled": True, "scenario": "constant"},
                        "store": {"dir": str(tmp_path / "store")}, **doc})
    outbox = Outbox(cfg.store.dir, max_mb=cfg.store.max_mb, wall_ms=clock.wall_ms)
    reader = read_data(build_simulated_bus(cfg, clock), cfg.channels, cfg.sampling, energy=load_energy(outbox),
                       clock=clock, sleep=clock.sleep, wall_ms=clock.wall_ms)
    handler = ErrorHandler(None, clock=clock)
    return Daemon(cfg, reader, outbox, handler, monitor=SystemMonitor(str(tmp_path)), clock=clock,
                  wait=clock.wait), outbox, handler


def test_influxdb_down_for_hours_then_everything_arrives_oldest_first(tmp_path, clock, victoria, make_proxy):
    daemon, outbox, handler = fake_daemon(tmp_path, clock, site={"name": "hours-outage"})
    proxy = make_proxy(victoria.url)

    def writer(url):
        cfg = parse_config({"influx": {"kind": "local", "api": "v2", "url": url, "org": "o", "bucket": "b"}})
        return make_writer(cfg.influx, environ={"INFLUXDB_TOKEN": "t"})

    # nothing listens: like a dead link (refused at once, so six hours of retries run quickly)
    sender = Sender(writer(f"http://127.0.0.1:{free_port()}"), Outbox(tmp_path / "store"), handler, Policy(),
                    clock=clock, sleep=clock.sleep)
    waits = []
    start = clock()
    end = start + 6 * 3600  # six hours with a 10 s interval: 2160 cycles
    while clock() < end:
        clock.now = start + daemon.cycles_done * 10  # the next slot of the 10 s grid
        daemon.run_cycle()
        if clock() >= sender.next_attempt_s:
            result = sender.flush()
            assert isinstance(result.error, UnreachableError)
            waits.append(sender.next_attempt_s - clock())
    assert handler.top_tier == Tier.CONNECTION
    assert max(waits) <= 300 and len(waits) > 60  # retried at least every 5 minutes, all along
    stored = outbox.stats().stored_total
    assert stored == daemon.cycles_done * 5 and outbox.stats().queue_depth == stored  # measuring went on
    sender.writer = writer(proxy.url)  # the link is back
    clock.advance(300)
    while sender.flush().delivered:
        pass
    assert outbox.stats().queue_depth == 0 and handler.top_tier is None
    stamps = [int(line.rsplit(" ", 1)[1]) for body in proxy.decoded_bodies() for line in body.splitlines()]
    assert len(stamps) == stored and stamps == sorted(stamps)


def test_size_cap_drops_oldest_and_reports_it_in_system_points(tmp_path, clock):
    daemon, outbox, _ = fake_daemon(tmp_path, clock, store={"dir": str(tmp_path / "store"), "max_mb": 0.05})
    daemon.run(cycles=200)
    stats = outbox.stats()
    # The cap counts every page, also the three the schema adds whatever the readings (the ledger's daily_totals
    # table, the migration record and the index of lines held for the clock, store_schema.py): at a 50 KB cap
    # they are 12 KB of it.
    fixed = 3 * outbox._db.execute("PRAGMA page_size").fetchone()[0]
    assert stats.dropped > 0 and stats.size_bytes <= 0.05 * 1024 * 1024 * 1.1 + fixed
    dropped_fields = [int(line.split("dropped_points=")[1].split("i")[0])
                      for _, line, _ in outbox.export() if line.startswith("system,")]
    assert max(dropped_fields) > 0


def test_a_health_reading_that_fails_leaves_the_cycle_stored_without_its_system_point(tmp_path, clock):
    """The Pi's health is read from the store's directory too (free space): when that read fails (the
    directory's file system gone, say), the cycle's readings are still stored and the loop goes on."""
    daemon, outbox, handler = fake_daemon(tmp_path, clock)
    daemon.monitor = SystemMonitor(str(tmp_path / "no-such-directory"))
    for _ in range(3):
        daemon.run_cycle()
    lines = [line for _, line, _ in outbox.export()]
    assert len(lines) == 3 * 4 and all(line.startswith("electricity,") for line in lines)
    assert daemon.last_system is None and daemon.cycles_done == 3 and handler.top_tier is None


@pytest.mark.slow
def test_power_loss_mid_transaction_keeps_every_committed_cycle(tmp_path):
    """kill -9 with a copy of the DB files taken while the daemon is frozen at a random moment,
    as a power cut would leave them: every copy opens cleanly and holds only whole cycles."""
    store = tmp_path / "store"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[store]\ndir = "{store}"\n[simulation]\nenabled = true\nscenario = "constant"\n'
                   '[led]\nenabled = false\n[sampling]\ninterval_s = 0.05\nwindow_s = 0.01\nsamples = 2\n')
    cfg.chmod(0o600)
    import random

    rng = random.Random(5)
    totals = []
    for attempt in range(12):
        proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.8, 1.6))
        proc.send_signal(signal.SIGSTOP)  # the instant the power goes
        wait_stopped(proc.pid)  # really frozen before the copy: SIGSTOP lands asynchronously
        snapshot = tmp_path / f"snap{attempt}"
        snapshot.mkdir()
        for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm"):
            if (store / name).exists():
                shutil.copy(store / name, snapshot / name)
        proc.kill()
        proc.wait(10)
        db = sqlite3.connect(snapshot / "outbox.db")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        total = db.execute("SELECT count(*) FROM points").fetchone()[0]
        db.close()
        assert total % 5 == 0  # whole cycles only: a cycle is one transaction
        totals.append(total)
        box = Outbox(snapshot)  # and the daemon's own open path accepts it without moving it aside
        assert box.stats().stored_total == total
        assert not list(snapshot.glob("*.corrupt-*"))
        box.close()
    assert totals == sorted(totals) and totals[-1] > totals[0]  # each restart continued the same store
