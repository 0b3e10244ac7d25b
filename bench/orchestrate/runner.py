"""One run: plan (effective config, identity) -> the recipe (bench/recipe.py) -> record.

A run never raises to its caller: failures become records with a status (`error`, `nan`, `oom`),
so a sweep goes on. Runs are identified by the hash of their effective config (bench/plan/); which
existing record makes a run skip is resume.py; two workers never run the same config at once
(lock.py); `oom_retries=N` retries an out-of-memory run with a smaller micro-batch (oom.py).
A run interrupted by Ctrl-C writes no record, as if it had been killed.
"""
from __future__ import annotations

import datetime as dt
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as hf_logging

from bench import BenchError
from bench.data import Rows, read_rows
from bench.loop.train import NonFiniteLoss
from bench.measure.memory import release_memory
from bench.model import distributed
from bench.model.device import device_name
from bench.orchestrate.isolate import announce
from bench.orchestrate.lock import RunLock
from bench.orchestrate.oom import oom_message, with_oom_retry
from bench.orchestrate.resume import skip_reason
from bench.orchestrate.summary import print_summary
from bench.plan import Plan, identify, plan
from bench.plan.fingerprint import fingerprints as content_fingerprints
from bench.recipe import Recipe
from bench.record import (
    OK,
    RECORD_FILE,
    SCHEMA_VERSION,
    TRACEBACK_FILE,
    check_writable,
    config_group,
    read_record,
    record_path,
    write_result,
)
from bench.record.provenance import lock_state, provenance

hf_logging.set_verbosity_error()  # the load report ("classifier newly initialised") is expected here


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run(cfg: DictConfig) -> dict:
    """Run one configuration and return its record (also written to `<results_dir>/<run_id>/record.json`).
    A skipped run returns its existing record with `skipped: True`."""
    p = plan(cfg)
    if p.world.distributed and not p.world.launched:  # the ranks are started by torchrun's engine (isolate.py)
        from bench.orchestrate.isolate import run_isolated

        outcome = run_isolated(cfg)
        record = read_record(Path(outcome["record"])) if outcome.get("record") else None
        return record or {"run_id": outcome.get("run_id"), "status": outcome["status"], "error": outcome.get("error")}
    distributed.init(p.world, cfg.get("distributed"), p.device)
    rows = read_rows(p.task, cfg.budget)  # the data's and the model files' content join the identity
    fingerprints = content_fingerprints(rows, cfg.model)
    p = identify(p, fingerprints)
    if not p.world.main:
        return _follow(p, rows)
    announce({"run_dir": str(p.run_dir), **record_identity(p)})  # to a parent that runs this one isolated (isolate.py)
    path = p.run_dir / RECORD_FILE
    reason = skip_reason(existing := read_record(path), cfg)
    if reason:
        print(f"skip {p.run_id}: {reason} ({path})")
        distributed.from_main(p.world, False)
        return {**existing, "skipped": True}
    check_writable(p.run_dir)
    lock = RunLock(p.run_dir)
    if not lock.acquire():
        print(f"skip {p.run_id}: another process is running it ({lock.path})")
        distributed.from_main(p.world, False)
        return {"run_id": p.run_id, "status": "running_elsewhere", "skipped": True}
    try:
        # Look again under the lock: another worker may have finished this run while we were planning.
        reason = skip_reason(existing := read_record(path), cfg)
        distributed.from_main(p.world, not reason)  # a distributed run's other ranks: whether to train
        if reason:
            print(f"skip {p.run_id}: {reason} ({path})")
            return {**existing, "skipped": True}
        if existing:
            print(f"again {p.run_id}: the last attempt ended with status '{existing.get('status')}'")
        record = _attempt(p, existing, rows, fingerprints)
    finally:
        lock.release()
    release_memory(p.device)  # the next run of a sweep in this process starts clean
    print_summary(record, path)
    return record


