"""A real S3 API on loopback for tests (moto's server mode), and a forwarding proxy in front of it
that can stall responses or go away, to see what a server does when its origin misbehaves."""

from __future__ import annotations

import http.client
import http.server
import threading
import time
import urllib.request
from contextlib import contextmanager
from typing import Callable, Iterator

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE":
       "/nonexistent"}


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 on 127.0.0.1 (a free port); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@contextmanager
def credentials_checked(endpoint: str) -> Iterator[None]:
    """moto checks every request's credentials against its IAM users (none: every key is unknown)."""
    def set_count(value: str) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=value.encode(), headers={"Content-Type": "text/plain"},
                                                      method="POST"), timeout=10).read()
    set_count("0")
    try:
        yield
    finally:
        set_count("inf")


class Proxy:
    """Forwards HTTP to `upstream`, counting requests (and the most weights downloads at once).
    `stall(method, path)` true: the request is held unanswered until the proxy stops.
    `fail(method, path)` a (status, forwarded): answered with that status (an S3 error body)
    instead, after forwarding the request when `forwarded` (its answer lost on the way back). `stop()` closes
    the port: the endpoint is gone."""

    def __init__(self, upstream: str, stall: Callable[[str, str], bool] = lambda m, p: False,
                 fail: Callable[[str, str], tuple[int, bool] | None] = lambda m, p: None):
        self.upstream = upstream.removeprefix("http://")
        self.stall = stall
        self.fail = fail
        self.seen: list[tuple[str, str]] = []
        self.weights_inflight = 0
        self.weights_peak = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy._stopped.is_set():  # gone: kept-alive connections are dropped too
                    self.close_connection = True
                    return
                with proxy._lock:
                    proxy.seen.append((self.command, self.path))
                if proxy.stall(self.command, self.path):
                    proxy._stopped.wait(120)
                    self.close_connection = True
                    return
                failure = proxy.fail(self.command, self.path)
                if failure is not None and not failure[1]:
                    self._error(failure[0])
                    return
                weights = self.command == "GET" and self.path.split("?")[0].endswith(".safetensors")
                with proxy._lock:
                    proxy.weights_inflight += weights
                    proxy.weights_peak = max(proxy.weights_peak, proxy.weights_inflight)
                try:
                    conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                    conn.request(self.command, self.path, body=body or None,
                                 headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
                    r = conn.getresponse()
                    data = r.read()
                    time.sleep(0.1 if weights else 0)  # a download that takes a while: overlaps are seen
                finally:
                    with proxy._lock:
                        proxy.weights_inflight -= weights
                if failure is not None:  # it happened upstream; the caller hears otherwise
                    conn.close()
                    self._error(failure[0])
                    return
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _error(self, status: int):
                body = (f"<Error><Code>{'SlowDown' if status == 503 else 'InternalError'}</Code>"
                        f"<Message>injected</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def count(self, method: str, suffix: str) -> int:
        with self._lock:
            return sum(1 for m, p in self.seen if m == method and p.split("?")[0].endswith(suffix))

    def stop(self) -> None:
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
