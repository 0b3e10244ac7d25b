"""Intruder-dimension mitigation over a λ grid (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv:2410.21228): scale a LoRA run's intruder dimensions down by λ and measure what that does to the
task, to forgetting and to the intruder count.

    python -m analysis.mitigate <run dir> [--lambdas 0,0.25,0.5,0.75,1] [--definition paper|peft]
        [--k 10] [--epsilon 0.5] [--probe sts] [--max-pairs N] [--out FILE] [--json]

For a finished LoRA run with saved weights (bench/model/rebuild.py rebuilds the base and the unmerged peft model), the
intruders of each layer are found with the suite's test (analysis/intruders.py, top-`k` left singular vectors of
W_merged = W0 + ΔW whose largest |cosine| with W0's is below `epsilon`), and for each λ of the grid the layer becomes

    W_λ = W_merged + (λ − 1) · Σ_{i ∈ intruders} σ_i u_i v_iᵀ        (λ = 1: the run as trained; λ = 0: removed)

Then three figures are measured on the mitigated model (merged into its weights, evaluated on the CPU in fp32):
- the task's dev main metric, with the runner's own evaluation (bench/reevaluate.py: the run's rows, tokenisation and
  metric code, so λ = 1 scores what the run scored) on the dev rows the run evaluated (its budget's `eval_samples`);
- a forgetting probe (bench/measure/probes.py): the base model's score once, the mitigated model's for each λ,
  `forgetting` = ability lost (before − after; after − before for losses), as in a run's record. The probe is the
  run's own (`forgetting=` in its config, with its settings) unless `--probe` names another; default `sts`;
  `--max-pairs` caps `sts` for speed;
- the intruder count of the mitigated weights (analysis/intruders.py on every analysed linear layer, W_λ vs W0, the
  same `k` and `epsilon`), in total and at the layers where intruders were found, and σ ratio: for each intruder
  direction found on W_merged, u_iᵀ W_λ v_i / σ_i (the paper's definition makes it exactly λ).

Two definitions (`--definition`):
- `paper` (default): the formula above, applied to W_merged in float64 and kept as it is (an update of rank up to
  r + the number of intruders): what the paper defines. The intruder directions are scaled by exactly λ (σ ratio = λ)
  and nothing else in W changes; at λ = 0 their singular values are 0, so they leave the top k.
- `peft`: peft's `peft.tuners.lora.intruders.reduce_intruder_dimension` (0.21): the same W_λ (its test in float32,
  on the LoRA layers), then ΔW_λ = W_λ − W0 divided by the LoRA scale and truncated back to the adapter's rank r by
  SVD, as a new adapter of the same config. ΔW_λ has rank up to r + the number of intruders (the part removed,
  σ u vᵀ of W_merged, holds W0's own action along v, not only ΔW's), so the truncation changes W_λ: the intruder
  directions are not scaled by λ (the σ ratio came out above λ wherever measured) and fewer of them go at λ = 0.
Why `paper` is the default: peft's truncation does not do what λ says (the σ ratio of a `--definition peft` run
shows it: above λ). Under either definition the count at λ = 0 need not be 0: the top k refills, and the vectors
that slide into it from below (ΔW's further components) can be intruders too. On the tests' constructed run (one rank-1
intruder) both definitions leave 0. The intruder column therefore counts what remains in the top k, and the σ ratio
says how much of the directions found is left.
The helper needs two fixes, done here: it gives the new adapter a fresh copy of the *untrained* task head (peft's
modules_to_save wrapper copies the original module), so the trained head is copied into it (without this, λ = 1
changes the model's outputs: by 0.03 in the logits of the tests' tiny model); and it is run once per λ on the run's
own adapter, and the new adapter is deleted again after measuring.

Which runs: the methods whose saved adapter is a plain LoRA (ΔW = s·B·A on nn.Linear layers with fp32/bf16 weights):
`lora`, `lora_fixed_alpha`, `rslora`, `loraplus`, `lora_fa` and the LoRA initialisations (`pissa`, `olora`, `eva`,
`corda`, `lora_ga`: saved as a plain LoRA). Any other method stops in one line: DoRA because peft's helper ignores its
trained magnitude vector (`get_delta_weight` is s·B·A alone, and the new adapter's magnitude is re-initialised from
‖W0 + ΔW_new‖, so even λ = 1 is not the run's model), QLoRA because the helper reads the packed 4-bit weight, the
LoRA variants (KaSA, BD-LoRA, ...) because their update is not s·B·A, DyLoRA because its rank hooks do not follow a new
adapter, and every non-LoRA method because the helper accepts LoRA only. A run without saved weights, an empty λ grid
or a λ outside [0, 1] stop in one line too.

Output: a table on stdout; the JSON written to `--out` (default `<run dir>/mitigation.json`; `--json` prints it on
stdout too, the table then goes to stderr) and the λ plot beside it (`<out stem>.png` and `.svg`:
`<run dir>/mitigation.png`). `python -m analysis.report` picks up every `mitigation.json` under its results folder
and shows its table and plot (section "Intruder mitigation").
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench import BenchError

DEFAULT_LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFINITIONS = ("paper", "peft")
RESULT_FILE = "mitigation.json"


# ------------------------------------------------------------------------------------------------ inputs


def parse_lambdas(text: str | list[float] | tuple[float, ...]) -> list[float]:
    """The λ grid from "0,0.5,1" (or a list), sorted, duplicates dropped; BenchError when empty or outside [0, 1]."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise BenchError(f"--lambdas {text!r}: not a comma-separated list of numbers") from None
    else:
        values = [float(v) for v in text]
    if not values:
        raise BenchError("the λ grid is empty; give values in [0, 1], e.g. --lambdas 0,0.25,0.5,0.75,1")
    bad = [v for v in values if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise BenchError(f"λ = {bad[0]:g} is outside [0, 1] (1 keeps the adapter, 0 removes the intruder directions)")
    return sorted(set(values))


def refusal(method_name: str) -> str | None:
    """Why mitigation does not apply to a method, in one line (from its name alone, nothing loaded); None when its
    saved adapter is a plain LoRA that peft's helper handles."""
    from methods import get_method
    from methods.dora import Dora
    from methods.dylora import DyLora
    from methods.lora import Lora, LoraFixedAlpha, LoraInit
    from methods.lora_fa import LoraFA
    from methods.lora_variants import LoraVariant
    from methods.loraplus import LoraPlus
    from methods.qlora import QLora
    from methods.rslora import RsLora

    method = get_method(method_name)
    if type(method) in (Lora, LoraFixedAlpha, RsLora, LoraPlus, LoraFA, LoraInit):
        return None
    why = "peft's reduce_intruder_dimension handles plain LoRA adapters (ΔW = s·B·A) only"
    if isinstance(method, Dora):
        why = ("its helper ignores DoRA's trained magnitude vector (ΔW taken as s·B·A; the new adapter's magnitude is "
               "re-initialised), so even λ = 1 would not be the run's model")
    elif isinstance(method, QLora):
        why = "its helper reads the packed 4-bit base weight as if it were W0"
    elif isinstance(method, LoraVariant):
        why = "a LoRA variant's update is not s·B·A alone"
    elif isinstance(method, DyLora):
        why = "DyLoRA's rank hooks do not follow the helper's new adapter"
    return (f"intruder mitigation needs a plain LoRA run (lora, rslora, lora_fixed_alpha, loraplus, lora_fa, LoRA "
            f"inits); method '{method_name}' is not one: {why}")


def check_plain_lora(model: nn.Module, run_id: str) -> str:
    """The rebuilt model's active adapter name; BenchError unless it is a plain LoRA peft model (no DoRA magnitude,
    no LoRA variant, float nn.Linear base layers)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel) or model.peft_type != "LORA":
        raise BenchError(f"{run_id}: the rebuilt model is not a peft LoRA model; intruder mitigation needs one")
    name = model.active_adapter
    if getattr(model.peft_config[name], "use_dora", False):
        raise BenchError(f"{run_id}: the adapter uses DoRA; peft's helper ignores its magnitude vector")
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or name not in layer.lora_A:
            continue
        base = layer.get_base_layer()
        if (name in layer.lora_magnitude_vector or layer.lora_variant.get(name) is not None
                or not isinstance(base, nn.Linear) or not base.weight.dtype.is_floating_point
                or base.weight.__class__.__name__ == "Params4bit"):
            raise BenchError(f"{run_id}: {layer_name} is not a plain LoRA layer on an nn.Linear; intruder mitigation "
                             "needs one")
    return name


# ------------------------------------------------------------------------------------------------ the math


def svd64(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vᵀ) in float64."""
    return torch.linalg.svd(w.double(), full_matrices=False)


def intruder_directions(w0: torch.Tensor, w_merged: torch.Tensor, k: int, epsilon: float
                        ) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices among the top-k of W_merged's singular vectors that are intruders, U, S, Vᵀ of W_merged in float64):
    analysis/intruders.py's test (largest |cos| with W0's left singular vectors below ε) on this SVD's vectors."""
    from analysis import intruders

    if torch.equal(w0, w_merged):  # a layer the method left unchanged: W0's own vectors, nothing to scale
        return [], None, None, None
    u, s, vh = svd64(w_merged)
    scores = (u[:, :k].T @ intruders.base_vectors(w0)).abs().max(dim=1).values
    return [i for i, sc in enumerate(scores.tolist()) if sc < epsilon], u, s, vh


