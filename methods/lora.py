"""LoRA (Hu et al., 2021, arXiv:2106.09685) via peft: W + (alpha/r)·B·A on the target linear layers,
B = 0 at init so the model starts as the base model. `rslora` and `dora` are the same family and are
registered in their own modules on top of this one."""
from __future__ import annotations

from typing import Any

from peft import LoraConfig, TaskType

from methods.base import AttachContext, register
from methods.peft_common import PeftMethod


@register
class Lora(PeftMethod):
    name = "lora"
    label = "LoRA"
    display_order = 2
    merges = True
    use_rslora = False
    use_dora = False

    def effective_config(self, cfg: dict, rank: int | None) -> dict:
        out = dict(cfg)
        out["r"] = rank
        # alpha: a fixed alpha (rsLoRA) when set, else alpha_over_rank * r (LoRA: a constant alpha/r).
        fixed = cfg.get("alpha")
        out["lora_alpha"] = float(fixed) if fixed is not None else float(cfg["alpha_over_rank"]) * rank
        return out

    def config_label(self, effective: dict) -> str:
        """The label with the scaling rule: "LoRA (α=2r)" (alpha_over_rank), "LoRA (α=16)" (fixed alpha)."""
        fixed, per_rank = effective.get("alpha"), effective.get("alpha_over_rank")
        if fixed is not None:
            return f"{self.display_label} (α={float(fixed):g})"
        if per_rank is not None:
            return f"{self.display_label} (α={float(per_rank):g}r)"
        return self.display_label

    def peft_config(self, cfg: Any, ctx: AttachContext) -> LoraConfig:
        eff = self.effective_config(dict(cfg), ctx.rank)
        return LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=eff["r"],
            lora_alpha=eff["lora_alpha"],
            lora_dropout=float(cfg.dropout),
            target_modules=list(cfg.target_modules),
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            init_lora_weights=True,  # A Kaiming-uniform, B = 0
        )


@register
class LoraFixedAlpha(Lora):
    """LoRA with alpha fixed across ranks (scale alpha/r): the rank study's third scaling rule
    (conf/method/lora_fixed_alpha.yaml; label "LoRA (α=16)")."""

    name = "lora_fixed_alpha"
