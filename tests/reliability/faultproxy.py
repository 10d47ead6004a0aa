"""A fault-injecting HTTP proxy in front of an S3 server (moto), for the reliability tests.

moto has no fault injection to rely on, so the tests point kdist's ``--endpoint-url`` at this
proxy. Each request is forwarded to the upstream server unless a seeded schedule picks a fault:

- ``slowdown``: a 503 ``SlowDown`` error (S3 throttling); the upstream never sees the request.
- ``internal``: a 500 ``InternalError`` error; the upstream never sees the request.
- ``drop``: the request is read, then the connection is closed without a reply (upstream not
  contacted): the client sees a reset or an empty reply.
- ``cut``: the request is forwarded, so it takes effect (a PUT stores its object), then the
  reply is cut off at a random byte (inside the status line, the headers or the body) and the
  connection closed: the client cannot tell whether it took effect.

Rates are per request and can be changed while the proxy runs (``set_rates``); ``outage`` makes
every request fail, at once or once the upstream has stored a given number of bytes more;
``inject`` queues faults for the next requests of one method (a ``cut`` at a chosen byte, too).
The proxy counts requests, injected faults and the bytes of PUT bodies the upstream stored, so
a test can tell how much a backup uploaded. Decisions are taken in arrival order from one seeded
generator (so a schedule repeats exactly only when the requests arrive in the same order).
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "drop", "cut")
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError",
                 "We encountered an internal error. Please try again."),
}
# headers that belong to one connection, never forwarded (RFC 9110 7.6.1), plus Expect: the proxy
# answers "100 Continue" itself and forwards the whole body
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
               "upgrade", "expect", "proxy-authorization", "proxy-authenticate"}


class FaultProxy:
    """``with FaultProxy(upstream_url, seed=1, slowdown=0.1) as proxy:`` then use ``proxy.url``."""

    def __init__(self, upstream: str, seed: int = 0, **rates: float):
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname, parts.port or 80)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rates: dict[str, float] = {}
        self._outage_after: int | None = None  # fail everything once put_bytes reaches this
        self._queued: dict[str, list[tuple[str | None, int | None]]] = {}  # method -> (fault, cut at)
        self.requests = 0
        self.faults = {kind: 0 for kind in FAULTS}
        self.forwarded_puts = 0  # PUTs the upstream answered with 2xx
        self.put_bytes = 0  # bytes of those PUTs' bodies
        self.set_rates(**rates)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)

    # ---- control -------------------------------------------------------------------------
    def set_rates(self, **rates: float) -> None:
        """Per-request probabilities of each fault (unnamed ones are 0); they must sum to <= 1."""
        unknown = set(rates) - set(FAULTS)
        if unknown or sum(rates.values()) > 1 + 1e-9:
            raise ValueError(f"bad fault rates {rates}: kinds are {FAULTS}, summing to at most 1")
        with self._lock:
            self._rates = {kind: float(rates.get(kind, 0.0)) for kind in FAULTS}
            self._outage_after = None

    def outage(self, after_bytes: int = 0) -> None:
        """Fail every request (with faults of every kind, at random) once the upstream has stored
        ``after_bytes`` more bytes of PUT bodies; ``set_rates`` ends the outage."""
        with self._lock:
            self._outage_after = self.put_bytes + after_bytes

    def inject(self, method: str, *faults: str | None, cut_at: int | None = None) -> None:
        """The next requests of ``method`` get these faults in order (``None``: forwarded as is),
        before the rates apply again; ``cut_at`` is the byte a ``cut`` stops at (default random)."""
        if set(faults) - set(FAULTS) - {None}:
            raise ValueError(f"unknown faults {faults}; use {FAULTS}")
        with self._lock:
            self._queued.setdefault(method.upper(), []).extend((f, cut_at) for f in faults)

    def counters(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "faults": dict(self.faults),
                    "forwarded_puts": self.forwarded_puts, "put_bytes": self.put_bytes}

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- one request ---------------------------------------------------------------------
    def _decide(self, method: str) -> tuple[str | None, int | None]:
        """The fault for the next request of ``method``, and where a ``cut`` stops (None: random)."""
        with self._lock:
            self.requests += 1
            cut_at = None
            if self._queued.get(method):
                fault, cut_at = self._queued[method].pop(0)
            elif self._outage_after is not None and self.put_bytes >= self._outage_after:
                fault = self._rng.choice(FAULTS)
            else:
                fault, draw = None, self._rng.random()
                for kind in FAULTS:
                    draw -= self._rates[kind]
                    if draw < 0:
                        fault = kind
                        break
            if fault is not None:
                self.faults[fault] += 1
            return fault, cut_at

    def _cut_at(self, size: int) -> int:
        with self._lock:
            return self._rng.randrange(1, size) if size > 1 else 1

    def _forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes):
        conn = http.client.HTTPConnection(*self._upstream, timeout=60)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            payload = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            return resp.status, resp.reason, out, payload
        finally:
            conn.close()

    def _stored(self, method: str, status: int, body: bytes) -> None:
        if method == "PUT" and 200 <= status < 300:
            with self._lock:
                self.forwarded_puts += 1
                self.put_bytes += len(body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: ThreadingHTTPServer

    def log_message(self, *args) -> None:  # quiet: the tests print counters instead
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        try:
            self._proxy_one()
        except OSError:  # the client hung up (it timed out, or gave up retrying)
            self.close_connection = True

    def _proxy_one(self) -> None:
        proxy: FaultProxy = self.server.proxy
        body = self._body()
        fault, cut_at = proxy._decide(self.command)
        if fault == "drop":
            self._hang_up()
            return
        if fault in _ERRORS:
            self._send_error_xml(*_ERRORS[fault])
            return
        try:
            status, reason, headers, payload = proxy._forward(self.command, self.path, self.headers.items(), body)
        except OSError:
            self._hang_up()  # the upstream is gone: look like it to the client
            return
        proxy._stored(self.command, status, body)
        head = [f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")]
        for name, value in headers:
            if name.lower() != "content-length":
                head.append(f"{name}: {value}\r\n".encode("latin-1"))
        # a HEAD reply says the object's length but carries no body
        length = next((v for k, v in headers if k.lower() == "content-length"), None) \
            if self.command == "HEAD" else str(len(payload))
        if length is not None:
            head.append(f"Content-Length: {length}\r\n".encode("latin-1"))
        head.append(b"\r\n")
        raw = b"".join(head) + (b"" if self.command == "HEAD" else payload)
        if fault == "cut":
            self.wfile.write(raw[:cut_at or proxy._cut_at(len(raw))])
            self._hang_up()
            return
        self.wfile.write(raw)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def _send_error_xml(self, status: int, reason: str, code: str, message: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
               f"<RequestId>{request_id}</RequestId><HostId>faultproxy</HostId></Error>").encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def _hang_up(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
