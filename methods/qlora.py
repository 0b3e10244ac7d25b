"""QLoRA (Dettmers et al. 2023, arXiv:2305.14314): the frozen base model is loaded in 4-bit NormalFloat
(NF4) with double quantisation of the quantisation constants (bitsandbytes, through transformers'
`BitsAndBytesConfig` at load time), prepared with peft's `prepare_model_for_kbit_training`, and LoRA trains
on top in higher precision. Needs a CUDA GPU and the `bitsandbytes` package (`pip install '.[gpu]'`).

Merging folds B·A into the dequantised weight and quantises the result again to NF4, so merged outputs
differ from unmerged ones by the NF4 rounding (unlike plain LoRA, where they agree to ~1e-6)."""
from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from methods.base import AttachContext, head_modules, register
from methods.errors import BenchError
from methods.lora import Lora


@register
class QLora(Lora):
    name = "qlora"

    def validate(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise BenchError(f"method=qlora needs a CUDA GPU (bitsandbytes 4-bit NF4) but this run's device is "
                             f"{device.type}; use method=lora here, or run on a GPU machine")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise BenchError("method=qlora needs the bitsandbytes package: pip install -e '.[gpu]' "
                             "(or pip install bitsandbytes)")

    def load_kwargs(self, eff: dict, model_cfg: Any, device: torch.device) -> dict:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=str(eff["quant_type"]),
            bnb_4bit_use_double_quant=bool(eff["double_quant"]),
            bnb_4bit_compute_dtype=getattr(torch, str(eff["compute_dtype"])),
            llm_int8_skip_modules=list(head_modules(model_cfg)),  # the task head trains: keep it unquantised
        )
        return {"quantization_config": quant, "device_map": {"": device.index or 0}}

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        # Freezes the base, casts its remaining 16-bit tensors (LayerNorm, embeddings) to fp32 for stability,
        # and optionally turns on gradient checkpointing (the QLoRA paper's setting; off by default so that
        # the memory difference to `lora` is the quantisation alone).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(eff["gradient_checkpointing"]))
        return super().attach(model, eff, ctx)
