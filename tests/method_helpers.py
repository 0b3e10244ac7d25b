"""Build a tiny random-init model with a method attached, from the real composed config; synthetic
batches; the shared training loop for a few steps. Used by the method tests."""
from __future__ import annotations

import pytest
import torch
from omegaconf import DictConfig
from torch import nn

from bench import BenchError
from bench.loop.train import TrainSettings, train
from bench.model import is_causal_lm, load_model, tokenizer_path
from bench.plan import plan
from methods import REGISTRY, AttachContext, Method, in_display_order
from methods.base import HeadSpec, head_modules, is_head_param
from methods.peft_generic import method_yamls

NUM_LABELS = 2


def _runs_on_cpu(method: Method) -> bool:
    """True for a method that runs on these tests' CPU and tiny BERT (qlora, loftq need CUDA; a yaml method may
    declare that it cannot apply to the BERT family, `cannot_apply`)."""
    try:
        method.validate(torch.device("cpu"))
        method.validate_model({"family": "bert", "name": "tiny-bert"})
    except BenchError:
        return False
    return True


# Derived from the registry: every method that runs here, and what each declares.
ALL_METHODS = [name for name in in_display_order() if _runs_on_cpu(REGISTRY[name])]
MERGING = {name for name in ALL_METHODS if REGISTRY[name].merges}
# Methods whose model equals the base model before training (full and bitfit trivially: nothing added).
IDENTITY_AT_INIT = {name for name in ALL_METHODS if REGISTRY[name].identity_at_init}

# The yaml-only methods share one code path (methods/peft_generic.py), so the fast suite checks every hand-written
# method and one yaml tuner of each kind: shared random projections (vera), a multiplicative rotation (oft), a
# spectral one that is not identity at init (fourierft), a virtual-token one (p_tuning), a LoRA init that moves W
# (pissa), a LoRA init from a data pass (eva), one that does not merge (lily) and a LoRA variant whose regulariser
# the loss gets in training and whose sampler state must be released after each step (monteclora). Every other
# registered method gets the same tests under `-m slow` (docs/development.md), so each test still covers the whole
# registry.
FAST_YAML = {"vera", "oft", "fourierft", "p_tuning", "pissa", "eva", "lily", "monteclora"}


def registry_cases(names, fast: set[str] = FAST_YAML) -> list:
    """`names` as pytest parameters, the yaml-only methods outside `fast` marked `slow`."""
    yamls = method_yamls()
    return [name if name not in yamls or name in fast else pytest.param(name, marks=pytest.mark.slow)
            for name in names]


def fresh_base(cfg: DictConfig) -> nn.Module:
    """The same random-init base model every time (seeded)."""
    torch.manual_seed(0)
    model, _ = load_model(cfg.model, NUM_LABELS)
    return model


def build(make_cfg, method_name: str, *overrides: str, rank: int = 4, total_steps: int = 8
          ) -> tuple[DictConfig, Method, nn.Module, AttachContext, dict]:
    """(cfg, method, base model, ctx, the method's effective config as the run hashes it): nothing attached yet."""
    cfg = make_cfg(f"method={method_name}", f"rank={rank}", *overrides)
    p = plan(cfg)
    ctx = AttachContext(rank=p.rank, model_cfg=cfg.model, causal_lm=is_causal_lm(cfg.model),
                        num_labels=NUM_LABELS, total_steps=total_steps, tokenizer_path=tokenizer_path(cfg.model),
                        calibration=lambda: [batch(i) for i in range(4)])
    return cfg, p.method, fresh_base(cfg), ctx, p.effective["method"]


def batch(seed: int = 0, size: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    """A BERT pair-style batch: token_type_ids 0/1 and some padding, as the collator makes them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30522, (size, length), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    types = torch.zeros_like(ids)
    types[:, length // 2:] = 1
    labels = torch.randint(0, NUM_LABELS, (size,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


@torch.no_grad()
def logits(model: nn.Module, b: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    model.eval()
    b = b if b is not None else batch(99)
    return model(**{k: v for k, v in b.items() if k != "labels"}).logits.detach().clone()


def train_steps(model: nn.Module, method: Method, cfg: DictConfig, steps: int, lr: float = 1e-2) -> None:
    """`steps` optimiser steps of the shared loop (on_step hooks included) on synthetic batches."""
    settings = TrainSettings(steps=steps, lr=lr, weight_decay=0.0, warmup_ratio=0.0, budget=cfg.budget,
                             device=torch.device("cpu"), precision="fp32", head=head_modules(cfg.model))
    train(model, method, [batch(i) for i in range(steps)], settings)


@torch.no_grad()
def perturb(model: nn.Module, head: HeadSpec, scale: float = 0.1, seed: int = 1) -> None:
    """Move every trainable non-head parameter off its init (e.g. LoRA's B = 0), as training would."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.requires_grad and not is_head_param(name, head):
            param.add_(scale * torch.randn(param.shape, generator=g))


def trainable(model: nn.Module, head: HeadSpec) -> tuple[set[str], set[str]]:
    """(trainable names outside the head, trainable names in the head)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {n for n in names if is_head_param(n, head)}
    return names - heads, heads
