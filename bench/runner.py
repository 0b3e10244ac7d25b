"""One run: plan (effective config, identity) -> the steps of bench/steps.py -> record.

A run never raises to its caller: failures become records with a status (`error`, `nan`, `oom`),
so a sweep goes on. Runs are identified by the hash of their effective config (bench/plan.py); which
existing record makes a run skip is bench/resume.py; two workers never run the same config at once
(bench/lock.py); `oom_retries=N` retries an out-of-memory run with a smaller micro-batch (bench/oom.py).
A run interrupted by Ctrl-C writes no record, as if it had been killed.
"""
from __future__ import annotations

import datetime as dt
import functools
import os
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as hf_logging

from bench import BenchError, steps
from bench.fingerprint import lock_state
from bench.isolate import announce
from bench.lock import RunLock
from bench.measure import MemoryMeter, check_gpu_start, device_name, peak_memory_summary, release_memory
from bench.models import is_causal_lm
from bench.oom import oom_message, with_oom_retry
from bench.plan import Plan, identify, plan
from bench.precision import autocast_dtype
from bench.record import (
    OK,
    RECORD_FILE,
    SCHEMA_VERSION,
    TRACEBACK_FILE,
    check_writable,
    config_group,
    provenance,
    read_record,
    record_path,
    write_result,
)
from bench.resume import skip_reason
from bench.summary import print_summary
from bench.train import NonFiniteLoss
from methods.base import tensor_bytes

hf_logging.set_verbosity_error()  # the load report ("classifier newly initialised") is expected here


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run(cfg: DictConfig) -> dict:
    """Run one configuration and return its record (also written to `<results_dir>/<run_id>/record.json`).
    A skipped run returns its existing record with `skipped: True`."""
    p = plan(cfg)
    rows = steps.read_rows(p.task, cfg.budget)  # the data's and the model files' content join the identity
    fingerprints = steps.fingerprints(rows, cfg.model)
    p = identify(p, fingerprints)
    announce({"run_dir": str(p.run_dir), **_identity(p)})  # to a parent that runs this one isolated (bench/isolate.py)
    path = p.run_dir / RECORD_FILE
    reason = skip_reason(existing := read_record(path), cfg)
    if reason:
        print(f"skip {p.run_id}: {reason} ({path})")
        return {**existing, "skipped": True}
    check_writable(p.run_dir)
    lock = RunLock(p.run_dir)
    if not lock.acquire():
        print(f"skip {p.run_id}: another process is running it ({lock.path})")
        return {"run_id": p.run_id, "status": "running_elsewhere", "skipped": True}
    try:
        # Look again under the lock: another worker may have finished this run while we were planning.
        reason = skip_reason(existing := read_record(path), cfg)
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


def _identity(p: Plan) -> dict[str, Any]:
    """What names a run in its record: id, hashes, the labels tables group by, the effective config."""
    return {"run_id": p.run_id, "config_hash": p.config_hash, "config_group": config_group(p.effective),
            "task": p.task.name, "model": str(p.cfg.model.name), "method": p.method.name, "rank": p.rank,
            "seed": p.effective["seed"], "lr": p.lr, "budget": str(p.cfg.budget.name),
            "effective_config": p.effective}


def job_outcome(cfg: DictConfig, record: dict) -> dict[str, Any]:
    """What a sweep job returns to the progress callback (bench/sweep.py): run_id, status, skipped, record path."""
    path = record_path(Path(str(cfg.results_dir)) / record["run_id"])
    return {"run_id": record["run_id"], "status": record["status"], "skipped": bool(record.get("skipped")),
            "record": str(path) if path.is_file() else None, "error": record.get("error")}


