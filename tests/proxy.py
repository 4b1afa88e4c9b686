"""FaultProxy: a small HTTP/1.1 reverse proxy on 127.0.0.1 that counts, records and breaks traffic.

Put it between a client and a real server (tests/servers.py) to see exactly what the client sends and to
return statuses the real servers never produce (401, 403, 404, 413, 422, 429 + Retry-After, 503...):

    with FaultProxy(vm.url) as proxy:
        proxy.fail_next(429, headers={"Retry-After": "1"})
        ... client writes to proxy.url ...
        assert proxy.requests == 2 and proxy.log[0].status == 429

Stdlib only. Keep-alive connections from the client are supported (protocol HTTP/1.1, every response
carries Content-Length unless the status forbids a body). Each forwarded request opens a fresh upstream
connection; upstream chunked replies are de-chunked and relayed with a Content-Length.
When the upstream cannot be reached the proxy answers 502 (like a real reverse proxy).
"""
from __future__ import annotations

import gzip
import http.client
import http.server
import json
import socket
import struct
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["FaultProxy", "LoggedRequest", "Rule"]

# Hop-by-hop headers (RFC 7230 6.1) plus the ones the proxy recomputes.
_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "trailers", "transfer-encoding", "upgrade", "content-length", "host", "expect"}


def _decode(body: bytes, encoding: str | None) -> bytes:
    enc = (encoding or "").strip().lower()
    if enc in ("gzip", "x-gzip"):
        return gzip.decompress(body)
    if enc == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)
    return body


@dataclass
class LoggedRequest:
    """One request as the client sent it, and what the proxy answered."""
    method: str
    path: str                     # path + "?" + query, as on the request line
    headers: dict[str, str]       # names as sent by the client
    body: bytes                   # raw (still gzip when Content-Encoding: gzip)
    bytes_in: int                 # request line + headers + body, as received
    status: int | None = None     # status sent back to the client (None: connection dropped)
    injected: bool = False        # True when a fault rule answered instead of the upstream
    time: float = field(default_factory=time.monotonic)

    def header(self, name: str, default: str | None = None) -> str | None:
        """Case-insensitive header lookup."""
        low = name.lower()
        for k, v in self.headers.items():
            if k.lower() == low:
                return v
        return default

    @property
    def decoded_body(self) -> bytes:
        try:
            return _decode(self.body, self.header("Content-Encoding"))
        except (OSError, EOFError, zlib.error):
            return self.body

    @property
    def text(self) -> str:
        return self.decoded_body.decode("utf-8", errors="replace")

    @property
    def query(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query, keep_blank_values=True))


@dataclass
class Rule:
    """A canned response. `remaining` None = unlimited; `predicate(text)` None = every request."""
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    remaining: int | None = 1
    predicate: Callable[[str], bool] | None = None
    hits: int = 0
    on_request: bool = False  # predicate takes the LoggedRequest (headers too), not the body text


class _CountingReader:
    """Wraps the connection's rfile and counts every byte read from the client."""

    def __init__(self, raw) -> None:
        self._raw = raw
        self.count = 0

    def readline(self, limit: int = -1) -> bytes:
        data = self._raw.readline(limit)
        self.count += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.count += len(data)
        return data

    def close(self) -> None:
        self._raw.close()

    def __getattr__(self, name):
        return getattr(self._raw, name)


