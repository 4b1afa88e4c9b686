"""The live page's HTTP server, for visitors standing at the model (no internet needed).

`FlowPage` serves a small read-only web site from a daemon thread
(stdlib ``http.server``): the page and its assets from ``web/``, the latest
snapshot as JSON (``/api/now``), a server-sent event stream that pushes every
new snapshot (``/api/events``) and the last hours of power per unit
(``/api/history``) read from the store, and the daemon's Prometheus metrics (``/metrics``).

The measuring loop calls ``update(snapshot)`` once per cycle; that only stores
the dict under a lock and wakes the event streams. Everything else (deriving
the flows (view.py), encoding JSON, reading the store (history.py)) happens in the server's threads.

Nothing here runs at import time, and no configuration value other than
channel and unit names and roles is ever put on the page.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from history import HISTORY_BUCKET_S, HISTORY_CACHE_S, History
from view import derive

log = logging.getLogger(__name__)

WEB_DIR_NAME = "web"  # next to this file: index.html, flow.js, style.css, favicon.svg

KEEPALIVE_S = 15.0
MAX_EVENT_CLIENTS = 16

_WHOLE_HOURS = re.compile(r"[0-9]{1,4}")
_STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


# -- the server ---------------------------------------------------------------------------------------------
def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen address {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


MAX_CONNECTIONS = 32  # page loads and API calls at once; the event streams have their own MAX_EVENT_CLIENTS
# A request's whole header (and the wait for it on a kept-alive connection) must arrive within this, however
# slowly a client trickles it (slowloris): a per-read timeout alone never fires for a byte every few seconds.
HEADER_DEADLINE_S = 10.0


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most MAX_CONNECTIONS page/API connections at once (a room full of
    phones must not exhaust a Pi Zero's threads). When they are all taken, the connection that has
    waited longest for its request header is closed to make room: slow clients cannot hold the page.
    An event stream gives its page slot back (the streams are capped by MAX_EVENT_CLIENTS)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # socketserver's 5 makes a burst of connections wait for SYN retries
    page: FlowPage

    def __init__(self, *args, header_deadline_s: float = HEADER_DEADLINE_S, **kwargs) -> None:
        self._stop_requested = False
        # stop_serving() ends the loop's select() with a byte. Made first: a failed bind calls server_close().
        self._wake_r, self._wake_w = socket.socketpair()
        super().__init__(*args, **kwargs)
        self.header_deadline_s = header_deadline_s
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self._holding: set = set()  # connections holding a page slot
        self._waiting: dict = {}  # connection -> monotonic time it began waiting for a request header

    def serve_until_stopped(self) -> None:
        """socketserver's serve_forever without its poll (ten wake-ups a second: 30 a cycle at the default
        interval, as much CPU as the cycle, for a page nobody may be watching): it sleeps in select() on the
        listening socket and the wake-up socket stop_serving() writes. Runs in the page's thread."""
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop_requested:
                for key, _ in selector.select():
                    if key.fileobj is self and not self._stop_requested:
                        self._handle_request_noblock()  # socketserver's own accept-and-dispatch

    def stop_serving(self) -> None:
        """End serve_until_stopped() (from any thread)."""
        self._stop_requested = True
        self._wake_w.send(b"\0")

    def server_close(self) -> None:
        super().server_close()
        self._wake_r.close()
        self._wake_w.close()

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._evict_oldest_waiting()
            if not self._slots.acquire(timeout=1.0):
                self.shutdown_request(request)
                return
        with self._lock:
            self._holding.add(request)
        try:
            super().process_request(request, client_address)
        except Exception:
            self.release_slot(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.waiting(request, False)
            self.release_slot(request)

    def release_slot(self, request) -> None:
        """Give `request`'s page slot back (idempotent): it ended or became an event stream."""
        with self._lock:
            if request not in self._holding:
                return
            self._holding.discard(request)
        self._slots.release()

    def waiting(self, request, on: bool) -> None:
        """Mark `request` as waiting for (or reading) a request header, or no longer."""
        with self._lock:
            if on:
                self._waiting[request] = time.monotonic()
            else:
                self._waiting.pop(request, None)

    def _evict_oldest_waiting(self) -> None:
        with self._lock:
            if not self._waiting:
                return
            oldest = min(self._waiting, key=self._waiting.__getitem__)
            del self._waiting[oldest]
        try:
            oldest.shutdown(socket.SHUT_RDWR)  # its thread wakes with EOF and gives its slot back
        except OSError:
            pass


class _DeadlineReader(io.RawIOBase):
    """The request's socket, read with a deadline for the whole header: each read may wait only for
    what is left of it. With no deadline set, reads wait `idle_s` (the handler's timeout). While the
    deadline is set (the header), at most MAX_HEADER_BYTES are read: http.server alone would take 100 lines
    of 64 KB each, and parse them with ~50 MB of memory per request."""

    MAX_HEADER_BYTES = 32768

    def __init__(self, sock: socket.socket, idle_s: float) -> None:
        super().__init__()
        self._sock = sock
        self._idle_s = idle_s
        self._deadline: float | None = None
        self._header_bytes = 0

    @property
    def deadline(self) -> float | None:
        return self._deadline

    @deadline.setter
    def deadline(self, value: float | None) -> None:
        self._deadline, self._header_bytes = value, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is None:
            self._sock.settimeout(self._idle_s)
        else:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request header deadline passed")
            if self._header_bytes >= self.MAX_HEADER_BYTES:
                raise ValueError(f"request header larger than {self.MAX_HEADER_BYTES // 1024} KB")
            self._sock.settimeout(min(left, self._idle_s))
            got = self._sock.recv_into(buffer)
            self._header_bytes += got
            return got
        return self._sock.recv_into(buffer)


class FlowPage:
    """The live energy-flow web site. See the module docstring.

    `channels`: the configured channels (.name, .role, .unit_name); `site`:
    the site name shown in the title; `history(since_ms)`: the store's
    export, (time_ms, line, status) oldest first, called from a server thread
    (give it its own connection); `plant_unit`: the unit the houses trade
    with; `clock`: Unix seconds; `metrics()`: (body, Content-Type) of `/metrics` (Prometheus), called in
    a server thread; None: no `/metrics`; `today()`: today's totals per unit (ledger.Today.totals), shown
    beside the diagram and in `/api/now` as `today`, called in a server thread; None: not shown.
    """

    def __init__(self, listen: str = "127.0.0.1:8080", *, channels: Sequence[Any], site: str,
                 history: Callable[[int], Iterable[tuple[int, str, str]]] | None = None,
                 plant_unit: str = "power_plant", clock: Callable[[], float] = time.time,
                 history_hours: int = 24, header_deadline_s: float = HEADER_DEADLINE_S,
                 metrics: Callable[[], tuple[bytes, str]] | None = None,
                 today: Callable[[], dict] | None = None) -> None:
        self._host, self._port = _parse_listen(listen)
        self.channels = tuple(channels)
        self.site = site
        self.plant_unit = plant_unit
        self.clock = clock
        self._history = History(history, self.channels, clock, history_hours) if history else None
        self.history_hours = history_hours
        self.header_deadline_s = header_deadline_s
        self.metrics = metrics
        self._today = today
        self._today_lock = threading.Lock()
        self._cond = threading.Condition()
        self._snapshot: dict | None = None
        self._version = 0
        self._derived: tuple[int, dict, bytes] | None = None
        self._derive_lock = threading.Lock()
        self._stopping = False
        self._event_clients = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._files: dict[str, tuple[float, bytes, str]] = {}
        self.web_dir = Path(__file__).resolve().parent / WEB_DIR_NAME

    # -- the caller's side ------------------------------------------------------------------------------
    def update(self, snapshot: dict) -> None:
        """Publish this cycle's snapshot (kept by reference: do not change it afterwards). Cheap."""
        with self._cond:
            self._snapshot = snapshot
            self._version += 1
            self._cond.notify_all()

    def start(self) -> None:
        """Bind and serve in a daemon thread. Raises OSError if the address is taken."""
        if self._server is not None:
            return
        server_class = _Server
        if ":" in self._host:
            server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        server = server_class((self._host, self._port), _Handler, header_deadline_s=self.header_deadline_s)
        server.page = self
        self._stopping = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_until_stopped, name="flow-page", daemon=True)
        self._thread.start()
        log.info("live energy-flow page on %s", self.url)

    def stop(self) -> None:
        """Stop serving (idempotent); open event streams end."""
        server = self._server
        if server is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        server.stop_serving()
        if self._thread is not None:
            self._thread.join(timeout=5)
        server.server_close()
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        """http://host:port/ as a browser on this machine reaches it."""
        host, port = self._host, self._port
        if self._server is not None:
            port = self._server.server_address[1]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    # -- the server's side ------------------------------------------------------------------------------
    def current(self) -> tuple[int, dict, bytes]:
        """(version, derived view, its JSON) of the latest snapshot, derived once per version."""
        with self._cond:
            version, snapshot = self._version, self._snapshot
        with self._derive_lock:
            if self._derived is None or self._derived[0] != version:
                view = derive(snapshot, self.channels, self.plant_unit, self.site)
                view["today"] = self.today_totals()
                view["version"] = version
                self._derived = (version, view, json.dumps(view, separators=(",", ":")).encode())
            return self._derived

    def wait_for_update(self, seen: int, timeout: float) -> int | None:
        """Block until the version differs from `seen` (returns it), or None on timeout / stop."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != seen or self._stopping, timeout)
            if self._stopping or self._version == seen:
                return None
            return self._version

    @property
    def stopping(self) -> bool:
        return self._stopping

    def enter_events(self) -> bool:
        with self._cond:
            if self._event_clients >= MAX_EVENT_CLIENTS:
                return False
            self._event_clients += 1
            return True

    def leave_events(self) -> None:
        with self._cond:
            self._event_clients -= 1

    def today_totals(self) -> dict | None:
        """Today's totals per unit (ledger.Today, cached there), or None when not shown or unreadable."""
        if self._today is None:
            return None
        try:
            with self._today_lock:
                return self._today()
        except Exception as exc:  # noqa: BLE001 - a store that cannot be read must not take the page down
            log.warning("flow page: cannot read today's totals: %s", exc)
            return None

    def history_json(self, hours: int) -> bytes | None:
        if self._history is None:
            return None
        return self._history.json(min(max(hours, 1), self._history.window_h))

    def static_file(self, name: str) -> tuple[bytes, str, str] | None:
        """(content, content type, etag) of web/<name>, or None. Re-read when the file changes."""
        if not _STATIC_NAME.match(name) or ".." in name:
            return None
        path = self.web_dir / name
        try:
            mtime = path.stat().st_mtime
            if not path.is_file():
                return None
            cached = self._files.get(name)
            if cached is None or cached[0] != mtime:
                data = path.read_bytes()
                cached = (mtime, data, '"' + hashlib.sha256(data).hexdigest()[:20] + '"')
                self._files[name] = cached
        except OSError:
            return None
        return cached[1], _CONTENT_TYPES.get(path.suffix, "application/octet-stream"), cached[2]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "flow-page"
    sys_version = ""
    timeout = 30  # an idle keep-alive connection, or a client that stopped reading, frees its thread

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    # -- methods ----------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._route(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._route(head=True)

    def _not_allowed(self) -> None:
        self.close_connection = True  # the request body (if any) is not read
        self._send(405, b"Read-only: only GET and HEAD.\n", "text/plain; charset=utf-8",
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed  # noqa: N815

    def setup(self) -> None:
        super().setup()
        self._reader = _DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        # The whole header, from the moment we wait for it, has HEADER_DEADLINE_S (slowloris).
        self._reader.deadline = time.monotonic() + self.server.header_deadline_s
        self.server.waiting(self.connection, True)
        try:
            # Any other method (e.g. PROPFIND) also gets 405, not http.server's 501.
            super().handle_one_request()
        except (ConnectionError, TimeoutError, ValueError):
            self.close_connection = True
        finally:
            self._header_done()

    def _header_done(self) -> None:
        self._reader.deadline = None
        self.server.waiting(self.connection, False)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self._header_done()  # the header is in: from here on the request is served, not evictable
        return ok

    def __getattr__(self, name: str):
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    # -- routing ----------------------------------------------------------------------------------------
    def _route(self, head: bool) -> None:
        page = self.server.page
        parts = urlsplit(self.path)
        path = parts.path
        try:
            if path in ("/", "/index.html"):
                self._file("index.html", head)
            elif path.startswith("/static/"):
                self._file(path[len("/static/"):], head)
            elif path == "/favicon.ico":
                self._file("favicon.svg", head, cache="public, max-age=86400")
            elif path == "/api/now":
                _, view, _ = page.current()
                body = json.dumps({**view, "server_time_ms": int(page.clock() * 1000)},
                                  separators=(",", ":")).encode()
                self._send(200, body, "application/json", head=head, cache="no-store")
            elif path == "/api/events":
                self._events(head)
            elif path == "/api/history":
                self._history(parse_qs(parts.query, keep_blank_values=True), head)
            elif path == "/metrics" and page.metrics is not None:
                body, content_type = page.metrics()
                self._send(200, body, content_type, head=head, cache="no-store")
            else:
                self._send(404, b"Not found.\n", "text/plain; charset=utf-8", head=head)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - a bug here must not take the page down
            log.exception("flow page: error answering %s", path)
            self._send(500, b"Internal error.\n", "text/plain; charset=utf-8", head=head)

    def _file(self, name: str, head: bool, cache: str = "no-cache") -> None:
        found = self.server.page.static_file(name)
        if found is None:
            self._send(404, b"Not found.\n", "text/plain; charset=utf-8", head=head)
            return
        data, content_type, etag = found
        if etag in (self.headers.get("If-None-Match") or ""):
            self._send(304, b"", None, head=True, cache=cache, extra={"ETag": etag})
            return
        self._send(200, data, content_type, head=head, cache=cache, extra={"ETag": etag})

    def _history(self, query: dict[str, list[str]], head: bool) -> None:
        page = self.server.page
        text = (query.get("hours") or [str(page.history_hours)])[0]
        # ASCII digits only ("²".isdigit() is True, and int() takes "٣"), within the window the page keeps.
        hours = int(text) if _WHOLE_HOURS.fullmatch(text) else 0
        if not 1 <= hours <= page.history_hours:
            message = f"hours must be a whole number from 1 to {page.history_hours}"
            self._send(400, json.dumps({"error": message}).encode(), "application/json", head=head,
                       cache="no-store")
            return
        try:
            body = page.history_json(hours)
        except Exception as exc:  # noqa: BLE001 - the store may be busy, locked or broken
            log.warning("flow page: cannot read the history: %s", exc)
            self._send(503, b'{"error":"the history cannot be read right now"}', "application/json",
                       head=head, cache="no-store", extra={"Retry-After": "60"})
            return
        if body is None:  # no store behind this page: say so (a 404 would be a console error)
            body = json.dumps({"available": False, "hours": hours, "bucket_s": HISTORY_BUCKET_S,
                               "series": []}).encode()
        self._send(200, body, "application/json", head=head, cache=f"max-age={int(HISTORY_CACHE_S)}")

    def _events(self, head: bool) -> None:
        page = self.server.page
        if head:
            self._send(200, b"", "text/event-stream", head=True, cache="no-store")
            return
        if not page.enter_events():
            self._send(503, b"Too many live viewers.\n", "text/plain; charset=utf-8", cache="no-store",
                       extra={"Retry-After": "30"})
            return
        self.server.release_slot(self.connection)  # streams are capped apart: page loads keep their slots
        try:
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.send_header("X-Accel-Buffering", "no")
            for key, value in _SECURITY_HEADERS.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(b"retry: 3000\n\n")
            seen = 0  # version 0: nothing published yet
            while not page.stopping:
                version, _, body = page.current()
                if version != seen:
                    seen = version
                    self.wfile.write(b"id: %d\ndata: %s\n\n" % (version, body))
                    self.wfile.flush()
                if page.wait_for_update(seen, KEEPALIVE_S) is None and not page.stopping:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
        except (ConnectionError, TimeoutError, OSError):
            pass
        finally:
            page.leave_events()

    def _send(self, status: int, body: bytes, content_type: str | None, *, head: bool = False,
              cache: str = "no-store", extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if status != 304:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        for key, value in {**_SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
