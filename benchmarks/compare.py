"""``python -m benchmarks run``: kdist, restic and borg side by side on the same seeded data.

For each data set (large files, small files) and each tool, in a fresh repository per round, on
the same disk as the data: a first backup, an unchanged second backup, for the large set a nightly
backup (a few files rewritten in place, one added), then two full restores of the latest snapshot,
each checked (file count, total size, sample hashes): ``restore`` into a never-used directory, and
``restore-reused`` into the same path again after that first restore was deleted (shutil.rmtree),
the disk state after a mass deletion in which creating files can be several times slower (ext4).
Tools are interleaved within every round (kdist, restic, borg, kdist, ...) so a noisy moment hits
all of them, and each tool's reused target is prepared the same way (its own restore, deleted).
``--kdist-processes 1,2,4`` adds, for the small set, kdist's first and second backups with
``snapshot create --processes N`` as extra rows (``kdist-pN``) and a scaling table. The page
cache holds the source (or, for a restore, the repository) before every measured command.
Measured per command: wall time, the tool process's peak RSS, the repository size on disk after
it, and kdist's storage requests when its JSON reports them. ``--s3`` adds kdist runs against an
S3 server (moto) for request counts. Numbers, never pass/fail: the exit status is 1 only when a
command failed or a restore did not reproduce the data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass

from benchmarks import datasets, report
from benchmarks.datasets import DataSet
from benchmarks.measure import disk_usage, run_measured, run_quiet, settle
from benchmarks.peers import TOOLS, Kdist, Tool, kdist_process_tools, setup_tools

DEFAULT_DATA_DIR = "/var/tmp/kdist-bench"
DEFAULT_SEED = 6
PHASES = {"large": ("first", "second", "nightly", "restore", "restore-reused"),
          "small": ("first", "second", "restore", "restore-reused")}
RESTORE_PHASES = ("restore", "restore-reused")
PROCESSES_DATASET = "small"  # --kdist-processes: the data set and phases of the kdist-pN rows
PROCESSES_PHASES = ("first", "second")


@dataclass
class Case:
    """One data set as the runs see it: the cached set, its working copy, the nightly overlay."""

    name: str
    base: DataSet
    src: str
    nightly: DataSet | None = None

    def restore_hashes(self) -> dict[str, str]:
        hashes = dict(self.base.hashes)
        if self.nightly:  # the latest snapshot is the nightly one
            hashes.update(self.nightly.hashes)
        return hashes


@dataclass
class Workspace:
    root: str

    def __post_init__(self):
        self.datasets = os.path.join(self.root, "datasets")
        self.work = os.path.join(self.root, "work")
        self.logs = os.path.join(self.root, "logs")
        for path in (self.work, self.logs):
            shutil.rmtree(path, ignore_errors=True)
        for path in (self.datasets, self.work, self.logs):
            os.makedirs(path, exist_ok=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description="kdist benchmarks")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="kdist, restic and borg side by side", description=__doc__)
    run.add_argument("--quick", action="store_true",
                     help="small data (4 x 16 MiB, 3,000 files), 1 round: about a minute")
    run.add_argument("--size", choices=sorted(datasets.SIZES), default=None,
                     help="data set sizes (default full, or quick with --quick; tiny is for the smoke test)")
    run.add_argument("--large-files", type=int, default=None, help="override: number of large files")
    run.add_argument("--large-mib", type=int, default=None, help="override: MiB per large file")
    run.add_argument("--small-files", type=int, default=None, help="override: number of small files")
    run.add_argument("--rounds", type=int, default=None,
                     help="rounds, each with fresh repositories (default 3, 1 with --quick)")
    run.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                     help=f"data sets, repositories, restores (default {DEFAULT_DATA_DIR})")
    run.add_argument("--out", default=None, help="raw per-run results as JSON (default DATA_DIR/results.json)")
    run.add_argument("--tools", default="kdist,restic,borg", help="comma-separated, from " + ",".join(TOOLS))
    run.add_argument("--s3", action="store_true", help="also run kdist against a moto S3 server (request counts)")
    run.add_argument("--kdist-processes", type=_process_counts, default=[], metavar="N[,N...]",
                     help="for the small data set, also run kdist's first and second backups with "
                          "`snapshot create --processes N` for each N, as rows kdist-pN (e.g. 1,2,4)")
    run.add_argument("--seed", type=int, default=DEFAULT_SEED)
    run.add_argument("--weak-kdf-for-tests", action="store_true", help=argparse.SUPPRESS)  # the smoke test's speed-up
    return ap


def _process_counts(text: str) -> list[int]:
    """``1,2,4`` -> [1, 2, 4]: distinct positive counts, in the order given."""
    counts: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            n = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of processes: {part!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"processes must be at least 1, not {n}")
        if n not in counts:
            counts.append(n)
    if not counts:
        raise argparse.ArgumentTypeError("expected comma-separated numbers of processes, e.g. 1,2,4")
    return counts


def _sizes(args) -> datasets.Sizes:
    preset = datasets.SIZES[args.size or ("quick" if args.quick else "full")]
    return datasets.Sizes(args.large_files or preset.large_files, args.large_mib or preset.large_mib,
                          args.small_files or preset.small_files)


def prepare_cases(ws: Workspace, sizes: datasets.Sizes, seed: int, say) -> list[Case]:
    large = datasets.ensure_large(ws.datasets, seed, sizes.large_files, sizes.large_mib)
    nightly = datasets.ensure_nightly(ws.datasets, seed, sizes.large_files, sizes.large_mib)
    small = datasets.ensure_small(ws.datasets, seed, sizes.small_files)
    cases = [Case("large", large, os.path.join(ws.work, "large-src"), nightly),
             Case("small", small, os.path.join(ws.work, "small-src"))]
    for case in cases:
        datasets.make_working_copy(case.src, case.base)
    say(f"data sets ready in {ws.datasets}")
    return cases


def requests_from_output(stdout: str) -> dict | None:
    """kdist's own request counts from its ``--json`` output, if it reports them."""
    try:
        doc = json.loads(stdout)
    except ValueError:
        return None
    items = doc if isinstance(doc, list) else [doc]
    found = [i["requests"] for i in items if isinstance(i, dict) and isinstance(i.get("requests"), dict)]
    if not found:
        return None
    total: dict[str, dict[str, int]] = {}
    for counts in found:
        for kind, c in counts.items():
            t = total.setdefault(kind, {"calls": 0, "bytes": 0})
            t["calls"] += c.get("calls", 0)
            t["bytes"] += c.get("bytes", 0)
    return total