def _as_body(body: bytes | str | dict | list | None, headers: dict[str, str]) -> bytes:
    if body is None:
        return b""
    if isinstance(body, (dict, list)):
        headers.setdefault("Content-Type", "application/json")
        return json.dumps(body).encode()
    if isinstance(body, str):
        headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        return body.encode()
    return bytes(body)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    # -- connection set-up --------------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.rfile = _CountingReader(self.rfile)
        self.server.proxy._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._track(self.connection, add=False)

    def handle(self) -> None:
        if self.server.proxy._refusing:
            self._reset()
            return
        super().handle()

    def handle_one_request(self) -> None:
        self._start_count = self.rfile.count
        super().handle_one_request()

    def _reset(self) -> None:
        """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
        proxy = self.server.proxy
        with proxy._lock:
            proxy.refused += 1
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close_connection = True
        try:
            self.connection.close()
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - keep the test output quiet
        pass

    # -- requests -------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _proxy(self) -> None:
        proxy = self.server.proxy
        if proxy._refusing:  # e.g. the next request on an idle keep-alive connection
            self._reset()
            return
        body = self._read_body()
        entry = LoggedRequest(method=self.command, path=self.path, headers=dict(self.headers.items()),
                              body=body, bytes_in=self.rfile.count - self._start_count)
        with proxy._lock:
            proxy.requests += 1
            proxy.bytes_in += entry.bytes_in
            proxy.log.append(entry)
            proxy._cond.notify_all()
        rule = proxy._match(entry)
        delay = proxy._delay
        if delay > 0 and proxy._stopping.wait(delay):
            self.close_connection = True
            return
        if rule is not None:
            entry.injected = True
            self._respond(entry, rule.status, list(rule.headers.items()), rule.body)
            return
        try:
            status, headers, rbody = proxy._forward(self.command, self.path, self.headers, body)
        except (OSError, http.client.HTTPException) as e:
            msg = f"FaultProxy: upstream {proxy.upstream} unreachable: {e!r}\n".encode()
            self._respond(entry, 502, [("Content-Type", "text/plain; charset=utf-8")], msg)
            return
        self._respond(entry, status, headers, rbody)

    def _respond(self, entry: LoggedRequest, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        entry.status = status
        try:
            self.send_response(status)
            for k, v in headers:
                if k.lower() in _HOP or k.lower() in ("date", "server"):
                    if not (k.lower() == "content-length" and self.command == "HEAD"):
                        continue
                self.send_header(k, v)
            no_body = status in (204, 304) or 100 <= status < 200 or self.command == "HEAD"
            if not no_body:
                self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if not no_body and body:
                self.wfile.write(body)
            self.wfile.flush()
        except OSError:  # client went away (e.g. it timed out during delay())
            entry.status = None
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _proxy


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: "FaultProxy"


class FaultProxy:
    """Threaded HTTP/1.1 proxy from `url` (127.0.0.1, free port) to `upstream` (e.g. "http://127.0.0.1:8086").

    Counters (what CLIENTS sent): `requests`, `bytes_in` (request line + headers + body, exactly as
    received), `refused` (connections reset by refuse()); `log` holds a LoggedRequest per request.
    Fault rules are tried in the order they were added; the first that matches answers the request
    instead of the upstream. `clear()` drops rules, delay and refuse; `reset_counts()` zeroes the counters
    and empties `log`.
    """

    # What start() builds; tests/tls.py's TLSProxy swaps in a TLS-terminating server and handler.
    server_class: type = _Server
    handler_class: type = _Handler

    def __init__(self, upstream: str, *, port: int = 0, upstream_timeout: float = 30.0) -> None:
        u = urllib.parse.urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self._up_host = u.hostname
        self._up_port = u.port or 80
        self._up_prefix = u.path.rstrip("/")
        self._up_netloc = u.netloc
        self.upstream_timeout = upstream_timeout
        self._port = port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._rules: list[Rule] = []
        self._delay = 0.0
        self._refusing = False
        self.requests = 0
        self.bytes_in = 0
        self.refused = 0
        self.log: list[LoggedRequest] = []

    # -- life cycle ---------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FaultProxy not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = self.server_class(("127.0.0.1", self._port), self.handler_class)
        self._httpd.proxy = self
        self._port = self._httpd.server_address[1]  # a restart keeps the port
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"FaultProxy:{self._port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd = self._httpd
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # wake handler threads blocked on idle keep-alive connections
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._httpd else "stopped"
        return f"<FaultProxy {where} -> {self.upstream} requests={self.requests} bytes_in={self.bytes_in}>"

    # -- counters ---------------------------------------------------------------------------------------
    def reset_counts(self) -> None:
        with self._lock:
            self.requests = 0
            self.bytes_in = 0
            self.refused = 0
            self.log.clear()

    def decoded_bodies(self) -> list[str]:
        """Request bodies as text, gunzipped when Content-Encoding is gzip (deflate too)."""
        with self._lock:
            entries = list(self.log)
        return [e.text for e in entries]

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least `n` requests arrived (for clients that write from background threads)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.requests < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # -- faults -------------------------------------------------------------------------------------------
    def fail_next(self, status: int, count: int = 1, body: bytes | str | dict | None = b"",
                  headers: dict[str, str] | None = None) -> Rule:
        """The next `count` requests get `status` (+ body/headers) without reaching the upstream."""
        return self._add(Rule(status, remaining=count, predicate=None, **self._canned(body, headers)))

    def fail_always(self, status: int, body: bytes | str | dict | None = b"",
                    headers: dict[str, str] | None = None) -> Rule:
        """Every request gets `status` until clear()."""
        return self._add(Rule(status, remaining=None, predicate=None, **self._canned(body, headers)))

    def fail_when(self, predicate: Callable[[str], bool], status: int, body: bytes | str | dict | None = b"",
                  headers: dict[str, str] | None = None, count: int | None = None) -> Rule:
        """Requests whose decoded body text makes `predicate` true get `status` (at most `count` times)."""
        return self._add(Rule(status, remaining=count, predicate=predicate, **self._canned(body, headers)))

    def fail_when_request(self, predicate: Callable[[LoggedRequest], bool], status: int,
                          body: bytes | str | dict | None = b"", headers: dict[str, str] | None = None) -> Rule:
        """Requests for which `predicate(request)` is true (it sees headers, e.g. Authorization) get `status`."""
        return self._add(Rule(status, remaining=None, predicate=predicate, on_request=True,
                              **self._canned(body, headers)))

    def delay(self, seconds: float) -> None:
        """Hold every response (forwarded or injected) for `seconds`; 0 turns it off."""
        self._delay = max(0.0, float(seconds))

    def refuse(self, on: bool = True) -> None:
        """Reset (RST) new connections and the next request on open ones, until refuse(False) or clear()."""
        self._refusing = on

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
        self._delay = 0.0
        self._refusing = False

    # -- internals --------------------------------------------------------------------------------------
    @staticmethod
    def _canned(body, headers) -> dict:
        h = dict(headers or {})
        return {"body": _as_body(body, h), "headers": h}

    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def _match(self, entry: LoggedRequest) -> Rule | None:
        with self._lock:
            rules = [r for r in self._rules if r.remaining is None or r.remaining > 0]
        text = None
        for r in rules:
            if r.predicate is not None:
                if text is None and not r.on_request:
                    text = entry.text
                try:
                    if not r.predicate(entry if r.on_request else text):
                        continue
                except Exception:  # noqa: BLE001 - a broken predicate must not kill the proxy
                    continue
            with self._lock:
                if r.remaining is not None:
                    if r.remaining <= 0:
                        continue
                    r.remaining -= 1
                r.hits += 1
            return r
        return None

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _forward(self, method: str, path: str, headers, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self._up_host, self._up_port, timeout=self.upstream_timeout)
        try:
            conn.putrequest(method, self._up_prefix + path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", self._up_netloc)
            for k, v in headers.items():
                if k.lower() not in _HOP:
                    conn.putheader(k, v)
            if body or method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            rbody = resp.read()
            return resp.status, resp.getheaders(), rbody
        finally:
            conn.close()
