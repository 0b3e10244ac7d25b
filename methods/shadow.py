"""ShadowPEFT via peft (`ShadowConfig`): a small trained "shadow" network runs beside the frozen decoder. A shadow
backbone (peft's "mirror": the base model's architecture with one layer, randomly initialised, fed by the base
model's frozen input embeddings) makes a shadow state; at every decoder block the difference between the block's
input and the shadow state is injected back through a rank-r bottleneck (W_down, W_up; W_up = 0 at init, so the model
starts as the base model), and the shadow state is advanced by a gated update from the block's output. It cannot
merge: the adaptation depends on the input.

peft adds the shadow network's own loss (its head on the initial shadow state, weight auxiliary_loss_weight) to the
model's loss whenever labels are given, in evaluation too; here it is added in training only, as AdaLoRA's
regulariser (methods/adalora.py), so that `eval_loss` is the task loss for every method. peft's ShadowPEFT wraps a
decoder's layer loop: it refuses the suite's encoders (facts.cannot_apply)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import PeftModel
from peft.tuners.shadow import ShadowModel
from torch import nn

from methods.base import AttachContext, register
from methods.facts import TunerFacts
from methods.peft_generic import GenericPeftMethod


class _TrainOnlyAuxLossShadowModel(ShadowModel):
    """peft's ShadowModel with the shadow network's own loss added in training mode only."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training:
            return super().forward(*args, **kwargs)
        return self.model(*args, **kwargs)


def _train_only_aux_loss(model: PeftModel) -> PeftModel:
    if isinstance(model.base_model, ShadowModel):
        model.base_model.__class__ = _TrainOnlyAuxLossShadowModel
    return model


@register
class Shadow(GenericPeftMethod):
    """ShadowPEFT: the yaml's `peft_args` (no `peft_config:` key: this class names ShadowConfig), `rank` = the
    bottleneck's r (facts.rank_fills)."""

    name = "shadow"

    def __init__(self, name: str, facts: TunerFacts):
        super().__init__(name, facts, "ShadowConfig")

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        return _train_only_aux_loss(super().attach(model, eff, ctx))

    def load(self, base_model: nn.Module, eff: dict, ctx: AttachContext, out_dir: Path) -> nn.Module:
        return _train_only_aux_loss(super().load(base_model, eff, ctx, out_dir))
