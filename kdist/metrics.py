"""Prometheus metrics of backups, fleet runs, maintenance and the fleet's status.

Written with ``prometheus-client`` (the exposition format and the Pushgateway protocol are its
job, not ours) to a textfile-collector file (``--metrics-file``, ``KDIST_METRICS_FILE``: a file,
or a directory where each kind of run and label set writes its own ``kdist_<job>_<labels>.prom``,
e.g. node_exporter's ``--collector.textfile.directory``; one file shared by two kinds of runs
would hold only the last one's) and/or pushed to a Pushgateway (``--pushgateway URL``,
``KDIST_PUSHGATEWAY``).

Every run writes ``kdist_<job>_success`` (1 or 0), its duration and its figures. The time of the
last success is kept across failed runs: a failed run carries the previous file's value over
(and a push to a Pushgateway replaces only the metrics it sends: ``pushadd``), so the alert
"``time() - kdist_backup_last_success_timestamp_seconds > 26*3600``" keeps working when backups
fail night after night. A metrics target that cannot be written is a warning, never the run's
failure.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass

METRICS_FILE_ENV = "KDIST_METRICS_FILE"
PUSHGATEWAY_ENV = "KDIST_PUSHGATEWAY"


@dataclass
class MetricsTarget:
    textfile: str | None = None
    pushgateway: str | None = None
    exported: bool = False  # this run's metrics are written (a failure after that adds nothing)

    def __bool__(self) -> bool:
        return bool(self.textfile or self.pushgateway)

    def file_for(self, job: str, labels: dict[str, str]) -> str | None:
        """The textfile a run writes: ``textfile``, or, if that is a directory, a file of its own
        per kind of run and label set (``kdist_backup_web1.prom``, ``kdist_maintenance_quick.prom``):
        a run rewrites only its own series, so a failing one never hides another's last success."""
        if self.textfile and os.path.isdir(self.textfile):
            suffix = "".join("_" + re.sub(r"[^A-Za-z0-9.-]+", "-", v).strip("-")[:60] for v in labels.values())
            return os.path.join(self.textfile, f"kdist_{job}{suffix}.prom")
        return self.textfile


def _previous(path: str, name: str, labels: dict) -> float | None:
    """A sample's value in an earlier textfile (None if absent or unreadable)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
    except (OSError, ValueError):
        return None
    return None


def export(target: MetricsTarget, job: str, labels: dict[str, str], values: dict[str, float], success: bool,
           duration: float, help_texts: dict[str, str] | None = None, rows: list | None = None) -> None:
    """Write ``kdist_<job>_<name>`` gauges for ``values`` (with ``labels``), ``_success``,
    ``_duration_seconds`` and ``_last_success_timestamp_seconds``; ``rows``: more samples
    ``(name, labels, value, help)`` (one per host and path for the fleet's status)."""
    if not target:
        return
    try:
        _export(target, job, labels, values, success, duration, help_texts, rows)
        target.exported = True
    except Exception as exc:  # metrics must never turn a backup into a failure
        sys.stderr.write(f"kdist: warning: could not write metrics ({type(exc).__name__}: {exc})\n")


def _export(target: MetricsTarget, job: str, labels: dict[str, str], values: dict[str, float], success: bool,
            duration: float, help_texts: dict[str, str] | None, rows: list | None) -> None:
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    names = list(labels)
    now = time.time()
    textfile = target.file_for(job, labels)

    def gauge(name: str, value: float, help_text: str) -> None:
        g = Gauge(f"kdist_{job}_{name}", help_text, names, registry=registry)
        (g.labels(**labels) if names else g).set(value)

    gauge("success", 1.0 if success else 0.0, f"1 if the last kdist {job} succeeded, else 0")
    gauge("duration_seconds", duration, f"How long the last kdist {job} took")
    gauge("last_run_timestamp_seconds", now, f"When the last kdist {job} ended")
    last = now if success else (_previous(textfile, f"kdist_{job}_last_success_timestamp_seconds", labels)
                                if textfile else None)
    if last is not None:
        gauge("last_success_timestamp_seconds", last, f"When a kdist {job} last succeeded")
    for name, value in values.items():
        gauge(name, float(value), (help_texts or {}).get(name, f"kdist {job}: {name.replace('_', ' ')}"))
    by_name: dict[str, Gauge] = {}
    for name, extra, value, help_text in rows or ():
        g = by_name.get(name)
        if g is None:
            g = by_name[name] = Gauge(f"kdist_{job}_{name}", help_text, names + list(extra), registry=registry)
        g.labels(**labels, **extra).set(value)
    if textfile:
        from prometheus_client import write_to_textfile

        write_to_textfile(textfile, registry)  # a temporary file beside it, then a rename
    if target.pushgateway:
        from prometheus_client import pushadd_to_gateway

        pushadd_to_gateway(target.pushgateway, job=f"kdist_{job}", registry=registry, grouping_key=labels,
                           timeout=3)  # a hung gateway must not hold a run (or --timeout's hooks) long
