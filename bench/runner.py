"""One run: plan (effective config, identity) -> build -> train -> evaluate -> measure -> record.

A run never raises to its caller: failures become records with a status (`error`, `nan`, `oom`),
so a sweep goes on. Runs are identified by the hash of their effective config; a run whose `ok`
record exists is skipped unless `rerun=true`.

Resume policy: a run with an `ok` record is skipped; a run with a failure record (`error`, `nan`,
`oom`) is tried again (its `attempt` counter goes up) unless `skip_failed=true`; a run with no record
(killed, interrupted) is run. A run interrupted by Ctrl-C writes no record, as if it had been killed.
`oom_retries=N` retries an out-of-memory run up to N times with the micro-batch split by its smallest
factor and gradient accumulation multiplied by it, so the effective batch is unchanged (recorded under
`oom_retry`; the memory and speed figures are then those of the smaller micro-batch).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import datetime as dt
import os
import random
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as hf_logging

from bench import BenchError
from bench import metrics as glue_metrics
from bench.data import make_loader, subset, tokenize
from bench.measure import (
    MemoryMeter,
    check_gpu_start,
    device_name,
    latency_batch,
    latency_interleaved,
    peak_memory_summary,
    release_memory,
)
from bench.models import attach_context, load_model, load_tokenizer
from bench.record import SCHEMA_VERSION, config_group, config_hash, provenance, read_record, write_json_atomic
from bench.tasks import Task, get_task, load_task
from bench.train import NonFiniteLoss, autocast_dtype, predict, to_predictions, total_steps, train
from methods import Method, get_method
from methods.base import count_params, tensor_bytes

RECORD = "record.json"
hf_logging.set_verbosity_error()  # the load report ("classifier newly initialised") is expected here
FAILED_STATUSES = ("error", "nan", "oom")
LOCK_HEARTBEAT_S = 60.0  # a running run refreshes its lock's mtime this often
LOCK_STALE_S = 600.0     # a lock not refreshed for this long is taken over, from any host


@dataclass
class Plan:
    cfg: DictConfig
    task: Task
    method: Method
    device: torch.device
    precision: str
    rank: int | None
    lr: float
    method_cfg: dict
    effective: dict
    config_hash: str
    run_id: str
    run_dir: Path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from bench.sweep import auto_cuda_index  # several GPUs: one per worker process (see bench/sweep.py)

        index = auto_cuda_index(torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise BenchError(f"precision={name}: choose auto, fp32, bf16 or fp16")
    if device.type == "cpu" and name != "fp32":
        raise BenchError(f"precision={name} is for CUDA; CPU runs use fp32 (precision=auto or fp32)")
    return name


def plan(cfg: DictConfig) -> Plan:
    """Validate the config and work out the run's effective config and identity. Raises BenchError."""
    method = get_method(cfg.method.name)
    task = get_task(cfg.task.name)
    device = resolve_device(str(cfg.device))
    precision = resolve_precision(str(cfg.precision), device)
    method.validate(device)
    if method.uses_rank and (not isinstance(cfg.rank, int) or cfg.rank < 1):
        raise BenchError(f"rank={cfg.rank}: method '{method.name}' needs a positive integer rank")
    rank = int(cfg.rank) if method.uses_rank else None
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    lr = float(cfg.lr if cfg.lr is not None else method_cfg["lr"])
    if not lr > 0:
        raise BenchError(f"lr={lr}: the learning rate must be positive")
    eff_method = method.effective_config(method_cfg, rank)
    eff_method["lr"] = lr
    effective = {
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "method": eff_method,
        "rank": rank,
        "budget": OmegaConf.to_container(cfg.budget, resolve=True),
        "seed": int(cfg.seed),
        "device_type": device.type,
        "precision": precision,
        "measure": OmegaConf.to_container(cfg.measure, resolve=True),
    }
    if cfg.get("forgetting"):  # only when set, so runs without it keep their identity
        effective["forgetting"] = OmegaConf.to_container(cfg.forgetting, resolve=True)
    h = config_hash(effective)
    rank_part = f"-r{rank}" if rank is not None else ""
    run_id = f"{task.name}-{cfg.model.name}-{method.name}{rank_part}-s{cfg.seed}-{h[:8]}"
    run_dir = Path(str(cfg.results_dir)) / run_id
    return Plan(cfg, task, method, device, precision, rank, lr, method_cfg, effective, h, run_id, run_dir)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class _Lock:
    """`run_dir/.lock` created exclusively, so two workers of a parallel sweep do not run the same config.
    While the run goes on, a thread refreshes the lock's mtime. A lock is stale, and taken over, when its
    holder on this host is dead, or when it was not refreshed for LOCK_STALE_S (a holder on another host
    that died, e.g. a Slurm job killed at its time limit)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._stop = threading.Event()

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{socket.gethostname()}:{os.getpid()}")
            threading.Thread(target=self._heartbeat, daemon=True).start()
            return True
        return False

    def _stale(self) -> bool:
        try:
            host, _, pid = self.path.read_text().partition(":")
            age_s = time.time() - self.path.stat().st_mtime
        except OSError:  # released meanwhile
            return True
        dead_here = host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))
        return dead_here or age_s > LOCK_STALE_S

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _skip_reason(existing: dict | None, cfg: DictConfig) -> str | None:
    """Why a run with this existing record is not run again (None: run it)."""
    if existing is None or cfg.rerun:
        return None
    if existing.get("status") == "ok":
        return "an ok record exists; rerun=true to run it again"
    if existing.get("status") in FAILED_STATUSES and cfg.get("skip_failed", False):
        return f"a '{existing['status']}' record exists and skip_failed=true"
    return None


def run(cfg: DictConfig) -> dict:
    """Run one configuration and return its record (also written to `<results_dir>/<run_id>/record.json`).
    A skipped run returns its existing record with `skipped: True`."""
    p = plan(cfg)
    path = p.run_dir / RECORD
    reason = _skip_reason(existing := read_record(path), cfg)
    if reason:
        print(f"skip {p.run_id}: {reason} ({path})")
        return {**existing, "skipped": True}
    lock = _Lock(p.run_dir)
    if not lock.acquire():
        print(f"skip {p.run_id}: another process is running it ({lock.path})")
        return {"run_id": p.run_id, "status": "running_elsewhere", "skipped": True}
    try:
        # Look again under the lock: another worker may have finished this run while we were planning.
        reason = _skip_reason(existing := read_record(path), cfg)
        if reason:
            print(f"skip {p.run_id}: {reason} ({path})")
            return {**existing, "skipped": True}
        if existing:
            print(f"again {p.run_id}: the last attempt ended with status '{existing.get('status')}'")
        record = _attempt(p, existing)
    finally:
        lock.release()
    release_memory(p.device)  # the next run of a sweep in this process starts clean
    _print_summary(record, path)
    return record


def _smaller_micro_batch(p: Plan) -> Plan | None:
    """The same plan with the micro-batch divided by its smallest factor and gradient accumulation
    multiplied by it (same effective batch); None when the micro-batch is already 1."""
    size = int(p.cfg.budget.batch_size)
    factor = next((f for f in range(2, size + 1) if size % f == 0), None)
    if factor is None:
        return None
    cfg = copy.deepcopy(p.cfg)
    cfg.budget.batch_size = size // factor
    cfg.budget.grad_accum_steps = int(cfg.budget.grad_accum_steps) * factor
    return dataclasses.replace(p, cfg=cfg)


def _attempt(p: Plan, previous: dict | None) -> dict:
    cfg = p.cfg
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))  # recorded in provenance.torch_threads
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "run_id": p.run_id, "config_hash": p.config_hash,
        "config_group": config_group(p.effective), "status": "error",
        "task": p.task.name, "model": str(cfg.model.name), "method": p.method.name, "rank": p.rank,
        "seed": int(cfg.seed), "lr": p.lr, "budget": str(cfg.budget.name),
        "attempt": int(previous.get("attempt", 1)) + 1 if previous else 1,
        "started_at": _now(), "provenance": {**provenance(), "device": device_name(p.device), "pid": os.getpid(),
                                             "torch_threads": torch.get_num_threads()},
        "effective_config": p.effective, "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if previous:
        record["previous_status"] = previous.get("status")
    (p.run_dir / "traceback.txt").unlink(missing_ok=True)  # from an earlier failed attempt
    start = time.perf_counter()
    finished = False
    try:
        record.update(_execute_with_oom_retry(p, int(cfg.get("oom_retries") or 0), record))
        record["status"] = "ok"
        finished = True
    except NonFiniteLoss as exc:
        record.update(status="nan", error=str(exc))
        finished = True
    except torch.OutOfMemoryError as exc:
        record.update(status="oom", error=(str(exc).splitlines() or ["out of memory"])[0])
        finished = True
    except BenchError as exc:
        record.update(status="error", error=str(exc))
        finished = True
    except Exception as exc:  # noqa: BLE001 - any failure is a result, the sweep goes on
        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
        p.run_dir.mkdir(parents=True, exist_ok=True)
        (p.run_dir / "traceback.txt").write_text(traceback.format_exc())
        record["traceback_file"] = "traceback.txt"
        finished = True
    finally:  # KeyboardInterrupt/SystemExit: no record, the run stays missing and a resume runs it
        if finished:
            record["ended_at"] = _now()
            record["run_wall_s"] = time.perf_counter() - start
            write_json_atomic(p.run_dir / RECORD, record)
    return record


def _execute_with_oom_retry(p: Plan, retries: int, record: dict) -> dict:
    """_execute, and on out-of-memory up to `retries` more tries with a smaller micro-batch."""
    failed: list[dict] = []
    while True:
        message = None
        try:
            out = _execute(p)
        except torch.OutOfMemoryError as exc:
            message = (str(exc).splitlines() or ["out of memory"])[0]
        if message is None:
            if failed:
                out["oom_retry"] = {**record["oom_retry"], "batch_size": int(p.cfg.budget.batch_size),
                                    "grad_accum_steps": int(p.cfg.budget.grad_accum_steps)}
            return out
        release_memory(p.device)  # outside the except block: the failed attempt's frames are released by now
        failed.append({"batch_size": int(p.cfg.budget.batch_size),
                       "grad_accum_steps": int(p.cfg.budget.grad_accum_steps), "error": message})
        smaller = _smaller_micro_batch(p) if len(failed) <= retries else None
        if retries:
            record["oom_retry"] = {"failed_attempts": failed,
                                   "note": "memory and speed figures are those of the last micro-batch"}
        if smaller is None:
            raise torch.OutOfMemoryError(message)
        print(f"oom {p.run_id}: retrying with micro-batch {smaller.cfg.budget.batch_size} x "
              f"{smaller.cfg.budget.grad_accum_steps} accumulation steps (same effective batch)")
        p = smaller


def _evaluate(model, loader, p: Plan) -> tuple[dict[str, float], np.ndarray]:
    logits, labels, loss = predict(model, loader, p.device, p.precision)
    preds = to_predictions(logits, p.task.is_regression)
    return {**glue_metrics.compute(list(p.task.metrics), preds, labels), "eval_loss": loss}, logits


def _check_positions(config: Any, p: Plan, features: list[dict]) -> None:
    """Prompt/prefix tuning lengthen every sequence by their virtual tokens; fail before training, with the fix,
    when the longest example would then run past the model's position embeddings."""
    extra = p.method.virtual_tokens(p.rank)
    positions = getattr(config, "max_position_embeddings", None)
    if not extra or not positions:
        return
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        positions -= int(config.pad_token_id) + 1  # RoBERTa's positions start after the padding index
    longest = max(len(f["input_ids"]) for f in features)
    if longest + extra > positions:
        raise BenchError(f"method '{p.method.name}' adds {extra} virtual tokens, and the longest tokenised example "
                         f"has {longest}: {longest + extra} > the model's {positions} positions; set "
                         f"budget.max_seq_len={positions - extra} (for every method you compare) or a smaller rank")


