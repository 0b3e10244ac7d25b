"""rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): LoRA with the scale alpha/sqrt(r) instead of alpha/r,
so the size of the update stays stable as the rank grows (peft `use_rslora=True`). Everything else,
including B = 0 at init and merging, is LoRA's."""
from __future__ import annotations

from methods.base import register
from methods.lora import Lora


@register
class RsLora(Lora):
    name = "rslora"
    use_rslora = True
