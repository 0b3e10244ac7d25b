"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691) and prefix tuning (Li & Liang 2021,
arXiv:2101.00190; P-Tuning v2 for NLU) via peft. `rank` = number of virtual tokens.

- prompt_tuning: `rank` trained embeddings are prepended to the input embeddings. peft prepends zeros
  to token_type_ids and ones to the attention mask, so BERT pair inputs work. The classification still reads
  the real first token ([CLS] / <s>): peft puts the virtual tokens first, so BERT's pooler (RoBERTa's head) would
  otherwise read virtual token 0, a learned input embedding, in place of the [CLS] position the pre-trained
  pooler and every other method read. A forward pre-hook on the module that reads the first position
  (conf/model/family: `first_token_reader`) drops the virtual positions from its input (`read_real_first_token`);
  it is applied on attach and on load and, being a plain object in the module's hooks, survives a deep copy.
- prefix_tuning: `rank` trained key/value vectors are prepended in every layer (past_key_values).
- cartridge (Cartridges, peft's CartridgeConfig): the same trained key/value prefix, stored directly as the KV cache
  it is served as, with its first `num_frozen_tokens` positions frozen (the paper's attention sink). Cartridges are
  made for compressing a corpus by self-study distillation; here the prefix trains on the task loss.
None is identity at init and none merges. Both lengthen the sequence: with a model of 512
positions, the longest tokenised example + rank must stay <= 512 (BERT also shifts positions past a prefix):
the runner checks this on the data before training (`virtual_tokens`).

Prefix tuning and the transformers cache rename: peft (0.21) hands the prefix to the backbone as
`past_key_values`, and only when that name is in the backbone's `forward` signature. transformers 5.24 renamed
the argument to `cache` in BERT/RoBERTa, and 5.25 in Llama (the old name still works, with a deprecation), so
peft's check fails with "Model does not support past key values". Where the backbone takes `cache` and not
`past_key_values`, `_accept_past_key_values` gives that one module instance a `forward` that takes the old name and
passes it on as `cache` (over the `cache=None` that a renamed causal-LM head passes beside it); nothing else
changes, and with older transformers it does nothing.
"""
from __future__ import annotations

import inspect
import types
from pathlib import Path
from typing import Any

from peft import CartridgeConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit
from torch import nn

from methods.base import AttachContext, register
from methods.errors import BenchError
from methods.peft_common import PeftMethod, task_type

_INITS = {"random": PromptTuningInit.RANDOM, "sample_vocab": PromptTuningInit.SAMPLE_VOCAB,
          "text": PromptTuningInit.TEXT}


class VirtualTokens(PeftMethod):
    """Prompt and prefix tuning: `rank` virtual tokens in front of every sequence; W unchanged; not identity."""

    def virtual_tokens(self, rank: int | None) -> int:
        return int(rank or 0)

    def derive(self, settings: dict, rank: int | None) -> dict:
        return {**settings, "num_virtual_tokens": rank}

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        return self.adapt(super().attach(model, eff, ctx), ctx)

    def load(self, base_model: nn.Module, eff: dict, ctx: AttachContext, out_dir: Path) -> nn.Module:
        return self.adapt(super().load(base_model, eff, ctx, out_dir), ctx)

    def adapt(self, model: PeftModel, ctx: AttachContext) -> PeftModel:
        """What the model needs once peft has attached or loaded the method (each subclass's own fix)."""
        return model


@register
class PromptTuning(VirtualTokens):
    name = "prompt_tuning"

    def derive(self, settings: dict, rank: int | None) -> dict:
        out = super().derive(settings, rank)
        if out["init"] not in _INITS:
            raise BenchError(f"prompt_tuning: init={out['init']}; choose one of {', '.join(_INITS)}")
        if out["init"] != "text":
            out.pop("init_text", None)  # unused: keep it out of the run's identity
        return out

    def adapt(self, model: PeftModel, ctx: AttachContext) -> PeftModel:
        return read_real_first_token(model, ctx)

    def peft_config(self, eff: dict, ctx: AttachContext) -> PromptTuningConfig:
        kwargs: dict[str, Any] = {}
        if eff["init"] == "text":
            # peft tokenises the text and repeats/truncates it to num_virtual_tokens tokens.
            if not ctx.tokenizer_path:
                raise BenchError("prompt_tuning: init=text needs the tokenizer's path in the attach context")
            kwargs = {"prompt_tuning_init_text": str(eff["init_text"]), "tokenizer_name_or_path": ctx.tokenizer_path}
        return PromptTuningConfig(task_type=task_type(ctx), num_virtual_tokens=int(eff["num_virtual_tokens"]),
                                  prompt_tuning_init=_INITS[eff["init"]], **kwargs)


@register
class PrefixTuning(VirtualTokens):
    name = "prefix_tuning"

    def derive(self, settings: dict, rank: int | None) -> dict:
        out = super().derive(settings, rank)
        if not out["prefix_projection"]:
            out.pop("encoder_hidden_size", None)  # only used by the reparametrisation MLP
        return out

    def peft_config(self, eff: dict, ctx: AttachContext) -> PrefixTuningConfig:
        kwargs: dict[str, Any] = {}
        if eff["prefix_projection"]:
            kwargs["encoder_hidden_size"] = int(eff["encoder_hidden_size"])
        return PrefixTuningConfig(task_type=task_type(ctx), num_virtual_tokens=int(eff["num_virtual_tokens"]),
                                  prefix_projection=bool(eff["prefix_projection"]), **kwargs)

    def adapt(self, model: PeftModel, ctx: AttachContext) -> PeftModel:
        return _accept_past_key_values(model)


@register
class Cartridge(VirtualTokens):
    name = "cartridge"

    def derive(self, settings: dict, rank: int | None) -> dict:
        out = super().derive(settings, rank)
        if int(out["num_virtual_tokens"]) <= int(out["num_frozen_tokens"]):
            raise BenchError(f"cartridge: rank {rank} leaves no trained virtual token after the "
                             f"{out['num_frozen_tokens']} frozen one(s); choose rank > method.num_frozen_tokens")
        return out

    def peft_config(self, eff: dict, ctx: AttachContext) -> CartridgeConfig:
        return CartridgeConfig(task_type=task_type(ctx), num_virtual_tokens=int(eff["num_virtual_tokens"]),
                               num_frozen_tokens=int(eff["num_frozen_tokens"]))

    def adapt(self, model: PeftModel, ctx: AttachContext) -> PeftModel:
        return _accept_past_key_values(model)


class SkipVirtualTokens:
    """Forward pre-hook: the module's first input (hidden states, batch x positions x hidden) without its first
    `n` positions, the virtual tokens, so that position 0 is the real first token again."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        hidden, *rest = args
        return (hidden[:, self.n:], *rest)


def read_real_first_token(model: PeftModel, ctx: AttachContext) -> PeftModel:
    """Make the head module that reads the first position (`model_cfg.first_token_reader`) read the real first
    token (module docstring). The outermost match is hooked: peft's wrapper where the module trains as head."""
    if ctx.causal_lm:  # a causal LM reads the answer's positions, after the real sequence
        return model
    model_cfg = ctx.model_cfg
    reader = str(model_cfg.get("first_token_reader") or "")
    modules = [m for name, m in model.named_modules() if reader and f".{name}".endswith(f".{reader}")]
    if not modules:
        kind = model.peft_config[model.active_adapter].peft_type.value.lower()
        raise BenchError(f"{kind}: model '{model_cfg.get('name')}' has no module '{reader}' "
                         "(model.first_token_reader: the head module that reads the first position)")
    n = int(model.peft_config[model.active_adapter].num_virtual_tokens)
    modules[0].register_forward_pre_hook(SkipVirtualTokens(n))
    return model


def _forward_with_past_key_values(self: nn.Module, *args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
    # A wrapping model that also took the rename (a Llama's causal-LM head, transformers >= 5.25) passes its own
    # `cache=None` beside peft's prefix, which arrives through its **kwargs as `past_key_values`: the prefix wins.
    if past_key_values is not None:
        kwargs["cache"] = past_key_values
    return type(self).forward(self, *args, **kwargs)


def _accept_past_key_values(model: PeftModel) -> PeftModel:
    """Let peft pass the prefix as `past_key_values` to a backbone whose forward calls it `cache` (module docstring).
    Bound with MethodType, so a deep copy of the model binds the copy's own backbone."""
    backbone = model.base_model.get_submodule(model.transformer_backbone_name)
    params = inspect.signature(backbone.forward).parameters
    if "past_key_values" not in params and "cache" in params:
        backbone.forward = types.MethodType(_forward_with_past_key_values, backbone)
    return model
