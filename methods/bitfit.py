"""BitFit (Ben Zaken et al. 2022, arXiv:2106.10199): train only the model's existing bias terms (and the
task head); every weight matrix, embedding and LayerNorm gain (γ) stays frozen. Nothing is added, so
the fine-tuned model has exactly the base model's shape and cost. Not peft's BEFT, which adds new biases.

LayerNorm biases (β) count as bias terms (`include_layer_norm_bias`, default true): the paper's BERT
equations mark b^{LN1}, b^{LN2} among the bias terms it trains, and its reported share (0.08% of
BERT-large) is what you get with them (0.066% without)."""
from __future__ import annotations

from typing import Any

from torch import nn

from methods.base import AttachContext, HeadSpec, Method, freeze_all_but_head, head_modules, is_head_param, register
from methods.errors import BenchError


def bias_names(model: nn.Module, head: HeadSpec, include_layer_norm_bias: bool) -> list[str]:
    """Names of the bias parameters BitFit trains (outside the task head)."""
    names = []
    for mod_name, module in model.named_modules():
        bias = getattr(module, "bias", None)
        if not isinstance(bias, nn.Parameter):
            continue
        if isinstance(module, nn.LayerNorm) and not include_layer_norm_bias:
            continue
        full = f"{mod_name}.bias" if mod_name else "bias"
        if not is_head_param(full, head):
            names.append(full)
    return names


@register
class BitFit(Method):
    name = "bitfit"

    def validate_model(self, model_cfg: Any) -> None:
        super().validate_model(model_cfg)
        if model_cfg.get("biases") is False:  # conf/model/family/*.yaml: e.g. Llama has no bias terms
            raise BenchError(f"bitfit cannot apply to model '{model_cfg.get('name')}' ({model_cfg.get('family')} "
                             "family): it has no bias terms to train; pick another method (e.g. method=lora or ia3)")

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        head = head_modules(ctx.model_cfg)
        freeze_all_but_head(model, head)
        names = set(bias_names(model, head, bool(eff["include_layer_norm_bias"])))
        if not names:
            raise BenchError("bitfit: the model has no bias terms outside the task head; BitFit cannot apply")
        for name, param in model.named_parameters():
            if name in names:
                param.requires_grad = True
        return model