def scaled(w_merged: torch.Tensor, idx: list[int], u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
           lam: float) -> torch.Tensor:
    """The paper's W_λ = W_merged + (λ − 1)·Σ_i σ_i u_i v_iᵀ over the intruder indices, float64."""
    w = w_merged.double()
    if not idx:
        return w
    part = u[:, idx] @ torch.diag(s[idx]) @ vh[idx, :]
    return w + (lam - 1.0) * part


def sigma_ratios(w: torch.Tensor, idx: list[int], u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> list[float]:
    """u_iᵀ W v_i / σ_i for each intruder direction i of the unmitigated W_merged (λ under the paper's definition)."""
    w = w.double()
    return [float(u[:, i] @ w @ vh[i, :] / s[i]) for i in idx]


# ------------------------------------------------------------------------------------------------ the experiment


def copy_heads(model: nn.Module, old: str, new: str) -> int:
    """Copy the trained task head (peft's modules_to_save) of adapter `old` into adapter `new`: peft's helper gives
    the new adapter a fresh copy of the original, untrained head. Returns how many modules were copied."""
    from peft.utils.other import ModulesToSaveWrapper

    n = 0
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper) and new in module.modules_to_save:
            module.modules_to_save[new].load_state_dict(module.modules_to_save[old].state_dict())
            n += 1
    return n


