"""The steps of a run, each a function: load data, build the model, attach the method, train, evaluate, time
the latency, save. bench/runner.py calls them in order; the sequential-forgetting experiment
(analysis/forgetting.py) and the overhead benchmark (bench/perf/overhead.py) call the same ones."""
from __future__ import annotations

import csv
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn

from bench import BenchError, lm
from bench import metrics as glue_metrics
from bench.data import make_loader, subset, tokenize
from bench.fingerprint import model_fingerprint, rows_sha256
from bench.measure import MemoryMeter, generation_interleaved, latency_batch, latency_interleaved, latency_ratios
from bench.models import attach_context, is_causal_lm, load_model, load_tokenizer
from bench.plan import Plan
from bench.precision import autocast_dtype
from bench.record import CURVE_FILE, WEIGHTS_DIR
from bench.tasks import Task, load_task
from bench.train import TrainResult, TrainSettings, predict, to_predictions, total_steps, train
from methods import Method
from methods.base import count_params, head_modules


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


@dataclass
class Data:
    tokenizer: Any
    train_features: list[dict]
    dev_features: list[dict]
    train_loader: Any
    dev_loader: Any
    info: dict  # for the record: source, rows, note
    tokenize_s: float  # time to tokenise the train rows


@dataclass
class Rows:
    """The rows a run trains and evaluates on (after the budget's caps), and where they came from."""
    train: pd.DataFrame
    dev: pd.DataFrame
    source: str
    check: dict  # for the record: files with fewer rows than the task expects (`rows_below_expected`)


def read_rows(task: Task, budget: Any) -> Rows:
    """The task's train and dev rows, capped by the budget (a fixed subset, the same for every method and seed).
    A data file with fewer rows than the task's yaml expects is a warning and a note in the record, not an error
    (a deliberately cut file is a legitimate, differently fingerprinted run)."""
    train_df, dev_df, source = load_task(task)
    check = task.row_check({"train": len(train_df), "dev": len(dev_df)}, source)
    for split, (n, expected) in check.get("rows_below_expected", {}).items():
        print(f"warning: task '{task.name}': the {split} file has {n} rows, {expected} expected ({source})")
    return Rows(subset(train_df, budget.train_samples), subset(dev_df, budget.eval_samples), source, check)


def fingerprints(rows: Rows, model_cfg: Any) -> dict[str, Any]:
    """The content fingerprints of a run (bench/fingerprint.py): sha256 of the rows and of the model's and
    tokenizer's files (these join the identity), with the names of the files hashed."""
    return {"train_rows_sha256": rows_sha256(rows.train), "dev_rows_sha256": rows_sha256(rows.dev),
            **model_fingerprint(model_cfg)}


def load_data(task: Task, cfg: DictConfig, tokenizer=None, rows: Rows | None = None) -> Data:
    """The task's train and dev rows (capped by the budget; `rows` when already read), tokenised, and their
    loaders: train shuffled by `cfg.seed`, dev in order."""
    budget = cfg.budget
    rows = rows or read_rows(task, budget)
    train_df, dev_df, source = rows.train, rows.dev, rows.source
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    info = {"source": source, "train_rows": len(train_df), "dev_rows": len(dev_df),
            "note": task.offline_note if source.startswith("glue_dir") else "", **rows.check}
    start = time.perf_counter()
    if is_causal_lm(cfg.model):  # the task as text (bench/lm.py)
        pr = lm.prompting(cfg.task, cfg.lm, tokenizer, task.name)
        encoded, train_cut = lm.encode(train_df, tokenizer, pr, int(budget.max_seq_len))
        train_features = lm.train_features(encoded, tokenizer, pr)
        tokenize_s = time.perf_counter() - start
        dev_features, dev_cut = lm.encode(dev_df, tokenizer, pr, int(budget.max_seq_len))
        dev_loader = lm.dev_loader(dev_features, tokenizer, int(cfg.lm.eval_batch_size), str(cfg.lm.eval_mode))
        first = dev_df.iloc[0]
        example = pr.prompt(tokenizer, str(first["text_a"]), None if pd.isna(first["text_b"]) else str(first["text_b"]))
        info.update(prompt={"chat_template": pr.chat, "loss_on": pr.loss_on, "eval_mode": str(cfg.lm.eval_mode),
                            "answers": list(pr.answers),
                            "example": example}, prompts_cut={"train": train_cut, "dev": dev_cut})
    else:
        train_features = tokenize(train_df, tokenizer, budget.max_seq_len)
        tokenize_s = time.perf_counter() - start
        dev_features = tokenize(dev_df, tokenizer, budget.max_seq_len)
        dev_loader = make_loader(dev_features, tokenizer, cfg.measure.eval_batch_size, shuffle=False, seed=0)
    return Data(tokenizer, train_features, dev_features, train_loader(train_features, tokenizer, cfg), dev_loader,
                info, tokenize_s)


