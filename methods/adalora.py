"""AdaLoRA (Zhang et al. 2023, arXiv:2303.10512) via peft: LoRA in SVD form (P·Λ·Q) whose rank budget is
reallocated during training. Every adapted matrix starts at `init_r` = ceil(init_r_multiple * rank) and
the total budget shrinks, on a cubic schedule, to `rank` (the target *average* rank) per matrix.

What makes it real and not plain LoRA:
- `on_step` calls `update_and_allocate(global_step)`; the shared loop calls it after every optimiser
  step, before zero_grad (the gradients are still there: the importance scores need them).
- `total_step` is the run's number of optimiser steps; `tinit`/`tfinal` are fractions of it, so
  `tinit < total_step - tfinal` holds for any step count (each is floored; their sum is < 1).
- The orthogonal regulariser γ·mean‖PPᵀ−I‖ is added by peft's AdaLoraModel.forward whenever a loss is
  computed. peft adds it in eval mode too, which would put it into the record's eval_loss; here it is
  added only in training, so eval_loss is the task loss for every method.
`info()` returns the final rank per adapted module for the record.
"""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

from peft import AdaLoraConfig, PeftModel
from peft.tuners.adalora import AdaLoraModel
from torch import nn

from methods.base import AttachContext, register
from methods.errors import BenchError
from methods.peft_common import PeftMethod, task_type


class _TrainOnlyRegAdaLoraModel(AdaLoraModel):
    """peft's AdaLoraModel with the orthogonal regulariser added to the loss only in training mode."""

    def forward(self, *args, **kwargs):
        if self.training:
            return super().forward(*args, **kwargs)
        return self.model(*args, **kwargs)


def _train_only_regulariser(model: nn.Module) -> nn.Module:
    if isinstance(model.base_model, AdaLoraModel):
        model.base_model.__class__ = _TrainOnlyRegAdaLoraModel
    return model


def _module_name(param_key: str) -> str:
    """'bert.encoder.layer.0.attention.self.query.lora_E.default' -> 'bert.encoder.layer.0.attention.self.query'"""
    return param_key.split(".lora_E")[0].removeprefix("base_model.model.")


@register
class AdaLora(PeftMethod):
    name = "adalora"

    def derive(self, settings: dict, rank: int | None) -> dict:
        out = dict(settings)
        out["target_r"] = rank
        # init_r > target_r is required: with equal ranks there is nothing to reallocate (and peft's
        # budget masking would be asked to drop k = 0 triplets).
        out["init_r"] = max(math.ceil(float(settings["init_r_multiple"]) * rank), rank + 1)
        out["lora_alpha"] = float(settings["alpha_over_rank"]) * out["init_r"]  # peft scales by alpha / init_r
        tinit_ratio, tfinal_ratio = float(settings["tinit_ratio"]), float(settings["tfinal_ratio"])
        if tinit_ratio < 0 or tfinal_ratio < 0 or tinit_ratio + tfinal_ratio >= 1:
            raise BenchError(f"adalora: tinit_ratio ({tinit_ratio}) and tfinal_ratio ({tfinal_ratio}) must be >= 0 "
                             "and sum to < 1, to leave steps for the budget phase")
        return out

    @staticmethod
    def schedule(eff: dict, total_steps: int) -> tuple[int, int]:
        """(tinit, tfinal) in steps. floor(a*T) + floor(b*T) <= (a+b)*T < T, so tinit < T - tfinal."""
        return int(float(eff["tinit_ratio"]) * total_steps), int(float(eff["tfinal_ratio"]) * total_steps)

    def peft_config(self, eff: dict, ctx: AttachContext) -> AdaLoraConfig:
        if ctx.total_steps < 1:
            raise BenchError(f"adalora needs the number of training steps; got total_steps={ctx.total_steps}")
        tinit, tfinal = self.schedule(eff, ctx.total_steps)
        return AdaLoraConfig(
            task_type=task_type(ctx),
            target_r=eff["target_r"],
            init_r=eff["init_r"],
            lora_alpha=eff["lora_alpha"],
            lora_dropout=float(eff["dropout"]),
            target_modules=list(eff["target_modules"]),
            total_step=ctx.total_steps,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=int(eff["deltaT"]),
            beta1=float(eff["beta1"]),
            beta2=float(eff["beta2"]),
            orth_reg_weight=float(eff["orth_reg_weight"]),
        )

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        return _train_only_regulariser(super().attach(model, eff, ctx))

    def load(self, base_model: nn.Module, eff: dict, ctx: AttachContext, out_dir: Path) -> nn.Module:
        # peft >= 0.21 warns that rank_pattern keys "did not match any targeted module and were ignored": its
        # generic check expects module-name patterns, but AdaLoRA stores per-matrix masks keyed by `lora_E`
        # parameter names and does use them (AdaLoraModel._remap_adapter_state_dict_for_load resizes the
        # matrices to them; the round-trip test checks the logits). Only that false alarm is silenced.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match",
                                    category=RuntimeWarning)
            return _train_only_regulariser(PeftModel.from_pretrained(base_model, str(out_dir)))

    def on_step(self, model: nn.Module, global_step: int) -> None:
        model.base_model.update_and_allocate(global_step)

    def scored_state(self, model: nn.Module) -> Any:
        return copy.deepcopy(model.peft_config[model.active_adapter].rank_pattern)

    def restore_scored_state(self, model: nn.Module, state: Any) -> None:
        """The kept evaluation's rank pattern, so that the saved adapter (peft resizes it to the rank pattern) and
        `info` are of the model that was scored. Between two maskings (every deltaT steps) the optimiser moves
        masked singular values off zero again and the scored model used them too, so every non-zero one is kept."""
        config = model.peft_config[model.active_adapter]
        if state is None:  # not yet masked then: every matrix at init_r
            config.rank_pattern = None
            return
        pattern = copy.deepcopy(state)
        adapter = model.active_adapter
        for name, param in model.base_model.model.named_parameters():
            if f"lora_E.{adapter}" in name:
                key = name if name in pattern else name.replace(f".{adapter}", "")
                nonzero = (param.detach().flatten() != 0).tolist()
                pattern[key] = [bool(kept) or used for kept, used in zip(pattern[key], nonzero)]
        config.rank_pattern = pattern

    def info(self, model: nn.Module) -> dict:
        config = model.peft_config[model.active_adapter]
        if config.rank_pattern:  # set by the allocator once it has masked (list of kept triplets per module)
            ranks = {_module_name(k): int(sum(bool(x) for x in v)) for k, v in config.rank_pattern.items()}
        else:  # never reallocated: every module still has init_r
            ranks = {_module_name(n): int(p.shape[0]) for n, p in model.named_parameters() if ".lora_E." in n}
        return {"rank_pattern": dict(sorted(ranks.items())), "total_rank": sum(ranks.values()),
                "init_r": config.init_r, "target_r": config.target_r, "reallocated": bool(config.rank_pattern),
                "total_step": config.total_step, "tinit": config.tinit, "tfinal": config.tfinal}
