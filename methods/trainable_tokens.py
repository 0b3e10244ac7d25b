"""Trainable tokens via peft (`TrainableTokensConfig`): the input-embedding rows of a few chosen tokens train (as a
delta on the frozen embedding matrix, zero at init), every other row and weight stays frozen. peft's use is new or
re-purposed vocabulary; as a PEFT baseline it trains the embeddings of the special tokens that frame every input.

Which tokens is a setting by role, `tokens` (in the run's identity): `first` is the tokenizer's [CLS] / <s> (its
cls_token, else its bos_token), `last` its [SEP] / </s> (sep_token, else eos_token). The ids are resolved from the
model's tokenizer at attach (the model is in the run's identity, and so is its tokenizer); peft saves them in the
adapter's config, so loading needs no tokenizer. On a model whose LM head is tied to the input embeddings (SmolLM2,
Llama 3.2), peft keeps the tie: the trained rows are also those tokens' output embeddings."""
from __future__ import annotations

from peft import TrainableTokensConfig
from torch import nn
from transformers import AutoTokenizer

from methods.base import AttachContext, register
from methods.errors import BenchError
from methods.peft_common import PeftMethod, merged_head_unwrapped, task_type

ROLES = {"first": ("cls_token_id", "bos_token_id"), "last": ("sep_token_id", "eos_token_id")}


def token_ids(tokenizer, roles: list[str]) -> list[int]:
    """The ids of the tokens named by role (ROLES), in order, without repeats."""
    ids: list[int] = []
    for role in roles:
        if role not in ROLES:
            raise BenchError(f"trainable_tokens: tokens has {role!r}; choose among {', '.join(ROLES)}")
        found = next((getattr(tokenizer, attr) for attr in ROLES[role] if getattr(tokenizer, attr) is not None), None)
        if found is None:
            raise BenchError(f"trainable_tokens: the tokenizer has no {' or '.join(ROLES[role])} for the {role!r} "
                             "token; choose other tokens (method.tokens)")
        if found not in ids:
            ids.append(int(found))
    return ids


@register
class TrainableTokens(PeftMethod):
    name = "trainable_tokens"

    def peft_config(self, eff: dict, ctx: AttachContext) -> TrainableTokensConfig:
        if not ctx.tokenizer_path:
            raise BenchError("trainable_tokens: needs the model's tokenizer (the attach context has no tokenizer path)")
        ids = token_ids(AutoTokenizer.from_pretrained(ctx.tokenizer_path), list(eff["tokens"]))
        return TrainableTokensConfig(task_type=task_type(ctx), token_indices=ids)

    def merged(self, model: nn.Module) -> nn.Module:
        return merged_head_unwrapped(model)

    def info(self, model: nn.Module) -> dict:
        return {"token_indices": list(model.peft_config[model.active_adapter].token_indices)}
