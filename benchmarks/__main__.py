"""``python -m benchmarks run [--quick] ...``: kdist, restic and borg side by side (benchmarks/compare.py).

The other benchmarks run as their own modules (``python -m benchmarks.ray_scaling``, ...).
"""

from benchmarks.compare import main

raise SystemExit(main())
