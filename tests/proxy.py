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
    # How the answer goes out: "plain" (at once), "endless" (headers, then body bytes until the client
    # hangs up), "trickle-headers" / "trickle-body" (that part one byte every 1/rate s), "echo" (the body
    # is `body` with b"{authorization}" replaced by the request's Authorization header, as some servers do).
    mode: str = "plain"
    rate: float = 1.0


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


class _Replay(_CountingReader):
    """An rfile whose first bytes were already read (slowly): serves them again, then the connection."""

    def __init__(self, data: bytes, raw: _CountingReader) -> None:
        super().__init__(raw)
        self._data = data
        self.count = raw.count

    def read(self, n: int = -1) -> bytes:
        if self._data:
            n = len(self._data) if n is None or n < 0 else n
            out, self._data = self._data[:n], self._data[n:]
            return out
        data = self._raw.read(n)
        self.count += len(data)
        return data


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
        with proxy._lock:
            proxy.in_flight += 1
        try:
            self._handle()
        finally:
            with proxy._lock:
                proxy.in_flight -= 1

    def _handle(self) -> None:
        proxy = self.server.proxy
        if proxy._refusing:  # e.g. the next request on an idle keep-alive connection
            self._reset()
            return
        if proxy._upload_stall_after is not None:
            self._stall_upload(proxy._upload_stall_after)
            return
        if proxy._upload_rate:
            self._read_slowly(proxy._upload_rate)
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
            if rule.mode == "plain":
                self._respond(entry, rule.status, list(rule.headers.items()), rule.body)
            elif rule.mode == "echo":
                echoed = rule.body.replace(b"{authorization}", (entry.header("Authorization") or "").encode())
                self._respond(entry, rule.status, list(rule.headers.items()), echoed)
            else:
                self._misbehave(entry, rule)
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

    # -- misbehaving servers --------------------------------------------------------------------------------
    def _misbehave(self, entry: LoggedRequest, rule: Rule) -> None:
        """Answers no real server gives: endless, or trickled a byte at a time. Ends when the client
        hangs up or the proxy stops."""
        proxy = self.server.proxy
        self.close_connection = True
        entry.status = rule.status
        head = [f"HTTP/1.1 {rule.status} {http.client.responses.get(rule.status, 'Status')}"]
        head += [f"{k}: {v}" for k, v in rule.headers.items()]
        if rule.mode != "endless":
            head.append(f"Content-Length: {len(rule.body)}")
        head.append("Connection: close")
        head_bytes = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        try:
            if rule.mode == "endless":
                self.wfile.write(head_bytes)
                chunk = b"<html><body>" + b"Top up your data plan! " * 2800 + b"</body></html>\n"
                while not proxy._stopping.is_set():
                    self.wfile.write(chunk)
                    with proxy._lock:
                        proxy.bytes_out += len(chunk)
                return
            trickled = head_bytes + rule.body if rule.mode == "trickle-headers" else rule.body
            if rule.mode == "trickle-body":
                self.wfile.write(head_bytes)
            self.wfile.flush()
            for i in range(len(trickled)):
                self.wfile.write(trickled[i:i + 1])
                self.wfile.flush()
                with proxy._lock:
                    proxy.bytes_out += 1
                if proxy._stopping.wait(1.0 / rule.rate):
                    return
        except OSError:
            entry.status = None  # the client gave up: what a deadline is for

    def _stall_upload(self, after_bytes: int) -> None:
        """Read `after_bytes` of the request body, then read nothing more until the proxy stops or
        `stall_hold_s` passes: the client's upload stalls with its buffers full."""
        proxy = self.server.proxy
        self.close_connection = True
        got = self.rfile.read(min(after_bytes, int(self.headers.get("Content-Length") or 0)))
        entry = LoggedRequest(method=self.command, path=self.path, headers=dict(self.headers.items()),
                              body=got, bytes_in=self.rfile.count - self._start_count)
        with proxy._lock:
            proxy.requests += 1
            proxy.log.append(entry)
            proxy._cond.notify_all()
        proxy._stopping.wait(proxy.stall_hold_s)

    def _read_slowly(self, bytes_per_s: float) -> None:
        """Read the request body at `bytes_per_s` (a slow link), then let it be handled as usual."""
        length = int(self.headers.get("Content-Length") or 0)
        step = max(int(bytes_per_s / 20), 1)
        data = bytearray()
        started = time.monotonic()
        while len(data) < length:
            piece = self.rfile.read(min(step, length - len(data)))
            if not piece:
                break
            data += piece
            ahead = started + len(data) / bytes_per_s - time.monotonic()
            if ahead > 0 and self.server.proxy._stopping.wait(ahead):
                break
        self.rfile = _Replay(bytes(data), self.rfile)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _proxy


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: "FaultProxy"
    rcvbuf: int = 0

    def server_bind(self) -> None:
        if self.rcvbuf:  # before listen(): accepted sockets inherit it, window scaling included
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        super().server_bind()


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

    def __init__(self, upstream: str, *, port: int = 0, upstream_timeout: float = 30.0, rcvbuf: int = 0) -> None:
        u = urllib.parse.urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self._up_host = u.hostname
        self._up_port = u.port or 80
        self._up_prefix = u.path.rstrip("/")
        self._up_netloc = u.netloc
        self.upstream_timeout = upstream_timeout
        self.rcvbuf = rcvbuf  # SO_RCVBUF of accepted connections (0: the kernel's), small to make stalls visible
        self.stall_hold_s = 60.0
        self._upload_stall_after: int | None = None
        self._upload_rate = 0.0
        self.bytes_out = 0  # bytes written by the misbehaving modes
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
        self.in_flight = 0  # requests being handled now (read, forwarded, answered), whatever their end
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
        server_class = type("_SizedServer", (self.server_class,), {"rcvbuf": self.rcvbuf})
        self._httpd = server_class(("127.0.0.1", self._port), self.handler_class)
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

    def answered_counts(self) -> dict[str, int]:
        """`requests` and `bytes_in`, with `in_flight` (requests being handled now) and `ok_lines` (the distinct
        lines of the bodies answered 2xx: a retried body counts once), all from one moment: a client that
        marks what a 2xx acknowledged has marked exactly `ok_lines` once `in_flight` is 0."""
        with self._lock:
            entries = list(self.log)
            counts = {"requests": self.requests, "bytes_in": self.bytes_in, "in_flight": self.in_flight}
        lines: set[str] = set()
        for entry in entries:
            status = entry.status
            if status is not None and 200 <= status < 300 and entry.body:
                lines.update(filter(None, entry.text.split("\n")))
        counts["ok_lines"] = len(lines)
        return counts

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

    def portal(self, page: str = "<html><body><h1>Your data allowance is used up</h1><p>Top up now to keep "
                                     "browsing.</p></body></html>", status: int = 200) -> Rule:
        """Every request gets a captive portal's HTML page with a 2xx status, until clear()."""
        return self.fail_always(status, body=page, headers={"Content-Type": "text/html; charset=utf-8"})

    def endless_body(self, status: int = 200) -> Rule:
        """Every request gets `status` and an HTML body that never ends (no Content-Length)."""
        return self._add(Rule(status, remaining=None, headers={"Content-Type": "text/html"}, mode="endless"))

    def trickle(self, part: str = "headers", status: int = 204, body: bytes | str = b"",
                bytes_per_s: float = 1.0, headers: dict[str, str] | None = None) -> Rule:
        """Every request gets its answer `part` ("headers": status line, headers and body; "body": the
        body only) at `bytes_per_s`: a read timeout per socket read never fires."""
        if part not in ("headers", "body"):
            raise ValueError(part)
        return self._add(Rule(status, remaining=None, mode=f"trickle-{part}", rate=bytes_per_s,
                              **self._canned(body, headers)))

    def echo_authorization(self, status: int = 401) -> Rule:
        """Every request gets `status` with an HTML page quoting its Authorization header back."""
        page = (b"<html><body><h1>Unauthorized</h1><p>Your request had<br>Authorization: {authorization}"
                b"</p></body></html>")
        return self._add(Rule(status, remaining=None, body=page, mode="echo",
                              headers={"Content-Type": "text/html", "WWW-Authenticate": 'Basic realm="db"'}))

    def stall_upload(self, after_bytes: int) -> None:
        """Read only the first `after_bytes` of each request body, then stop reading (hold `stall_hold_s`)."""
        self._upload_stall_after = int(after_bytes)

    def slow_upload(self, bytes_per_s: float) -> None:
        """Read request bodies at `bytes_per_s` (a slow link); 0 turns it off."""
        self._upload_rate = float(bytes_per_s)

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
        self._upload_stall_after = None
        self._upload_rate = 0.0

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
