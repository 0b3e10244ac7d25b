"""DyLoRA (Valipour et al. 2023, arXiv:2210.07558): one LoRA trained so that every truncation of it to its first
b components is a working adapter, so one training run gives models of every rank 1..r_max.

How it trains (the paper's Section 3):
- every optimiser step draws one rank b ~ uniform{1..r_max} (the paper's p_B), shared by all adapted layers (and by
  the micro-batches of one step);
- the forward pass uses the first b rows of A and the first b columns of B, scaled by α/b (the paper's
  h = W0 x + (α/b) B[:, :b] A[:b] x), so each truncated adapter is scaled as a LoRA of rank b would be;
- `frozen: true` (the default; the paper's update rule, Eqs. 6-7, which updates only W_dw^b and W_up^b) lets
  the loss's gradient reach only the b-th row of A and the b-th column of B: the lower components were trained
  at the lower ranks drawn before. `frozen: false` trains all of the first b components. Either way AdamW's
  momentum and the loop's weight decay still move a component that gets no gradient in a step (one tensor per
  matrix, as in peft's LoRA layers).
How it evaluates: at the full rank r_max (the main metric) unless a `rank_variants` context truncates it to b;
the runner evaluates each of `eval_ranks` (those <= r_max, plus r_max) and records them as `rank_metrics`.

Built on peft's LoRA layers (scale α/r_max, B = 0 at init): a forward hook on each `lora_A` multiplies its output
by (r_max/b) on the first b components and 0 on the rest, which turns peft's α/r_max into α/b; in frozen training a
hook on `lora_B` recomputes its (small) product with the columns other than b detached. At full rank the hook
multiplies by ones, so the model is peft's LoRA: `merge_and_unload` merges the full-rank adapter, and the saved
adapter is a plain peft LoRA adapter (loaded back with the hooks re-attached).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from methods.base import AttachContext, register
from methods.errors import BenchError
from methods.lora import Lora

_STATE_ATTR = "dylora_state"  # where the model keeps its RankState


@dataclass
class RankState:
    """The rank in use, shared by all of a model's hooks. Deep-copied with the model (the hooks hold it)."""

    max_rank: int
    frozen: bool
    eval_ranks: list[int]  # the ranks the runner evaluates (rank_variants)
    generator: torch.Generator
    eval_rank: int = 0  # the rank in eval mode: max_rank, unless a rank_variants context truncates
    train_rank: int | None = None  # this optimiser step's b; None: drawn at the step's first forward pass
    sampled: list[int] = field(default_factory=list)  # count of each b drawn (index b - 1)

    def __post_init__(self):
        self.eval_rank = self.eval_rank or self.max_rank
        self.sampled = self.sampled or [0] * self.max_rank

    def rank(self, training: bool) -> int:
        if not training:
            return self.eval_rank
        if self.train_rank is None:  # b ~ uniform{1..max_rank}
            self.train_rank = int(torch.randint(1, self.max_rank + 1, (), generator=self.generator))
            self.sampled[self.train_rank - 1] += 1
        return self.train_rank

    def __deepcopy__(self, memo):
        generator = torch.Generator().set_state(self.generator.get_state())
        return RankState(self.max_rank, self.frozen, list(self.eval_ranks), generator, self.eval_rank,
                         self.train_rank, list(self.sampled))


class _TruncateA:
    """Forward hook on lora_A: its output (..., r_max) times (r_max/b) on components < b and 0 from b on. In frozen
    training, components < b - 1 are detached, so A's gradient reaches row b - 1 only."""

    def __init__(self, state: RankState):
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        b, r = self.state.rank(module.training), self.state.max_rank
        if b == r and not (module.training and self.state.frozen):
            return out
        idx = torch.arange(r, device=out.device)
        if module.training and self.state.frozen:
            out = torch.where(idx == b - 1, out, out.detach())
        return out * ((idx < b).to(out.dtype) * (r / b))