class Runner:
    """Runs every phase of one (tool, data set) pair into one fresh repository."""

    def __init__(self, ws: Workspace, say, s3=None):
        self.ws, self.say, self.s3 = ws, say, s3
        self.cache = os.path.join(ws.work, "cache")  # restic's and borg's local caches
        self.target = os.path.join(ws.work, "restore")
        self.label = ""

    def run_case(self, tool: Tool, case: Case, round_no: int, phases: tuple[str, ...] | None = None) -> list[dict]:
        """Every phase of ``case`` (or only ``phases``) for ``tool``, one record each, in order."""
        backend = "s3" if self.s3 else "local"
        tag = f"{round_no}-{case.name}-{tool.name}-{backend}"
        repo, bucket_prefix = self._new_repo(tag)
        # A never-used restore directory per case for "restore": restoring into a path whose 100,000
        # files were just deleted was up to 6x slower on this ext4 disk, for whichever tool came
        # next. "restore-reused" then measures exactly that state, the same for every tool: the
        # same path again, right after this tool's own verified "restore" there was deleted.
        self.target = os.path.join(self.ws.work, f"restore-{tag}")
        env = tool.env(self.cache)
        if case.nightly:
            datasets.undo_nightly(case.src, case.base, case.nightly)
        init = run_quiet(tool.init(repo), env=env)
        if init.returncode != 0:
            rec = _record(case, tool, backend, round_no, "init", ok=False, error=init.stderr.strip()[-300:])
            self.say(report.progress_line(rec))
            return [rec]
        records: list[dict] = []
        if phases is None:  # on S3 the second restore would only repeat the first one's request counts
            phases = tuple(p for p in PHASES[case.name] if not (self.s3 and p == "restore-reused"))
        for phase in phases:
            rec = _record(case, tool, backend, round_no, phase, ok=True)
            self._run_phase(rec, tool, case, repo, env, f"{tag}-{phase}")
            if self.s3:
                rec["server_requests"] = self.s3.take_counts()
                rec["repo_bytes"] = rec["repo_apparent_bytes"] = self.s3.stored_bytes(*bucket_prefix)
            else:
                rec["repo_bytes"], rec["repo_apparent_bytes"] = disk_usage(repo)
            records.append(rec)
            self.say(report.progress_line(rec))
            if not rec["ok"]:
                break
        for path in (None if self.s3 else repo, self.target, self.cache):
            if path:
                shutil.rmtree(path, ignore_errors=True)
        return records

    def _run_phase(self, rec: dict, tool: Tool, case: Case, repo: str, env: dict, log_name: str) -> None:
        """Prepare the phase (nightly change, empty target, warm cache), run and check it; fill ``rec``."""
        phase = rec["phase"]
        if phase == "nightly":
            datasets.apply_nightly(case.src, case.nightly)
        if phase in RESTORE_PHASES:
            rec["target"], problem = self._prepare_target(phase)
            if problem:
                rec.update(ok=False, error=problem)
                return
            if not self.s3:
                datasets.warm(repo)
            cmd, cwd = tool.restore(repo, self.target, self.label)
        else:
            datasets.warm(case.src)
            self.label = phase  # borg names archives; the restore takes the latest
            cmd, cwd = tool.backup(repo, case.src, phase), None
        settle()
        if self.s3:
            self.s3.take_counts()
        m = run_measured(cmd, env, os.path.join(self.ws.logs, log_name), cwd=cwd)
        files, size = datasets.tree_stats(case.src)
        rec.update(wall_s=m.wall_s, peak_rss_kib=m.peak_rss_kib, exit_code=m.exit_code,
                   source_files=files, source_bytes=size,
                   mb_per_s=size / m.wall_s / 1e6 if m.wall_s else 0.0,
                   files_per_s=files / m.wall_s if m.wall_s else 0.0,
                   requests=requests_from_output(m.stdout) if isinstance(tool, Kdist) else None)
        if m.exit_code != 0:
            rec.update(ok=False, error=f"exit {m.exit_code}: {m.stderr.strip()[-300:]}")
        elif phase in RESTORE_PHASES:
            restored = tool.restored_root(self.target, case.src)
            ok, detail = datasets.verify_tree(restored, files, size, case.restore_hashes())
            rec["verify"] = {"ok": ok, "detail": detail}
            if not ok:
                rec.update(ok=False, error=f"restore differs: {detail}")

    def _prepare_target(self, phase: str) -> tuple[dict, str | None]:
        """Make ``self.target`` an empty directory for a restore phase: what was there before, and
        what is wrong with it (None: as the phase needs it).

        "restore": the path must be new (never used in this run). "restore-reused": the path holds
        this case's own full, verified "restore", which is deleted here (then ``settle`` syncs the
        deletion before the clock starts), so every tool restores into the same kind of disk state.
        """
        before = {"path": self.target, "existed": os.path.lexists(self.target), "files": 0, "bytes": 0}
        if before["existed"]:
            before["files"], before["bytes"] = datasets.tree_stats(self.target)
            shutil.rmtree(self.target)
        os.makedirs(self.target)
        if phase == "restore" and before["existed"]:
            return before, f"restore target {self.target} was used before: a fresh restore needs a new path"
        if phase == "restore-reused" and not before["files"]:
            return before, f"restore target {self.target} held no earlier restore to delete"
        return before, None

    def _new_repo(self, tag: str) -> tuple[str, tuple[str, str] | None]:
        if not self.s3:
            return os.path.join(self.ws.work, f"repo-{tag}"), None
        bucket = "kdist-bench"
        client = self.s3.client()
        if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=bucket)  # kdist never creates a bucket
        return f"s3://{bucket}/{tag}", (bucket, tag + "/")


