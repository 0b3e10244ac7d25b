"""Bottleneck adapters: Houlsby et al. 2019 (arXiv:1902.00751) and Pfeiffer et al. 2021 (arXiv:2005.00247).

An adapter is h -> h + up(act(down(h))): a down-projection to `rank` (the bottleneck width), a
non-linearity, an up-projection back, and a residual. It sits on the output of a sublayer's projection
(`dense`), before that sublayer's dropout, residual and LayerNorm, as in Houlsby's Figure 2:
- houlsby: after the attention output projection and after the FFN output projection of every layer,
  and the LayerNorms train too (Houlsby et al. train them "per task"; on Llama-family models: the RMSNorms);
- pfeiffer: after the FFN output projection only; LayerNorms frozen.
`up` starts at exactly zero (`down` ~ N(0, 0.01²), Houlsby's near-identity init), so the model starts
as the base model, as LoRA does with B = 0.

Not a peft tuner: `peft.utils.register_peft_method` only accepts names that already exist in peft's
closed `PeftType` enum, so a new method cannot be registered without patching peft. Instead the
adapted `dense` is swapped for `AdapterLinear`, an nn.Linear subclass holding the *same* weight and bias
Parameters plus the adapter, so the base weights keep their names (`...output.dense.weight`) and the
adapter's are `...output.dense.adapter.{down,up}.*`. Save/load/count use the generic Method path: the
trainable tensors go to one safetensors file and are loaded onto a freshly attached base model.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from methods.base import AttachContext, Method, freeze_all_but_head, head_modules, is_head_param, register
from methods.errors import BenchError


class Bottleneck(nn.Module):
    def __init__(self, dim: int, width: int, activation: str, init_std: float):
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.act = ACT2FN[activation]
        self.up = nn.Linear(width, dim)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class AdapterLinear(nn.Linear):
    """`base`'s own weight and bias (shared, not copied), followed by a bottleneck adapter."""

    def __init__(self, base: nn.Linear, adapter: Bottleneck):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(F.linear(x, self.weight, self.bias))


def _layers(model: nn.Module, model_cfg: Any) -> nn.ModuleList:
    path = str(model_cfg.layers)
    try:
        layers = model.base_model.get_submodule(path)
    except AttributeError as exc:
        raise BenchError(f"model '{model_cfg.name}' has no layer stack '{path}' (model.layers); "
                         "set it to the transformer layers' module path") from exc
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise BenchError(f"model '{model_cfg.name}': '{path}' (model.layers) is not a non-empty list of layers")
    return layers


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm, or the RMSNorm of Llama-family models (transformers' own class, e.g. LlamaRMSNorm)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")


class BottleneckAdapter(Method):
    """Houlsby and Pfeiffer differ only in their config: `placement` and `train_layer_norm`."""

    def derive(self, settings: dict, rank: int | None) -> dict:
        return {**settings, "bottleneck": rank}

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        head = head_modules(ctx.model_cfg)
        freeze_all_but_head(model, head)
        width = int(eff["bottleneck"])
        for i, layer in enumerate(_layers(model, ctx.model_cfg)):
            for placement in eff["placement"]:  # keys of the model config: attention_output, ffn_output
                sub_name = str(ctx.model_cfg[placement])
                try:
                    sublayer = layer.get_submodule(sub_name)
                except AttributeError as exc:
                    raise BenchError(f"{self.name}: layer {i} has no module '{sub_name}' (model.{placement}); "
                                     f"fix model.{placement} for this model family") from exc
                # The named module is the projection itself (Llama: self_attn.o_proj) or holds it as `dense` (BERT).
                if isinstance(sublayer, nn.Linear):
                    parent_name, _, attr = sub_name.rpartition(".")
                    parent, dense = (layer.get_submodule(parent_name) if parent_name else layer), sublayer
                else:
                    parent, attr, dense = sublayer, "dense", getattr(sublayer, "dense", None)
                if not isinstance(dense, nn.Linear) or isinstance(dense, AdapterLinear):
                    raise BenchError(f"{self.name}: '{sub_name}' of layer {i} is not (or has no `dense` that is) a "
                                     "plain nn.Linear (already adapted, or a different architecture)")
                adapter = Bottleneck(dense.out_features, width, str(eff["activation"]), float(eff["init_std"]))
                adapter.to(device=dense.weight.device, dtype=dense.weight.dtype)
                setattr(parent, attr, AdapterLinear(dense, adapter))
        if eff["train_layer_norm"]:
            for name, module in model.named_modules():
                if _is_norm(module) and not is_head_param(f"{name}.weight", head):
                    for param in module.parameters():
                        param.requires_grad = True
        return model


@register
class Houlsby(BottleneckAdapter):
    name = "houlsby"


@register
class Pfeiffer(BottleneckAdapter):
    name = "pfeiffer"