def _attempt(p: Plan, previous: dict | None, rows: steps.Rows, fingerprints: dict) -> dict:
    """One attempt at the run: its record, whatever happens (an exception becomes a status)."""
    cfg = p.cfg
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))  # recorded in provenance.torch_threads
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, **_identity(p), "status": "error",
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
    start = time.perf_counter()
    finished = False
    try:
        record.update(with_oom_retry(functools.partial(_execute, rows=rows), p, int(cfg.get("oom_retries") or 0),
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
        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
        p.run_dir.mkdir(parents=True, exist_ok=True)
        (p.run_dir / TRACEBACK_FILE).write_text(traceback.format_exc())
        record["traceback_file"] = TRACEBACK_FILE
        finished = True
    finally:  # KeyboardInterrupt/SystemExit: no record, the run stays missing and a resume runs it
        if finished:
            record["ended_at"] = _now()
            record["run_wall_s"] = time.perf_counter() - start
            write_result(p.run_dir, record, previous)
    return record


def _execute(p: Plan, rows: steps.Rows) -> dict:
    """The steps of one run, in order; returns the record's measured part."""
    cfg, measure = p.cfg, p.cfg.measure
    out: dict[str, Any] = {}
    gpu_start = check_gpu_start(p.device, str(measure.busy_gpu), int(measure.busy_gpu_threshold_bytes))
    if gpu_start is not None:
        out["gpu_start"] = gpu_start
    steps.seed_everything(int(cfg.seed))
    data = steps.load_data(p.task, cfg, rows=rows)
    out["data"] = data.info
    probe = None
    if cfg.get("forgetting"):  # bench/probes.py: the same probe before attaching and after training
        from bench.probes import make_probe

        probe = make_probe(cfg.forgetting, cfg.model, data.tokenizer, p.task.name)

    causal = is_causal_lm(cfg.model)
    out["model_kind"] = "causal_lm" if causal else "classifier"
    model, out["model_source"] = steps.build_model(p)
    steps.check_positions(model.config, p, [*data.train_features, *data.dev_features])
    amp = autocast_dtype(p.precision)
    forgetting_before = probe.measure(model, p.device, amp) if probe is not None else None
    if causal:  # the pre-trained LM on the same evaluation: what fine-tuning adds over zero-shot prompting
        out["zero_shot_metrics"] = steps.evaluate(model, data.dev_loader, p.task, p.device, p.precision)[0]
        out["zero_shot_main_metric_value"] = out["zero_shot_metrics"][p.task.main_metric]
    if cfg.model.get("random_init"):
        out["model_note"] = "random-init test model: metrics are meaningless"
    out["full_model_bytes"] = tensor_bytes(model)
    meter = MemoryMeter(p.device)

    n_steps = steps.total_steps(len(data.train_loader), cfg.budget)
    model, counts = steps.attach(p, model, n_steps, data)
    out.update(counts)

    def evaluate_now() -> dict:
        return steps.evaluate(model, data.dev_loader, p.task, p.device, p.precision)[0]

    warmup = steps.timing_warmup(p, n_steps)
    with meter.phase("train"):
        tr = steps.train_model(p, model, data.train_loader, n_steps, warmup, evaluate_fn=evaluate_now)
    out["train"] = steps.train_summary(tr, warmup)
    out["train_samples_per_s"] = out["train"]["samples_per_s"]
    out["train_tokens_per_s"] = out["train"]["tokens_per_s"]

    with meter.phase("eval"):
        out["metrics"], logits = steps.evaluate(model, data.dev_loader, p.task, p.device, p.precision)
    out["main_metric"] = p.task.main_metric
    out["main_metric_value"] = out["metrics"][p.task.main_metric]
    rank_metrics = steps.evaluate_rank_variants(p, model, data.dev_loader)
    if rank_metrics:  # a method whose one trained model is also a model of other ranks (DyLoRA)
        out["rank_metrics"] = rank_metrics
    if probe is not None:
        out["forgetting"] = probe.result(forgetting_before, probe.measure(model, p.device, amp))

    merged = None
    if p.method.merges:
        merged = p.method.merged(model)
        out["merged_metrics"], merged_logits = steps.evaluate(merged, data.dev_loader, p.task, p.device,
                                                              p.precision)
        out["merged_max_abs_logit_diff"] = float(np.abs(merged_logits - logits).max())
    if measure.latency:
        # Base, unmerged and merged are timed side by side at the end (base: a fresh copy of the base model),
        # so that the machine's drift over the run does not masquerade as a method's overhead.
        variants = {"base": steps.build_model(p)[0], "unmerged": model}
        if merged is not None:
            variants["merged"] = merged
        out["latency"] = steps.time_latency(p, variants, data.tokenizer.vocab_size, meter)
        if causal and cfg.lm.generation:
            with meter.phase("generation"):
                out["generation"] = steps.time_generation(p, variants, data.tokenizer.vocab_size,
                                                          int(data.tokenizer.pad_token_id))
        del variants
    del merged
    out["memory"] = meter.phases
    out.update(peak_memory_summary(meter.phases, "train"))
    out["method_info"] = p.method.info(model)
    out.update(steps.save(p, p.method, model, tr.curve))
    return out


__all__ = ["run", "plan", "Plan"]
