"""Sweep support: progress and a closing summary (a Hydra callback), and one GPU per worker process.

Progress works with every launcher because it goes through files, not memory: each finished job writes
`<sweep dir>/<job num>/bench_job.json` (run id, status, skipped), and the counts are a tally of those
files, so parallel workers (joblib, submitit) see the same numbers. The total comes from the basic
sweeper's own expansion of the sweep overrides (unknown for other sweepers).

GPU per worker: with several GPUs in one box and a parallel launcher (joblib, n_jobs = number of GPUs),
`device=auto` makes each worker process claim the first GPU no other process holds, through an
exclusive `flock` on a file in the temp folder named after the GPU's machine-wide id (its entry in
CUDA_VISIBLE_DEVICES when that is set). The kernel drops the lock when the process ends (also on
SIGKILL), so nothing stale is left behind. With one visible GPU (a Slurm task, a laptop) it is used.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from bench.record import read_record, write_json_atomic

JOB_FILE = "bench_job.json"
SWEEP_FILE = "bench_sweep.json"
SUMMARY_MAX_ROWS = 30  # beyond this the summary groups seeds: one row per config

def count_jobs(config: DictConfig) -> int | None:
    """Number of jobs the basic sweeper will launch for this multirun config (None for other sweepers)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.get("sweeper", {})
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
        return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))
    except Exception:  # noqa: BLE001 - a sweep type we cannot expand here: the total is unknown
        return None


def tally(sweep_dir: Path) -> dict[str, int]:
    """Counts over the finished jobs of a sweep: ran_ok, skipped, failed, finished."""
    counts = {"ran_ok": 0, "skipped": 0, "failed": 0, "finished": 0}
    for path in sweep_dir.glob(f"*/{JOB_FILE}"):
        try:
            job = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        counts["finished"] += 1
        if job.get("skipped"):
            counts["skipped"] += 1
        elif job.get("status") == "ok":
            counts["ran_ok"] += 1
        else:
            counts["failed"] += 1
    return counts


def progress_line(counts: dict[str, int], total: int | None) -> str:
    left = "?" if total is None else str(max(total - counts["finished"], 0))
    return (f"[sweep] {counts['finished']}/{total if total is not None else '?'} finished: "
            f"{counts['ran_ok']} ran ok, {counts['skipped']} skipped (ok record exists), "
            f"{counts['failed']} failed, {left} left")


def _job_outcome(job_return: JobReturn) -> dict[str, Any]:
    if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, dict):
        return dict(job_return.return_value)
    if job_return.status == JobStatus.COMPLETED:
        return {"status": str(job_return.return_value)}
    return {"status": "error", "error": repr(job_return._return_value)}  # the job raised


def summary_table(job_outcomes: list[dict]) -> str:
    """A one-screen table of a sweep's runs, read from their records (grouped over seeds when long)."""
    import pandas as pd

    records = []
    for job in job_outcomes:
        rec = read_record(job["record"]) if job.get("record") else None
        if rec is not None:
            scalars = {k: v for k, v in rec.items() if not isinstance(v, (dict, list))}
            records.append({**scalars, "skipped": bool(job.get("skipped"))})
        else:  # no record: a config error before the run had an identity, or a crash
            records.append({"run_id": job.get("run_id", "?"), "status": job.get("status", "?"),
                            "error": job.get("error"), "skipped": False})
    df = pd.DataFrame.from_records(records)
    for col in ("task", "model", "method", "rank", "seed", "main_metric_value", "trainable_params_excl_head",
                "train_samples_per_s", "run_wall_s", "error"):
        if col not in df.columns:
            df[col] = None
    df["status"] = df["status"].where(~df["skipped"].astype(bool), "ok (skipped)")
    if len(df) <= SUMMARY_MAX_ROWS:
        out = df[["run_id", "status", "main_metric_value", "trainable_params_excl_head", "train_samples_per_s",
                  "run_wall_s"]].rename(columns={"main_metric_value": "metric",
                                                 "trainable_params_excl_head": "params_excl_head",
                                                 "train_samples_per_s": "samples_per_s", "run_wall_s": "wall_s"})
        out["params_excl_head"] = [f"{int(v):,}" if pd.notna(v) else "-"
                                   for v in pd.to_numeric(out["params_excl_head"], errors="coerce")]
        text = out.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")
    else:
        df["ok"] = df["status"].str.startswith("ok")
        keys = ["task", "model", "method", "rank"]
        grouped = df.groupby(keys, dropna=False).agg(
            runs=("run_id", "size"), ok=("ok", "sum"),
            metric_mean=("main_metric_value", "mean"), metric_std=("main_metric_value", "std"))
        text = grouped.reset_index().to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")
    failed = df[~df["status"].str.startswith("ok")]
    lines = [text]
    for _, row in failed.head(10).iterrows():
        lines.append(f"  {row['status']}: {row['run_id']}: {str(row['error'])[:150]}")
    if len(failed) > 10:
        lines.append(f"  ... and {len(failed) - 10} more failures")
    return "\n".join(lines)


class SweepProgress(Callback):
    """Prints `[sweep] i/N finished: ... ran ok, ... skipped, ... failed, ... left` after each job of a
    multirun, and a summary table at the end (configured in conf/config.yaml, hydra.callbacks)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        for stale in sweep_dir.glob(f"*/{JOB_FILE}"):  # left by an earlier invocation into the same folder
            stale.unlink(missing_ok=True)
        total = count_jobs(config)
        write_json_atomic(sweep_dir / SWEEP_FILE, {"total": total, "started_at": _now()})
        print(f"[sweep] {total if total is not None else 'unknown number of'} runs; records in "
              f"{config.get('results_dir')}; per-job output in {sweep_dir}", flush=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        outcome = _job_outcome(job_return)
        write_json_atomic(Path(config.hydra.runtime.output_dir) / JOB_FILE, outcome)
        sweep_dir = Path(config.hydra.sweep.dir)
        print(progress_line(tally(sweep_dir), _read_total(sweep_dir)), flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = []
        for path in sorted(sweep_dir.glob(f"*/{JOB_FILE}"), key=lambda p: int(p.parent.name)
                           if p.parent.name.isdigit() else 0):
            try:
                jobs.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        counts = tally(sweep_dir)
        print(f"\n[sweep] done: {progress_line(counts, _read_total(sweep_dir))[8:]}", flush=True)
        if jobs:
            print(summary_table(jobs), flush=True)
        print(f"records: {config.get('results_dir')}   table: python -m analysis.collect "
              f"{config.get('results_dir')}", flush=True)


def _read_total(sweep_dir: Path) -> int | None:
    try:
        return json.loads((sweep_dir / SWEEP_FILE).read_text()).get("total")
    except (OSError, json.JSONDecodeError):
        return None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