class _FreezeB:
    """Forward hook on lora_B, frozen training only: the product recomputed with B's columns other than b - 1
    detached (same values), so B's gradient reaches column b - 1 only."""

    def __init__(self, state: RankState):
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not (module.training and self.state.frozen):
            return out
        b, weight = self.state.rank(True), module.weight
        column = (torch.arange(weight.shape[1], device=weight.device) == b - 1).to(weight.dtype)
        return F.linear(args[0], weight.detach() + (weight - weight.detach()) * column, module.bias)


def _install(model: nn.Module, effective: dict) -> nn.Module:
    """Hook every LoRA linear layer of `model` to one RankState (kept on the model). Its sampler is seeded from
    torch's seed (the run's), apart from the global stream, so dropout draws the same masks as in plain LoRA."""
    state = RankState(int(effective["r"]), bool(effective["frozen"]), list(effective["eval_ranks"]),
                      torch.Generator().manual_seed(torch.initial_seed()))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise BenchError("dylora: no LoRA layer was attached; check method.target_modules")
    for layer in layers:
        if not isinstance(layer, LoraLinear):
            raise BenchError(f"dylora truncates LoRA linear layers only; a target is a {type(layer).__name__} "
                             "layer: check method.target_modules")
        for adapter in layer.lora_A:
            layer.lora_A[adapter].register_forward_hook(_TruncateA(state))
            layer.lora_B[adapter].register_forward_hook(_FreezeB(state))
    setattr(model, _STATE_ATTR, state)
    return model


def rank_state(model: nn.Module) -> RankState:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise BenchError("dylora: the model was not attached by method 'dylora' (no rank state)")
    return state


@contextlib.contextmanager
def truncated(model: nn.Module, rank: int) -> Iterator[nn.Module]:
    """In this context the model (in eval mode) computes as its first `rank` components, scaled α/rank."""
    state = rank_state(model)
    if not 1 <= rank <= state.max_rank:
        raise BenchError(f"dylora: cannot evaluate at rank {rank}; the adapter has ranks 1..{state.max_rank}")
    before, state.eval_rank = state.eval_rank, rank
    try:
        yield model
    finally:
        state.eval_rank = before


@register
class DyLora(Lora):
    name = "dylora"

    def derive(self, settings: dict, rank: int | None) -> dict:
        out = super().derive(settings, rank)  # lora_alpha = alpha_over_rank * r_max: LoRA's scale at r_max
        ranks = sorted({int(b) for b in settings.get("eval_ranks") or [] if 1 <= int(b) <= rank} | {rank})
        out["eval_ranks"] = ranks
        out["frozen"] = bool(settings["frozen"])
        return out

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        return _install(super().attach(model, eff, ctx), eff)

    def load(self, base_model: nn.Module, eff: dict, ctx: AttachContext, out_dir: Path) -> nn.Module:
        """The saved full-rank peft LoRA adapter, with the truncation hooks re-attached (rank_variants work)."""
        model = PeftModel.from_pretrained(base_model, str(out_dir))
        saved_rank = int(model.peft_config[model.active_adapter].r)
        if saved_rank != int(eff["r"]):
            raise BenchError(f"dylora: the adapter in {out_dir} has rank {saved_rank}, and the run's effective config "
                             f"says r={eff['r']}; load it with the record of the run that saved it")
        return _install(model, eff)

    def on_step(self, model: nn.Module, global_step: int) -> None:
        rank_state(model).train_rank = None  # the next step draws its own b

    def rank_variants(self, model: nn.Module) -> list[tuple[int, contextlib.AbstractContextManager]]:
        return [(b, truncated(model, b)) for b in rank_state(model).eval_ranks]

    def info(self, model: nn.Module) -> dict:
        state = rank_state(model)
        return {"max_rank": state.max_rank, "frozen": state.frozen, "eval_ranks": state.eval_ranks,
                "sampled_ranks": {str(b + 1): n for b, n in enumerate(state.sampled)}}