def _record(case: Case, tool: Tool, backend: str, round_no: int, phase: str, ok: bool,
            error: str | None = None) -> dict:
    rec = {"dataset": case.name, "phase": phase, "tool": tool.name, "backend": backend, "round": round_no,
           "ok": ok, "error": error}
    if getattr(tool, "processes", None) is not None:
        rec["processes"] = tool.processes
    return rec


def run_s3(ws: Workspace, cases: list[Case], say, weak_kdf: bool) -> list[dict]:
    from benchmarks.s3_server import CountingS3Server  # only --s3 needs moto

    try:
        server = CountingS3Server(os.path.join(ws.logs, "s3-server.log"))
    except (RuntimeError, OSError) as exc:
        say(f"kdist on S3: skipped ({exc})")
        return []
    try:
        tool = Kdist(endpoint_url=server.url, weak_kdf=weak_kdf)
        if (why := tool.probe()) is not None:
            say(f"kdist on S3: skipped ({why})")
            return []
        runner = Runner(ws, say, s3=server)
        return [rec for case in cases for rec in runner.run_case(tool, case, 1)]
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    unknown = [n for n in names if n not in TOOLS]
    if unknown or not names:
        build_parser().error(f"--tools: unknown {', '.join(unknown)}; choose from {', '.join(TOOLS)}")
    rounds = args.rounds or (1 if args.quick else 3)
    sizes = _sizes(args)
    ws = Workspace(os.path.abspath(args.data_dir))
    out_path = args.out or os.path.join(ws.root, "results.json")

    def say(line: str) -> None:
        print(line, flush=True)

    tools, skipped = setup_tools(names, say, weak_kdf=args.weak_kdf_for_tests)
    process_tools, process_skipped = kdist_process_tools(args.kdist_processes, say, weak_kdf=args.weak_kdf_for_tests)
    skipped.update(process_skipped)
    info = report.run_info(argv, ws.root, sizes, rounds, tools + process_tools, skipped)
    for line in report.header_lines(info):
        say(line)
    cases = prepare_cases(ws, sizes, args.seed, say)
    runner = Runner(ws, say)
    runs: list[dict] = []
    for round_no in range(1, rounds + 1):
        for case in cases:
            for tool in tools:  # interleaved: kdist, restic, borg, kdist, ...
                runs += runner.run_case(tool, case, round_no)
            if case.name == PROCESSES_DATASET:  # then kdist-p1, kdist-p2, ...: backups only
                for tool in process_tools:
                    runs += runner.run_case(tool, case, round_no, phases=PROCESSES_PHASES)
    if args.s3:
        runs += run_s3(ws, cases, say, args.weak_kdf_for_tests)
    shutil.rmtree(ws.work, ignore_errors=True)
    with open(out_path, "w") as f:
        json.dump({"info": info, "runs": runs}, f, indent=1)
    say("")
    tables = (report.results_table(runs, info, rounds) + report.processes_table(runs, info)
              + report.s3_table(runs) + report.notes(info, runs))
    for line in tables:
        say(line)
    say(f"raw results: {out_path}")
    return 0 if all(r["ok"] for r in runs) else 1
