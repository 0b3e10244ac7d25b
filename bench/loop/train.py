"""The one training loop every method shares.

Read top to bottom: AdamW over the method's parameter groups (no decay on biases and LayerNorm; its moments in each
parameter's dtype), a linear warm-up then a linear or cosine decay (`budget.lr_schedule`, transformers' schedulers),
gradient accumulation, autocast as the run's precision says (bench/model/precision.py; a loss scaler under fp16),
gradient clipping, the method's per-step hook after each optimiser step (before zero_grad), a loss curve every
`log_every_steps`, and optional evaluation every `eval_every_steps` keeping the best
(`keep_best`: the best evaluation's trainable tensors, copied to host memory, and the method's `scored_state`, e.g.
AdaLoRA's rank pattern, so that the model evaluated, saved and analysed is the one that was scored).

Timing excludes the first `timing_warmup_steps` optimiser steps and all evaluation. The timed window is
bracketed by device synchronisation (it starts on an idle device and ends when the device has finished the
last step); single steps are not, since a sync per step would stop the host from preparing and queueing the
next step while the GPU works, an overhead a plain loop does not have. Data time (the host waiting for the
next batch: collation, padding) is split from compute time (the rest: forward, backward, optimiser step,
logging).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from bench import BenchError
from bench.model.device import sync
from bench.model.distributed import SINGLE, World, any_rank, mean, shard, unwrap
from bench.model.precision import autocast, autocast_dtype, uses_loss_scaler
from methods.base import HeadSpec, Method, is_head_param

# budget.lr_schedule: a linear warm-up over the method's warmup_ratio of the steps, then a decay to 0 at the last step
SCHEDULES = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run is recorded with status `nan`."""


@dataclass
class TrainResult:
    steps: int
    samples: int
    wall_s: float  # whole loop, evaluation included
    timed_steps: int
    timed_s: float  # wall time of the timed steps (data + compute), evaluation excluded
    timed_samples: int
    timed_tokens: int  # non-padding tokens
    compute_s: float
    data_s: float
    max_batch_seq_len: int = 0  # longest padded batch (tokens): activation memory peaks there
    timed_token_pairs: int = 0  # sum over timed rows of their non-padding length squared: what attention multiplies
    curve: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    best_step: int | None = None


def total_steps(n_batches: int, budget: Any) -> int:
    """Optimiser steps the run will take: `max_steps` if set, else epochs over the data."""
    if budget.max_steps:
        return int(budget.max_steps)
    return int(math.ceil(n_batches / budget.grad_accum_steps) * budget.epochs)


def _check_adapter_gradients(model: nn.Module, head: HeadSpec, method_name: str, world: World = SINGLE) -> None:
    """After the first backward: some non-head trainable parameter must have a non-zero gradient (on some rank:
    FSDP holds a shard of each), otherwise the method attached nothing that learns."""
    found = False
    for name, param in model.named_parameters():
        if param.requires_grad and not is_head_param(name, head) and param.grad is not None:
            grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad  # an FSDP shard
            if bool(grad.abs().sum() > 0):
                found = True
                break
    if any_rank(world, found):
        return
    raise BenchError(f"method '{method_name}' attached nothing that learns: no parameter outside the task "
                     f"head got a gradient; check method.target_modules against the model's module names")


@dataclass(frozen=True)
class TrainSettings:
    """Everything the loop needs besides the model, the method and the data."""

    steps: int  # optimiser steps
    lr: float
    weight_decay: float
    warmup_ratio: float
    budget: Any  # grad_accum_steps, max_grad_norm, log_every_steps, eval_every_steps, keep_best
    device: torch.device
    precision: str = "fp32"
    head: HeadSpec = ("classifier",)  # the task head's module names (conf/model/family: head)
    timing_warmup_steps: int = 0
    main_metric: str | None = None  # what keep_best compares
    world: World = SINGLE  # distributed: each rank trains on its share of every batch (bench/model/distributed.py)


class StepHook:
    """Called by the loop: `on_loss` may replace each micro-batch's loss before backward; `after_step` runs after
    each optimiser step. The loop knows nothing else about a hook (tests use one to inject faults)."""

    def on_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        return loss

    def after_step(self, step: int, accum: int) -> None:
        """`step`: optimiser steps done so far."""