class Mitigation:
    """A LoRA run rebuilt for mitigation: W0 and W_merged of every analysed linear layer, the intruders the suite's
    test finds on W_merged (`detected`: {layer: count}), and `model(λ)`, the merged model mitigated at λ.

    `base` is the rebuilt pre-trained model (kept for the probe's "before"; the caller may drop it)."""

    def __init__(self, run_dir: str | Path, k: int | None = None, epsilon: float | None = None):
        from analysis import intruders
        from analysis.weights import linear_weights
        from bench.model.rebuild import base_model, read_run, saved_weights_dir, tuned_model
        from methods import get_method
        from methods.base import head_modules

        self.k = intruders.DEFAULT_K if k is None else int(k)
        self.epsilon = intruders.DEFAULT_EPSILON if epsilon is None else float(epsilon)
        self.record, self.cfg = read_run(run_dir)
        self.run_id = self.record["run_id"]
        reason = refusal(self.record["method"])
        if reason:
            raise BenchError(f"{self.run_id}: {reason}")
        saved_weights_dir(run_dir, self.record)  # no weights: say so before loading anything
        self.method = get_method(self.record["method"])
        self.head = head_modules(self.cfg.model)
        self.base = base_model(self.record, self.cfg)
        self.peft_model = tuned_model(run_dir, base=self.base, merge=False)
        self.adapter = check_plain_lora(self.peft_model, self.run_id)
        self.w0 = linear_weights(self.base, self.head)
        self.merged0 = self.method.merged(self.peft_model).eval()
        self.w_merged = linear_weights(self.merged0, self.head)
        self.found: dict[str, tuple] = {}  # layer -> (intruder indices, U, S, Vᵀ of W_merged)
        with intruders.one_thread():
            for layer, w in self.w_merged.items():
                self.found[layer] = intruder_directions(self.w0[layer], w, self.k, self.epsilon)
        self.detected = {layer: len(v[0]) for layer, v in self.found.items() if v[0]}
        self.peft_detected: dict[str, int] | None = None  # peft's helper's own counts, once it has run
        self._calls = 0

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from analysis.weights import linear_weights

        return linear_weights(model, self.head)

    def model(self, lam: float, definition: str = "paper") -> nn.Module:
        """The merged model with the intruder directions scaled by λ under `definition` (module docstring)."""
        if definition == "paper":
            model = copy.deepcopy(self.merged0)
            for layer, (idx, u, s, vh) in self.found.items():
                if idx:
                    weight = model.get_submodule(layer).weight
                    with torch.no_grad():
                        weight.copy_(scaled(self.w_merged[layer], idx, u, s, vh, lam).to(weight.dtype))
            return model.eval()
        if definition != "peft":
            raise BenchError(f"--definition {definition!r}: choose one of {', '.join(DEFINITIONS)}")
        from peft.tuners.lora.intruders import reduce_intruder_dimension

        self._calls += 1
        new = f"bench_intruders_{self._calls}"
        lines: list[str] = []
        reduce_intruder_dimension(self.peft_model, old_adapter_name=self.adapter, new_adapter_name=new,
                                  top_k=self.k, threshold_epsilon=self.epsilon, mitigation_lambda=lam,
                                  logging_sink=lines.append)
        copy_heads(self.peft_model, self.adapter, new)
        try:
            return self.method.merged(self.peft_model).eval()
        finally:
            self.peft_model.set_adapter(self.adapter)
            self.peft_model.delete_adapter(new)
            found: dict[str, int] = {}
            for line in lines:
                m = re.match(r"(.+): (?:No intruders|Intruders: (\d+))$", line)
                if m and m.group(2):
                    found[m.group(1).removeprefix("base_model.model.")] = int(m.group(2))
            self.peft_detected = found

    def counts(self, model: nn.Module) -> dict[str, int]:
        """{layer: intruder count} of `model`'s weights against W0 (analysis/intruders.py, the same k and ε)."""
        from analysis import intruders

        weights = self.weights(model)
        scores = intruders.layer_scores(((n, self.w0[n], weights[n]) for n in self.w0), self.k)
        return {n: intruders.count(sc, self.epsilon) for n, sc in scores.items()}

    def sigma_ratios(self, model: nn.Module) -> dict[str, list[float]]:
        """{layer where intruders were found: u_iᵀ W v_i / σ_i for each of its intruder directions}."""
        weights = self.weights(model)
        return {n: sigma_ratios(weights[n], *self.found[n]) for n in self.detected}


