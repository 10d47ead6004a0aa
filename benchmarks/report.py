"""What ``python -m benchmarks run`` prints: the header, one line per run, and the tables of medians.

The tables are Markdown, ready for benchmarks/README.md. This module only formats; it runs nothing
but a look at /proc for the machine's description.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics

MIB = 1 << 20


def _meminfo_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return 0.0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _filesystem(path: str) -> str:
    """The type of the filesystem holding ``path`` (longest mount point that contains it)."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _dev, mount, fstype = line.split()[:3]
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                    best, kind = mount, fstype
    except OSError:
        pass
    return kind


def run_info(argv, data_dir, sizes, rounds, tools, skipped) -> dict:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + shlex.join(argv),
        "machine": {"cores": os.cpu_count(), "ram_gib": round(_meminfo_gib(), 1), "cpu": _cpu_model(),
                    "kernel": platform.release(), "python": platform.python_version(),
                    "data_dir": data_dir, "filesystem": _filesystem(data_dir)},
        "sizes": {"large_files": sizes.large_files, "large_mib": sizes.large_mib, "small_files": sizes.small_files},
        "rounds": rounds,
        "tools": {t.name: {"version": t.version, "label": t.label, "notes": t.notes, "variant_of": t.variant_of,
                           "processes": getattr(t, "processes", None)} for t in tools},
        "skipped": skipped,
    }


def _variants(info: dict) -> dict[str, dict]:
    """The tools that are settings of another (kdist-pN), by name."""
    return {name: t for name, t in info["tools"].items() if t.get("variant_of")}


def _tool_notes(info: dict) -> list[str]:
    """Every tool's notes, each once (kdist's variants share kdist's)."""
    return list(dict.fromkeys(note for t in info["tools"].values() for note in t["notes"]))


def header_lines(info: dict) -> list[str]:
    m, s = info["machine"], info["sizes"]
    variants = _variants(info)
    versions = ", ".join(f"{name} {t['version']}" for name, t in info["tools"].items() if name not in variants)
    lines = [
        f"kdist side-by-side benchmark, {info['date']}",
        f"command: {info['command']}",
        f"machine: {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}, Python {m['python']}",
        f"data: {m['data_dir']} ({m['filesystem']}); repositories and restores on the same disk",
        f"tools: {versions or 'none'}",
        f"large: {s['large_files']} files x {s['large_mib']} MiB (4 KiB blocks ~60% compressible, 40% repeating "
        "earlier blocks); nightly: a few files rewritten in place + 1 added;",
        f"small: {s['small_files']:,} files x 1 KiB random",
        f"rounds: {info['rounds']}, fresh repositories each round, tools interleaved, page cache warm",
        "restore: into a never-used directory; restore-reused: into the same path right after that restore "
        "was deleted (rm -rf, synced)",
    ]
    if variants:
        lines.append(f"kdist processes: {', '.join(variants)} = `kdist snapshot create --processes "
                     f"{', '.join(str(t['processes']) for t in variants.values())}` (small set: first and "
                     "second backups only)")
    lines += [f"note: {note}" for note in _tool_notes(info)]
    lines += [f"{name}: skipped ({why})" for name, why in info["skipped"].items()]
    return lines


def progress_line(rec: dict) -> str:
    head = f"  round {rec['round']} {rec['dataset']:<5} {rec['tool']:<8} {rec['backend']:<5} {rec['phase']:<14}"
    if "wall_s" not in rec:
        return f"{head} FAILED: {rec['error']}"
    text = (f"{head} {rec['wall_s']:7.2f} s  {_throughput(rec)}  RSS {rec['peak_rss_kib'] / 1024:6.0f} MiB  "
            f"repo {rec['repo_bytes'] / MIB:8.1f} MiB")
    if "verify" in rec:
        text += f"  restore check: {'ok' if rec['verify']['ok'] else 'FAILED'} ({rec['verify']['detail']})"
    if not rec["ok"]:
        text += f"  FAILED: {rec['error']}"
    return text


def _throughput(rec: dict) -> str:
    if rec["dataset"] == "small":
        return f"{rec['files_per_s']:8.0f} files/s"
    return f"{rec['mb_per_s']:8.1f} MB/s"


def format_requests(counts: dict | None, with_bytes: bool = True) -> str:
    if not counts:
        return "n/a"
    parts = []
    for kind, c in counts.items():
        if not c.get("calls"):
            continue
        mb = f" ({c['bytes'] / 1e6:.1f} MB)" if with_bytes and c.get("bytes") else ""
        parts.append(f"{kind} {c['calls']}{mb}")
    return ", ".join(parts) or "none"


def _groups(runs: list[dict], backend: str) -> dict[tuple[str, str], dict[str, list[dict]]]:
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in runs:
        if r["backend"] == backend and r["phase"] != "init":
            groups.setdefault((r["dataset"], r["phase"]), {}).setdefault(r["tool"], []).append(r)
    return groups


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r["ok"] and key in r]
    return statistics.median(values) if values else None


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(peer: float | None, kdist: float | None) -> str:
    return f"{peer / kdist:.2f}" if peer and kdist else "-"


