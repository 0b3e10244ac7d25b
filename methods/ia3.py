"""(IA)³ (Liu et al. 2022, T-Few, arXiv:2205.05638) via peft: learned vectors that rescale the keys, the
values and the FFN's inner activation; initialised to ones, so the model starts as the base model.
It merges (the vectors fold into the weights). Has no rank.

Targets are module paths *within each layer* (conf/model: ia3_targets, ia3_feedforward) turned into one
anchored regular expression, because peft's list matching is by suffix: `output.dense` would also hit
`attention.output.dense`, which the paper does not rescale (peft's built-in BERT/RoBERTa default does).
"""
from __future__ import annotations

import re

from peft import IA3Config

from methods.base import AttachContext, register
from methods.peft_common import PeftMethod, task_type


def layer_regex(layers: str, names: list[str]) -> str:
    """Full-match regex for `<anything>.<layers>.<i>.<name>` for each name."""
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"(.*\.)?{re.escape(layers)}\.\d+\.({alternatives})"


@register
class IA3(PeftMethod):
    name = "ia3"

    def peft_config(self, eff: dict, ctx: AttachContext) -> IA3Config:
        layers = str(ctx.model_cfg.layers)
        return IA3Config(task_type=task_type(ctx),
                         target_modules=layer_regex(layers, list(eff["target_modules"])),
                         feedforward_modules=layer_regex(layers, list(eff["feedforward_modules"])),
                         init_ia3_weights=True)
