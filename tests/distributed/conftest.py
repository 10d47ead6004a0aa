"""Distributed tests use fast (weak) key derivation, allowed only through this variable."""

import os

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")


import pytest  # noqa: E402
from ray._common.utils import get_ray_address_file  # noqa: E402


@pytest.fixture(scope="session")
def forget_ray_address():
    """``forget(address)``: after a test's Ray head stops, remove the address file Ray wrote
    for it (``/tmp/ray/ray_current_cluster``: both ``Cluster`` and ``ray start`` write one), so
    that a later ``ray.init()`` with no address does not follow it to a dead head. Only when
    the file still names that head (by its port: ``ray start`` writes the machine's address even
    with ``--node-ip-address=127.0.0.1``): another Ray on this machine keeps its own."""

    def forget(address: str) -> None:
        path = get_ray_address_file(None)
        try:
            with open(path) as f:
                named = f.read().strip()
            if named.rpartition(":")[2] == address.rpartition(":")[2]:
                os.remove(path)
        except OSError:
            pass

    return forget
