"""Any peft tuner from a yaml alone: every `conf/method/<name>.yaml` with a `peft_config:` key (the name of a
`peft.*Config` class) is a `GenericPeftMethod` built with its yaml's facts, every one with a `lora_init:` key (one
of LoRA's initialisations) a `LoraInit` (methods/lora.py), and every one with a `lora_variant:` key (one of the
variants peft configures through a LoraConfig sub-config) a `LoraVariant` (methods/lora_variants.py); none has Python
of its own.

A tuner's yaml holds:
- `peft_config`: the peft config class (`VeraConfig`, `LoHaConfig`, ...), built with the model's peft task type;
- `peft_args`: its constructor arguments (target modules from conf/model, e.g. `${model.lora_targets}`);
- the loop's settings every method has (`lr`, `warmup_ratio`, `weight_decay`);
- `facts` (methods/facts.py `TunerFacts`): every method's facts, plus `rank_fills` (the peft arguments the `rank`
  knob sets, each as a multiple of it: `{r: 1, alpha: 2}`; with `rank_meaning`, or neither when `rank` is ignored)
  and `prepends_tokens` (P-tuning: virtual tokens in front of the input, so the head reads the real first token as
  for prompt tuning).

`peft_config` and `peft_args` (with the rank filled in) are in the effective config, the run's identity; the facts
are not. Attaching, counting, saving, loading and merging are PeftMethod's (methods/peft_common.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
from peft import PeftConfig, PeftModel
from torch import nn

from methods.base import AttachContext, add
from methods.errors import BenchError
from methods.facts import FACTS_KEY, METHOD_CONF, MethodFacts, TunerFacts, method_yaml, validate_facts
from methods.lora import LoraInit
from methods.lora_variants import LoraVariant
from methods.peft_common import PeftMethod, merged_head_unwrapped, task_type
from methods.prompt import read_real_first_token


class GenericPeftMethod(PeftMethod):
    """A peft tuner described by its yaml (module docstring): one instance per yaml, with the yaml's facts and the
    name of its peft config class."""

    facts_schema = TunerFacts
    facts: TunerFacts

    def __init__(self, name: str, facts: TunerFacts, peft_config_class: str):
        config_class = getattr(peft, peft_config_class, None)
        if not (isinstance(config_class, type) and issubclass(config_class, PeftConfig)):
            raise BenchError(f"conf/method/{name}.yaml: peft_config: {peft_config_class} is not a peft config class")
        super().__init__(name, facts)
        self.peft_config_class = peft_config_class

    def derive(self, settings: dict, rank: int | None) -> dict:
        args = dict(settings.get("peft_args") or {})
        for arg, times in self.facts.rank_fills.items():
            value = float(times) * int(rank or 0)
            args[arg] = int(value) if value == int(value) else value
        return {**settings, "peft_args": args}

    def peft_config(self, eff: dict, ctx: AttachContext) -> PeftConfig:
        config_class = getattr(peft, self.peft_config_class)
        try:
            return config_class(task_type=task_type(ctx), **eff["peft_args"])
        except (TypeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BenchError(f"method '{self.name}': {self.peft_config_class}({eff['peft_args']}) failed: {first}; "
                             f"check peft_args in conf/method/{self.name}.yaml") from exc

    def merged(self, model: nn.Module) -> nn.Module:
        return merged_head_unwrapped(model)

    def virtual_tokens(self, rank: int | None) -> int:
        return int(rank or 0) if self.facts.prepends_tokens else 0

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        return self._adapt(super().attach(model, eff, ctx), ctx)

    def load(self, base_model: nn.Module, eff: dict, ctx: AttachContext, out_dir: Path) -> nn.Module:
        return self._adapt(super().load(base_model, eff, ctx, out_dir), ctx)

    def _adapt(self, model: PeftModel, ctx: AttachContext) -> PeftModel:
        if self.facts.prepends_tokens:
            return read_real_first_token(model, ctx)
        return model


def method_yamls() -> dict[str, dict]:
    """{name: the yaml as composed (methods/facts.py `method_yaml`; interpolations unresolved)} of every method yaml
    that names a peft config (`peft_config:`), one of LoRA's initialisations (`lora_init:`) or one of its variants
    (`lora_variant:`)."""
    out = {}
    for path in sorted(METHOD_CONF.glob("*.yaml")):
        raw = method_yaml(path.stem)
        if raw.get("peft_config") or raw.get("lora_init") or raw.get("lora_variant"):
            out[path.stem] = raw
    return out


def from_yaml(name: str, raw: dict[str, Any]) -> PeftMethod:
    """The method a tuner's yaml describes (`raw`: the composed yaml). A yaml that names no such peft class, an unknown
    LoRA initialisation or variant, or facts that do not check stops here with one line (every command imports the
    registry, so a broken yaml cannot go unnoticed)."""
    if raw.get("name") != name:
        raise BenchError(f"conf/method/{name}.yaml: name: {raw.get('name')!r} must equal the file's name")
    if raw.get("lora_init"):
        return LoraInit(name, validate_facts(name, raw.get(FACTS_KEY), MethodFacts), str(raw["lora_init"]))
    if raw.get("lora_variant"):
        return LoraVariant(name, validate_facts(name, raw.get(FACTS_KEY), MethodFacts), str(raw["lora_variant"]))
    return GenericPeftMethod(name, validate_facts(name, raw.get(FACTS_KEY), TunerFacts), str(raw["peft_config"]))


for _name, _raw in method_yamls().items():
    add(from_yaml(_name, _raw))
