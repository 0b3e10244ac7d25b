"""The LoRA variants peft configures through a sub-config of its LoraConfig (conf/method/<name>.yaml with
`lora_variant:`, built by methods/peft_generic.py like the LoRA initialisations): everything is lora's (targets, r,
alpha = 2r, dropout, B = 0 at init, merging, saving), plus the variant's sub-config built from the yaml's `variant:`
mapping (its constructor arguments, in the run's identity).

- kasa (KaSA, arXiv:2412.06071): at attach, W loses its r smallest singular components (peft truncates W in place;
  merging, saving and the weight analysis see the truncated W, and loading truncates a fresh W the same way), and a
  trained diagonal ΔΣ sits between A and B. Its two regularisers (β·‖ΔΣ‖² and γ·(‖BᵀB - I‖ + ‖AAᵀ - I‖)) are added
  to the training loss here: peft leaves them to the training loop (`LoraModel._get_kasa_loss`).
- monteclora (MonteCLoRA): every training forward averages `num_samples` sampled perturbations of A, weighted by
  sampled mixture weights; evaluation and merging use the plain A and B. Its KL regulariser is added to the training
  loss here (`LoraModel._get_monteclora_loss`). Its sampler keeps the last draw as module state, a tensor of the
  step's autograd graph; `on_step` detaches it, so that the trained model can be deep-copied (merging copies it).
- velora (VeLoRA): A's input activations are kept compressed (in groups) for the backward pass: less activation
  memory, an approximate gradient for A; the forward pass is LoRA's.
- bdlora (BD-LoRA): B is block-diagonal on the target matrices (the shards of tensor-parallel serving).
- arrow: routes among several trained LoRA adapters; its yaml refuses every model (facts.cannot_apply).

The regularisers are added in training mode only, as AdaLoRA's (methods/adalora.py), so that `eval_loss` is the task
loss for every method.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import peft
from peft import PeftModel
from peft.tuners.lora import LoraModel
from torch import nn

from methods.base import AttachContext
from methods.errors import BenchError
from methods.facts import MethodFacts
from methods.lora import Lora


class _Variant(NamedTuple):
    argument: str  # the LoraConfig argument that takes the sub-config
    config_class: str  # the peft sub-config class
    regulariser: str | None  # the LoraModel method whose value is added to the training loss


LORA_VARIANTS: dict[str, _Variant] = {
    "kasa": _Variant("kasa_config", "KasaConfig", "_get_kasa_loss"),
    "monteclora": _Variant("monteclora_config", "MontecloraConfig", "_get_monteclora_loss"),
    "velora": _Variant("velora_config", "VeloraConfig", None),
    "bdlora": _Variant("use_bdlora", "BdLoraConfig", None),
    "arrow": _Variant("arrow_config", "ArrowConfig", None),
}
_REGULARISER = "_bench_regulariser"  # attribute of the LoraModel: the name of the regulariser it adds in training
_GRAPH_STATE = ("gaussian_var_prior", "expert_weights")  # MonteCLoRA sampler state that holds the last draw


class _TrainingRegularisedLoraModel(LoraModel):
    """peft's LoraModel with the variant's regulariser added to the loss in training mode."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = super().forward(*args, **kwargs)
        if self.training and getattr(output, "loss", None) is not None:
            output.loss = output.loss + getattr(self, getattr(self, _REGULARISER))()
        return output


def detach_sampler_state(model: nn.Module) -> None:
    """MonteCLoRA's samplers keep their last draw as buffers that belong to the step's autograd graph; replace them
    by detached copies (a module holding such a tensor cannot be deep-copied)."""
    for module in model.modules():
        if type(module).__name__ == "MontecloraSampler":
            for name in _GRAPH_STATE:
                value = getattr(module, name, None)
                if value is not None and value.grad_fn is not None:
                    setattr(module, name, value.detach())


class LoraVariant(Lora):
    """LoRA with one of peft's variant sub-configs (`lora_variant` in the yaml: kasa, monteclora, velora, bdlora,
    arrow). One instance per yaml, built by methods/peft_generic.py with the yaml's facts."""

    def __init__(self, name: str, facts: MethodFacts, lora_variant: str):
        if lora_variant not in LORA_VARIANTS:
            raise BenchError(f"conf/method/{name}.yaml: lora_variant: {lora_variant}; choose one of "
                             f"{', '.join(LORA_VARIANTS)}")
        super().__init__(name, facts)
        self.lora_variant = lora_variant
        self.variant = LORA_VARIANTS[lora_variant]

    def init_kwargs(self, eff: dict) -> dict:
        args = dict(eff.get("variant") or {})
        try:
            sub_config = getattr(peft, self.variant.config_class)(**args)
        except (TypeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BenchError(f"method '{self.name}': {self.variant.config_class}({args}) failed: {first}; check "
                             f"`variant` in conf/method/{self.name}.yaml") from exc
        return {self.variant.argument: sub_config}

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        return self._regularised(super().attach(model, eff, ctx))

    def load(self, base_model: nn.Module, eff: dict, ctx: AttachContext, out_dir: Path) -> nn.Module:
        return self._regularised(super().load(base_model, eff, ctx, out_dir))

    def _regularised(self, model: PeftModel) -> PeftModel:
        if self.variant.regulariser and isinstance(model.base_model, LoraModel):
            setattr(model.base_model, _REGULARISER, self.variant.regulariser)
            model.base_model.__class__ = _TrainingRegularisedLoraModel
        return model

    def on_step(self, model: nn.Module, global_step: int) -> None:
        detach_sampler_state(model)

    def merged(self, model: nn.Module) -> nn.Module:
        detach_sampler_state(model)
        return super().merged(model)
