"""The kdist CLI in this process, which at its exit writes the storage requests it made (used by fleet_scale.py).

    FLEET_REQUESTS=OUT.json python -m benchmarks.fleet_child snapshot list --json ...

Not every command reports its requests in its ``--json`` output (``snapshot list`` does not), so
this wraps ``kdist.access.make_storage`` (every command's storage stack) to keep the counting storage the command opened
and dumps its counts (``{"GET": {"calls", "bytes"}, ...}``, as ``storage_requests``) at exit.
Nothing else changes: the command runs as ``kdist`` would, in this very process, so the process
the benchmark samples is the kdist process itself (no launcher in between).
"""

from __future__ import annotations

import atexit
import json
import os

from kdist import access
from kdist.cli.main import main

_opened = []
_make_storage = access.make_storage


def _counting_make_storage(*args, **kwargs):
    storage = _make_storage(*args, **kwargs)
    _opened.append(storage)
    return storage


def _dump() -> None:
    path = os.environ.get("FLEET_REQUESTS")
    if not path:
        return
    totals: dict[str, dict[str, int]] = {}
    for storage in _opened:
        while not hasattr(storage, "counts") and hasattr(storage, "inner"):
            storage = storage.inner  # under ReadOnlyStorage
        for kind, c in (storage.counts() if hasattr(storage, "counts") else {}).items():
            t = totals.setdefault(kind, {"calls": 0, "bytes": 0})
            t["calls"] += c["calls"]
            t["bytes"] += c["bytes"]
    with open(path, "w") as f:
        json.dump(totals, f)


access.make_storage = _counting_make_storage  # looked up at call time by RepositorySpec.storage
atexit.register(_dump)  # click leaves through sys.exit: atexit handlers still run

if __name__ == "__main__":
    main()
