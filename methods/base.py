"""The method interface and its name registry.

A method is behaviour: how it attaches to a model (`attach`), what trains, how it merges, saves and loads, and its
hooks into the loop; it never contains a training loop. Its facts and defaults live in its yaml
(conf/method/<name>.yaml, methods/facts.py) and reach the code as `method.facts` (and one property per fact:
`method.merges`, `method.label`, ...).

The shared loop (bench/loop/train.py) builds one AdamW from `optimizer_param_groups` (the same for every method unless
a method's learning rates differ per parameter, as LoRA+'s do) and calls `on_step` after every optimiser step,
before zero_grad. After training the runner evaluates the model as trained and, for a method whose one training
run gives models of several ranks (DyLoRA), each of `rank_variants`.

`attach`, `load` and `load_kwargs` receive the method's effective config (`eff`): the plain dict that
`effective_config` makes from the composed `cfg.method` and the rank, which is what the run's identity hashes
(bench/plan.py `effective["method"]`; a run record's `effective_config["method"]`). They read their settings from
it and derive nothing again, so the adapter that is built is the one the hash names.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from methods.errors import BenchError
from methods.facts import EVERY_FAMILY, FACTS_KEY, MethodFacts, read_facts


@dataclass(frozen=True)
class AttachContext:
    """What a method may need to know besides its own config."""

    rank: int | None
    model_cfg: Any  # conf/model/*.yaml: module names per family
    causal_lm: bool  # a decoder LM scored through its LM head (no task head); decided by bench.model.model_kind
    num_labels: int
    total_steps: int  # optimiser steps the loop will take (AdaLoRA's schedule needs it)
    tokenizer_path: str | None = None  # where the model's tokenizer loads from (prompt tuning's text init)
    # A fresh iterable of the run's training batches, in training order (CPU tensors, labels included), for methods
    # that initialise from data (EVA, CorDA, LoRA-GA); None where the caller has no data (analysis: load only).
    calibration: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None


def _fact(key: str) -> property:
    return property(lambda self: getattr(self.facts, key),
                    doc=f"`facts.{key}` of the method's yaml (methods/facts.py MethodFacts)")


def plain(value: Any) -> Any:
    """`value` with every OmegaConf node turned into plain dicts and lists (interpolations resolved)."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class Method:
    """How a method attaches to a model and trains, built with its facts (conf/method/<name>.yaml `facts:`).

    A method written in Python is a subclass with a `name` and the `@register` decorator, which builds its one
    instance with the facts of its yaml. A yaml-only method is an instance of a shared class built from its yaml
    (methods/peft_generic.py). Subclasses override `derive` (not `effective_config`) and declare no facts: both
    are checked when the subclass is defined."""

    name: str  # registry name = conf/method/<name>.yaml (a class attribute of a registered subclass)
    facts_schema: ClassVar[type[MethodFacts]] = MethodFacts
    # What `save` writes: a description of this class's `save`, so it stays beside it (`python -m methods show`).
    saved_format: ClassVar[str] = "trainable tensors (trainable.safetensors)"

    def __init__(self, name: str, facts: MethodFacts):
        if not isinstance(facts, self.facts_schema):
            raise TypeError(f"method '{name}': facts must be {self.facts_schema.__name__}, got {type(facts).__name__}")
        self.name = name
        self.facts = facts

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = sorted(set(vars(cls)) & set(MethodFacts.model_fields))
        if declared:
            raise TypeError(f"{cls.__qualname__} declares facts {declared} in Python; they belong in its yaml's "
                            "`facts:` block (conf/method/<name>.yaml)")
        if "effective_config" in vars(cls):
            raise TypeError(f"{cls.__qualname__} overrides effective_config; override `derive` instead (the facts "
                            "must stay out of every effective config)")

    label = _fact("label")
    summary = _fact("summary")
    defaults_source = _fact("defaults_source")
    lr_source = _fact("lr_source")
    display_order = _fact("display_order")
    rank_meaning = _fact("rank_meaning")
    rank_format = _fact("rank_format")
    merges = _fact("merges")
    changes_base_weights = _fact("changes_base_weights")
    unchanged_reason = _fact("unchanged_reason")
    edits_in_place = _fact("edits_in_place")
    trains_all_weights = _fact("trains_all_weights")
    identity_at_init = _fact("identity_at_init")
    cannot_apply = _fact("cannot_apply")

    @property
    def uses_rank(self) -> bool:
        """False: the `rank` knob is ignored and left out of the config hash."""
        return self.rank_meaning is not None

    @property
    def display_label(self) -> str:
        return self.label or self.name

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} '{self.name}'>"

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        """The model with the method attached, built from `eff` (the effective config, `effective_config`)."""
        raise NotImplementedError

    def validate(self, device: torch.device) -> None:
        """Raise BenchError (at plan time, before anything loads) when the method cannot run on `device`."""

    def validate_model(self, model_cfg: Any) -> None:
        """Raise BenchError (at plan time) when the method cannot apply to this model (conf/model/*.yaml): the
        families its facts' `cannot_apply` names, or every family ("*")."""
        family = str(model_cfg.get("family") or "")
        why = self.cannot_apply.get(family) or self.cannot_apply.get(EVERY_FAMILY)
        if why:
            raise BenchError(f"method '{self.name}' cannot apply to model '{model_cfg.get('name')}' "
                             f"({family} family): {why}")

    def virtual_tokens(self, rank: int | None) -> int:
        """Positions the method adds in front of every sequence (prompt/prefix tuning); 0 for most methods."""
        return 0

    def load_kwargs(self, eff: dict, model_cfg: Any, device: torch.device) -> dict:
        """Extra keyword arguments for the base model's `from_pretrained` (e.g. a quantisation config), from the
        effective config. Most methods load the model as it is."""
        return {}

    def effective_config(self, cfg: Mapping, rank: int | None) -> dict:
        """The method's settings as the run uses them, as a plain dict: the composed `cfg.method` without its
        facts (descriptions, never part of a run's identity), with what the rank and the other settings set filled
        in (`derive`). Hashed for the run's identity, and passed to `attach`, `load` and `load_kwargs`."""
        settings = {k: v for k, v in plain(cfg).items() if k != FACTS_KEY}
        return self.derive(settings, rank)

    def derive(self, settings: dict, rank: int | None) -> dict:
        """The settings with what follows from them and the rank (e.g. LoRA's r and lora_alpha); checks that stop
        a bad combination at plan time go here. Most methods use their settings as they are."""
        return settings

    def config_label(self, effective: dict) -> str:
        """The display label of a run with this effective method config: `display_label`, plus what tells
        configurations of one method apart where that matters (LoRA's scaling rule: "LoRA (α=2r)")."""
        return self.display_label

    def optimizer_param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """The AdamW parameter groups of the trainable parameters: every one at `lr`, with `weight_decay` except
        where `decays` says no (biases, LayerNorm). A method whose learning rate differs per parameter (LoRA+)
        returns groups with their own `lr`; the loop's schedule scales every group's lr alike."""
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (decay if decays(name, param) else no_decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay, "lr": lr},
                {"params": no_decay, "weight_decay": 0.0, "lr": lr}]

    def on_step(self, model: nn.Module, global_step: int) -> None:
        """Called by the loop after each optimiser step, before zero_grad."""

    def rank_variants(self, model: nn.Module) -> Iterable[tuple[int, AbstractContextManager]]:
        """(rank, a context in which `model` computes as that rank's model) for each rank the one trained model
        is also evaluated at (DyLoRA); the runner records their metrics as `rank_metrics`. Empty for most methods."""
        return ()

    def scored_state(self, model: nn.Module) -> Any:
        """A copy of what the model's outputs, saved weights and record depend on besides its trainable tensors
        (AdaLoRA: the rank pattern), taken when keep_best keeps an evaluation; None for most methods."""
        return None

    def restore_scored_state(self, model: nn.Module, state: Any) -> None:
        """Put back what `scored_state` copied, after keep_best has restored that evaluation's trainable tensors."""

    def merged(self, model: nn.Module) -> nn.Module:
        """A copy of the model with the method folded into the base weights."""
        raise NotImplementedError(f"method '{self.name}' does not merge")

    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Save what is needed to reproduce the fine-tuned model from the base model (safetensors)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, str(out_dir / "trainable.safetensors"))

    def load(self, base_model: nn.Module, eff: dict, ctx: AttachContext, out_dir: Path) -> nn.Module:
        """Rebuild the fine-tuned model from a fresh base model, the run's effective config and what `save` wrote."""
        model = self.attach(base_model, eff, ctx)
        state = load_file(str(out_dir / "trainable.safetensors"))
        missing = set(state) - {n for n, _ in model.named_parameters()}
        if missing:
            raise BenchError(f"{out_dir}: saved tensors {sorted(missing)[:3]} do not match the model")
        model.load_state_dict(state, strict=False)
        return model

    def info(self, model: nn.Module) -> dict:
        """Method-specific facts for the record (e.g. AdaLoRA's final rank pattern)."""
        return {}


