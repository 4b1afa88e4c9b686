"""sdnotify.Notifier against real AF_UNIX datagram sockets (a path socket and an abstract one)."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import uuid

import pytest

from sdnotify import Notifier


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


def _drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on `sock`, without blocking."""
    sock.setblocking(False)
    out = []
    try:
        while True:
            out.append(sock.recv(65536))
    except BlockingIOError:
        return out


@pytest.fixture
def sock_dir():
    """A short directory: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer."""
    path = tempfile.mkdtemp(prefix="spb-notify-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def path_socket(sock_dir):
    path = os.path.join(sock_dir, "notify.sock")
    sock = _receiver(path)
    yield path, sock
    sock.close()


@pytest.fixture
def abstract_socket():
    name = f"spb-test-{uuid.uuid4().hex}"
    sock = _receiver("\0" + name)
    yield "@" + name, sock
    sock.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_each_call_is_exactly_one_datagram(kind, request):
    address, sock = request.getfixturevalue(f"{kind}_socket")
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.enabled
    assert n.ready("measuring 4 channels") is True
    assert n.status("line one\nline two") is True
    assert n.watchdog() is True
    assert n.notify("EXTEND_TIMEOUT_USEC=5000000", "STATUS=waiting for NTP") is True
    assert n.stopping() is True
    n.close()
    assert _drain(sock) == [
        b"READY=1\nSTATUS=measuring 4 channels",
        b"STATUS=line one line two",
        b"WATCHDOG=1",
        b"EXTEND_TIMEOUT_USEC=5000000\nSTATUS=waiting for NTP",
        b"STOPPING=1",
    ]


def test_reopens_after_close(path_socket):
    address, sock = path_socket
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.watchdog()
    n.close()
    assert n.watchdog()
    assert _drain(sock) == [b"WATCHDOG=1", b"WATCHDOG=1"]


def test_no_op_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for n in (Notifier({}), Notifier()):
        assert not n.enabled
        assert n.ready("x") is False
        assert n.status("x") is False
        assert n.watchdog() is False
        assert n.stopping() is False
        assert n.notify("A=1") is False
        assert n._sock is None  # not even a socket was created


def test_default_environ_is_os_environ(monkeypatch, path_socket):
    address, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert Notifier().watchdog()
    assert _drain(sock) == [b"WATCHDOG=1"]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WATCHDOG_USEC": "300000000"}, 150.0),
        ({"WATCHDOG_USEC": "1000000"}, 0.5),
        ({"WATCHDOG_USEC": "3"}, 1.5e-6),
        ({"WATCHDOG_USEC": "300000000", "WATCHDOG_PID": str(os.getpid())}, 150.0),
        ({"WATCHDOG_USEC": "300000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "300000000", "WATCHDOG_PID": "nonsense"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env, expected):
    interval = Notifier(env).watchdog_interval_s
    if expected is None:
        assert interval is None
    else:
        assert interval == pytest.approx(expected)


def test_send_errors_never_raise_and_warn_once(sock_dir, caplog):
    n = Notifier({"NOTIFY_SOCKET": os.path.join(sock_dir, "nobody-listens.sock")})
    assert n.enabled
    with caplog.at_level(logging.WARNING, logger="sdnotify"):
        assert n.ready("x") is False
        assert n.watchdog() is False
        assert n.stopping() is False
    warnings = [r for r in caplog.records if r.name == "sdnotify" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "nobody-listens.sock" in warnings[0].getMessage()


def test_send_error_on_abstract_socket_does_not_raise(caplog):
    n = Notifier({"NOTIFY_SOCKET": f"@spb-nobody-{uuid.uuid4().hex}"})
    with caplog.at_level(logging.WARNING, logger="sdnotify"):
        assert n.watchdog() is False
    assert "@spb-nobody-" in caplog.text


def test_recovers_when_the_socket_appears(sock_dir):
    path = os.path.join(sock_dir, "late.sock")
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.watchdog() is False
    sock = _receiver(path)
    try:
        assert n.watchdog() is True
        assert _drain(sock) == [b"WATCHDOG=1"]
    finally:
        sock.close()
