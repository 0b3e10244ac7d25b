"""One run: plan (effective config, identity) -> build -> train -> evaluate -> measure -> record.

A run never raises to its caller: failures become records with a status (`error`, `nan`, `oom`),
so a sweep goes on. Runs are identified by the hash of their effective config; a run whose `ok`
record exists is skipped unless `rerun=true`.
"""
from __future__ import annotations

import csv
import datetime as dt
import os
import random
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bench import BenchError, metrics as glue_metrics
from bench.data import make_loader, subset, tokenize
from bench.measure import MemoryMeter, device_name, latency_batch, latency_ms
from bench.models import load_model, load_tokenizer
from bench.record import SCHEMA_VERSION, config_hash, provenance, read_record, write_json_atomic
from bench.tasks import Task, get_task, load_task
from bench.train import NonFiniteLoss, autocast_dtype, predict, to_predictions, total_steps, train
from methods import AttachContext, Method, get_method
from methods.base import count_params, tensor_bytes

RECORD = "record.json"


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
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    A lock left by a dead process on this host is taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                host, _, pid = self.path.read_text().partition(":")
                if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                    self.path.unlink(missing_ok=True)
                    continue
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{socket.gethostname()}:{os.getpid()}")
            return True
        return False

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(cfg: DictConfig) -> dict:
    """Run one configuration and return its record (also written to `<results_dir>/<run_id>/record.json`)."""
    p = plan(cfg)
    existing = read_record(p.run_dir / RECORD)
    if existing and existing.get("status") == "ok" and not cfg.rerun:
        print(f"skip {p.run_id}: an ok record exists ({p.run_dir / RECORD}); rerun=true to run again")
        return {**existing, "skipped": True}
    lock = _Lock(p.run_dir)
    if not lock.acquire():
        print(f"skip {p.run_id}: another process is running it ({lock.path})")
        return {"run_id": p.run_id, "status": "running_elsewhere", "skipped": True}
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "run_id": p.run_id, "config_hash": p.config_hash, "status": "error",
        "task": p.task.name, "model": str(cfg.model.name), "method": p.method.name, "rank": p.rank,
        "seed": int(cfg.seed), "lr": p.lr, "budget": str(cfg.budget.name),
        "started_at": _now(), "provenance": {**provenance(), "device": device_name(p.device)},
        "effective_config": p.effective, "config": OmegaConf.to_container(cfg, resolve=True),
    }
    start = time.perf_counter()
    try:
        record.update(_execute(p))
        record["status"] = "ok"
    except NonFiniteLoss as exc:
        record.update(status="nan", error=str(exc))
    except torch.OutOfMemoryError as exc:
        record.update(status="oom", error=str(exc).splitlines()[0])
    except BenchError as exc:
        record.update(status="error", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure is a result, the sweep goes on
        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
        p.run_dir.mkdir(parents=True, exist_ok=True)
        (p.run_dir / "traceback.txt").write_text(traceback.format_exc())
        record["traceback_file"] = "traceback.txt"
    finally:
        record["ended_at"] = _now()
        record["run_wall_s"] = time.perf_counter() - start
        write_json_atomic(p.run_dir / RECORD, record)
        lock.release()
    _print_summary(record, p.run_dir / RECORD)
    return record


def _evaluate(model, loader, p: Plan) -> tuple[dict[str, float], np.ndarray]:
    logits, labels, loss = predict(model, loader, p.device, p.precision)
    preds = to_predictions(logits, p.task.is_regression)
    return {**glue_metrics.compute(list(p.task.metrics), preds, labels), "eval_loss": loss}, logits


def _execute(p: Plan) -> dict:
    cfg, budget, measure = p.cfg, p.cfg.budget, p.cfg.measure
    out: dict[str, Any] = {}
    seed_everything(int(cfg.seed))

    train_df, dev_df, data_source = load_task(p.task)
    train_df, dev_df = subset(train_df, budget.train_samples), subset(dev_df, budget.eval_samples)
    tokenizer = load_tokenizer(cfg.model)
    train_loader = make_loader(tokenize(train_df, tokenizer, budget.max_seq_len), tokenizer,
                               budget.batch_size, shuffle=True, seed=int(cfg.seed))
    dev_loader = make_loader(tokenize(dev_df, tokenizer, budget.max_seq_len), tokenizer,
                             measure.eval_batch_size, shuffle=False, seed=0)
    out["data"] = {"source": data_source, "train_rows": len(train_df), "dev_rows": len(dev_df),
                   "note": p.task.offline_note if data_source.startswith("glue_dir") else ""}

    probe = None
    if cfg.get("forgetting"):  # analysis/forgetting.py: the same probe before attaching and after training
        from analysis.forgetting import make_probe
        probe = make_probe(cfg.forgetting, cfg.model, tokenizer, p.task.name)

    model, model_source = load_model(cfg.model, p.task.num_labels)
    model.to(p.device)
    if probe is not None:
        forgetting_before = probe.measure(model, p.device, autocast_dtype(p.precision))
    out["model_source"] = model_source
    if cfg.model.get("random_init"):
        out["model_note"] = "random-init test model: metrics are meaningless"
    head = str(cfg.model.head)
    out["full_model_bytes"] = tensor_bytes(model)
    meter = MemoryMeter(p.device)
    amp = autocast_dtype(p.precision)
    lat_batch = latency_batch(tokenizer.vocab_size, measure.latency_batch_size, measure.latency_seq_len, p.device)
    latency: dict[str, Any] = {"batch_size": measure.latency_batch_size, "seq_len": measure.latency_seq_len}
    if measure.latency:
        with meter.phase("latency_base"):
            latency["base"] = latency_ms(model, lat_batch, measure.latency_warmup_iters, measure.latency_iters,
                                         p.device, amp)

    steps = total_steps(len(train_loader), budget)
    ctx = AttachContext(rank=p.rank, model_cfg=cfg.model, num_labels=p.task.num_labels, total_steps=steps)
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

    if measure.latency:
        with meter.phase("latency_unmerged"):
            latency["unmerged"] = latency_ms(model, lat_batch, measure.latency_warmup_iters,
                                             measure.latency_iters, p.device, amp)
    if p.method.merges:
        merged = p.method.merged(model)
        merged_metrics, merged_logits = _evaluate(merged, dev_loader, p)
        out["merged_metrics"] = merged_metrics
        out["merged_max_abs_logit_diff"] = float(np.abs(merged_logits - logits).max())
        if measure.latency:
            with meter.phase("latency_merged"):
                latency["merged"] = latency_ms(merged, lat_batch, measure.latency_warmup_iters,
                                               measure.latency_iters, p.device, amp)
        del merged
    out["latency"] = latency
    out["memory"] = meter.phases
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
    lat = rec["latency"]
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
            line += f", merged {lat['merged']['p50_ms']:.1f} ms (max |logit diff| {rec['merged_max_abs_logit_diff']:.1e})"
        lines.append(line)
    if "adapter_bytes" in rec:
        lines.append(f"  stored weights {_fmt_bytes(rec['adapter_bytes'])} vs full model {_fmt_bytes(rec['full_model_bytes'])}")
    lines.append(f"  record: {path}")
    print("\n".join(lines))
