"""LoRA (Hu et al., 2021, arXiv:2106.09685) via peft: W + (alpha/r)·B·A on the target linear layers,
B = 0 at init so the model starts as the base model. `rslora` and `dora` are the same family and are
registered in their own modules on top of this one."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from methods.base import AttachContext, register
from methods.errors import BenchError
from methods.facts import MethodFacts
from methods.peft_common import PeftMethod, task_type


@register
class Lora(PeftMethod):
    name = "lora"
    use_rslora: ClassVar[bool] = False
    use_dora: ClassVar[bool] = False

    def derive(self, settings: dict, rank: int | None) -> dict:
        out = dict(settings)
        out["r"] = rank
        # alpha: a fixed alpha (rsLoRA) when set, else alpha_over_rank * r (LoRA: a constant alpha/r).
        fixed = settings.get("alpha")
        out["lora_alpha"] = float(fixed) if fixed is not None else float(settings["alpha_over_rank"]) * rank
        return out

    def config_label(self, effective: dict) -> str:
        """The label with the scaling rule: "LoRA (α=2r)" (alpha_over_rank), "LoRA (α=16)" (fixed alpha)."""
        fixed, per_rank = effective.get("alpha"), effective.get("alpha_over_rank")
        if fixed is not None:
            return f"{self.display_label} (α={float(fixed):g})"
        if per_rank is not None:
            return f"{self.display_label} (α={float(per_rank):g}r)"
        return self.display_label

    def peft_config(self, eff: dict, ctx: AttachContext) -> LoraConfig:
        return LoraConfig(
            task_type=task_type(ctx),
            r=eff["r"],
            lora_alpha=eff["lora_alpha"],
            lora_dropout=float(eff["dropout"]),
            target_modules=list(eff["target_modules"]),
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            **{"init_lora_weights": True, **self.init_kwargs(eff)},  # True: A Kaiming-uniform, B = 0
        )

    def init_kwargs(self, eff: dict) -> dict:
        """LoraConfig arguments of the initialisation (LoraInit); plain LoRA: none (B = 0)."""
        return {}


@register
class LoraFixedAlpha(Lora):
    """LoRA with alpha fixed across ranks (scale alpha/r): the rank study's third scaling rule
    (conf/method/lora_fixed_alpha.yaml sets `alpha`; its label reads "LoRA (α=16)")."""

    name = "lora_fixed_alpha"


# The LoRA initialisations peft ships (conf/method/<name>.yaml with `lora_init:`, built as LoraInit instances by
# methods/peft_generic.py like any yaml-only method). `needs_data`: a pass over the run's first training batches
# (ctx.calibration) before training; `mutates_base`: the init moves the principal part out of W (W_res = W - s·B·A),
# so `save` converts the adapter to a plain LoRA of rank 2r on the unmodified W (peft's
# path_initial_model_for_weight_conversion) and loading it needs no data and no init.
LORA_INITS: dict[str, dict[str, Any]] = {
    "pissa": {"init": "pissa", "needs_data": False, "mutates_base": True},
    "olora": {"init": "olora", "needs_data": False, "mutates_base": True},
    "eva": {"init": "eva", "needs_data": True, "mutates_base": False},
    "corda": {"init": "corda", "needs_data": True, "mutates_base": True},
    "lora_ga": {"init": "lora_ga", "needs_data": True, "mutates_base": True},
    "loftq": {"init": "loftq", "needs_data": False, "mutates_base": False},  # re-quantises W on load (deterministic)
}
_INITIAL = "_bench_initial_adapter"  # attribute of the attached model: the LoRA tensors as initialised


class LoraInit(Lora):
    """LoRA with one of peft's initialisations (`lora_init` in the yaml: pissa, olora, eva, corda, lora_ga, loftq);
    everything else is lora's. One instance per yaml, built by methods/peft_generic.py with the yaml's facts."""

    def __init__(self, name: str, facts: MethodFacts, lora_init: str):
        if lora_init not in LORA_INITS:
            raise BenchError(f"conf/method/{name}.yaml: lora_init: {lora_init}; choose one of {', '.join(LORA_INITS)}")
        super().__init__(name, facts)
        self.lora_init = lora_init

    @property
    def _init(self) -> dict[str, Any]:
        return LORA_INITS[self.lora_init]

    def validate(self, device: torch.device) -> None:
        if self.lora_init == "loftq" and (device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None):
            raise BenchError(f"method={self.name} needs a CUDA GPU and bitsandbytes (peft 0.21 quantises LoftQ's NF4 "
                             "with bitsandbytes on CUDA only); use method=lora here, or run on a GPU machine")

    def init_kwargs(self, eff: dict) -> dict:
        from peft.tuners.lora.config import CordaConfig, EvaConfig, LoftQConfig, LoraGAConfig

        opts = dict(eff.get("init_options") or {})
        out: dict[str, Any] = {"init_lora_weights": self._init["init"]}
        if self.lora_init == "pissa" and opts.get("niter"):
            out["init_lora_weights"] = f"pissa_niter_{int(opts['niter'])}"
        elif self.lora_init == "eva":
            out["eva_config"] = EvaConfig(rho=float(opts.get("rho", 2.0)), tau=float(opts.get("tau", 0.99)),
                                          use_label_mask=False)
        elif self.lora_init == "corda":
            out["corda_config"] = CordaConfig(corda_method=str(opts.get("corda_method", "ipm")), verbose=False)
        elif self.lora_init == "lora_ga":
            out["lora_ga_config"] = LoraGAConfig(direction=str(opts.get("direction", "ArB2r")),
                                                 scale=str(opts.get("scale", "stable")))
        elif self.lora_init == "loftq":
            out["loftq_config"] = LoftQConfig(loftq_bits=int(opts.get("bits", 4)), loftq_iter=int(opts.get("iter", 1)))
        return out

    def attach(self, model: nn.Module, eff: dict, ctx: AttachContext) -> nn.Module:
        if not self._init["needs_data"]:
            return self._keep_initial(super().attach(model, eff, ctx))
        if ctx.calibration is None:
            raise BenchError(f"method={self.name} initialises from the training data, and this caller gave none "
                             "(AttachContext.calibration)")
        n = int(eff.get("calibration_batches", 8))
        device = next(model.parameters()).device

        def batches(labels: bool):
            for i, b in enumerate(ctx.calibration()):
                if i >= n:
                    return
                yield {k: v.to(device) for k, v in b.items() if labels or k != "labels"}

        if self.lora_init == "eva":
            from peft import initialize_lora_eva_weights

            peft_model = super().attach(model, eff, ctx)
            was_training = peft_model.training
            peft_model.eval()
            initialize_lora_eva_weights(peft_model, list(batches(labels=False)), show_progress_bar=False)
            return peft_model.train(was_training)
        # CorDA and LoRA-GA: a pass over the data on the base model, then attach (peft's order).
        peft_cfg = self.peft_config(eff, ctx)
        if self.lora_init == "corda":
            from peft.tuners.lora.corda import preprocess_corda

            def run_model() -> None:  # peft's hook takes one sequence at a time (positions x features)
                with torch.no_grad():
                    for b in batches(labels=False):
                        for i, length in enumerate(b["attention_mask"].sum(dim=1).tolist()):
                            model(**{k: v[i:i + 1, :length] for k, v in b.items()})

            was_training = model.training
            model.eval()
            preprocess_corda(model, peft_cfg, run_model=run_model)
            model.train(was_training)
        else:
            from peft.tuners.lora.loraga import preprocess_loraga

            def train_step() -> None:
                for b in batches(labels=True):
                    model(**b).loss.backward()

            preprocess_loraga(model, peft_cfg, train_step=train_step)
        return self._keep_initial(self.attach_config(model, peft_cfg, ctx))

    def _keep_initial(self, model: nn.Module) -> nn.Module:
        """Keep a copy of the adapter as initialised where the init changed W, so that `save` can write a plain LoRA
        on the unmodified W."""
        if self._init["mutates_base"]:
            from peft import get_peft_model_state_dict

            initial = {k: v.detach().clone().cpu() for k, v in get_peft_model_state_dict(model).items()
                       if ".lora_A." in k or ".lora_B." in k}
            setattr(model, _INITIAL, initial)
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        """peft's files; where the init changed W, converted to a LoRA of rank 2r on the unmodified W:
        W_res + B·A = W + [B | -B0]·[A ; A0] (with W = W_res + B0·A0), alpha doubled to keep alpha/r. peft's own
        conversion (`path_initial_model_for_weight_conversion`) drops the trained task head (modules_to_save), so
        it is done here on the saved tensors."""
        super().save(model, out_dir)
        initial = getattr(model, _INITIAL, None)
        if not initial:
            return
        weights, config_path = out_dir / "adapter_model.safetensors", out_dir / "adapter_config.json"
        state = load_file(str(weights))
        for key in list(state):
            if key in initial and ".lora_A." in key:
                state[key] = torch.cat([state[key], initial[key].to(state[key].dtype)], dim=0)
            elif key in initial and ".lora_B." in key:
                state[key] = torch.cat([state[key], -initial[key].to(state[key].dtype)], dim=1)
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights), metadata={"format": "pt"})
        config = json.loads(config_path.read_text())
        config.update(r=2 * int(config["r"]), lora_alpha=2 * float(config["lora_alpha"]), init_lora_weights=True,
                      corda_config=None, lora_ga_config=None, eva_config=None)
        config_path.write_text(json.dumps(config, indent=2))
