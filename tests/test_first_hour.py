"""The first hour of a new user: shipped configs run as shipped, the page is there at once, a terminal shows
what happens, the banner and the store's words are true."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import config as config_mod
from config import parse_config
from credentials import Secret, SecretError
from service import LOCAL_ONLY_MEANING, ServiceHooks, console_wanted
from outbox import Outbox, format_mb
from rpi_errors import BLINK_CODES, ErrorHandler

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ["config.example.toml", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.toml"))]
CONSOLE_LINE = re.compile(r"^\d\d:\d\d:\d\d  red_house [+-]\d+\.\d\d W \| green_house [+-]\d+\.\d\d W  -> (.*)$")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "STATE_DIRECTORY")}
    return {**env, "SOLAR_CONFIG": "", **extra}


def write_config(tmp_path, extra: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f"""
[sampling]
interval_s = 0.5
window_s = 0.1
[store]
dir = "{tmp_path / 'store'}"
[simulation]
enabled = true
scenario = "constant"
[led]
enabled = false
[[channel]]
name = "red_house"
address = 0x40
[[channel]]
name = "green_house"
address = 0x41
{extra}""")
    return path


# -- config files are not secrets -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_run_as_shipped_and_as_copied(name, tmp_path):
    copy = tmp_path / "copy.toml"
    shutil.copyfile(ROOT / name, copy)  # what `cp` makes with the usual umask
    copy.chmod(0o644)
    for path in (ROOT / name, copy):
        result = subprocess.run([sys.executable, str(ROOT / "main.py"), "once", "--config", str(path)],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120, env=clean_env())
        assert result.returncode == 0, f"{path}: {result.stderr}"
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_secret_files_stay_refused_when_group_or_others_can_read_them(tmp_path, mode):
    token = tmp_path / "token"
    token.write_text("s3cret")
    token.chmod(mode)
    with pytest.raises(SecretError) as err:
        Secret("INFLUXDB_TOKEN", str(token), environ={}).value()
    assert f"(mode {mode:04o}): run chmod 600 {token}" in str(err.value) and "s3cret" not in str(err.value)
    token.chmod(0o600)
    assert Secret("INFLUXDB_TOKEN", str(token), environ={}).value() == "s3cret"


# -- see it at once -------------------------------------------------------------------------------------------
def read_pty(master: int, proc: subprocess.Popen, deadline_s: float = 90) -> str:
    """Everything the child wrote to the terminal until it exited (bounded by a deadline)."""
    out = b""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=max(deadline - time.monotonic(), 1))
    return out.decode().replace("\r\n", "\n")


def run_on_a_terminal(tmp_path, env) -> tuple[str, str, int]:
    master, slave = pty.openpty()
    cfg = write_config(tmp_path)
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", "--cycles", "2", "--config", str(cfg)],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    try:
        text = read_pty(master, proc)
    finally:
        os.close(master)
    return text, proc.stderr.read().decode(), proc.returncode


def test_run_on_a_terminal_shows_one_compact_line_per_cycle(tmp_path):
    text, stderr, rc = run_on_a_terminal(tmp_path, clean_env())
    assert rc == 0, stderr
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 2, text
    for line in lines:
        match = CONSOLE_LINE.match(line)
        assert match, line
        assert match.group(1).startswith("stored on this Pi (")
    assert "stopped after 2 cycles" in stderr


@pytest.mark.slow  # whole daemon processes
def test_run_under_systemd_or_into_a_pipe_prints_no_cycle_lines(tmp_path):
    text, stderr, rc = run_on_a_terminal(tmp_path, clean_env(JOURNAL_STREAM="8:12345"))
    assert rc == 0 and text.strip() == "", text
    cfg = write_config(tmp_path)
    piped = subprocess.run([sys.executable, str(ROOT / "main.py"), "run", "--cycles", "1", "--config", str(cfg)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=90, env=clean_env())
    assert piped.returncode == 0 and piped.stdout == ""
    assert "stopped after 1 cycle\n" in piped.stderr  # one cycle, not "1 cycles"


def test_console_is_wanted_only_on_a_terminal_off_systemd(tmp_path):
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as tty, open(tmp_path / "f", "w") as plain:
            assert console_wanted(tty, {}) is True
            assert console_wanted(tty, {"JOURNAL_STREAM": "8:1"}) is False
            assert console_wanted(plain, {}) is False
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.slow  # whole daemon processes
def test_embedded_default_serves_the_page_on_8080_and_logs_its_url_once(tmp_path):
    default = config_mod.embedded_default()
    assert default.web.enabled and default.web.listen == "127.0.0.1:8080" and default.influx.kind == "none"
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env(), text=True)
    log = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("page on" in line for line in log):
            line = proc.stderr.readline()
            if not line:
                break
            log.append(line)
        assert any("live energy-flow page on http://127.0.0.1:8080/" in line for line in log), "".join(log)
        view = {}
        while time.monotonic() < deadline and not view.get("time_ms"):
            with urllib.request.urlopen("http://127.0.0.1:8080/api/now", timeout=5) as answer:
                view = json.loads(answer.read(1_000_000))
            time.sleep(0.2)
        # The banner tells the truth: no database is configured, so nothing is being sent.
        assert view["status"]["level"] == "ok" and view["status"]["meaning"] == LOCAL_ONLY_MEANING
        assert "sending" not in view["status"]["meaning"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    log.append(rest)
    assert proc.returncode == 0
    assert sum("http://127.0.0.1:8080/" in line for line in "".join(log).splitlines()) == 1, "".join(log)


def test_banner_says_sending_only_when_there_is_somewhere_to_send_to(tmp_path):
    local = parse_config({"influx": {"kind": "none"}})
    remote = parse_config({"influx": {"kind": "local", "api": "v1", "url": "http://127.0.0.1:8086", "database": "d"}})
    assert ServiceHooks(local, ErrorHandler(None), tmp_path).meaning(None) == LOCAL_ONLY_MEANING
    assert "storing on this Pi only" in LOCAL_ONLY_MEANING
    assert ServiceHooks(remote, ErrorHandler(None), tmp_path).meaning(None) == BLINK_CODES[None].meaning
    for tier in BLINK_CODES:  # a problem is a problem, with or without a database
        if tier is not None:
            assert ServiceHooks(local, ErrorHandler(None), tmp_path).meaning(tier) == BLINK_CODES[tier].meaning


# -- local-only storage ages out, it does not drop -----------------------------------------------------------
DAY_MS = 86_400_000


def test_local_only_history_ages_out_without_counting_as_dropped(tmp_path):
    now = 1_780_000_000_000
    old = [(now - 3 * DAY_MS + k, f"m f={k}i {now - 3 * DAY_MS + k}") for k in range(50)]
    new = [(now - 1000 + k, f"m f={k}i {now - 1000 + k}") for k in range(50)]
    for local_only, kept in ((True, 50), (False, 100)):
        box = Outbox(tmp_path / str(local_only), retention_days=1, wall_ms=lambda: now, local_only=local_only)
        box.append(old)
        box.append(new)
        assert box.enforce_limits() == 0
        stats = box.stats()
        # With a database, unsent readings are kept until delivered; without one they are history.
        assert stats.stored_total == kept and stats.queue_depth == kept and stats.dropped == 0
        box.close()


def test_local_only_size_cap_ages_the_oldest_out_and_a_real_queue_counts_drops(tmp_path):
    now = 1_780_000_000_000
    count = 10_000
    lines = [(now - 100_000 + k, f"m,channel=c field={k}i,pad=\"{'x' * 80}\" {now - 100_000 + k}")
             for k in range(count)]
    for local_only in (True, False):
        box = Outbox(tmp_path / str(local_only), max_mb=0.25, wall_ms=lambda: now, local_only=local_only)
        box.append(lines)
        dropped = box.enforce_limits()
        stats = box.stats()
        assert 0 < stats.stored_total < count and stats.size_bytes <= 0.25 * 1_048_576
        assert stats.queue_depth == stats.stored_total
        assert dropped == stats.dropped == (0 if local_only else count - stats.stored_total)
        # the newest survive
        assert list(box.export())[-1][0] == now - 100_000 + count - 1
        box.close()


@pytest.mark.parametrize("size,text", [(0, "0 MB"), (0.25 * 1_048_576, "0.25 MB"), (1_048_576 * 1.5, "1.5 MB"),
                                       (1_048_576 * 12.5, "12.5 MB"), (1_048_576 * 200, "200 MB"),
                                       (1_048_576 * 3, "3 MB"), (5000, "0.0048 MB")])
def test_sizes_read_as_mb_with_a_sensible_precision(size, text):
    assert format_mb(size) == text
