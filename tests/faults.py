"""A fault-injecting HTTP proxy for the GCS emulator: every Nth request fails.

Point STORAGE_EMULATOR_HOST at the proxy and the google-cloud-storage client sees a
flaky GCS: 503s and dropped connections, deterministically, so a test can assert that
every storage call retried and the work still completed. ``latency`` adds a fixed wait
to every request (a remote bucket), and ``max_in_flight`` records how many requests were
ever being served at once (how parallel the client really was).
"""

from __future__ import annotations

import http.client
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit


class FlakyProxy:
    """Forward to ``upstream`` (http://host:port); fail request k when k % every == 0.

    Failures alternate between a 503 answer and a connection closed with no answer.
    """

    def __init__(self, upstream: str, every: int = 3, latency: float = 0.0, on_request=None):
        self.upstream = urlsplit(upstream)
        self.on_request = on_request  # called with (method, path) before each request is served
        self.every = every
        self.latency = latency
        self.requests = 0
        self.failures = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else headers then body wait on a delayed ACK (40 ms)

            def log_message(self, *args):  # keep test output clean
                pass

            def _handle(self):
                with proxy._lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    if proxy.latency:
                        time.sleep(proxy.latency)
                    respond = self._forward()
                finally:
                    with proxy._lock:  # before answering: the client may send its next one at once
                        proxy.in_flight -= 1
                respond()

            def _forward(self):
                """Do the request's work; return what sends the answer."""
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.on_request is not None:
                    proxy.on_request(self.command, self.path)
                with proxy._lock:
                    proxy.requests += 1
                    fail = proxy.every and proxy.requests % proxy.every == 0
                    if fail:
                        proxy.failures += 1
                        kind = proxy.failures % 2
                if fail and kind == 1:
                    return lambda: self._answer(503, "Service Unavailable (injected)", [], b"")
                if fail:
                    return self._drop
                conn = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=30
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                kept = [(key, value) for key, value in response.getheaders()
                        if key.lower() not in {"transfer-encoding", "content-length", "connection"}]  # fmt: skip
                return lambda: self._answer(response.status, response.reason, kept, data)

            def _answer(self, status, reason, headers, data):
                self.send_response(status, reason)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _drop(self):
                self.close_connection = True
                self.connection.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128  # a pool of clients connecting at once is not refused

        self._server = Server(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