COLUMNS = ("data set", "phase", "tool", "time s", "throughput", "peak RSS MiB", "repository MiB", "speed", "size",
           "kdist requests", "ok")
TABLE_HEAD = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]


def results_table(runs: list[dict], info: dict, rounds: int) -> list[str]:
    lines = [
        f"Medians over {rounds} round(s). Throughput: MB/s (10^6 bytes) of the whole source tree for large "
        "(nightly included), files/s for small; a restore's is of the restored tree.",
        "Repository: size on disk (du) after the phase. speed = peer time / kdist time (>1: kdist faster); "
        "size = peer repository / kdist repository (>1: kdist's is smaller).",
        "restore: into a never-used directory; restore-reused: into the same path right after that full restore "
        "was deleted (rm -rf, synced), for every tool alike.",
        "kdist requests: storage requests by kind as kdist reports them (n/a: not reported). ok: runs that "
        "succeeded (restores: and reproduced the data) / runs.",
        "",
        *TABLE_HEAD,
    ]
    for (dataset, phase), by_tool in _groups(runs, "local").items():
        k_time, k_repo = (_median(by_tool.get("kdist", []), key) for key in ("wall_s", "repo_bytes"))
        small = dataset == "small"
        rate_key, unit, rate_fmt = ("files_per_s", "files/s", ".0f") if small else ("mb_per_s", "MB/s", ".1f")
        for tool, t in info["tools"].items():
            rows = by_tool.get(tool)
            if not rows:
                continue
            wall, repo, rss = (_median(rows, key) for key in ("wall_s", "repo_bytes", "peak_rss_kib"))
            peer = tool != "kdist" and not t.get("variant_of")  # kdist-pN rows are kdist, not peers
            kdist_like = not peer
            cells = [
                dataset, phase, t["label"], _num(wall, ".2f"), f"{_num(_median(rows, rate_key), rate_fmt)} {unit}",
                _num(rss and rss / 1024, ".0f"), _num(repo and repo / MIB, ".1f"),
                _ratio(wall, k_time) if peer else "-", _ratio(repo, k_repo) if peer else "-",
                format_requests(rows[0].get("requests"), with_bytes=False) if kdist_like else "",
                f"{sum(r['ok'] for r in rows)}/{len(rows)}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def processes_table(runs: list[dict], info: dict) -> list[str]:
    """kdist's small-file backups by ``--processes``: medians and the speed-up over the fewest processes."""
    variants = _variants(info)
    if not variants:
        return []
    names = (["kdist"] if "kdist" in info["tools"] else []) + sorted(variants, key=lambda n: variants[n]["processes"])
    base_name = min(variants, key=lambda n: variants[n]["processes"])
    lines = [
        "",
        f"kdist backup scaling with processes (small set; speed-up = {base_name} time / this time; peak RSS: "
        "the largest single process, not the sum over processes):",
        "",
        "| phase | tool | processes | time s | throughput | peak RSS MiB | speed-up | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups = _groups(runs, "local")
    for (dataset, phase), by_tool in groups.items():
        if dataset != "small" or not any(by_tool.get(n) for n in variants):
            continue
        base = _median(by_tool.get(base_name, []), "wall_s")
        for name in names:
            rows = by_tool.get(name)
            if not rows:
                continue
            wall, rate, rss = (_median(rows, key) for key in ("wall_s", "files_per_s", "peak_rss_kib"))
            processes = variants[name]["processes"] if name in variants else "default"
            cells = [phase, name, str(processes), _num(wall, ".2f"), f"{_num(rate, '.0f')} files/s",
                     _num(rss and rss / 1024, ".0f"), _ratio(base, wall), f"{sum(r['ok'] for r in rows)}/{len(rows)}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def s3_table(runs: list[dict]) -> list[str]:
    groups = _groups(runs, "s3")
    if not groups:
        return []
    lines = [
        "",
        "kdist on S3 (a moto server on this machine: request counts, not speed). Server: the HTTP requests the "
        "S3 server served, by kind, with the MB sent or returned; kdist: what kdist itself reports.",
        "",
        "| data set | phase | time s | objects MiB | requests seen by the S3 server | kdist requests | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for (dataset, phase), by_tool in groups.items():
        for r in by_tool.get("kdist", []):
            stored = r.get("repo_bytes")
            cells = [dataset, phase, _num(r.get("wall_s"), ".2f"), _num(stored and stored / MIB, ".1f"),
                     format_requests(r.get("server_requests")), format_requests(r.get("requests")),
                     "ok" if r["ok"] else "FAILED"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def notes(info: dict, runs: list[dict]) -> list[str]:
    lines = [""]
    for name, why in info["skipped"].items():
        lines.append(f"{name}: skipped ({why})")
    lines += [f"note: {note}" for note in _tool_notes(info)]
    for r in runs:
        if not r["ok"]:
            where = f"round {r['round']} {r['dataset']} {r['tool']} {r['backend']} {r['phase']}"
            lines.append(f"FAILED: {where}: {r['error']}")
    if any(r["tool"].startswith("kdist") and "wall_s" in r and r.get("requests") is None for r in runs):
        lines.append("kdist requests n/a: `kdist snapshot create --json` and `snapshot restore --json` "
                     "do not report their storage requests (yet)")
    return lines
