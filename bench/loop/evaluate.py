"""Evaluation, shared by every method: predictions over a loader and the task's metrics from them. A causal LM's
choice batches are scored by each label's answer log-likelihood (or greedy generation), bench/data/text.py."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bench.data import text
from bench.data.tasks import Task
from bench.metrics import compute
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
             ) -> tuple[dict[str, float], np.ndarray]:
    """(the task's metrics and eval_loss on `loader`, the logits)."""
    logits, labels, loss = predict(model, loader, device, precision)
    preds = to_predictions(logits, task.is_regression)
    metrics = {**compute(list(task.metrics), preds, labels), "eval_loss": loss}
    if isinstance(getattr(loader, "collate_fn", None), text.GenerateCollator):  # lm.eval_mode=generate
        metrics["no_answer_fraction"] = text.no_answer_fraction(logits)
    return metrics, logits


def evaluate_rank_variants(method: Method, model: nn.Module, loader, task: Task, device: torch.device,
                           precision: str) -> dict[str, dict[str, float]]:
    """{rank: metrics} of the trained model evaluated as each of the method's `rank_variants` (DyLoRA: truncated to
    each eval rank); empty for methods without them."""
    out = {}
    for rank, variant in method.rank_variants(model):
        with variant:
            out[str(rank)] = evaluate(model, loader, task, device, precision)[0]
    return out

