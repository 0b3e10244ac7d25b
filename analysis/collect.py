"""Collect run records under a results folder into one pandas DataFrame (one row per run, flat columns).

    python -m analysis.collect results/runs [--out results/runs.csv]

Nested record fields are flattened with dots (`latency.merged.p50_ms`). Records from older schema versions
are read as they are (missing columns are NaN); failed runs are kept with their `status`. Files that are not
valid JSON (e.g. an interrupted write by a tool that did not write atomically) are listed and skipped.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from bench.record import config_group

RECORD_NAME = "record.json"
KNOWN_SCHEMAS = {1}


def find_records(root: str | Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(root.rglob(RECORD_NAME))


def load_records(root: str | Path) -> tuple[list[dict], list[str]]:
    """Return (records, problems). Each record gets `record_path`."""
    records, problems = [], []
    for path in find_records(root):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            problems.append(f"{path}: unreadable ({type(exc).__name__})")
            continue
        schema = rec.get("schema_version")
        if schema not in KNOWN_SCHEMAS:
            problems.append(f"{path}: schema_version {schema} is not one this version reads {sorted(KNOWN_SCHEMAS)}")
            continue
        rec["record_path"] = str(path)
        records.append(rec)
    return records, problems


def to_frame(records: list[dict]) -> pd.DataFrame:
    """Flatten records; the full config blobs and per-eval lists are left out of the table."""
    slim = []
    for rec in records:
        group = config_group_of(rec)
        rec = {k: v for k, v in rec.items() if k not in ("config", "effective_config")}
        if group:
            rec["config_group"] = group
        if isinstance(rec.get("train"), dict):
            rec["train"] = {k: v for k, v in rec["train"].items() if k != "evals"}
        slim.append(rec)
    df = pd.json_normalize(slim, sep=".")
    if not df.empty:
        df["ok"] = df["status"] == "ok"
    return df


def config_group_of(rec: dict) -> str | None:
    """The record's config group (effective config minus the seed: one config over seeds), also for
    records written before the runner stored it."""
    if rec.get("config_group"):
        return rec["config_group"]
    effective = rec.get("effective_config")
    return config_group(effective) if isinstance(effective, dict) else None


def collect(root: str | Path) -> pd.DataFrame:
    records, problems = load_records(root)
    for line in problems:
        print(f"warning: {line}")
    return to_frame(records)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default="results/runs")
    ap.add_argument("--out", help="write the table here (.csv or .parquet)")
    args = ap.parse_args(argv)
    df = collect(args.results)
    if df.empty:
        raise SystemExit(f"no run records under {args.results}")
    if args.out:
        (df.to_parquet if args.out.endswith(".parquet") else df.to_csv)(args.out, index=False)
        print(f"wrote {len(df)} runs to {args.out}")
    cols = [c for c in ("run_id", "status", "main_metric_value", "trainable_params_excl_head",
                        "train_samples_per_s") if c in df.columns]
    print(df[cols].to_string(index=False))


if __name__ == "__main__":
    main()
