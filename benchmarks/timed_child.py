"""Run one command, then write its wall time, exit code and peak RSS as JSON (used by measure.py).

    python -S benchmarks/timed_child.py RESULT.json CMD [ARG...]

Why a separate small process: on Linux a child's ru_maxrss starts from the peak RSS of the process
it was spawned from (exec keeps the high-water mark of the memory it replaces), so a tool started
straight from the harness, which has held data-set buffers, would report the harness's peak as its
own. Started fresh with ``-S``, this launcher holds ~10 MiB, and that is the floor it adds.
Standard input, output, error and the working directory are inherited from the caller.
"""

import json
import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    result_path, cmd = argv[0], argv[1:]
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd)
    except OSError as exc:
        print(f"cannot run {cmd[0]}: {exc}", file=sys.stderr)
        return 127
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    with open(result_path, "w") as f:
        json.dump({"wall_s": wall, "exit_code": proc.returncode, "peak_rss_kib": usage.ru_maxrss}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
