"""Reading and writing records: the run folder's file names, atomic writes, the one reader and `migrate`.

Every record is written by `write_result` (validated against bench/record/schema.py) and read by `read_record` /
`load_records`, which migrate a record of any older schema version to the current one first (`migrate`), so no
reader patches old records itself.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bench import BenchError
from bench.metrics import directions
from bench.record.identity import config_group, config_hash, run_id
from bench.record.schema import OK, SCHEMA_VERSION, Record

KNOWN_SCHEMAS = (1, SCHEMA_VERSION)  # schema versions the reader migrates or reads
RECORD_FILE = "record.json"
CURVE_FILE = "curve.csv"
SAMPLES_FILE = "samples.jsonl"  # generation tasks: every evaluated answer (stage, question, generation, gold, ...)
TRACEBACK_FILE = "traceback.txt"
FAILED_ATTEMPT_FILE = "failed_attempt.json"  # a failed rerun of a run whose ok record stays its result
WEIGHTS_DIR = "weights"
# Set by the test suite: a record that does not follow the schema is an error at writing, not a warning.
STRICT_ENV = "PEFT_BENCH_STRICT_RECORDS"


class SchemaError(ValueError):
    """A record that cannot be read as the current schema (an unknown version, or fields that do not validate)."""


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """A record of any schema version this code knows, as the current version (a new dict). SchemaError for a
    version it does not know.

    1 -> 2: the knobs added since (budget.lr_schedule, lm.max_new_tokens, lm.shots) ran at their defaults; tasks had no
    `version` (their definition then is version 1), and the earliest records keep the task's
    label count only in the composed config; the identity becomes the allow-listed part of the effective config
    (bench/record/identity.py), so `config_hash`, `config_group` and `run_id` are recomputed and the old ones kept
    in `migrated_from`; records without `model_kind` are encoders (`classifier`); `higher_is_better` says each
    metric's direction; a thread count that was not recorded is unknown (null)."""
    version = raw.get("schema_version")
    if version == SCHEMA_VERSION:
        return dict(raw)
    if version != 1:
        raise SchemaError(f"schema_version {version!r} is not one this version reads {list(KNOWN_SCHEMAS)}"
                          + (" (written by a newer peft-bench?)" if isinstance(version, int) and version > 1 else ""))
    rec = dict(raw)
    effective = rec.get("effective_config")
    if isinstance(effective, dict):
        # knobs that schema 1 runs did not have ran at the value that is now their default
        if isinstance(effective.get("budget"), dict):
            effective = {**effective, "budget": {"lr_schedule": "linear", **effective["budget"]}}
        if isinstance(effective.get("lm"), dict):
            effective = {**effective, "lm": {"max_new_tokens": 256, "shots": 0, **effective["lm"]}}
        if isinstance(effective.get("task"), dict):
            task = {"version": 1, **effective["task"]}
            config_task = (rec.get("config") or {}).get("task") or {}
            if "num_labels" not in task and "num_labels" in config_task:
                task["num_labels"] = config_task["num_labels"]
            effective = {**effective, "task": task}
        rec["effective_config"] = effective
        new_hash = config_hash(effective)
        rec["migrated_from"] = {"schema_version": 1, "config_hash": rec.get("config_hash"),
                                "run_id": rec.get("run_id")}
        rec["config_hash"], rec["config_group"] = new_hash, config_group(effective)
        rec["run_id"] = run_id(rec["task"], rec["model"], rec["method"], rec.get("rank"), rec["seed"], new_hash)
    if rec.get("status") == OK and not rec.get("model_kind"):
        rec["model_kind"] = "classifier"
    if isinstance(rec.get("metrics"), dict):
        rec["higher_is_better"] = directions(rec["metrics"])
    if isinstance(rec.get("provenance"), dict):
        rec["provenance"] = {"torch_threads": None, **rec["provenance"]}
    rec["schema_version"] = SCHEMA_VERSION
    return rec


def validate(raw: dict[str, Any]) -> Record:
    """The record (migrated from its schema version) as the typed Record. SchemaError with the first problems."""
    try:
        return Record.model_validate(migrate(raw))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
        raise SchemaError(f"does not follow the record schema ({problems})") from None


def as_dict(record: Record) -> dict[str, Any]:
    """The record as the JSON object it is stored as (fields never set are left out)."""
    return record.model_dump(mode="json", exclude_unset=True)


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


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written atomically like the record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
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
    """A record (from a run folder or its record file), migrated to the current schema and validated; None when
    the file is missing or not JSON. A record that does not validate is returned as stored (its status and attempt
    still decide whether a run is skipped), so a newer record is never mistaken for a missing one."""
    try:
        with open(record_path(path)) as fh:
            raw = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    try:
        return as_dict(validate(raw))
    except SchemaError:
        return raw


def write_record(run_dir: Path, record: dict) -> Path:
    """Write a record atomically into its folder (validated as `write_result` does); returns the file's path."""
    path = run_dir / RECORD_FILE
    write_json_atomic(path, _checked(record))
    return path


def _checked(record: dict) -> dict:
    """The record as stored: validated against the schema. One that does not validate is a bug in the writer; it is
    still written (no result is lost) with a warning, or raises where STRICT_ENV is set (the test suite)."""
    try:
        return as_dict(validate(record))
    except SchemaError as exc:
        if os.environ.get(STRICT_ENV):
            raise
        print(f"warning: record {record.get('run_id')} {exc}; written as it is", file=sys.stderr)
        return record


def write_result(run_dir: Path, record: dict, previous: dict | None) -> Path:
    """Write an attempt's record. A failed attempt at a run whose last record is ok (a `rerun=true` that failed)
    goes beside it, into `failed_attempt.json`: the ok record stays the run's result until a new ok replaces it.
    BenchError (one line) when the folder cannot be written."""
    keep_ok = record.get("status") != OK and (previous or {}).get("status") == OK
    path = run_dir / (FAILED_ATTEMPT_FILE if keep_ok else RECORD_FILE)
    record = _checked(record)
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
    """(records, problems) under `root`: every record migrated to the current schema and validated, each with its
    `record_path` added; files that are not JSON, of an unknown schema version or that do not validate are listed in
    `problems` and skipped."""
    records, problems = [], []
    for path in find_records(root):
        _, rec, problem = read_checked(path)
        if rec is None:
            problems.append(f"{path}: {problem}")
            continue
        rec["record_path"] = str(path)
        records.append(rec)
    return records, problems


def read_checked(path: Path) -> tuple[dict | None, dict | None, str | None]:
    """(the record as stored, migrated and validated, the problem) of a record file; where there is a problem (not
    JSON, an unknown schema version, fields that do not validate) the second is None."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, None, f"unreadable ({type(exc).__name__})"
    try:
        return raw, as_dict(validate(raw)), None
    except SchemaError as exc:
        return raw, None, str(exc)
