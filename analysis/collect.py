"""Collect run records under a results folder into one pandas DataFrame (one row per run, flat columns).

    python -m analysis.collect results/runs [--out results/runs.csv]

Nested record fields are flattened with dots (`latency.merged.p50_ms`). Records from older schema versions
are read as they are (missing columns are NaN); failed runs are kept with their `status`. Files that are not
valid JSON (e.g. an interrupted write by a tool that did not write atomically) are listed and skipped.

When a run folder holds `analysis.json` (written by `python -m analysis.analyse`) computed for its record, its
summary joins the row as `analysis.*` columns (`analysis.status`, `analysis.intruders.total` with the
`analysis.intruders.k` and `analysis.intruders.epsilon` it was counted at, `analysis.spectrum.mean_effective_rank`
...); a caller that holds the analyses (the report) passes them instead. `add_derived` adds the columns tables and
plots use:
`metric_pct`, `peak_train_memory_bytes` (+ its `memory_kind`), `intruders`, `forgetting_value`, `budget_desc`.
`task_kind` says what the task asks of the model (`task_kind_of`): `generation` (question -> worked solution -> final
number) or `classification` (a label per example, also when a causal LM answers it as text).
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.analyse import stored_analysis
from bench import record
from bench.data.tasks import CLASSIFICATION, GENERATION, TASKS
from bench.record.identity import BUDGET_ADDED

BUDGET_DESC_FIELDS = ("max_steps", "epochs", "batch_size", "train_samples", "eval_samples", "max_seq_len")


def load_records(root: str | Path, analyses: dict[str, dict] | None = None) -> tuple[list[dict], list[str]]:
    """Return (records, problems), read through bench.record. Each record gets `record_path` and the summary of
    its run's weight analysis as `analysis`: from `analyses` ({run dir: analysis}, as `analysis.analyse.analyse_all`
    returns) when given, else from the run folder's analysis.json when that was computed for this record."""
    records, problems = record.load_records(root)
    for rec in records:
        run_dir = Path(rec["record_path"]).parent
        res = analyses.get(str(run_dir)) if analyses is not None else stored_analysis(run_dir, rec)
        if res:
            rec["analysis"] = analysis_summary(res)
    return records, problems


def analysis_summary(res: dict) -> dict:
    """The scalar part of a run's analysis (no per-layer scores or singular values)."""
    out = {"status": res.get("status"), "reason": res.get("reason") or res.get("error")}
    if res.get("status") == "ok":
        intr, spec = res["intruders"], res["spectrum"]
        out["intruders"] = {k: intr[k] for k in ("k", "epsilon", "total", "layers", "layers_with_intruders",
                                                  "total_by_epsilon")}
        out["spectrum"] = {k: spec[k] for k in ("changed_layers", "mean_effective_rank",
                                                "mean_numerical_rank",
                                                "mean_energy90_rank", "mean_relative_update")}
    return out


def _budget_fields(rec: dict) -> dict:
    """The run's effective budget, without the fields that follow the task (budget=paper: epochs, batch size); keys
    newer than the record filled with the value it ran with (bench/record/identity.py BUDGET_ADDED)."""
    budget = dict((rec.get("effective_config") or {}).get("budget") or {})
    if budget:
        budget = {**BUDGET_ADDED, **budget}
    if budget.get("name") == "paper":
        for key in ("epochs", "eval_every_steps", "batch_size"):
            budget.pop(key, None)
    return budget


def to_frame(records: list[dict]) -> pd.DataFrame:
    """Flatten records; the full config blobs and per-eval lists are left out of the table."""
    slim = []
    for rec in records:
        group = rec["config_group"]
        budget = _budget_fields(rec)
        label = method_label_of(rec)
        kind = task_kind_of(rec)
        rec = {k: v for k, v in rec.items() if k not in ("config", "effective_config")}
        rec["method_label"] = label
        rec["task_kind"] = kind
        if group:
            rec["config_group"] = group
        if budget:
            rec["budget_sig"] = hashlib.sha256(json.dumps(budget, sort_keys=True).encode()).hexdigest()[:8]
            rec["budget_desc"] = f"{budget.get('name')}: " + ", ".join(
                f"{k}={budget[k]}" for k in BUDGET_DESC_FIELDS if budget.get(k) is not None)
        if isinstance(rec.get("train"), dict):
            rec["train"] = {k: v for k, v in rec["train"].items() if k != "evals"}
        slim.append(rec)
    df = pd.json_normalize(slim, sep=".")
    if not df.empty:
        df["ok"] = df["status"] == "ok"
    return df


def task_kind_of(rec: dict) -> str:
    """`generation` or `classification`, from the record: its effective task's `kind` (every run since generation
    tasks exist has it); else a generation evaluation in the record, or the task's yaml (conf/task/) for a task this
    checkout knows; else `classification` (records written before generation tasks existed)."""
    kind = ((rec.get("effective_config") or {}).get("task") or {}).get("kind")
    if kind:
        return str(kind)
    if rec.get("generation_eval") or rec.get("zero_shot_generation_eval"):
        return GENERATION
    task = TASKS.get(str(rec.get("task")))
    return task.kind if task is not None else CLASSIFICATION


def method_label_of(rec: dict) -> str:
    """The run's method label from its effective method config (`Method.config_label`: e.g. LoRA's scaling rule);
    the method's plain label for records without one, the name for methods this checkout does not have."""
    from methods import REGISTRY

    name = str(rec.get("method"))
    method = REGISTRY.get(name)
    if method is None:
        return name
    effective = (rec.get("effective_config") or {}).get("method")
    return method.config_label(effective) if isinstance(effective, dict) else method.display_label


def _first_present(df: pd.DataFrame, columns: list[str]) -> tuple[pd.Series, pd.Series]:
    """Row-wise first non-null value among `columns`, and the column it came from."""
    value = pd.Series(np.nan, index=df.index, dtype=float)
    source = pd.Series(None, index=df.index, dtype=object)
    for col in columns:
        if col in df.columns:
            take = value.isna() & df[col].notna()
            value[take] = df.loc[take, col].astype(float)
            source[take] = col
    return value, source


# Peak training memory: CUDA peak allocated when measured, else the CPU process's peak RSS.
MEMORY_COLUMNS = ["memory.train.peak_allocated_bytes", "memory.train.peak_rss_bytes"]
MEMORY_KIND = {"memory.train.peak_allocated_bytes": "CUDA peak allocated",
               "memory.train.peak_rss_bytes": "CPU peak RSS of the process"}


def add_derived(df: pd.DataFrame) -> pd.DataFrame:
    """Columns the tables and plots use, tolerant of records that lack some fields."""
    df = df.copy()

    def col(name: str) -> pd.Series:
        return df[name] if name in df.columns else pd.Series(np.nan, index=df.index)

    df["metric_pct"] = pd.to_numeric(col("main_metric_value"), errors="coerce") * 100
    df["peak_train_memory_bytes"], src = _first_present(df, MEMORY_COLUMNS)
    df["memory_kind"] = src.map(MEMORY_KIND)
    df["intruders"] = pd.to_numeric(col("analysis.intruders.total"), errors="coerce")
    df["forgetting_value"] = pd.to_numeric(col("forgetting.forgetting"), errors="coerce")
    if "rank" not in df.columns:
        df["rank"] = np.nan
    if "budget_desc" not in df.columns:
        df["budget_desc"] = col("budget").astype(str)
        df["budget_sig"] = df["budget_desc"]
    return df


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
