"""Where a run came from: git state, package versions, host, and the lock file's state (provenance, not identity:
a run on other versions is the same experiment, and `analysis.compare` shows the versions that differ)."""
from __future__ import annotations

import platform
import re
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.config import REPO_ROOT
from bench.hashing import file_sha256

LOCK_FILE = REPO_ROOT / "requirements.lock"


PACKAGES = ("torch", "transformers", "peft", "tokenizers", "accelerate", "safetensors", "datasets", "hydra-core",
            "numpy", "scipy", "scikit-learn", "pandas", "bitsandbytes")


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def provenance() -> dict[str, Any]:
    return {**git_state(), "versions": versions(), "hostname": socket.gethostname(),
            "platform": platform.platform()}



def read_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    """{normalised package name: pinned version} from a pip constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[_normalise(name)] = version.strip()
    return pins


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_state(path: Path = LOCK_FILE) -> dict[str, Any]:
    """sha256 of the lock file and the installed packages that differ from it (name: installed vs locked)."""
    if not path.is_file():
        return {"lock_sha256": None, "lock_mismatches": None}
    installed = {_normalise(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}
    mismatches = {name: f"{installed[name]} (lock {version})" for name, version in sorted(read_lock(path).items())
                  if name in installed and installed[name] != version}
    return {"lock_sha256": file_sha256(path), "lock_mismatches": mismatches}

