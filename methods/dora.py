"""DoRA (Liu et al. 2024, arXiv:2402.09353): the weight is split into a magnitude vector (one entry per
output feature, trained) and a direction that LoRA updates (peft `use_dora=True`). At init the magnitude
is the base weight's column norm and B = 0, so the model starts as the base model; it merges."""
from __future__ import annotations

from methods.base import register
from methods.lora import Lora


@register
class Dora(Lora):
    name = "dora"
    use_dora = True
