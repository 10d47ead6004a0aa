"""moto's S3 server with a request counter in front, for the benchmark's ``--s3`` runs.

    python -m benchmarks.s3_server -p PORT

Serves moto's own application (as ``python -m moto.server`` does) and counts every HTTP request by
kind (PUT, GET, LIST, STAT, DELETE, OTHER) with the bytes sent up or down. ``GET /_bench/requests``
returns the counts as JSON and resets them, so each phase reads its own. The counts are what an S3
bill sees, whatever the client reports about itself. ``CountingS3Server`` is the harness's side: it
starts this module as a subprocess on a free loopback port (fake credentials only, like the test
suite's moto fixture) and reads the counts and the bucket's size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import parse_qs

import boto3

COUNTS_PATH = "/_bench/requests"
KINDS = ("PUT", "GET", "LIST", "STAT", "DELETE", "OTHER")
FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def request_kind(method: str, path: str, query: str) -> str:
    has_key = "/" in path.strip("/")  # path-style: /bucket/key...
    params = parse_qs(query, keep_blank_values=True)
    if method == "PUT" or (method == "POST" and ("uploads" in params or "uploadId" in params)):
        return "PUT"
    if method == "GET":
        return "GET" if has_key else "LIST"
    if method == "HEAD":
        return "STAT"
    if method == "DELETE" or (method == "POST" and "delete" in params):
        return "DELETE"
    return "OTHER"


class CountingApp:
    """WSGI middleware: count each request, then hand it to moto."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.counts = self._empty()

    @staticmethod
    def _empty() -> dict:
        return {kind: {"calls": 0, "bytes": 0} for kind in KINDS}

    def _add(self, kind: str, calls: int = 0, nbytes: int = 0) -> None:
        with self.lock:
            self.counts[kind]["calls"] += calls
            self.counts[kind]["bytes"] += nbytes

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == COUNTS_PATH:
            with self.lock:
                body, self.counts = json.dumps(self.counts).encode(), self._empty()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        method = environ.get("REQUEST_METHOD", "")
        kind = request_kind(method, environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))
        self._add(kind, calls=1, nbytes=int(environ.get("CONTENT_LENGTH") or 0) if method in ("PUT", "POST") else 0)

        def counting_start_response(status, headers, exc_info=None):
            if kind == "GET":
                length = next((v for k, v in headers if k.lower() == "content-length"), "0")
                self._add(kind, nbytes=int(length))
            return start_response(status, headers, exc_info)

        return self.app(environ, counting_start_response)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-H", "--host", default="127.0.0.1")
    ap.add_argument("-p", "--port", type=int, required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    from moto.server import DomainDispatcherApplication, create_backend_app  # only in the server process
    from werkzeug.serving import run_simple

    run_simple(args.host, args.port, CountingApp(DomainDispatcherApplication(create_backend_app)), threaded=True)


if __name__ == "__main__":
    main()


class CountingS3Server:
    """Runs ``python -m benchmarks.s3_server`` on a free loopback port (the harness's side)."""

    START_TIMEOUT = 30.0

    def __init__(self, log_path: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, **FAKE_AWS_ENV)
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.s3_server", "-p", str(port)],
                                         cwd=package_parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"S3 server exited with {self.proc.returncode}; see {log_path}")
            try:
                urllib.request.urlopen(self.url + COUNTS_PATH, timeout=1).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"S3 server did not answer within {self.START_TIMEOUT:.0f} s; see {log_path}")
                time.sleep(0.05)

    def client(self):
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                            region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"])

    def take_counts(self) -> dict:
        """The requests served since the last call (and start counting afresh)."""
        with urllib.request.urlopen(self.url + COUNTS_PATH, timeout=10) as r:
            return json.loads(r.read())

    def stored_bytes(self, bucket: str, prefix: str) -> int:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sum(o["Size"] for page in pages for o in page.get("Contents", []))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
