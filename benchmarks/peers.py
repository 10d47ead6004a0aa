"""The backup tools under test, each driven through its own command line: kdist, restic, borg.

A tool knows its commands (create a repository, back up, restore), the environment that carries
its password (never an argument), where a restore puts the tree, and how its version reads.
``setup_tools`` installs missing peers from the distribution (apt) and skips, with one line, those
it cannot. ``kdist_process_tools`` makes the kdist variants ``kdist-pN`` that back up with
``snapshot create --processes N`` (skipped while the CLI has no such option). Every tool runs
encrypted with its recommended compression: kdist zstd (its default), restic ``--compression
auto`` (repository format 2, restic >= 0.14), borg ``zstd``.
This module times nothing (compare.py does).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from benchmarks.measure import run_quiet
from benchmarks.s3_server import FAKE_AWS_ENV

PASSWORD = "kdist-bench-password"
APT_PACKAGES = {"restic": "restic", "borg": "borgbackup"}


@dataclass
class Tool:
    name: str
    version: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The name the result table shows (with a caveat, if one changes what is compared)."""
        return self.name

    @property
    def variant_of(self) -> str | None:
        """The tool this one is a setting of (kdist-p2 of kdist), or None for a tool of its own."""
        return None

    def env(self, cache_dir: str) -> dict[str, str]:
        return dict(os.environ)

    def init(self, repo: str) -> list[str]:
        raise NotImplementedError

    def backup(self, repo: str, src: str, label: str) -> list[str]:
        raise NotImplementedError

    def restore(self, repo: str, target: str, label: str) -> tuple[list[str], str | None]:
        """The restore command of the snapshot ``label`` (the latest one), and its working directory."""
        raise NotImplementedError

    def restored_root(self, target: str, src: str) -> str:
        """Where the restored copy of ``src`` lands below ``target``."""
        raise NotImplementedError

    def probe(self) -> str | None:
        """Read the version; return why the tool cannot be used, or None."""
        raise NotImplementedError


class Kdist(Tool):
    WEAK_KDF_ENV = "KDIST_ALLOW_WEAK_KDF_FOR_TESTS"

    def __init__(self, endpoint_url: str | None = None, weak_kdf: bool = False, processes: int | None = None):
        super().__init__("kdist" if processes is None else f"kdist-p{processes}")
        self.endpoint_url = endpoint_url
        self.processes = processes  # None: the CLI's default (--processes auto once it has the option)
        self.weak_kdf = weak_kdf  # the smoke test's setting only: numbers are then not a user's
        if weak_kdf:
            self.notes.append("kdist repositories use the test-only weak KDF (--weak-kdf-for-tests): "
                              "not a user's numbers")

    def env(self, cache_dir):
        # its local cache lives and dies with the case, as restic's and borg's do
        env = dict(os.environ, KDIST_PASSWORD=PASSWORD, KDIST_CACHE_DIR=os.path.join(cache_dir, "kdist"))
        env.pop(self.WEAK_KDF_ENV, None)  # full-strength scrypt, as a user gets, even if the shell sets it
        if self.weak_kdf:
            env[self.WEAK_KDF_ENV] = "1"
        if self.endpoint_url:
            env.update(FAKE_AWS_ENV)
            for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
                env.pop(key, None)
        return env

    def _repo_args(self, repo):
        return ["--repo", repo] + (["--endpoint-url", self.endpoint_url] if self.endpoint_url else [])

    def init(self, repo):
        return ["kdist", "repo", "create", *self._repo_args(repo)]

    @property
    def variant_of(self):
        return None if self.processes is None else "kdist"

    def backup(self, repo, src, label):
        processes = [] if self.processes is None else ["--processes", str(self.processes)]
        return ["kdist", "snapshot", "create", *self._repo_args(repo), *processes, "--json", src]

    def restore(self, repo, target, label):
        return ["kdist", "snapshot", "restore", *self._repo_args(repo), "--json", "latest", target], None

    def restored_root(self, target, src):
        return target

    def probe(self):
        if shutil.which("kdist") is None:
            return "the kdist command is not installed (pip install -e .)"
        out = run_quiet(["kdist", "--version"]).stdout.strip()
        self.version = out.split("version")[-1].strip() or out
        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = run_quiet(["git", "-C", checkout, "describe", "--always", "--dirty"])
        if rev.returncode == 0:
            self.version += f" (git {rev.stdout.strip()})"
        if self.processes is not None:
            usage = run_quiet(["kdist", "snapshot", "create", "--help"])
            if usage.returncode != 0:
                return f"`kdist snapshot create --help` failed: {(usage.stderr or usage.stdout).strip()[-200:]}"
            if not re.search(r"--processes\b", usage.stdout):
                return "`kdist snapshot create` has no --processes option (yet)"
        return None


