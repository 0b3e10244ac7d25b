"""LoRA-FA (Zhang et al. 2023, arXiv:2308.03303): LoRA whose down-projection A is frozen at its random init, so only
B trains. Half of LoRA's parameters (and their optimiser state), and less activation memory: a frozen A needs no
copy of its input for a weight gradient, only the r-wide output A·x is kept (for B's gradient). The update
ΔW = (α/r)·B·A then lives in the fixed r-dimensional row space of A. Everything else is LoRA's: targets, B = 0 at
init (the model starts as the base model), scaling, merging, the saved adapter (A included: it is part of ΔW).

peft ships a `create_lorafa_optimizer` that also multiplies B's gradient by (A·Aᵀ)⁻¹ (r x r) inside its own AdamW
variant; the suite keeps its one shared AdamW for every method (bench/loop/train.py), so this is frozen-A LoRA
trained by that AdamW, not peft's optimiser."""
from __future__ import annotations

from torch import nn

from methods.base import AttachContext, register
from methods.errors import BenchError
from methods.lora import Lora


@register
class LoraFA(Lora):
    name = "lora_fa"

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        model = super().attach(model, eff, ctx)
        frozen = 0
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
                frozen += 1
        if not frozen:
            raise BenchError(f"method '{self.name}': LoRA attached no lora_A to freeze; check method.target_modules")
        return model
