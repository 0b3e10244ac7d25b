"""LoRA+ (Hayou, Ghosh & Yu 2024, arXiv:2402.12354): LoRA whose B matrices learn `loraplus_lr_ratio` times faster
than A (ηB = ratio · ηA), which the paper shows lets wide models learn features efficiently. The model is LoRA's
(same layers, init, scaling, merging, saved adapter); only the optimiser's parameter groups differ.

Which parameter gets which learning rate is decided by peft's helper (`peft.optimizers.create_loraplus_optimizer`:
lora_B at ratio x lr, lora_A at lr, LoRA embedding layers at its `loraplus_lr_embedding`). Two rules of the suite
override the helper's, so that LoRA+ differs from LoRA in B's learning rate only:
- the task head (and anything else that is not a LoRA parameter) keeps the run's lr: the helper would put every
  1-D parameter, the head's biases included, in B's group;
- weight decay follows the loop's rule for every method (`methods.base.decays`): the helper's own default gives
  the LoRA matrices no decay.
"""
from __future__ import annotations

import torch
from peft.optimizers import create_loraplus_optimizer
from torch import nn

from methods.base import AttachContext, decays, register
from methods.errors import BenchError
from methods.lora import Lora

_RATIO_ATTR = "loraplus_lr_ratio"  # where attach leaves the ratio on the model, for the optimiser's groups


@register
class LoraPlus(Lora):
    name = "loraplus"

    def derive(self, settings: dict, rank: int | None) -> dict:
        out = super().derive(settings, rank)
        ratio = float(settings["loraplus_lr_ratio"])
        if ratio < 1:  # peft's docs: "Should be ≥1"; below 1 B would learn slower than A, the opposite of LoRA+
            raise BenchError(f"loraplus: method.loraplus_lr_ratio must be >= 1 (B's lr / A's lr); got {ratio:g}")
        out["loraplus_lr_ratio"] = ratio
        return out

    def config_label(self, effective: dict) -> str:
        ratio = effective.get("loraplus_lr_ratio")
        label = super().config_label(effective)
        if ratio is None:
            return label
        return label[:-1] + f", λ={float(ratio):g})" if label.endswith(")") else label + f" (λ={float(ratio):g})"

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        model = super().attach(model, eff, ctx)
        setattr(model, _RATIO_ATTR, float(eff["loraplus_lr_ratio"]))
        return model

    def optimizer_param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        ratio = getattr(model, _RATIO_ATTR, None)
        if ratio is None:
            raise BenchError("loraplus: the model was not attached by method 'loraplus' (no learning-rate ratio)")
        # peft's helper builds an optimiser; only its groups' learning rates are read (no state is allocated
        # before a step), so the loop still builds the one AdamW of every method.
        helper = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio)
        lr_of = {id(p): group["lr"] for group in helper.param_groups for p in group["params"]}
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                param_lr = lr_of[id(param)] if ".lora_" in name else lr
                groups.setdefault((param_lr, decays(name, param)), []).append(param)
        # The run's own lr first: the loss curve logs the first group's lr.
        ordered = sorted(groups.items(), key=lambda item: (item[0][0] != lr, item[0][0], not item[0][1]))
        return [{"params": params, "lr": group_lr, "weight_decay": weight_decay if decay else 0.0}
                for (group_lr, decay), params in ordered]
