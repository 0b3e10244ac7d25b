"""Evaluation, shared by every method: predictions over a loader and the task's metrics from them. A causal LM's
choice batches are scored by each label's answer log-likelihood (or greedy generation), bench/data/text.py."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest
from torch import nn

from bench.data import answers, text
from bench.data.tasks import Task
from bench.metrics import compute
from bench.model.device import sync
from bench.model.precision import autocast, autocast_dtype
from methods import Method


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, precision: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Logits and labels over a loader, and the mean loss. For a causal LM's choice batches (bench/data/text.py) the
    "logits" are each label's answer log-likelihood and the loss the gold answer's NLL per token."""
    model.eval()
    amp_dtype = autocast_dtype(precision)
    logits, labels, loss_sum, n = [], [], 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, amp_dtype):
            if text.is_choice_batch(batch):  # a causal LM scoring each label's answer text (bench/data/text.py)
                scores, gold_nll = text.score_choices(model, batch)
                if text.is_generate_batch(batch):  # lm.eval_mode=generate: greedy answers matched exactly
                    scores = text.generate_choices(model, batch)
                batch_logits, batch_loss = scores, gold_nll.mean()
            else:
                out = model(**batch)
                batch_logits, batch_loss = out.logits, out.loss
        bs = batch["labels"].shape[0]
        loss_sum += float(batch_loss) * bs
        n += bs
        logits.append(batch_logits.float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(logits).numpy(), torch.cat(labels).numpy(), loss_sum / max(n, 1)


def to_predictions(logits: np.ndarray, is_regression: bool) -> np.ndarray:
    return logits[:, 0] if is_regression else logits.argmax(-1)



def evaluate(model: nn.Module, loader, task: Task, device: torch.device, precision: str
             ) -> tuple[dict[str, float], np.ndarray, dict[str, list]]:
    """(the task's metrics and eval_loss on `loader`, the logits, each example's prediction and label: `pred` a class
    id or a regression score, in loader order)."""
    logits, labels, loss = predict(model, loader, device, precision)
    preds = to_predictions(logits, task.is_regression)
    metrics = {**compute(list(task.metrics), preds, labels), "eval_loss": loss}
    if isinstance(getattr(loader, "collate_fn", None), text.GenerateCollator):  # lm.eval_mode=generate
        metrics["no_answer_fraction"] = text.no_answer_fraction(logits)
    return metrics, logits, {"pred": preds.tolist(), "label": labels.tolist()}


def evaluate_rank_variants(method: Method, model: nn.Module, evaluate_fn: Callable[[], dict[str, float]]
                           ) -> dict[str, dict[str, float]]:
    """{rank: metrics} of the trained model evaluated (`evaluate_fn`: the run's own evaluation) as each of the
    method's `rank_variants` (DyLoRA: truncated to each eval rank); empty for methods without them."""
    out = {}
    for rank, variant in method.rank_variants(model):
        with variant:
            out[str(rank)] = evaluate_fn()
    return out



@dataclass
class SolutionEval:
    """A generation task's evaluation: `metrics` (accuracy, no_answer_fraction, eval_loss), `scores` (each example's
    teacher-forced gold-solution NLL per token: what merged and unmerged models are compared on), `stats` (the
    record's GenerationEval block) and `samples` (question, generation, extracted answer, gold, correct)."""

    metrics: dict[str, float]
    scores: np.ndarray
    stats: dict[str, Any]
    samples: list[dict[str, Any]]


@torch.no_grad()
def evaluate_solutions(model: nn.Module, loader, tokenizer, device: torch.device, precision: str,
                       generate: bool = True) -> SolutionEval:
    """Each dev question answered by batched greedy decoding (KV cache, left padding; bench/data/text.py), its final
    number read by the task's rule (bench/data/answers.py) and compared with the gold one; and the gold solution's
    teacher-forced loss (`eval_loss`, nats per solution token, averaged over examples). `generate=False` computes the
    loss alone (a merged model's check against the unmerged one)."""
    model.eval()
    amp_dtype = autocast_dtype(precision)
    nll: list[float] = []
    samples: list[dict[str, Any]] = []
    new_tokens, unfinished, no_answer, generate_s = 0, 0, 0, 0.0
    start = time.perf_counter()
    for batch in loader:
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with autocast(device, amp_dtype):
            _, gold_nll = text.score_choices(model, tensors)
            nll += gold_nll.float().cpu().tolist()
            if not generate:
                continue
            sync(device)
            t0 = time.perf_counter()
            generated, stopped = text.greedy_generations(model, tensors)
            sync(device)
            generate_s += time.perf_counter() - t0
        for question, gold, toks, stop in zip(batch["questions"], batch["answers"], generated, stopped):
            generation = tokenizer.decode(toks, skip_special_tokens=True)
            extracted = answers.extract(generation)
            value = answers.to_number(extracted)
            samples.append({"question": question, "generation": generation, "extracted": extracted,
                            "gold": gold, "correct": value is not None and float(value) == float(gold)})
            new_tokens += len(toks) + stop  # the end-of-sequence token is generated too
            unfinished += not stop
            no_answer += value is None
    metrics = {"eval_loss": float(np.mean(nll)) if nll else float("nan")}
    stats: dict[str, Any] = {}
    if generate:
        n = len(samples)
        correct = sum(s["correct"] for s in samples)
        ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson") if n else None
        metrics.update(accuracy=correct / n, no_answer_fraction=no_answer / n)
        stats = {"examples": n, "correct": correct, "accuracy_ci95": [float(ci.low), float(ci.high)],
                 "generated_tokens": new_tokens, "mean_generated_tokens": new_tokens / n,
                 "unfinished_fraction": unfinished / n, "generate_s": generate_s,
                 "eval_wall_s": time.perf_counter() - start,
                 "generated_tokens_per_s": new_tokens / generate_s if generate_s else None,
                 "answer_rule": answers.RULE}
    return SolutionEval(metrics, np.asarray(nll, dtype=float), stats, samples)
