"""Shared pieces for methods that peft implements: attach through `get_peft_model`, save/load through
peft's own `save_pretrained` / `PeftModel.from_pretrained` (adapter_model.safetensors), merge through
`merge_and_unload`."""
from __future__ import annotations

import copy
import re
from pathlib import Path

from peft import PeftConfig, PeftModel, TaskType, get_peft_model
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from methods.base import AttachContext, Method, head_modules
from methods.errors import BenchError


def task_type(ctx: AttachContext) -> TaskType:
    """peft's task type for the model: CAUSAL_LM for a decoder LM (no head; labels shifted by the model), SEQ_CLS for
    a classifier (peft adds its `classifier`/`score` to modules_to_save)."""
    return TaskType.CAUSAL_LM if ctx.causal_lm else TaskType.SEQ_CLS


def merged_head_unwrapped(model: nn.Module) -> nn.Module:
    """A merged copy by peft's merge_and_unload, with the trained task head unwrapped first: peft 0.21's generic
    unload (every tuner but LoRA's) copies `.weight` from the head's wrapper and fails on a head without one
    (RoBERTa's classification head)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.modules_to_save[module.active_adapters[0]])
    return model.merge_and_unload()


class PeftMethod(Method):
    saved_format = "peft adapter (adapter_model.safetensors + adapter_config.json)"

    def peft_config(self, eff: dict, ctx: AttachContext) -> PeftConfig:
        """The peft config built from the effective config."""
        raise NotImplementedError

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        # The whole task head trains, as for every method (conf/model/family `head`: BERT's pooler too). task_type
        # SEQ_CLS adds peft's own `classifier`/`score` to modules_to_save; the family's names are added here.
        return self.attach_config(model, self.peft_config(eff, ctx), ctx)

    def attach_config(self, model: nn.Module, peft_cfg: PeftConfig, ctx: AttachContext) -> nn.Module:
        """`get_peft_model` with this peft config, the task head trained in full; one line when nothing matches."""
        peft_cfg.modules_to_save = list(head_modules(ctx.model_cfg)) or None
        try:
            return get_peft_model(model, peft_cfg)
        except ValueError as exc:  # e.g. "Target modules {...} not found in the base model"
            first = re.split(r"(?<=\.)\s", str(exc).strip(), maxsplit=1)[0] or type(exc).__name__
            targets = getattr(peft_cfg, "target_modules", None)
            raise BenchError(f"method '{self.name}' could not attach to target_modules={targets}: {first} "
                             "Check method.target_modules against the model's module names.") from exc

    def merged(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).merge_and_unload()

    def save(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir), safe_serialization=True)

    def load(self, base_model: nn.Module, eff: dict, ctx: AttachContext, out_dir: Path) -> nn.Module:
        """peft's own loader: the saved adapter_config.json (written from `eff` at attach) rebuilds the adapter."""
        return PeftModel.from_pretrained(base_model, str(out_dir))