def _follow(p: Plan, rows: Rows) -> dict:
    """A distributed run's rank other than 0: train when rank 0 says the run goes ahead; rank 0 records. A failure
    every rank meets (a NaN loss, a bad config found late) is rank 0's to record; any other ends this process, and
    with it the run (the launcher stops the others; rank 0 records an error)."""
    if not distributed.from_main(p.world, None):
        return {"run_id": p.run_id, "status": "skipped_by_rank_0", "skipped": True}
    try:
        Recipe(p, rows).run()
    except (NonFiniteLoss, BenchError) as exc:
        return {"run_id": p.run_id, "status": "error", "error": str(exc), "skipped": False}
    return {"run_id": p.run_id, "status": OK, "skipped": False}


def _stopped_by_launcher(signum: int, frame: Any) -> None:
    raise distributed.RankLost("rank 0 was stopped by its launcher (SIGTERM): another rank failed or the job was "
                               "cancelled; the launcher's output says which")


def record_identity(p: Plan) -> dict[str, Any]:
    """What names a run in its record: id, hashes, the labels tables group by, the effective config."""
    return {"run_id": p.run_id, "config_hash": p.config_hash, "config_group": config_group(p.effective),
            "task": p.task.name, "model": str(p.cfg.model.name), "method": p.method.name, "rank": p.rank,
            "seed": p.effective["seed"], "lr": p.lr, "budget": str(p.cfg.budget.name),
            "effective_config": p.effective}


def job_outcome(cfg: DictConfig, record: dict) -> dict[str, Any]:
    """What a sweep job returns to the progress callback (sweep.py): run_id, status, skipped, record path."""
    path = record_path(Path(str(cfg.results_dir)) / record["run_id"])
    return {"run_id": record["run_id"], "status": record["status"], "skipped": bool(record.get("skipped")),
            "record": str(path) if path.is_file() else None, "error": record.get("error")}


def _attempt(p: Plan, previous: dict | None, rows: Rows, fingerprints: dict) -> dict:
    """One attempt at the run: its record, whatever happens (an exception becomes a status)."""
    cfg = p.cfg
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))  # recorded in provenance.torch_threads
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, **record_identity(p), "status": "error",
        "attempt": int(previous.get("attempt", 1)) + 1 if previous else 1,
        "started_at": _now(), "provenance": {**provenance(), "device": device_name(p.device), "pid": os.getpid(),
                                             "parent_pid": os.getppid(),
                                             "torch_threads": torch.get_num_threads()},
        "config": OmegaConf.to_container(cfg, resolve=True), "fingerprints": fingerprints,
    }
    record["provenance"].update(lock_state())
    if previous:
        record["previous_status"] = previous.get("status")
    (p.run_dir / TRACEBACK_FILE).unlink(missing_ok=True)  # from an earlier failed attempt
    if p.world.launched:  # torchrun stops the other ranks when one dies: rank 0 then records the run as failed
        on_sigterm = signal.signal(signal.SIGTERM, _stopped_by_launcher)
    start = time.perf_counter()
    finished = False
    try:
        record.update(with_oom_retry(lambda attempt: Recipe(attempt, rows).run(), p, int(cfg.get("oom_retries") or 0),
                                     record))
        record["status"] = OK
        finished = True
    except NonFiniteLoss as exc:
        record.update(status="nan", error=str(exc))
        finished = True
    except torch.OutOfMemoryError as exc:
        record.update(status="oom", error=oom_message(exc))
        finished = True
    except BenchError as exc:
        record.update(status="error", error=str(exc))
        finished = True
    except Exception as exc:  # noqa: BLE001 - any failure is a result, the sweep goes on
        lost = distributed.lost_rank(exc) if p.world.launched else None
        record.update(status="error", error=lost or f"{type(exc).__name__}: {exc}")
        p.run_dir.mkdir(parents=True, exist_ok=True)
        (p.run_dir / TRACEBACK_FILE).write_text(traceback.format_exc())
        record["traceback_file"] = TRACEBACK_FILE
        finished = True
    finally:  # KeyboardInterrupt/SystemExit: no record, the run stays missing and a resume runs it
        if p.world.launched:  # the record is written whatever the launcher does meanwhile
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if finished:
            record["ended_at"] = _now()
            record["run_wall_s"] = time.perf_counter() - start
            write_result(p.run_dir, record, previous)
        if p.world.launched:
            signal.signal(signal.SIGTERM, on_sigterm)
    return record


__all__ = ["run", "plan", "Plan"]