def _execute(p: Plan) -> dict:
    cfg, budget, measure = p.cfg, p.cfg.budget, p.cfg.measure
    out: dict[str, Any] = {}
    gpu_start = check_gpu_start(p.device, str(measure.busy_gpu), int(measure.busy_gpu_threshold_bytes))
    if gpu_start is not None:
        out["gpu_start"] = gpu_start
    seed_everything(int(cfg.seed))

    train_df, dev_df, data_source = load_task(p.task)
    train_df, dev_df = subset(train_df, budget.train_samples), subset(dev_df, budget.eval_samples)
    tokenizer = load_tokenizer(cfg.model)
    train_features, dev_features = (tokenize(df, tokenizer, budget.max_seq_len) for df in (train_df, dev_df))
    train_loader = make_loader(train_features, tokenizer, budget.batch_size, shuffle=True, seed=int(cfg.seed))
    dev_loader = make_loader(dev_features, tokenizer, measure.eval_batch_size, shuffle=False, seed=0)
    out["data"] = {"source": data_source, "train_rows": len(train_df), "dev_rows": len(dev_df),
                   "note": p.task.offline_note if data_source.startswith("glue_dir") else ""}

    probe = None
    if cfg.get("forgetting"):  # analysis/forgetting.py: the same probe before attaching and after training
        from bench.probes import make_probe
        probe = make_probe(cfg.forgetting, cfg.model, tokenizer, p.task.name)

    load_kwargs = p.method.load_kwargs(cfg.method, cfg.model, p.device)  # e.g. QLoRA's 4-bit quantisation
    model, model_source = load_model(cfg.model, p.task.num_labels, **load_kwargs)
    model.to(p.device)
    _check_positions(model.config, p, [*train_features, *dev_features])
    if probe is not None:
        forgetting_before = probe.measure(model, p.device, autocast_dtype(p.precision))
    out["model_source"] = model_source
    if cfg.model.get("random_init"):
        out["model_note"] = "random-init test model: metrics are meaningless"
    head = str(cfg.model.head)
    out["full_model_bytes"] = tensor_bytes(model)
    meter = MemoryMeter(p.device)
    amp = autocast_dtype(p.precision)

    steps = total_steps(len(train_loader), budget)
    ctx = attach_context(cfg.model, p.rank, p.task.num_labels, steps)
    model = p.method.attach(model, cfg.method, ctx)
    model.to(p.device)
    out.update(count_params(model, head))
    if out["trainable_params_excl_head"] == 0 and p.method.name != "full":
        raise BenchError(f"method '{p.method.name}' attached no trainable parameters outside the task head; "
                         f"check method.target_modules ({cfg.method.get('target_modules')}) against the model")

    def evaluate_now() -> dict:
        return _evaluate(model, dev_loader, p)[0]

    # Short runs (smoke budgets) keep at least half their steps timed.
    timing_warmup = min(int(measure.timing_warmup_steps), steps // 2)
    with meter.phase("train"):
        tr = train(model, p.method, train_loader, lr=p.lr, weight_decay=float(p.method_cfg["weight_decay"]),
                   warmup_ratio=float(p.method_cfg["warmup_ratio"]), budget=budget, steps=steps,
                   device=p.device, precision=p.precision, head=head, run_id=p.run_id,
                   timing_warmup_steps=timing_warmup, evaluate_fn=evaluate_now,
                   main_metric=p.task.main_metric)
    out["train"] = {
        "steps": tr.steps, "samples": tr.samples, "wall_s": tr.wall_s, "timed_steps": tr.timed_steps,
        "timed_s": tr.timed_s, "compute_s": tr.compute_s, "data_s": tr.data_s,
        "samples_per_s": tr.timed_samples / tr.timed_s if tr.timed_s else None,
        "tokens_per_s": tr.timed_tokens / tr.timed_s if tr.timed_s else None,
        "step_time_ms": 1000 * tr.compute_s / tr.timed_steps if tr.timed_steps else None,
        "data_time_ms": 1000 * tr.data_s / tr.timed_steps if tr.timed_steps else None,
        "timing_warmup_steps": timing_warmup, "best_step": tr.best_step, "evals": tr.evals,
        "max_batch_seq_len": tr.max_batch_seq_len,
    }
    out["train_samples_per_s"] = out["train"]["samples_per_s"]
    out["train_tokens_per_s"] = out["train"]["tokens_per_s"]

    with meter.phase("eval"):
        out["metrics"], logits = _evaluate(model, dev_loader, p)
    out["main_metric"] = p.task.main_metric
    out["main_metric_value"] = out["metrics"][p.task.main_metric]
    if probe is not None:
        out["forgetting"] = probe.result(forgetting_before,
                                         probe.measure(model, p.device, autocast_dtype(p.precision)))

    merged = None
    if p.method.merges:
        merged = p.method.merged(model)
        merged_metrics, merged_logits = _evaluate(merged, dev_loader, p)
        out["merged_metrics"] = merged_metrics
        out["merged_max_abs_logit_diff"] = float(np.abs(merged_logits - logits).max())
    if measure.latency:
        # Base, unmerged and merged are timed side by side at the end (base: a fresh copy of the base model),
        # so that the machine's drift over the run does not masquerade as a method's overhead.
        base_model = load_model(cfg.model, p.task.num_labels, **load_kwargs)[0]
        variants = {"base": base_model.to(p.device), "unmerged": model}
        if merged is not None:
            variants["merged"] = merged
        lat_batch = latency_batch(tokenizer.vocab_size, measure.latency_batch_size, measure.latency_seq_len,
                                  p.device)
        latency = {"batch_size": int(measure.latency_batch_size), "seq_len": int(measure.latency_seq_len),
                   "order": "interleaved"}
        latency.update(latency_interleaved(
            variants, lat_batch, warmup_iters=int(measure.latency_warmup_iters), iters=int(measure.latency_iters),
            device=p.device, autocast_dtype=amp, rounds=int(measure.latency_rounds),
            warmup_tol=float(measure.latency_warmup_tol), max_warmup_s=float(measure.latency_max_warmup_s),
            meter=meter))
        for name in ("unmerged", "merged"):
            if name in latency:
                latency[f"{name}_over_base_p50_ratio"] = latency[name]["p50_ms"] / latency["base"]["p50_ms"]
        out["latency"] = latency
        del base_model, variants, lat_batch
    del merged
    out["memory"] = meter.phases
    out.update(peak_memory_summary(meter.phases, "train"))
    out["method_info"] = p.method.info(model)

    if cfg.save_weights != "none":
        weights_dir = p.run_dir / "weights"
        p.method.save(model, weights_dir)
        out["weights_dir"] = "weights"
        out["adapter_bytes"] = sum(f.stat().st_size for f in weights_dir.glob("*.safetensors"))
    with open(p.run_dir / "curve.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "loss", "lr", "elapsed_s"])
        writer.writeheader()
        writer.writerows(tr.curve)
    out["curve_file"] = "curve.csv"
    return out


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _print_summary(rec: dict, path: Path) -> None:
    if rec["status"] != "ok":
        print(f"FAILED {rec['run_id']} status={rec['status']}: {rec.get('error')}\n  record: {path}")
        return
    mem = rec["memory"].get("train", {})
    peak = mem.get("peak_allocated_bytes", mem.get("peak_rss_bytes", mem.get("lifetime_peak_rss_bytes")))
    peak_label = "peak CUDA allocated" if mem.get("kind") == "cuda" else "peak RSS (process)"
    lat = rec.get("latency", {})
    lines = [
        f"run {rec['run_id']}  status=ok",
        f"  {rec['main_metric']} = {rec['main_metric_value']:.4f}   eval_loss = {rec['metrics']['eval_loss']:.4f}"
        + (f"   ({rec['model_note']})" if rec.get("model_note") else ""),
        f"  trainable params {rec['trainable_params']:,} ({rec['trainable_params_excl_head']:,} excl. head) "
        f"of {rec['total_params']:,}",
        f"  train {rec['train']['steps']} steps in {rec['train']['wall_s']:.1f} s, "
        f"{rec['train_samples_per_s']:.1f} samples/s; {peak_label} during training {_fmt_bytes(peak)}",
    ]
    if "base" in lat:
        line = f"  latency p50 (batch {lat['batch_size']}x{lat['seq_len']}): base {lat['base']['p50_ms']:.1f} ms"
        line += f", unmerged {lat['unmerged']['p50_ms']:.1f} ms"
        if "merged" in lat:
            diff = rec["merged_max_abs_logit_diff"]
            line += f", merged {lat['merged']['p50_ms']:.1f} ms (max |logit diff| {diff:.1e})"
        line += f"; unmerged/base {lat['unmerged_over_base_p50_ratio']:.2f}"
        if "merged" in lat:
            line += f", merged/base {lat['merged_over_base_p50_ratio']:.2f}"
        lines.append(line)
    for flag in rec.get("gpu_start", {}).get("flags", []):
        lines.append(f"  WARNING (GPU at run start): {flag}")
    if "adapter_bytes" in rec:
        lines.append(f"  stored weights {_fmt_bytes(rec['adapter_bytes'])} "
                     f"vs full model {_fmt_bytes(rec['full_model_bytes'])}")
    lines.append(f"  record: {path}")
    print("\n".join(lines))
