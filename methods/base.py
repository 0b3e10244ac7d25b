"""The method interface and its name registry.

A method says how to attach itself to a model and what trains; it never contains a training loop.
The shared loop (bench/loop/train.py) builds one AdamW from `optimizer_param_groups` (the same for every method unless
a method's learning rates differ per parameter, as LoRA+'s do) and calls `on_step` after every optimiser step,
before zero_grad. After training the runner evaluates the model as trained and, for a method whose one training
run gives models of several ranks (DyLoRA), each of `rank_variants`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from methods.errors import BenchError


@dataclass(frozen=True)
class AttachContext:
    """What a method may need to know besides its own config."""

    rank: int | None
    model_cfg: Any  # conf/model/*.yaml: module names per family
    num_labels: int
    total_steps: int  # optimiser steps the loop will take (AdaLoRA's schedule needs it)
    tokenizer_path: str | None = None  # where the model's tokenizer loads from (prompt tuning's text init)
    # A fresh iterable of the run's training batches, in training order (CPU tensors, labels included), for methods
    # that initialise from data (EVA, CorDA, LoRA-GA); None where the caller has no data (analysis: load only).
    calibration: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None


class Method:
    """A method's facts (class attributes; tables, plots, weight analysis and tests derive from them) and how
    it attaches to a model."""

    name: ClassVar[str]  # registry name = conf/method/<name>.yaml
    label: ClassVar[str] = ""  # display name in tables and plots ("LoRA", "Full FT"); empty: the name
    display_order: ClassVar[int] = 100  # position in tables and plots (then by name)
    rank_meaning: ClassVar[str | None] = "r"  # what the `rank` knob means; None: ignored, left out of the hash
    rank_format: ClassVar[str] = "r={}"  # how a table labels the rank
    merges: ClassVar[bool] = False  # True: can be folded into the base weights for zero-overhead inference
    # True: the pre-trained parameters (W or biases) differ after training (after merging where it merges);
    # False: the method only adds modules or inputs, and `unchanged_reason` says how.
    changes_base_weights: ClassVar[bool] = True
    unchanged_reason: ClassVar[str] = ""
    edits_in_place: ClassVar[bool] = False  # trains pre-trained parameters in place: nothing added, nothing to merge
    trains_all_weights: ClassVar[bool] = False  # every weight trains (no "attached nothing" check)
    identity_at_init: ClassVar[bool] = True  # the attached model computes what the base model does, before training
    saved_format: ClassVar[str] = "trainable tensors (trainable.safetensors)"  # what `save` writes
    # The method table in docs/methods.md (bench/tools/method_table.py): what trains besides the head, and how the
    # defaults were set (paper / peft example / our lr sweep / guess) with the learning rate's source.
    summary: ClassVar[str] = ""
    defaults_source: ClassVar[str] = ""
    lr_source: ClassVar[str] = ""

    @property
    def uses_rank(self) -> bool:
        """False: the `rank` knob is ignored and left out of the config hash."""
        return self.rank_meaning is not None

    @property
    def display_label(self) -> str:
        return self.label or self.name

    def attach(self, model: nn.Module, cfg: Any, ctx: AttachContext) -> nn.Module:
        raise NotImplementedError

    def validate(self, device: torch.device) -> None:
        """Raise BenchError (at plan time, before anything loads) when the method cannot run on `device`."""

    def validate_model(self, model_cfg: Any) -> None:
        """Raise BenchError (at plan time) when the method cannot apply to this model (conf/model/*.yaml)."""

    def virtual_tokens(self, rank: int | None) -> int:
        """Positions the method adds in front of every sequence (prompt/prefix tuning); 0 for most methods."""
        return 0

    def load_kwargs(self, cfg: Any, model_cfg: Any, device: torch.device) -> dict:
        """Extra keyword arguments for the base model's `from_pretrained` (e.g. a quantisation config).
        Most methods load the model as it is."""
        return {}

    def effective_config(self, cfg: dict, rank: int | None) -> dict:
        """The method's settings as they will be used (e.g. alpha derived from rank); hashed for identity."""
        return dict(cfg)

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

    def load(self, base_model: nn.Module, cfg: Any, ctx: AttachContext, out_dir: Path) -> nn.Module:
        """Rebuild the fine-tuned model from a fresh base model and what `save` wrote."""
        model = self.attach(base_model, cfg, ctx)
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


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise BenchError(f"unknown method '{name}'; choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


HeadSpec = str | Sequence[str]
CAUSAL_LM = "causal_lm"  # conf/model/family/*.yaml `kind`: a decoder LM scored through its LM head (bench/data/text.py)


def is_causal_lm(model_cfg: Any) -> bool:
    """True for a causal LM (no task head; peft's CAUSAL_LM task type); False for a sequence classifier."""
    return str(model_cfg.get("kind") or "classifier") == CAUSAL_LM


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


__all__ = ["CAUSAL_LM", "is_causal_lm",
           "AttachContext", "Method", "REGISTRY", "register", "get_method", "freeze_all_but_head", "head_modules",
           "decays", "is_head_param", "count_params", "param_count", "tensor_bytes"]
