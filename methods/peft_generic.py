"""Any peft tuner from a yaml alone: every `conf/method/<name>.yaml` with a `peft_config:` key (the name of a
`peft.*Config` class) is registered here as a method, with no Python of its own.

The yaml holds:
- `peft_config`: the peft config class (`VeraConfig`, `LoHaConfig`, ...), built with the model's peft task type;
- `peft_args`: its constructor arguments (target modules from conf/model, e.g. `${model.lora_targets}`);
- `facts`: what the registry says about the method (methods/base.py `Method`): `label`, `summary` (what trains,
  in docs/methods.md), `rank_meaning` (null: `rank` is ignored and left out of the run's identity), `rank_fills`
  (the peft arguments the `rank` knob sets, each as a multiple of it: `{r: 1, alpha: 2}`), `merges`,
  `identity_at_init`, `changes_base_weights` (+ `unchanged_reason`), `prepends_tokens` (P-tuning: virtual tokens
  in front of the input, so the head reads the real first token as for prompt tuning), `cannot_apply` (model
  family -> the one line saying why it stops at plan time), `defaults_source` (how the defaults were chosen:
  paper, peft example, our lr sweep, guess) and `lr_source` (the learning rate's source, for the table);
- the loop's settings every method has (`lr`, `warmup_ratio`, `weight_decay`).

`facts` are descriptions, not settings: they are left out of the effective config (the run's identity), whereas
`peft_config` and `peft_args` (with the rank filled in) are in it. Attaching, counting, saving, loading and merging
are PeftMethod's (methods/peft_common.py).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import peft
from omegaconf import OmegaConf
from peft import PeftConfig, PeftModel
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from methods.base import REGISTRY, AttachContext
from methods.errors import BenchError
from methods.lora import LORA_INITS, LoraInit
from methods.peft_common import PeftMethod, task_type
from methods.prompt import read_real_first_token

METHOD_CONF = Path(__file__).resolve().parent.parent / "conf" / "method"

# Facts a yaml may set, with their Method attribute names (methods/base.py); anything else under `facts` is a typo.
_FACTS = {"label", "summary", "display_order", "rank_meaning", "rank_format", "rank_fills", "merges",
          "identity_at_init", "changes_base_weights", "unchanged_reason", "prepends_tokens", "cannot_apply",
          "defaults_source", "lr_source"}


class GenericPeftMethod(PeftMethod):
    """A peft tuner described by its yaml (module docstring). One subclass per yaml, made by `register_yaml`."""

    peft_config_class: ClassVar[str]
    rank_fills: ClassVar[dict[str, float]] = {}
    prepends_tokens: ClassVar[bool] = False
    cannot_apply: ClassVar[dict[str, str]] = {}

    def validate_model(self, model_cfg: Any) -> None:
        family = str(model_cfg.get("family") or "")
        if family in self.cannot_apply:
            raise BenchError(f"method '{self.name}' cannot apply to model '{model_cfg.get('name')}' "
                             f"({family} family): {self.cannot_apply[family]}")

    def effective_config(self, cfg: dict, rank: int | None) -> dict:
        out = {k: v for k, v in cfg.items() if k != "facts"}
        args = dict(out.get("peft_args") or {})
        for arg, times in self.rank_fills.items():
            value = float(times) * int(rank or 0)
            args[arg] = int(value) if value == int(value) else value
        out["peft_args"] = args
        return out

    def peft_config(self, cfg: Any, ctx: AttachContext) -> PeftConfig:
        eff = self.effective_config(OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg)
                                    else dict(cfg), ctx.rank)
        config_class = getattr(peft, self.peft_config_class)
        try:
            return config_class(task_type=task_type(ctx.model_cfg), **eff["peft_args"])
        except (TypeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BenchError(f"method '{self.name}': {self.peft_config_class}({eff['peft_args']}) failed: {first}; "
                             f"check peft_args in conf/method/{self.name}.yaml") from exc

    def merged(self, model: nn.Module) -> nn.Module:
        """peft's merge_and_unload, with the trained task head unwrapped first: peft 0.21's generic unload (every
        tuner but LoRA's) copies `.weight` from the head's wrapper and fails on a head without one (RoBERTa's
        classification head)."""
        model = copy.deepcopy(model)
        for name, module in list(model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module.modules_to_save[module.active_adapters[0]])
        return model.merge_and_unload()

    def virtual_tokens(self, rank: int | None) -> int:
        return int(rank or 0) if self.prepends_tokens else 0

    def attach(self, model: nn.Module, cfg: Any, ctx: AttachContext) -> nn.Module:
        return self._adapt(super().attach(model, cfg, ctx), ctx)

    def load(self, base_model: nn.Module, cfg: Any, ctx: AttachContext, out_dir: Path) -> nn.Module:
        return self._adapt(super().load(base_model, cfg, ctx, out_dir), ctx)

    def _adapt(self, model: PeftModel, ctx: AttachContext) -> PeftModel:
        if self.prepends_tokens:
            return read_real_first_token(model, ctx.model_cfg)
        return model


def method_yamls() -> dict[str, dict]:
    """{name: the yaml as written (interpolations unresolved)} of every method yaml that names a peft config
    (`peft_config:`) or one of LoRA's initialisations (`lora_init:`, methods/lora.py LoraInit)."""
    out = {}
    for path in sorted(METHOD_CONF.glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if isinstance(raw, dict) and (raw.get("peft_config") or raw.get("lora_init")):
            out[path.stem] = raw
    return out


def register_yaml(name: str, raw: dict) -> type[PeftMethod]:
    """Register the method a yaml describes; a yaml that names no such peft class or an unknown fact stops here
    with one line (every command imports the registry, so a broken yaml cannot go unnoticed)."""
    if raw.get("name") != name:
        raise BenchError(f"conf/method/{name}.yaml: name: {raw.get('name')!r} must equal the file's name")
    base: type[PeftMethod]
    if raw.get("lora_init"):
        if str(raw["lora_init"]) not in LORA_INITS:
            raise BenchError(f"conf/method/{name}.yaml: lora_init: {raw['lora_init']}; choose one of "
                             f"{', '.join(LORA_INITS)}")
        base, extra = LoraInit, {"lora_init": str(raw["lora_init"]), "merges": True}
    else:
        config_class = str(raw["peft_config"])
        if not isinstance(getattr(peft, config_class, None), type) or not issubclass(getattr(peft, config_class),
                                                                                     PeftConfig):
            raise BenchError(f"conf/method/{name}.yaml: peft_config: {config_class} is not a peft config class")
        base, extra = GenericPeftMethod, {"peft_config_class": config_class}
    facts = dict(raw.get("facts") or {})
    unknown = sorted(set(facts) - _FACTS)
    if unknown:
        raise BenchError(f"conf/method/{name}.yaml: unknown facts {unknown}; known: {sorted(_FACTS)}")
    attrs: dict[str, Any] = {"name": name, "__module__": __name__, **extra, **facts}
    if base is GenericPeftMethod:
        attrs["rank_fills"] = dict(facts.get("rank_fills") or {})
        attrs["cannot_apply"] = dict(facts.get("cannot_apply") or {})
        if bool(attrs.get("rank_meaning")) != bool(attrs["rank_fills"]):
            raise BenchError(f"conf/method/{name}.yaml: facts.rank_meaning and facts.rank_fills go together "
                             "(both set: `rank` fills those peft arguments; both null: `rank` is ignored)")
    if facts.get("prepends_tokens"):
        attrs.setdefault("rank_format", "{} tokens")
    cls = type(f"Peft_{name}", (base,), attrs)
    if name in REGISTRY:
        raise BenchError(f"conf/method/{name}.yaml: method '{name}' is also registered in Python")
    REGISTRY[name] = cls()
    return cls


for _name, _raw in method_yamls().items():
    register_yaml(_name, _raw)
