"""moto's S3 server in a subprocess, for the fixtures of every test directory."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

MOTO_START_TIMEOUT = 30.0


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_answering(url: str, proc: subprocess.Popen, log_path: str) -> None:
    deadline = time.monotonic() + MOTO_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}; log: {_tail(log_path)}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:  # any HTTP answer means it is up
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"moto server at {url} did not answer within {MOTO_START_TIMEOUT:.0f} s; log: {_tail(log_path)}")


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-2000:]


# moto 5.2's IAM check re-signs a request from its decoded query string, so every listing with
# Delimiter="/" (all of kdist's) fails with SignatureDoesNotMatch. With ``iam=True`` the server
# skips only that comparison: access keys are still looked up, and every action is still
# authorised against the policies of the key's user.
_MOTO_WITH_IAM = (
    "import sys; from moto.iam import access_control as a; "
    "a.IAMRequestBase.check_signature = lambda self: None; "
    "from moto.server import main; sys.exit(main(sys.argv[1:]))"
)


@contextlib.contextmanager
def running_moto(log_dir, extra_env: dict | None = None, iam: bool = False):
    """A moto server in a subprocess on a free loopback port; yields its URL."""
    port = _free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(str(log_dir), "server.log")
    with open(log_path, "wb") as log:
        launch = ["-c", _MOTO_WITH_IAM] if iam else ["-m", "moto.server"]
        proc = subprocess.Popen([sys.executable, *launch, "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(extra_env or {})})
    try:
        _wait_until_answering(url, proc, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