def _probe(record: dict, cfg, name: str | None, max_pairs: int | None):
    """The forgetting probe: the run's own (with its settings) unless `name` names another; else `sts`."""
    from omegaconf import OmegaConf

    from bench.measure.probes import make_probe, probe_config
    from bench.model import load_tokenizer

    own = cfg.get("forgetting")
    if own is not None and (name is None or name == str(own.probe)):
        pcfg = OmegaConf.create(OmegaConf.to_container(own, resolve=True))
    else:
        pcfg = probe_config(name or "sts")
    if max_pairs is not None and str(pcfg.probe) == "sts":
        pcfg.max_pairs = int(max_pairs)
    return make_probe(pcfg, cfg.model, load_tokenizer(cfg.model), record["task"]), pcfg


def mitigate(run_dir: str | Path, lambdas=DEFAULT_LAMBDAS, definition: str = "paper", k: int | None = None,
             epsilon: float | None = None, probe: str | None = None, max_pairs: int | None = None,
             log=None) -> dict:
    """Task metric, forgetting and intruder count of a LoRA run at each λ (module docstring); the result as a dict."""
    from omegaconf import OmegaConf

    from bench.reevaluate import dev_set

    lambdas = parse_lambdas(lambdas)
    if definition not in DEFINITIONS:
        raise BenchError(f"--definition {definition!r}: choose one of {', '.join(DEFINITIONS)}")
    log = log or (lambda _msg: None)
    start = time.perf_counter()
    mit = Mitigation(run_dir, k, epsilon)
    record, cfg = mit.record, mit.cfg
    device = torch.device("cpu")
    probe_obj, pcfg = _probe(record, cfg, probe, max_pairs)
    dev = dev_set(cfg)  # the run's dev rows, task and metric code, on the CPU in fp32 (bench/reevaluate.py)
    log(f"{mit.run_id}: rebuilt in {time.perf_counter() - start:.1f} s; intruders found: {mit.detected or 'none'}")
    before = probe_obj.measure(mit.base, device)
    mit.base = None  # not needed any more

    def measure(model: nn.Module, lam: float | None) -> dict:
        t0 = time.perf_counter()
        per_layer = mit.counts(model)
        weights = mit.weights(model)
        after = probe_obj.measure(model, device)
        row = {
            "lambda": lam,
            "metric": dev.main_metric(model),
            "probe_after": after,
            "forgetting": probe_obj.result(before, after)["forgetting"],
            "intruders": sum(per_layer.values()),
            "intruders_at_detected_layers": sum(per_layer[n] for n in mit.detected),
            "per_layer": {n: c for n, c in per_layer.items() if c or n in mit.detected},
            "sigma_ratio": mit.sigma_ratios(model),
            "delta_w_rel_change": _rel_change(weights, mit.w_merged, mit.w0),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        log(f"  λ={'as trained' if lam is None else f'{lam:g}'}: metric {row['metric']:.4f}, forgetting "
            f"{row['forgetting']:+.4f}, intruders {row['intruders']} ({row['seconds']:.1f} s)")
        return row

    unmitigated = measure(mit.merged0, None)
    rows = [measure(mit.model(lam, definition), lam) for lam in lambdas]
    task = dev.task
    result = {
        "run_id": mit.run_id,
        "run_dir": str(Path(run_dir).resolve()),
        "method": record["method"],
        "task": record["task"],
        "model": record.get("model"),
        "rank": record.get("rank"),
        "definition": definition,
        "k": mit.k,
        "epsilon": mit.epsilon,
        "lambdas": lambdas,
        "metric": {"name": task.main_metric, "higher_is_better": True, "split": f"dev ({len(dev.data.dev_features)} "
                   "rows)", "recorded": (record.get("metrics") or {}).get(task.main_metric),
                   "evaluated": "merged into the weights, CPU, fp32"},
        "probe": {"name": str(pcfg.probe), "metric": probe_obj.metric, "higher_is_better": probe_obj.higher_is_better,
                  "before": before,
                  "settings": {key: v for key, v in OmegaConf.to_container(pcfg, resolve=True).items()
                               if key != "probe"},
                  "recorded": record.get("forgetting")},
        "detected": mit.detected,
        "detected_total": sum(mit.detected.values()),
        "unmitigated": unmitigated,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if mit.peft_detected is not None:
        result["peft_detected"] = mit.peft_detected
    return result


def _rel_change(weights: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], w0: dict[str, torch.Tensor]
                ) -> float:
    """‖ΔW_λ − ΔW‖_F / ‖ΔW‖_F over all analysed layers (0 at λ = 1 under the paper's definition)."""
    num = sum(float((weights[n].double() - merged[n].double()).norm() ** 2) for n in merged)
    den = sum(float((merged[n].double() - w0[n].double()).norm() ** 2) for n in merged)
    return math.sqrt(num / den) if den else 0.0


# ------------------------------------------------------------------------------------------------ output


def table(result: dict) -> str:
    """The result as a plain-text table with each column's unit and direction."""
    probe = result["probe"]
    lost = "before − after" if probe["higher_is_better"] else "after − before"
    lines = [
        f"{result['run_id']} ({result['method']}, rank {result['rank']}): intruder mitigation, definition "
        f"'{result['definition']}', k={result['k']}, epsilon={result['epsilon']:g}; intruders found in "
        f"{len(result['detected'])} layers: {result['detected_total']}",
        f"  metric: dev {result['metric']['name']} (higher is better; {result['metric']['split']})",
        f"  forgetting: {probe['name']} probe, {probe['metric']} {lost} (lower = less lost; before = "
        f"{probe['before']:.4f})",
        f"  intruders: count over all analysed layers (lower = fewer); 'found layers': at the {len(result['detected'])}"
        f" layers where intruders were found; σ ratio: u_iᵀ W_λ v_i / σ_i, mean over the intruder directions",
        "",
        f"  {'λ':>10s} {'metric':>9s} {'forgetting':>11s} {'intruders':>10s} {'found layers':>13s} {'σ ratio':>9s}",
    ]
    for row in [result["unmitigated"], *result["rows"]]:
        ratios = [r for rs in row["sigma_ratio"].values() for r in rs]
        lam = "as trained" if row["lambda"] is None else f"{row['lambda']:g}"
        ratio = f"{sum(ratios) / len(ratios):.3f}" if ratios else "-"
        lines.append(f"  {lam:>10s} {row['metric']:9.4f} {row['forgetting']:+11.4f} {row['intruders']:10d} "
                     f"{row['intruders_at_detected_layers']:13d} {ratio:>9s}")
    return "\n".join(lines)


def plot(result: dict, out_dir: Path, name: str) -> Path:
    """Task metric, forgetting and intruder count against λ, three panels side by side (PNG and SVG)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from analysis.plots import _save, probe_label

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.95)
    rows = result["rows"]
    lams = [r["lambda"] for r in rows]
    base = result["unmitigated"]
    probe = result["probe"]
    panels = [
        ("metric", f"Dev {result['metric']['name']} (higher is better)", "#1b9e77"),
        ("forgetting", f"Forgetting: {probe_label(probe['name'], probe['metric'])}\n"
                       f"{'before − after' if probe['higher_is_better'] else 'after − before'} (lower = less lost)",
         "#d95f02"),
        ("intruders", f"Intruder dimensions (k={result['k']}, ε={result['epsilon']:g}; count)", "#7570b3"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15.5, 4.0))
    for ax, (key, label, color) in zip(axes, panels):
        ax.plot(lams, [r[key] for r in rows], marker="o", color=color, lw=1.8, label="mitigated")
        ax.axhline(base[key], color="0.4", ls="--", lw=1.0, label="as trained")
        if key == "intruders":
            ax.plot(lams, [r["intruders_at_detected_layers"] for r in rows], marker="s", color=color, ls=":",
                    lw=1.4, label="at the layers where found")
            ax.set_ylim(bottom=0)
            ax.yaxis.get_major_locator().set_params(integer=True)
        if key == "forgetting":
            ax.axhline(0, color="0.7", lw=0.8)
        ax.set_xlabel("λ (0: intruder directions removed, 1: adapter kept)")
        ax.set_ylabel(label)
        ax.set_xlim(-0.05, 1.05)
        ax.legend(frameon=False, fontsize=8)
    fig.suptitle(f"Intruder mitigation of {result['run_id']} ({result['definition']} definition)", y=1.02)
    fig.tight_layout()
    return _save(fig, Path(out_dir), name)


def write(result: dict, out: Path) -> Path:
    """The JSON at `out` and the plot beside it (`<stem>.png`, `.svg`); returns the PNG's path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return plot(result, out.parent, out.stem)


def report_section(results: Path, plots_dir: Path, rel) -> list[str]:
    """analysis/report.py's "Intruder mitigation" section: for every `mitigation.json` under `results`, its table and
    its λ plot redrawn into `plots_dir`. [] when there is none. `rel(path)`: the link text for a plot."""
    from analysis.tables import Table

    lines: list[str] = []
    for path in sorted(Path(results).rglob(RESULT_FILE)):
        try:
            res = json.loads(path.read_text())
            rows = [res["unmitigated"], *res["rows"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            lines += [f"- {path}: unreadable ({type(exc).__name__})", ""]
            continue
        png = plot(res, plots_dir, f"mitigation_{res['run_id']}")
        probe = res["probe"]
        scale, unit = (100, ", x 100") if probe["higher_is_better"] else (1, "")  # a score x 100; a loss as it is
        body = [["as trained" if r["lambda"] is None else f"{r['lambda']:g}", f"{100 * r['metric']:.2f}",
                 f"{scale * r['forgetting']:+.{2 if scale == 100 else 4}f}", str(r["intruders"]),
                 str(r["intruders_at_detected_layers"])] for r in rows]
        lines += [
            f"### {res['run_id']}",
            "",
            f"Definition `{res['definition']}`, k = {res['k']}, ε = {res['epsilon']:g}: "
            f"{res['detected_total']} intruders found in {len(res['detected'])} layers. Forgetting: {probe['name']} "
            f"probe ({probe['metric']}), ability lost{unit}.",
            "",
            Table("", ["λ", f"Dev {res['metric']['name']} (x 100, ↑)", f"Forgetting ({unit[2:] or 'raw'}, ↓)",
                       "Intruders (↓)",
                       "At layers where found (↓)"], body).markdown(),
            "",
            f"![mitigation {res['run_id']}]({rel(png)})",
            "",
        ]
    if not lines:
        return []
    return ["## Intruder mitigation", "",
            "`python -m analysis.mitigate <run dir>`: the run's intruder directions scaled by λ (1: the adapter as "
            "trained, 0: removed; docs/analysis.md). Read across λ: what the task loses, what forgetting recovers, how "
            "many intruders remain.", ""] + lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a finished LoRA run with saved weights")
    ap.add_argument("--lambdas", default=",".join(f"{v:g}" for v in DEFAULT_LAMBDAS),
                    help="comma-separated λ in [0, 1] (default 0,0.25,0.5,0.75,1)")
    ap.add_argument("--definition", default="paper", choices=DEFINITIONS,
                    help="paper: scale W_merged's intruder directions (default); peft: peft's helper (truncates to r)")
    ap.add_argument("--k", type=int, default=None, help="top-k singular vectors (default 10)")
    ap.add_argument("--epsilon", type=float, default=None, help="|cosine| threshold (default 0.5)")
    ap.add_argument("--probe", default=None, choices=["sts", "mlm", "ppl", "wiki"],
                    help="forgetting probe (default: the run's own, else sts)")
    ap.add_argument("--max-pairs", type=int, default=None, help="sts: cap on STS-B dev pairs (speed)")
    ap.add_argument("--out", default=None, help=f"JSON path (default <run dir>/{RESULT_FILE}); the plot goes beside it")
    ap.add_argument("--json", action="store_true", help="also print the JSON on stdout (the table goes to stderr)")
    args = ap.parse_args(argv)
    text_out = sys.stderr if args.json else sys.stdout
    try:
        result = mitigate(args.run_dir, args.lambdas, args.definition, args.k, args.epsilon, args.probe,
                          args.max_pairs, log=lambda msg: print(msg, file=sys.stderr))
    except BenchError as exc:
        raise SystemExit(f"error: {exc}") from None
    out = Path(args.out) if args.out else Path(args.run_dir) / RESULT_FILE
    png = write(result, out)
    print(table(result), file=text_out)
    print(f"written: {out} and {png} (.svg beside it)", file=text_out)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