class Restic(Tool):
    def __init__(self):
        super().__init__("restic")
        self.compression = True

    @property
    def label(self):
        return self.name if self.compression else f"{self.name} (no compression)"

    def env(self, cache_dir):
        return dict(os.environ, RESTIC_PASSWORD=PASSWORD, RESTIC_CACHE_DIR=os.path.join(cache_dir, "restic"))

    def init(self, repo):
        return ["restic", "init", "--repo", repo] + (["--repository-version", "2"] if self.compression else [])

    def backup(self, repo, src, label):
        compression = ["--compression", "auto"] if self.compression else []
        return ["restic", "backup", "--repo", repo, "-q", *compression, src]

    def restore(self, repo, target, label):
        return ["restic", "restore", "latest", "--repo", repo, "--target", target], None

    def restored_root(self, target, src):
        return os.path.join(target, os.path.abspath(src).lstrip("/"))

    def probe(self):
        out = run_quiet(["restic", "version"]).stdout
        match = re.search(r"restic (\d+)\.(\d+)\.(\d+)", out)
        if not match:
            return f"cannot read its version from {out.strip()!r}"
        self.version = ".".join(match.groups())
        if tuple(int(g) for g in match.groups()) < (0, 14, 0):
            self.compression = False
            self.notes.append(f"restic {self.version} < 0.14: no compression, repository format 1")
        return None


class Borg(Tool):
    def __init__(self):
        super().__init__("borg")

    def env(self, cache_dir):
        return dict(os.environ, BORG_PASSPHRASE=PASSWORD, BORG_BASE_DIR=os.path.join(cache_dir, "borg"),
                    BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")

    def init(self, repo):
        return ["borg", "init", "--encryption=repokey-blake2", repo]

    def backup(self, repo, src, label):
        return ["borg", "create", "--compression", "zstd", f"{repo}::{label}", src]

    def restore(self, repo, target, label):
        return ["borg", "extract", f"{repo}::{label}"], target  # borg extracts into the working directory

    def restored_root(self, target, src):
        return os.path.join(target, os.path.abspath(src).lstrip("/"))

    def probe(self):
        out = run_quiet(["borg", "--version"]).stdout
        match = re.search(r"borg (\d+)\.(\d+)\.(\d+)", out)
        if not match:
            return f"cannot read its version from {out.strip()!r}"
        self.version = ".".join(match.groups())
        if match.group(1) != "1":
            return f"borg {self.version}: this harness drives borg 1.x"
        return None


TOOLS = {"kdist": Kdist, "restic": Restic, "borg": Borg}


def _apt_install(packages: list[str]) -> str | None:
    """Install Debian packages; return the reason it failed, or None."""
    if os.geteuid() != 0:
        return "not root, cannot apt-get install"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", *packages]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:  # perhaps stale package lists: update once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return f"apt-get install {' '.join(packages)} failed: {lines[-1] if lines else result.returncode}"
    return None


def kdist_process_tools(counts: list[int], say, weak_kdf: bool = False) -> tuple[list[Tool], dict[str, str]]:
    """kdist-pN for each N of ``counts`` (``snapshot create --processes N``), and {name: why skipped}."""
    tools, skipped = [], {}
    for n in counts:
        tool = Kdist(weak_kdf=weak_kdf, processes=n)
        if (why := tool.probe()) is not None:
            skipped[tool.name] = why
            say(f"{tool.name}: skipped ({why})")
        else:
            tools.append(tool)
    return tools, skipped


def setup_tools(names: list[str], say, weak_kdf: bool = False) -> tuple[list[Tool], dict[str, str]]:
    """The usable tools in the order asked, installing missing peers; and {name: why skipped}."""
    missing = [n for n in names if n in APT_PACKAGES and shutil.which(n) is None]
    install_error = None
    if missing:
        say(f"installing {', '.join(APT_PACKAGES[n] for n in missing)} with apt-get ...")
        install_error = _apt_install([APT_PACKAGES[n] for n in missing])
    tools, skipped = [], {}
    for name in names:
        tool = Kdist(weak_kdf=weak_kdf) if name == "kdist" else TOOLS[name]()
        if name in missing and shutil.which(name) is None:
            skipped[name] = f"could not install: {install_error or 'not found after apt-get install'}"
        elif (why := tool.probe()) is not None:
            skipped[name] = why
        if name in skipped:
            say(f"{name}: skipped ({skipped[name]})")
        else:
            tools.append(tool)
    return tools, skipped
