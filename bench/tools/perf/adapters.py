"""Synthetic adapters for the hot-swap and serving benchmarks: N adapters of one method, saved as a run saves them.

Speed and memory do not depend on an adapter's values, only on its shapes, so the adapters are the method attached
once to the base model (seed 0, the same base every benchmark loads) with random non-zero values: adapter i is the
attached state plus `scale` x N(0, 1) noise drawn from seed 1000 + i, on every trainable tensor, the task head's
copy included (each adapter has its own head, as trained adapters do).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from peft import PeftModel, get_peft_model_state_dict
from torch import nn

from bench.model import attach_context, load_model
from methods import get_method


def make_adapters(cfg: DictConfig, n: int, out: Path, num_labels: int, scale: float = 0.02,
                  check: Callable[[nn.Module], None] | None = None) -> dict[str, Path]:
    """Save `n` adapters of `cfg.method` for `cfg.model` under `out` (`adapter0` ... `adapter{n-1}`, each a folder in
    the method's own format); returns {name: folder}. `check` sees the attached model before anything is saved (to
    refuse early what a benchmark cannot measure)."""
    method = get_method(str(cfg.method.name))
    ctx = attach_context(cfg.model, int(cfg.rank), num_labels, 100)
    eff = method.effective_config(cfg.method, ctx.rank)
    torch.manual_seed(0)  # the same base model as the benchmarks load
    model, _ = load_model(cfg.model, num_labels)
    model = method.attach(model, eff, ctx)
    if check is not None:
        check(model)
    start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    dirs = {}
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in start:
                    param.copy_(start[name] + scale * torch.randn(param.shape, generator=g, dtype=param.dtype))
        dirs[f"adapter{i}"] = out / f"adapter{i}"
        method.save(model, dirs[f"adapter{i}"])
    return dirs


def adapter_param_bytes(model: PeftModel, name: str) -> int:
    """Exact bytes of adapter `name`'s tensors as loaded (peft's state dict of that adapter: its weights and its copy
    of the task head), numel x element size summed."""
    return sum(t.numel() * t.element_size() for t in get_peft_model_state_dict(model, adapter_name=name).values())
