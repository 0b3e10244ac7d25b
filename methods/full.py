"""Full fine-tuning: every weight trains. The reference every PEFT method is compared against."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from methods.base import AttachContext, Method, register


@register
class Full(Method):
    name = "full"
    saved_format = "every tensor of the model (trainable.safetensors)"

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        for param in model.parameters():
            param.requires_grad = True
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        # The fine-tuned model *is* the artefact: every tensor, buffers included.
        # Tied tensors (a causal LM's lm_head.weight is its embed_tokens.weight) are stored once, under the first
        # name: safetensors refuses shared memory, and loading that name restores both through the tie.
        out_dir.mkdir(parents=True, exist_ok=True)
        state, seen = {}, set()
        for k, v in model.state_dict().items():
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                state[k] = v.detach().cpu().contiguous()
        save_file(state, str(out_dir / "trainable.safetensors"))