REGISTRY: dict[str, Method] = {}


def add(method: Method) -> Method:
    """Put `method` in the registry under its name; a name registered twice stops the import with one line."""
    if method.name in REGISTRY:
        raise BenchError(f"method '{method.name}' is registered twice ({REGISTRY[method.name]!r} and {method!r})")
    REGISTRY[method.name] = method
    return method


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register the one instance of a method written in Python, with its yaml's facts."""
    add(cls(cls.name, read_facts(cls.name, cls.facts_schema)))
    return cls


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise BenchError(f"unknown method '{name}'; choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


HeadSpec = str | Sequence[str]
def head_modules(model_cfg: Any) -> tuple[str, ...]:
    """The task head's module names from a model config (conf/model/family/*.yaml `head`: a list, or one name;
    an empty list: no task head, as for a causal LM whose pre-trained LM head scores the answers)."""
    head = model_cfg.get("head")
    if head is None:
        head = "classifier"
    return (str(head),) if isinstance(head, str) else tuple(str(h) for h in head)


def freeze_all_but_head(model: nn.Module, head: HeadSpec) -> None:
    """Freeze every parameter except those of the task head (the modules named in `head`)."""
    for name, param in model.named_parameters():
        param.requires_grad = is_head_param(name, head)


def decays(name: str, param: torch.Tensor) -> bool:
    """The loop's weight-decay rule, one for every method: no decay on biases and LayerNorm (1-D tensors, or
    LayerNorm by name)."""
    return not (param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name)


def is_head_param(name: str, head: HeadSpec) -> bool:
    """True for parameters of the task head: `name` contains one of the head's module names as whole
    dot-separated components (`classifier`, `pooler`; also under peft's wrappers, …classifier.modules_to_save…).
    The one place that decides what the head is (counts, freezing, gradient checks, analysis)."""
    heads = (head,) if isinstance(head, str) else head
    return bool(heads) and any(f".{h}." in f".{name}." for h in heads)


def param_count(param: torch.Tensor) -> int:
    """Number of values a parameter stands for: bitsandbytes' 4-bit `Params4bit` packs two per byte."""
    if param.__class__.__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def count_params(model: nn.Module, head: HeadSpec) -> dict[str, int]:
    trainable = [(n, param_count(p)) for n, p in model.named_parameters() if p.requires_grad]
    return {
        "trainable_params": sum(n for _, n in trainable),
        "trainable_params_excl_head": sum(n for name, n in trainable if not is_head_param(name, head)),
        "total_params": sum(param_count(p) for p in model.parameters()),
    }


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer: what a full-model safetensors file holds (header excluded)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


__all__ = [
           "AttachContext", "Method", "REGISTRY", "add", "plain", "register", "get_method", "freeze_all_but_head",
           "head_modules",
           "decays", "is_head_param", "count_params", "param_count", "tensor_bytes"]