def train_loader(features: list, tokenizer, cfg: DictConfig):
    """A fresh training loader (micro-batches of the budget, shuffled by `cfg.seed`: the same order each time)."""
    if is_causal_lm(cfg.model):
        return lm.train_loader(features, tokenizer, int(cfg.budget.batch_size), int(cfg.seed))
    return make_loader(features, tokenizer, cfg.budget.batch_size, shuffle=True, seed=int(cfg.seed))


def fresh_model(p: Plan, steps: int) -> nn.Module:
    """Seeded as a run is, the base model with the method attached: what each way of a benchmark starts from."""
    seed_everything(int(p.cfg.seed))
    return attach(p, build_model(p)[0], steps)[0]


def build_model(p: Plan) -> tuple[nn.Module, str]:
    """(the pre-trained model on the run's device, its source), loaded as the method asks (e.g. 4-bit)."""
    load_kwargs = p.method.load_kwargs(p.effective["method"], p.cfg.model, p.device)
    model, source = load_model(p.cfg.model, p.task.num_labels, **load_kwargs)
    return model.to(p.device), source


def check_positions(config: Any, p: Plan, features: list[dict]) -> None:
    """Prompt/prefix tuning lengthen every sequence by their virtual tokens; fail before training, with the fix,
    when the longest example would then run past the model's position embeddings."""
    extra = p.method.virtual_tokens(p.rank)
    positions = getattr(config, "max_position_embeddings", None)
    if not extra or not positions:
        return
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        positions -= int(config.pad_token_id) + 1  # RoBERTa's positions start after the padding index
    longest = max(len(f["input_ids"]) if "input_ids" in f else len(f["prompt_ids"]) + max(map(len, f["answer_ids"]))
                  for f in features)  # a causal LM's dev feature: its prompt and answers (bench/lm.py)
    if longest + extra > positions:
        raise BenchError(f"method '{p.method.name}' adds {extra} virtual tokens, and the longest tokenised example "
                         f"has {longest}: {longest + extra} > the model's {positions} positions; set "
                         f"budget.max_seq_len={positions - extra} (for every method you compare) or a smaller rank")


