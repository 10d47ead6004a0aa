"""Connecting a driver (``kdist fleet backup``, ``kdist gc run --ray``) to a Ray cluster.

``ray.init()`` with no address follows the ``ray_current_cluster`` file in Ray's temporary
directory, which a crashed or test cluster leaves behind: it then retries for minutes with only
GCS warnings, and it silently joins whichever cluster last ran ``ray start`` on the machine.
kdist never follows it by accident:

- ``--address ADDRESS`` (host:port of the head's GCS, or ``ray://host:port``) is used as given,
  whatever ``RAY_ADDRESS`` says;
- else ``RAY_ADDRESS`` (what ``ray job submit`` sets for its entrypoint);
- else a new Ray of its own on this machine, stopped at the end, unless a cluster runs here:
  then it refuses (exit 20) rather than back up one machine where the operator meant the
  cluster (a cron line written for ``ray submit`` before ``--address``), or join a cluster
  nobody named; ``local`` asks for a Ray of its own whatever runs here;
- ``auto`` means the cluster running on this machine: the one the cluster file names, else the
  one GCS process found running (a head started with another ``--temp-dir``); the launcher's
  ``ray submit`` runs the driver on the head, where that is the cluster.

Before ``ray.init`` is given an address, the address must answer within ``timeout`` seconds
(a TCP connection, then the HTTP/2 handshake of a GCS's gRPC), so a stale file or a wrong address is a
clear error in seconds (exit 20), not minutes of retries.
"""

from __future__ import annotations

import os
import socket
import time

from repo_format.errors import KdistError

DEFAULT_TIMEOUT = 10.0  # seconds an address has to answer (KDIST_RAY_TIMEOUT changes it)
TIMEOUT_ENV = "KDIST_RAY_TIMEOUT"


class RayUnavailable(KdistError):
    """The Ray cluster cannot be reached or started (exit 20)."""


def _host_port(address: str) -> tuple[str, int]:
    if address.startswith(("http://", "https://")):
        raise RayUnavailable(f"the Ray address {address} is a dashboard URL (what `ray job submit` takes); give the "
                             "head's GCS address, HOST:PORT (port 6379 by default), or auto on the head")
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayUnavailable(f"the Ray address {address!r} is not host:port (or ray://host:port)")
    return host.strip("[]"), int(port)


_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 3.4: a client's first bytes
_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # a SETTINGS frame with no setting
_SETTINGS = 0x4


def check_answers(address: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Raise ``RayUnavailable`` unless ``address`` accepts a connection and answers as a gRPC
    server within ``timeout`` seconds: a Ray head's GCS (gRPC over HTTP/2) answers the HTTP/2
    preface with its SETTINGS frame; a port that accepts and never speaks fails."""
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout
    try:
        conn = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise RayUnavailable(f"the Ray cluster at {address} does not answer ({exc.strerror or exc}); is its head "
                             "running? (`ray status --address ...` on the head)") from None
    with conn:
        if os.environ.get("RAY_USE_TLS", "0") not in ("", "0"):
            return  # a TLS handshake needs Ray's certificates: the TCP connection is what we can check
        reply = b""
        try:
            conn.sendall(_PREFACE + _EMPTY_SETTINGS)
            while len(reply) < 9:  # a frame header: length (3), type (1), flags (1), stream (4)
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                got = conn.recv(9 - len(reply))
                if not got:
                    break
                reply += got
        except OSError:
            pass
        if len(reply) < 9 or reply[3] != _SETTINGS:
            raise RayUnavailable(f"the Ray cluster at {address} accepts connections but does not answer as a Ray "
                                 f"head within {timeout:g} s (a wrong port, or a hung head)")


def cluster_file() -> str:
    """Where ``ray start`` records the cluster of this machine (Ray's rule: ``RAY_TMPDIR``, else
    ``TMPDIR`` on Linux, else /tmp; then ``ray/ray_current_cluster``)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, "ray", "ray_current_cluster")