def train(model: nn.Module, method: Method, loader, s: TrainSettings,
          evaluate_fn: Callable[[], dict] | None = None, hooks: Sequence[StepHook] = ()) -> TrainResult:
    device, budget, steps, world = s.device, s.budget, s.steps, s.world
    net = unwrap(model)  # `model` runs the forward pass (DDP's wrapper); the method and the optimiser see `net`
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise BenchError(f"method '{method.name}' left no trainable parameters")
    # One AdamW for every method; the groups (lr and weight decay per parameter) are the method's to say
    # (methods/base.py: the same lr everywhere, no decay on biases and LayerNorm; LoRA+: B at ratio x lr).
    optimizer = torch.optim.AdamW(method.optimizer_param_groups(net, s.lr, s.weight_decay), lr=s.lr,
                                  fused=device.type == "cuda")
    schedule = SCHEDULES[str(budget.get("lr_schedule", "linear"))]
    scheduler = schedule(optimizer, int(round(s.warmup_ratio * steps)), steps)
    amp_dtype = autocast_dtype(s.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=uses_loss_scaler(s.precision))
    accum = int(budget.grad_accum_steps)

    res = TrainResult(0, 0, 0.0, 0, 0.0, 0, 0, 0.0, 0.0)
    best_value, best_state, best_method_state = -math.inf, None, None
    log_loss = torch.zeros((), device=device)
    log_count = 0
    model.train()
    wall_start = time.perf_counter()
    batches = _forever(loader)
    progress = tqdm(total=steps, desc=f"train {method.name}", unit="step", dynamic_ncols=True,
                    disable=os.environ.get("BENCH_PROGRESS", "1") == "0")
    timed_start: float | None = None
    eval_in_window_s = 0.0
    while res.steps < steps:
        timed = res.steps >= s.timing_warmup_steps
        if timed and timed_start is None:
            sync(device)
            timed_start = time.perf_counter()
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(accum)]
        t1 = time.perf_counter()
        for batch in micro:
            n_rows, seq_len = batch["input_ids"].shape
            # Count on the host-side batch: the same sum on the device would force a sync every micro-batch.
            lengths = batch["attention_mask"].sum(dim=1) if timed else None
            res.max_batch_seq_len = max(res.max_batch_seq_len, int(seq_len))
            batch, weight = shard(batch, world)  # the whole batch on one process (weight 1)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(device, amp_dtype):
                loss = model(**batch).loss
            loss = loss * weight / accum  # x 1.0 on one process: exact
            for hook in hooks:
                loss = hook.on_loss(loss, res.steps)
            scaler.scale(loss).backward()
            log_loss += loss.detach()
            res.samples += n_rows
            if lengths is not None:
                res.timed_samples += n_rows
                res.timed_tokens += int(lengths.sum())
                res.timed_token_pairs += int((lengths * lengths).sum())
        if res.steps == 0:
            _check_adapter_gradients(net, s.head, method.name, world)
        if budget.max_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, float(budget.max_grad_norm))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        method.on_step(net, res.steps + 1)
        optimizer.zero_grad(set_to_none=True)
        res.steps += 1
        log_count += 1
        if timed:
            res.timed_steps += 1
            res.data_s += t1 - t0
        for hook in hooks:
            hook.after_step(res.steps, accum)

        if res.steps % budget.log_every_steps == 0 or res.steps == steps:
            mean_loss = float(mean(world, log_loss)) / log_count  # every rank logs (and stops on) the same loss
            if not math.isfinite(mean_loss):
                raise NonFiniteLoss(f"training loss is {mean_loss} at step {res.steps}")
            res.curve.append({"step": res.steps, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                              "elapsed_s": time.perf_counter() - wall_start})
            progress.set_postfix(loss=f"{mean_loss:.4f}")
            log_loss.zero_()
            log_count = 0
        progress.update(1)

        if evaluate_fn and budget.eval_every_steps and res.steps % budget.eval_every_steps == 0 \
                and res.steps < steps:
            sync(device)
            eval_start = time.perf_counter()
            metrics = evaluate_fn()  # every rank evaluates the whole split: their metrics, and so keep_best, agree
            model.train()
            res.evals.append({"step": res.steps, **metrics})
            if budget.keep_best and metrics[s.main_metric] > best_value:
                best_value, res.best_step = metrics[s.main_metric], res.steps
                best_state = copy_trainable_to_cpu(net)
                best_method_state = method.scored_state(net)
            sync(device)
            if timed_start is not None:
                eval_in_window_s += time.perf_counter() - eval_start
    sync(device)
    end = time.perf_counter()
    progress.close()
    res.wall_s = end - wall_start
    if timed_start is not None:
        res.timed_s = end - timed_start - eval_in_window_s
        res.compute_s = res.timed_s - res.data_s
    if best_state is not None and evaluate_fn is not None:
        final = evaluate_fn()
        res.evals.append({"step": res.steps, **final})
        if final[s.main_metric] < best_value:  # restore the best evaluated model: its weights and method state
            net.load_state_dict(best_state, strict=False)
            method.restore_scored_state(net, best_method_state)
        else:
            res.best_step = res.steps
    return res


def copy_trainable_to_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """keep_best's copy of the trainable tensors, in host memory: off the training device, so a GPU run's peak
    memory is the method's own (on a CPU run it is part of the process's RSS, as any copy would be)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _forever(loader):
    while True:
        yield from loader