def attach(p: Plan, model: nn.Module, steps: int, data: Data | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(the model with the method attached, on the run's device; its parameter counts and the task head's module
    names, for the record). BenchError when the method trains nothing outside the task head. With `data`, a method
    that initialises from data (EVA, CorDA, LoRA-GA) reads the run's first training batches from a fresh loader in
    the same order, so the training loader's order is not touched."""
    calibration = None
    if data is not None:
        def calibration():
            return train_loader(data.train_features, data.tokenizer, p.cfg)
    ctx = attach_context(p.cfg.model, p.rank, p.task.num_labels, steps, calibration)
    model = p.method.attach(model, p.effective["method"], ctx).to(p.device)  # the method config the run's hash names
    head = head_modules(p.cfg.model)
    counts: dict[str, Any] = {**count_params(model, head), "head_modules": list(head)}
    if counts["trainable_params_excl_head"] == 0 and not p.method.trains_all_weights:
        raise BenchError(f"method '{p.method.name}' attached no trainable parameters outside the task head; "
                         f"check method.target_modules ({p.cfg.method.get('target_modules')}) against the model")
    return model, counts


def train_settings(p: Plan, steps: int, timing_warmup_steps: int = 0) -> TrainSettings:
    return TrainSettings(steps=steps, lr=p.lr, weight_decay=float(p.cfg.method.weight_decay),
                         warmup_ratio=float(p.cfg.method.warmup_ratio), budget=p.cfg.budget, device=p.device,
                         precision=p.precision, head=head_modules(p.cfg.model), timing_warmup_steps=timing_warmup_steps,
                         main_metric=p.task.main_metric)


def train_model(p: Plan, model: nn.Module, loader, steps: int, timing_warmup_steps: int = 0,
                evaluate_fn=None) -> TrainResult:
    """The shared loop with the run's settings (and the test-only fault hooks of bench/faults.py)."""
    from bench.faults import injected_faults

    return train(model, p.method, loader, train_settings(p, steps, timing_warmup_steps), evaluate_fn=evaluate_fn,
                 hooks=injected_faults(p.run_id))


def timing_warmup(p: Plan, steps: int) -> int:
    """Steps left out of throughput figures: short runs (smoke budgets) keep at least half their steps timed."""
    return min(int(p.cfg.measure.timing_warmup_steps), steps // 2)


def train_summary(tr: TrainResult, warmup: int) -> dict:
    """The record's `train` block."""
    return {
        "steps": tr.steps, "samples": tr.samples, "wall_s": tr.wall_s, "timed_steps": tr.timed_steps,
        "timed_s": tr.timed_s, "compute_s": tr.compute_s, "data_s": tr.data_s,
        "samples_per_s": tr.timed_samples / tr.timed_s if tr.timed_s else None,
        "tokens_per_s": tr.timed_tokens / tr.timed_s if tr.timed_s else None,
        "step_time_ms": 1000 * tr.compute_s / tr.timed_steps if tr.timed_steps else None,
        "data_time_ms": 1000 * tr.data_s / tr.timed_steps if tr.timed_steps else None,
        "timing_warmup_steps": warmup, "best_step": tr.best_step, "evals": tr.evals,
        "max_batch_seq_len": tr.max_batch_seq_len,
    }


def evaluate(model: nn.Module, loader, task: Task, device: torch.device, precision: str
             ) -> tuple[dict[str, float], np.ndarray]:
    """(the task's metrics and eval_loss on `loader`, the logits)."""
    logits, labels, loss = predict(model, loader, device, precision)
    preds = to_predictions(logits, task.is_regression)
    metrics = {**glue_metrics.compute(list(task.metrics), preds, labels), "eval_loss": loss}
    if isinstance(getattr(loader, "collate_fn", None), lm.GenerateCollator):  # lm.eval_mode=generate
        metrics["no_answer_fraction"] = lm.no_answer_fraction(logits)
    return metrics, logits


def evaluate_rank_variants(p: Plan, model: nn.Module, loader) -> dict[str, dict[str, float]]:
    """{rank: metrics} of the trained model evaluated as each of the method's `rank_variants` (DyLoRA: truncated to
    each eval rank); empty for methods without them."""
    out = {}
    for rank, variant in p.method.rank_variants(model):
        with variant:
            out[str(rank)] = evaluate(model, loader, p.task, p.device, p.precision)[0]
    return out


def time_latency(p: Plan, variants: dict[str, nn.Module], vocab_size: int, meter: MemoryMeter) -> dict:
    """Latency of the models in `variants` (base, unmerged, merged), timed side by side (README, "Measurement")."""
    measure = p.cfg.measure
    # A causal LM's forward pass over a prompt is its prefill: timed at the generation knobs' shape (lm.gen_*).
    rows, length = ((p.cfg.lm.gen_batch_size, p.cfg.lm.gen_prompt_len) if is_causal_lm(p.cfg.model)
                    else (measure.latency_batch_size, measure.latency_seq_len))
    batch = latency_batch(vocab_size, int(rows), int(length), p.device)
    latency = {"batch_size": int(rows), "seq_len": int(length), "order": "interleaved"}
    latency.update(latency_interleaved(
        variants, batch, warmup_iters=int(measure.latency_warmup_iters), iters=int(measure.latency_iters),
        device=p.device, autocast_dtype=autocast_dtype(p.precision), rounds=int(measure.latency_rounds),
        warmup_tol=float(measure.latency_warmup_tol), max_warmup_s=float(measure.latency_max_warmup_s),
        meter=meter))
    latency.update(latency_ratios({k: v for k, v in latency.items() if k in variants},
                                  noise_tol=float(measure.latency_noise_tol)))
    return latency


def time_generation(p: Plan, variants: dict[str, nn.Module], vocab_size: int, pad_id: int) -> dict:
    """Generation latency of a causal LM's variants (base, unmerged, merged) with the KV cache: prefill ms and decode
    tokens/s, timed side by side (bench/measure.py `generation_interleaved`), with each variant's decode time per
    token relative to base per round (`<name>_over_base_ratio`, `..._too_noisy`, as for forward latency)."""
    knobs = p.cfg.lm
    batch = latency_batch(vocab_size, int(knobs.gen_batch_size), int(knobs.gen_prompt_len), p.device)
    out: dict[str, Any] = {"batch_size": int(knobs.gen_batch_size), "prompt_len": int(knobs.gen_prompt_len),
                           "new_tokens": int(knobs.gen_new_tokens), "decoding": "greedy, KV cache",
                           "order": "interleaved"}
    out.update(generation_interleaved(
        variants, batch, new_tokens=int(knobs.gen_new_tokens), pad_id=pad_id,
        warmup_iters=max(1, int(p.cfg.measure.latency_warmup_iters) // 2), iters=int(knobs.gen_iters),
        device=p.device, autocast_dtype=autocast_dtype(p.precision), rounds=int(p.cfg.measure.latency_rounds)))
    out.update(latency_ratios({k: v for k, v in out.items() if k in variants},
                              noise_tol=float(p.cfg.measure.latency_noise_tol)))
    return out


def save(p: Plan, method: Method, model: nn.Module, curve: list[dict]) -> dict:
    """The weights (unless save_weights=none) and the loss curve into the run folder; what the record says."""
    out: dict[str, Any] = {}
    if p.cfg.save_weights != "none":
        weights_dir = p.run_dir / WEIGHTS_DIR
        method.save(model, weights_dir)
        out["weights_dir"] = WEIGHTS_DIR
        out["adapter_bytes"] = sum(f.stat().st_size for f in weights_dir.glob("*.safetensors"))
    write_curve(p.run_dir, curve)
    out["curve_file"] = CURVE_FILE
    return out


def write_curve(run_dir: Path, curve: list[dict]) -> None:
    with open(run_dir / CURVE_FILE, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "loss", "lr", "elapsed_s"])
        writer.writeheader()
        writer.writerows(curve)


__all__ = ["Data", "Rows", "attach", "build_model", "check_positions", "evaluate", "evaluate_rank_variants",
           "fingerprints", "load_data", "read_rows", "save", "seed_everything", "time_generation", "time_latency",
           "timing_warmup",
           "total_steps", "train_model", "train_summary", "write_curve"]
