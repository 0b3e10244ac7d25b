"""The record: the only contract between a run and analysis.

This module owns the run folder's file names (`record.json`, `curve.csv`, `traceback.txt`, `weights/`),
the schema version, the status values, run identity (config hash), provenance, atomic writing and reading
(records of older schema versions included: missing fields are simply absent). The runner writes through
it; analysis and the sweep summary read through it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bench import BenchError
from bench.hashing import config_hash

SCHEMA_VERSION = 1
KNOWN_SCHEMAS = {1}  # schema versions `load_records` reads
RECORD_FILE = "record.json"
CURVE_FILE = "curve.csv"
TRACEBACK_FILE = "traceback.txt"
FAILED_ATTEMPT_FILE = "failed_attempt.json"  # a failed rerun of a run whose ok record stays its result
WEIGHTS_DIR = "weights"
OK = "ok"
FAILED_STATUSES = ("error", "nan", "oom")  # a run that finished with a failure; `ok` is the only success
STATUSES = (OK, *FAILED_STATUSES)
def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a reader sees the old file or the
    whole new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; records on a shared folder are for the team
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, default=str, allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def record_path(run_dir: str | Path) -> Path:
    """The record file of a run folder (a path to the record file itself is returned as is)."""
    run_dir = Path(run_dir)
    return run_dir if run_dir.name == RECORD_FILE or run_dir.is_file() else run_dir / RECORD_FILE


def read_record(path: str | Path) -> dict | None:
    """A record (from a run folder or its record file), or None when the file is missing or unreadable."""
    try:
        with open(record_path(path)) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def write_record(run_dir: Path, record: dict) -> Path:
    """Write a run's record atomically into its folder; returns the file's path."""
    path = run_dir / RECORD_FILE
    write_json_atomic(path, record)
    return path


def write_result(run_dir: Path, record: dict, previous: dict | None) -> Path:
    """Write an attempt's record. A failed attempt at a run whose last record is ok (a `rerun=true` that failed)
    goes beside it, into `failed_attempt.json`: the ok record stays the run's result until a new ok replaces it.
    BenchError (one line) when the folder cannot be written."""
    keep_ok = record.get("status") != OK and (previous or {}).get("status") == OK
    path = run_dir / (FAILED_ATTEMPT_FILE if keep_ok else RECORD_FILE)
    try:
        write_json_atomic(path, record)
    except OSError as exc:
        raise BenchError(f"{run_dir}: cannot write the run's record ({exc.strerror or type(exc).__name__}); "
                         f"its result ({record.get('status')}) is lost: make the folder writable and run again"
                         ) from None
    if keep_ok:
        print(f"kept the ok record of {record.get('run_id')}: this attempt ended '{record.get('status')}' "
              f"({path.name} beside it)")
    elif record.get("status") == OK:
        (run_dir / FAILED_ATTEMPT_FILE).unlink(missing_ok=True)  # an older failed attempt: superseded
    return path


def check_writable(run_dir: Path) -> None:
    """BenchError (one line, before any training) when the run folder cannot be made or written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BenchError(f"results_dir: cannot write in {run_dir} ({exc.strerror or type(exc).__name__}); "
                         "choose a writable folder, e.g. results_dir=/tmp/runs") from None


def find_records(root: str | Path) -> list[Path]:
    """Every record file under `root` (or `root` itself when it is a file)."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(root.rglob(RECORD_FILE))


def load_records(root: str | Path) -> tuple[list[dict], list[str]]:
    """(records, problems) under `root`: each record gets `record_path`; unreadable files and unknown schema
    versions are listed in `problems` and skipped."""
    records, problems = [], []
    for path in find_records(root):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            problems.append(f"{path}: unreadable ({type(exc).__name__})")
            continue
        schema = rec.get("schema_version")
        if schema not in KNOWN_SCHEMAS:
            problems.append(f"{path}: schema_version {schema} is not one this version reads "
                            f"{sorted(KNOWN_SCHEMAS)}")
            continue
        rec["record_path"] = str(path)
        records.append(rec)
    return records, problems


def config_group(effective: dict) -> str:
    """Hash of the effective config without the seed: the runs of one config over seeds share it
    (regression tracking compares seed groups)."""
    return config_hash({k: v for k, v in effective.items() if k != "seed"})