def _survey(timeout: float) -> tuple[str | None, list[str], list[str]]:
    """What runs on this machine and answers: the address the cluster file names (None if there
    is no file or it is stale), the GCS addresses that Ray processes running here point at (a
    head started with another --temp-dir, or whose file a tmp cleaner removed; on a worker node,
    its head; looked for only when the file does not answer), and what was tried."""
    tried: list[str] = []
    path = cluster_file()
    try:
        with open(path, encoding="utf-8") as f:
            recorded = f.read().strip() or None
    except OSError:
        recorded = None
    if recorded is None:
        tried.append(f"no cluster file at {path}")
    else:
        try:
            check_answers(recorded, timeout)
        except RayUnavailable as exc:
            tried.append(f"{path} names {recorded}, which does not answer: a file left by a cluster that is gone "
                         f"({exc})")
            recorded = None
    answering: list[str] = []
    if recorded is None:
        from ray._private.services import find_gcs_addresses

        for address in sorted(find_gcs_addresses()):
            try:
                check_answers(address, timeout)
                answering.append(address)
            except RayUnavailable:
                tried.append(f"a GCS process for {address} does not answer")
    return recorded, answering, tried


def _running_here(timeout: float) -> str | None:
    """A Ray cluster that runs on this machine and answers, described; None if there is none."""
    recorded, answering, _ = _survey(min(timeout, 3.0))
    if recorded:
        return f"{recorded}, named by {cluster_file()}"
    return f"{answering[0]}, the GCS of a Ray process running here" if answering else None


def local_cluster(timeout: float = DEFAULT_TIMEOUT) -> str:
    """The address of the Ray cluster running on this machine (``--address auto``)."""
    recorded, answering, tried = _survey(timeout)
    if recorded:
        return recorded
    if len(answering) == 1:
        return answering[0]
    if len(answering) > 1:
        raise RayUnavailable(f"several Ray clusters run on this machine ({', '.join(answering)}): pass --address")
    raise RayUnavailable("no Ray cluster runs on this machine: " + "; ".join(tried + ["no GCS process found"])
                         + ". Start one (`ray start --head`), pass --address HOST:PORT, or leave --address out "
                         "to start a Ray of its own")


def default_timeout() -> float:
    try:
        return max(0.1, float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT))
    except ValueError:
        raise RayUnavailable(f"{TIMEOUT_ENV} must be a number of seconds") from None


def connect(address: str | None, timeout: float | None = None, **init_kwargs) -> bool:
    """Connect this process to Ray (see the module's rules). True when it started a Ray of its
    own, which the caller stops with ``ray.shutdown()``. Nothing to do if Ray is initialized."""
    import ray

    timeout = default_timeout() if timeout is None else timeout
    if ray.is_initialized():
        return False
    named = address or os.environ.get("RAY_ADDRESS")
    address = named or "local"
    init_kwargs.setdefault("logging_level", "WARNING")
    init_kwargs.setdefault("log_to_driver", False)
    if not named:
        running = _running_here(timeout)
        if running:
            raise RayUnavailable(f"a Ray cluster runs on this machine ({running}): pass --address auto to use it, "
                                 "or --address local for a Ray of kdist's own")
    if address == "local":
        # ray.init would take RAY_ADDRESS over this argument (empty here), never the cluster file
        os.environ.pop("RAY_ADDRESS", None)
        try:
            ray.init(address="local", **init_kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayUnavailable(f"cannot start a local Ray: {exc}") from None
        return True
    if address == "auto":
        address = local_cluster(timeout)
    check_answers(address, timeout)
    os.environ["RAY_ADDRESS"] = address  # ray.init prefers the variable to its argument: make them agree
    try:
        ray.init(address=address, **init_kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailable(f"cannot join the Ray cluster at {address}: {exc}") from None
    return False
