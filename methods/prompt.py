"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691) and prefix tuning (Li & Liang 2021,
arXiv:2101.00190; P-Tuning v2 for NLU) via peft. `rank` = number of virtual tokens.

- prompt_tuning: `rank` trained embeddings are prepended to the input embeddings. peft prepends zeros
  to token_type_ids and ones to the attention mask, so BERT pair inputs work.
- prefix_tuning: `rank` trained key/value vectors are prepended in every layer (past_key_values).
Neither is identity at init and neither merges. Both lengthen the sequence: with a model of 512
positions, the longest tokenised example + rank must stay <= 512 (BERT also shifts positions past a prefix):
the runner checks this on the data before training (`virtual_tokens`).
"""
from __future__ import annotations

from typing import Any

from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType

from methods.base import AttachContext, register
from methods.errors import BenchError
from methods.peft_common import PeftMethod

_INITS = {"random": PromptTuningInit.RANDOM, "sample_vocab": PromptTuningInit.SAMPLE_VOCAB,
          "text": PromptTuningInit.TEXT}


class VirtualTokens(PeftMethod):
    """Prompt and prefix tuning: `rank` virtual tokens in front of every sequence; W unchanged; not identity."""

    rank_meaning = "virtual tokens"
    rank_format = "{} tokens"
    changes_base_weights = False
    identity_at_init = False

    def virtual_tokens(self, rank: int | None) -> int:
        return int(rank or 0)

    def effective_config(self, cfg: dict, rank: int | None) -> dict:
        return {**cfg, "num_virtual_tokens": rank}


@register
class PromptTuning(VirtualTokens):
    name = "prompt_tuning"
    label = "Prompt tuning"
    display_order = 10
    unchanged_reason = "prompt tuning learns input tokens; the pre-trained W are unchanged"

    def effective_config(self, cfg: dict, rank: int | None) -> dict:
        out = super().effective_config(cfg, rank)
        if out["init"] not in _INITS:
            raise BenchError(f"prompt_tuning: init={out['init']}; choose one of {', '.join(_INITS)}")
        if out["init"] != "text":
            out.pop("init_text", None)  # unused: keep it out of the run's identity
        return out

    def peft_config(self, cfg: Any, ctx: AttachContext) -> PromptTuningConfig:
        eff = self.effective_config(dict(cfg), ctx.rank)
        kwargs: dict[str, Any] = {}
        if eff["init"] == "text":
            # peft tokenises the text and repeats/truncates it to num_virtual_tokens tokens.
            if not ctx.tokenizer_path:
                raise BenchError("prompt_tuning: init=text needs the tokenizer's path in the attach context")
            kwargs = {"prompt_tuning_init_text": str(cfg.init_text), "tokenizer_name_or_path": ctx.tokenizer_path}
        return PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=int(eff["num_virtual_tokens"]),
                                  prompt_tuning_init=_INITS[eff["init"]], **kwargs)


@register
class PrefixTuning(VirtualTokens):
    name = "prefix_tuning"
    label = "Prefix tuning"
    display_order = 11
    unchanged_reason = "prefix tuning learns key/value prefixes; the pre-trained W are unchanged"

    def effective_config(self, cfg: dict, rank: int | None) -> dict:
        out = super().effective_config(cfg, rank)
        if not out["prefix_projection"]:
            out.pop("encoder_hidden_size", None)  # only used by the reparametrisation MLP
        return out

    def peft_config(self, cfg: Any, ctx: AttachContext) -> PrefixTuningConfig:
        eff = self.effective_config(dict(cfg), ctx.rank)
        kwargs: dict[str, Any] = {}
        if eff["prefix_projection"]:
            kwargs["encoder_hidden_size"] = int(cfg.encoder_hidden_size)
        return PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=int(eff["num_virtual_tokens"]),
                                  prefix_projection=bool(eff["prefix_projection"]), **kwargs)
