"""OSF (orthogonal subspace fine-tuning) via peft (`OSFConfig`): each target matrix is split by its SVD into the
top singular directions, frozen, and the rest, W_low = U_low·diag(S_low)·V_lowᵀ, which trains; every gradient of
U_low and V_low is projected orthogonally to the frozen directions, so the update never enters them. The model
starts as the base model (W = W_high + W_low, up to rounding); the update merges.

peft sizes the frozen part (`effective_rank`, half of min(d_out, d_in) by default). Here `rank` is the width of the
trained part instead, as LoRA's r is (trainable values per matrix: r·(d_out + d_in + 1)): at attach every target
gets `effective_rank` = min(d_out, d_in) - rank through peft's `rank_pattern`, from the target's own shape (the
model is in the run's identity, so its shapes are). peft saves the pattern in the adapter's config, so loading
rebuilds the same split."""
from __future__ import annotations

import re

from peft import OSFConfig
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from methods.base import AttachContext, register
from methods.errors import BenchError
from methods.peft_common import PeftMethod, merged_head_unwrapped, task_type


def preserved_ranks(model: nn.Module, config: OSFConfig, trained_rank: int) -> dict[str, int]:
    """{a pattern matching one target module's name exactly: min(d_out, d_in) - trained_rank} for every linear module
    the config targets. BenchError when a target has no room for `trained_rank` trained directions and one frozen."""
    pattern: dict[str, int] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim != 2 or not check_target_module_exists(config, name):
            continue
        width = min(weight.shape)
        if not 0 < trained_rank < width:
            raise BenchError(f"method 'osf': rank {trained_rank} must be between 1 and {width - 1} for {name} "
                             f"(min(d_out, d_in) = {width}: at least one direction stays frozen)")
        pattern[rf"(^|\.){re.escape(name)}$"] = width - trained_rank
    return pattern


@register
class Osf(PeftMethod):
    name = "osf"

    def derive(self, settings: dict, rank: int | None) -> dict:
        return {**settings, "trained_rank": rank}

    def peft_config(self, eff: dict, ctx: AttachContext) -> OSFConfig:
        return OSFConfig(task_type=task_type(ctx), target_modules=list(eff["target_modules"]))

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        config = self.peft_config(eff, ctx)
        config.rank_pattern = preserved_ranks(model, config, int(eff["trained_rank"]))
        return self.attach_config(model, config, ctx)

    def merged(self, model: nn.Module) -> nn.Module:
        return merged_head_unwrapped(model)
