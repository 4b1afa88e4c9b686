"""The disk lies: a damaged store file, a full file system, a store that turns read-only mid-run.

Real parts: a real SQLite file with garbage bytes in it, a real 1 MB tmpfs filled by a real filler
file, a real ext4 file system (on a loop device) that the kernel turns read-only after an error, as an
SD card's does. Mounting needs root: off CI the tests that mount skip and say why; in CI they must run.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import daemon as daemon_mod
from config import parse_config
from daemon import Daemon, load_energy
from outbox import Outbox, StoreError
from rpi_errors import ErrorHandler, Tier
from servers import require
from simulator import build_simulated_bus
from tools import read_data
from health import SystemMonitor

ROOT = Path(__file__).resolve().parent.parent
_HOLD = 360  # daemon._MAX_UNSTORED_CYCLES: cycles held in memory while the store cannot be written


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def small_fs(tmp_path):
    """A real 1 MB tmpfs (needs root to mount)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = _run("mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt))
    if result.returncode != 0:
        require(f"cannot mount a 1 MB tmpfs here ({result.stderr.strip() or 'mount failed'}): needs root")
    yield mnt
    _run("umount", "-l", str(mnt))


def fill(directory: Path) -> Path:
    """A filler file taking every free byte of `directory`'s file system."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC: the file system is full
    return filler


def fake_daemon(store_dir, clock, **store):
    cfg = parse_config({"simulation": {"enabled": True, "scenario": "constant"},
                        "store": {"dir": str(store_dir), **store}})
    outbox = Outbox(cfg.store.dir, max_mb=cfg.store.max_mb, wall_ms=clock.wall_ms)
    reader = read_data(build_simulated_bus(cfg, clock), cfg.channels, cfg.sampling, energy=load_energy(outbox),
                       clock=clock, sleep=clock.sleep, wall_ms=clock.wall_ms)
    handler = ErrorHandler(None, clock=clock)
    daemon = Daemon(cfg, reader, outbox, handler, monitor=SystemMonitor(str(store_dir)), clock=clock,
                    wait=clock.wait)
    return daemon, outbox, handler


def cycles(daemon, clock, n):
    for _ in range(n):
        clock.advance(10)
        daemon.run_cycle()


# -- damage --------------------------------------------------------------------------------------------
def damage_schema_with_invalid_utf8(db: Path) -> None:
    """Garbage bytes in the schema's SQL text: SQLite's error message then quotes them, and Python's
    sqlite3 raises UnicodeDecodeError instead of an sqlite3.Error."""
    data = bytearray(db.read_bytes())
    at = data.find(b"CREATE TABLE points")
    assert at > 0
    data[at + 7:at + 12] = b"\xff\xfe\xc3\x28\xff"
    db.write_bytes(bytes(data))
    with pytest.raises(UnicodeDecodeError):  # what every command died of before
        sqlite3.connect(db).execute("SELECT 1 FROM points")


def write_config(tmp_path, store) -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[store]\ndir = "{store}"\n[simulation]\nenabled = true\nscenario = "constant"\n'
                   '[led]\nenabled = false\n[sampling]\ninterval_s = 0.1\nwindow_s = 0.02\nsamples = 2\n')
    cfg.chmod(0o600)
    return cfg


def main_py(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", ["run", "once", "check", "status", "export"])
def test_bytes_that_make_sqlites_error_text_invalid_utf8_are_a_corrupt_store_not_a_crash(tmp_path, command):
    store = tmp_path / "store"
    cfg = write_config(tmp_path, store)
    assert main_py("run", "--config", str(cfg), "--cycles", "2").returncode == 0
    damage_schema_with_invalid_utf8(store / "outbox.db")
    result = main_py(command, "--config", str(cfg), *(["--cycles", "2"] if command == "run" else []))
    assert "Traceback" not in result.stderr and "UnicodeDecodeError" not in result.stderr, result.stderr
    moved = sorted(p.name for p in store.glob("outbox.db.corrupt-*") if not p.name.endswith(("-wal", "-shm")))
    if command in ("status", "export"):
        # Readers never write: one line naming the store and what the daemon will do; the file stays.
        assert result.returncode == 1
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: the store {store / 'outbox.db'} is damaged (")
        assert "\\xff" in line and "moves it aside" in line
        assert moved == []
        return
    assert result.returncode == 0, result.stderr
    assert len(moved) == 1  # moved aside, kept for recovery
    assert "failed its integrity check" in result.stderr and "\\xff" in result.stderr
    fresh = Outbox(store, readonly=True)  # a fresh store, holding what this command stored
    assert fresh.stats().stored_total == {"run": 10, "once": 5, "check": 0}[command]
    fresh.close()


def test_damage_found_mid_run_starts_a_fresh_store_for_both_connections(tmp_path, caplog):
    store = tmp_path / "store"
    writer, reader = Outbox(store), Outbox(store, check_integrity=False)  # measuring and sender threads
    for i in range(200):
        writer.append([(i, f"m v={i} {i}")])
    assert writer.checkpoint()
    db = store / "outbox.db"
    data = bytearray(db.read_bytes())
    data[8192:24576] = b"\xff\xc3" * 8192  # garbage over the table's pages
    with open(db, "r+b") as f:
        f.write(data)
    with pytest.raises(StoreError) as err:
        reader.pending(10, 100_000)
    assert err.value.corrupt and "a fresh store was started" in str(err.value)
    writer.append([(1, "after v=1 1")])  # the other connection follows to the fresh file
    assert [p.line for p in reader.pending(10, 100_000)] == ["after v=1 1"]
    assert len([p for p in store.glob("outbox.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]) == 1
    assert "failed its integrity check" in caplog.text
    writer.close()
    reader.close()


# -- disk full -----------------------------------------------------------------------------------------
def test_disk_full_holds_cycles_in_memory_shows_critical_and_stores_them_later(small_fs, clock):
    daemon, outbox, handler = fake_daemon(small_fs / "store", clock)
    cycles(daemon, clock, 2)
    filler = fill(small_fs)
    cycles(daemon, clock, 200)
    assert handler.top_tier == Tier.CRITICAL
    assert "cannot store readings" in handler.active["store"].message
    assert daemon.held_cycles > 150  # the WAL's spare room took a few; the rest waits in memory
    filler.unlink()  # space again
    cycles(daemon, clock, 1)
    assert "store" not in handler.active and handler.top_tier != Tier.CRITICAL
    # Every cycle measured while full landed (before: the WAL grew into the freed space, 38 of 200 stored).
    assert outbox.stats().stored_total == (2 + 200 + 1) * 5
    assert daemon.lost_cycles == 0 and outbox.stats().dropped == 0
    outbox.close()


@pytest.mark.slow  # 400 cycles on a full filesystem
def test_beyond_the_memory_hold_each_lost_cycle_is_counted_and_logged(small_fs, clock, caplog):
    daemon, outbox, handler = fake_daemon(small_fs / "store", clock)
    cycles(daemon, clock, 2)
    filler = fill(small_fs)
    stored_before = outbox.stats().stored_total
    cycles(daemon, clock, _HOLD + 40)
    full_stored = outbox.stats().stored_total - stored_before  # the WAL's spare room may take a few
    lost = _HOLD + 40 - full_stored // 5 - _HOLD
    assert lost > 0 and daemon.lost_cycles == lost
    assert caplog.text.count("lost the oldest held cycle") == lost
    filler.unlink()
    cycles(daemon, clock, 1)
    stats = outbox.stats()
    assert stats.stored_total == (2 + _HOLD + 40 + 1 - lost) * 5
    assert stats.dropped == lost * 5  # counted in the store (and in the next system points)
    outbox.close()


@pytest.mark.slow
def test_a_store_on_a_1_mb_file_system_runs_for_hours(small_fs, clock):
    """Three hours at 10 s: the WAL stays small (SQLite's default lets it reach about 4 MB), so a
    max_mb that fits the card is all it takes; the cap then drops the oldest, counted."""
    daemon, outbox, handler = fake_daemon(small_fs / "store", clock, max_mb=0.5)
    wal = small_fs / "store" / "outbox.db-wal"
    biggest_wal = 0
    for _ in range(3 * 360):
        cycles(daemon, clock, 1)
        assert daemon.last_store_ok, handler.active
        biggest_wal = max(biggest_wal, wal.stat().st_size if wal.exists() else 0)
    stats = outbox.stats()
    assert stats.stored_total + stats.dropped == daemon.cycles_done * 5  # every point stored or counted
    assert biggest_wal <= 256 * 1024
    assert handler.top_tier != Tier.CRITICAL
    outbox.close()


def stored_total(store: Path) -> int:
    """Points in the store, read as `status` does; 0 before the daemon created it."""
    try:
        box = Outbox(store, readonly=True)
    except StoreError:
        return 0
    try:
        return box.stats().stored_total
    finally:
        box.close()


@pytest.mark.parametrize("under", ["terminal", "systemd"])
def test_shutdown_while_the_store_is_full_logs_exactly_how_many_cycles_were_not_stored(small_fs, tmp_path, under):
    store = small_fs / "store"
    cfg = write_config(tmp_path, store)
    env = {**os.environ, "SOLAR_CONFIG": ""}
    if under == "systemd":
        env["JOURNAL_STREAM"] = "8:1234"  # what systemd sets: the log drops its own timestamps
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=log_file, env=env)
        try:
            deadline = time.monotonic() + 60
            while stored_total(store) < 10:
                assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
                time.sleep(0.05)
            fill(small_fs)
            while "cannot store readings" not in log_path.read_text():
                assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert "Traceback" not in text
    lines = text.strip().splitlines()
    done = int(lines[-1].rsplit("stopped after ", 1)[1].split()[0])  # the final line stays
    stored_cycles = stored_total(store) // 5
    (lost_line,) = [line for line in lines if "held cycles" in line and "could not be stored" in line]
    not_stored = int(lost_line.split("stopping with ", 1)[1].split()[0])
    assert not_stored >= 1 and stored_cycles + not_stored == done, text[-3000:]
    assert lines[-1].startswith("INFO __main__: stopped after" if under == "systemd" else "20")


# -- read-only -----------------------------------------------------------------------------------------
@pytest.fixture
def card(tmp_path):
    """A real ext4 file system on a loop device, mounted with errors=remount-ro like a Pi's SD card.

    Yields (mount point, go_read_only(), mount_again()): go_read_only() makes the kernel turn it
    read-only under the open store (the 'emergency_ro' an I/O error causes); mount_again() is the
    technician's fix: a checked copy of the card mounted at the same place."""
    image, mnt = tmp_path / "card.img", tmp_path / "card"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    if _run("mkfs.ext4", "-q", "-F", str(image)).returncode != 0:
        require("mkfs.ext4 failed (package e2fsprogs)")
    result = _run("mount", "-o", "loop,errors=remount-ro", str(image), str(mnt))
    if result.returncode != 0:
        require(f"cannot mount an ext4 image on a loop device here ({result.stderr.strip()}): needs root")
    mounted = [str(mnt)]
    device = next(line.split()[0] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1] == str(mnt))
    trigger = Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error")

    def go_read_only():
        if not trigger.exists():
            require(f"{trigger} is missing: this kernel cannot turn ext4 read-only on demand")
        trigger.write_text("test: the card failed")

    def mount_again():
        _run("umount", "-l", str(mnt))
        copy = tmp_path / "card-fixed.img"
        shutil.copy(image, copy)
        _run("e2fsck", "-p", "-f", str(copy))
        result = _run("mount", "-o", "loop", str(copy), str(mnt))
        assert result.returncode == 0, result.stderr

    yield mnt, go_read_only, mount_again
    for _ in range(2):
        _run("umount", "-l", str(mnt))


def test_store_turning_read_only_mid_run_keeps_measuring_and_stores_the_held_cycles_once_writable(card, clock):
    mnt, go_read_only, mount_again = card
    daemon, outbox, handler = fake_daemon(mnt / "store", clock)
    cycles(daemon, clock, 5)
    go_read_only()
    with pytest.raises(OSError) as err:
        (mnt / "probe").write_text("x")
    assert err.value.errno == 30  # EROFS: really read-only now
    cycles(daemon, clock, 50)
    assert handler.top_tier == Tier.CRITICAL and "cannot store readings" in handler.active["store"].message
    assert daemon.held_cycles == 50 and daemon.cycles_done == 55  # measuring went on
    mount_again()
    # The store's connection is opened anew every _REOPEN_EVERY_FAILURES failed cycles: within that many
    # cycles of the card coming back, every held cycle lands.
    after = 0
    while "store" in handler.active and after <= daemon_mod._REOPEN_EVERY_FAILURES:
        cycles(daemon, clock, 1)
        after += 1
    assert "store" not in handler.active and after <= daemon_mod._REOPEN_EVERY_FAILURES
    stats = outbox.stats()
    assert stats.stored_total == (55 + after) * 5 and stats.dropped == 0  # the 5 before, and every held one
    assert daemon.store_held_at_exit() == 0
    outbox.close()


def test_held_cycles_are_tried_once_more_at_shutdown(small_fs, clock, caplog):
    daemon, outbox, handler = fake_daemon(small_fs / "store", clock)
    cycles(daemon, clock, 2)
    filler = fill(small_fs)
    cycles(daemon, clock, 100)
    held = daemon.held_cycles
    assert held > 50
    with caplog.at_level(logging.INFO):
        filler.unlink()
        assert daemon.store_held_at_exit() == 0  # space came back just before the stop
    assert f"stored the {held} held cycles before stopping" in caplog.text
    assert outbox.stats().stored_total == 102 * 5
    outbox.close()
