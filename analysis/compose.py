"""Adapters of finished runs combined into one, and the result scored on every source task.

    python -m analysis.compose <run dir A> <run dir B> [...] [--types cat,linear,svd,ties,dare_linear,magnitude_prune]
                               [--weights 0.5,0.5] [--density 0.5] [--out compose.json]

The runs are LoRA-family runs on one base model (e.g. LoRA on SST-2 and on RTE) with saved weights. Each adapter is
put on one copy of the base model under its task's name, and peft's `add_weighted_adapter` combines them with each
combination type asked for. Every variant (each source adapter alone, each combination) is scored on the dev set of
every source task, as the run scored it (bench/reevaluate.py), with that task's own head: heads are task-specific
(a 2-way SST-2 classifier cannot answer STS-B), so only the adapted layers are combined and the head is the task's.
The table shows each task's main metric and its difference from the task's own adapter alone. The suite trains no
multi-task runs, so there is no multi-task row.

What each type computes (peft 0.21, `LoraModel.add_weighted_adapter`; w_i the weights, s_i = alpha_i / r_i):
- `cat`: the adapters side by side (rank = the sum of ranks): ΔW = Σ w_i s_i B_i A_i exactly.
- `svd` (and `*_svd`): Σ w_i s_i B_i A_i (after TIES/DARE/pruning for those), truncated by SVD to the largest rank.
- `linear`, `ties`, `dare_*`, `magnitude_prune`: A and B are combined separately, each with weight sqrt(w_i s_i):
  ΔW = (Σ sqrt(w_i s_i) B_i)(Σ sqrt(w_i s_i) A_i). This is not the weighted sum of the ΔW: two identical adapters at
  (0.5, 0.5) give twice the adapter's ΔW, and (0.25, 0.25) give it once. All ranks must be equal.
TIES, DARE and magnitude pruning keep a `density` fraction of the entries; DARE drops at random (seeded by --seed).

Refused in one line: fewer than two runs, runs on different base models, runs without saved weights, and methods
whose adapters cannot be combined this way (not a peft LoRA adapter; DoRA, whose magnitude vector the combination
ignores; initialisations that change the base weights, e.g. PiSSA). A combination type that peft refuses for these
adapters (e.g. `linear` over different ranks) is a row with its one-line reason, and the other types still run.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from analysis.tables import DASH, Table
from bench import BenchError
from bench.model.rebuild import base_model, read_run, saved_weights_dir, tuned_model
from bench.record.provenance import provenance
from bench.reevaluate import DevSet, dev_set, head_copy, set_head
from methods.base import head_modules

SCHEMA = "compose/1"
COMBINATION_TYPES = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                     "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
DEFAULT_TYPES = ("cat", "linear", "svd", "ties", "dare_linear", "magnitude_prune")
PLAIN_INITS = (True, False, "gaussian")  # LoRA inits that leave the base weights as they are


@dataclass
class Source:
    """One finished run's adapter: its LoRA tensors and config (no head), and its task's head and dev set."""

    name: str
    run_id: str
    record: dict
    cfg: DictConfig
    config: LoraConfig
    lora_state: dict[str, torch.Tensor]
    head: dict[str, nn.Module]
    dev: DevSet


def not_combinable(config: Any) -> str | None:
    """Why peft's add_weighted_adapter cannot combine this adapter config, or None."""
    if not isinstance(config, LoraConfig):
        return f"a {type(config).__name__} adapter, not LoRA: add_weighted_adapter combines LoRA adapters"
    if config.use_dora:
        return "DoRA: add_weighted_adapter combines A and B and ignores the magnitude vector"
    if config.init_lora_weights not in PLAIN_INITS:
        return (f"init_lora_weights={config.init_lora_weights!r} changes the base weights at initialisation, "
                "so its adapter does not sit on the shared base model")
    return None


def load_source(run_dir: str | Path, base: nn.Module, tokenizer=None) -> Source:
    record, cfg = read_run(run_dir)
    saved_weights_dir(run_dir, record)
    model = tuned_model(run_dir, base=base, merge=False)
    if not isinstance(model, PeftModel):
        raise BenchError(f"{record['run_id']}: method '{record['method']}' saves no peft adapter; only LoRA-family "
                         "adapters can be combined")
    config = model.peft_config[model.active_adapter]
    reason = not_combinable(config)
    if reason:
        raise BenchError(f"{record['run_id']}: cannot combine method '{record['method']}': {reason}")
    lora_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items() if ".lora_" in k}
    head = head_copy(model.merge_and_unload(), head_modules(cfg.model))
    # Only the adapted layers are combined: no task head (modules_to_save) and no task type, which would add one.
    config = copy.deepcopy(config)
    config.modules_to_save, config.task_type, config.inference_mode = None, None, True
    return Source(str(cfg.task.name), record["run_id"], record, cfg, config, lora_state, head,
                  dev_set(cfg, tokenizer=tokenizer))


def load_sources(run_dirs: list[str | Path]) -> tuple[nn.Module, list[Source]]:
    """(the shared pre-trained model, each run's adapter), checked to be combinable."""
    if len(run_dirs) < 2:
        raise BenchError("compose needs at least two runs")
    runs = [read_run(d) for d in run_dirs]
    models = {str(cfg.model.name) for _, cfg in runs}
    if len(models) > 1:
        raise BenchError(f"the runs are on different base models ({', '.join(sorted(models))}); adapters combine "
                         "only on one base")
    base = base_model(*runs[0])
    sources: list[Source] = []
    for d in run_dirs:
        src = load_source(d, base, tokenizer=sources[0].dev.data.tokenizer if sources else None)
        taken = {s.name for s in sources}
        if src.name in taken:  # two runs of one task (e.g. two seeds): name them apart
            src.name = f"{src.name}#{sum(s.name.split('#')[0] == src.name for s in sources) + 1}"
        sources.append(src)
    return base, sources


def composition_model(base: nn.Module, sources: list[Source]) -> PeftModel:
    """A copy of `base` with every source's adapter under its name (heads are set per task when scoring)."""
    model: PeftModel | None = None
    for src in sources:
        if model is None:
            model = get_peft_model(copy.deepcopy(base), src.config, adapter_name=src.name)
        else:
            model.add_adapter(src.name, src.config)
        result = set_peft_model_state_dict(model, src.lora_state, adapter_name=src.name)
        missing = [k for k in result.missing_keys if ".lora_" in k and f".{src.name}." in k]
        if missing:
            raise BenchError(f"{src.run_id}: its adapter does not fit the shared base model (missing {missing[0]})")
    assert model is not None
    return model.eval()


def combine(model: PeftModel, sources: list[Source], combination_type: str, weights: list[float],
            density: float, seed: int) -> str:
    """Add the combination of every source adapter as adapter `combination_type` (peft's add_weighted_adapter);
    its name. Raises BenchError with peft's one-line reason where peft refuses."""
    torch.manual_seed(seed)  # DARE drops entries at random
    kwargs = {"density": density} if combination_type.startswith(("ties", "dare", "magnitude")) else {}
    try:
        model.add_weighted_adapter([s.name for s in sources], weights, combination_type,
                                   combination_type=combination_type, **kwargs)
    except (ValueError, TypeError) as exc:
        raise BenchError(str(exc).strip().splitlines()[0]) from None
    model.eval()  # the new adapter's modules (its LoRA dropout) are created in training mode
    return combination_type


def score(model: PeftModel, adapter: str, sources: list[Source]) -> dict[str, float]:
    """Adapter `adapter` scored on every source task's dev set, each with that task's head."""
    model.set_adapter(adapter)
    inner = model.get_base_model()
    out = {}
    for src in sources:
        set_head(inner, src.head, src.dev.task)
        out[src.name] = src.dev.main_metric(model)
    return out


def compose(run_dirs: list[str | Path], types: tuple[str, ...] = DEFAULT_TYPES, weights: list[float] | None = None,
            density: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Each source adapter alone and each combination, scored on every source task (see the module docstring)."""
    unknown = [t for t in types if t not in COMBINATION_TYPES]
    if unknown:
        raise BenchError(f"unknown combination type(s) {unknown}; peft's are {', '.join(COMBINATION_TYPES)}")
    if not 0 < density <= 1:
        raise BenchError(f"density {density} must be in (0, 1]")
    base, sources = load_sources(run_dirs)
    weights = weights or [1.0 / len(sources)] * len(sources)
    if len(weights) != len(sources) or not all(math.isfinite(w) for w in weights):
        raise BenchError(f"{len(weights)} weight(s) for {len(sources)} runs: give one finite weight per run")
    model = composition_model(base, sources)
    rows = [{"variant": f"alone: {s.name}", "combination_type": None, "status": "ok", "reason": "",
             "metrics": score(model, s.name, sources)} for s in sources]
    for ctype in types:
        try:
            name = combine(model, sources, ctype, weights, density, seed)
            rows.append({"variant": ctype, "combination_type": ctype, "status": "ok", "reason": "",
                         "metrics": score(model, name, sources)})
        except BenchError as exc:
            rows.append({"variant": ctype, "combination_type": ctype, "status": "refused", "reason": str(exc),
                         "metrics": {}})
    return {
        "schema": SCHEMA,
        "sources": [{"name": s.name, "run_id": s.run_id, "task": str(s.cfg.task.name), "method": s.record["method"],
                     "rank": s.record.get("rank"), "main_metric": s.dev.task.main_metric,
                     "record_main_metric_value": s.record.get("main_metric_value")} for s in sources],
        "model": str(sources[0].cfg.model.name),
        "weights": weights, "density": density, "seed": seed,
        "rows": rows,
        "provenance": provenance(),
    }


def table(result: dict[str, Any]) -> Table:
    """One row per variant: each task's main metric and its difference from the task's own adapter alone."""
    names = [s["name"] for s in result["sources"]]
    own = {n: next(r["metrics"][n] for r in result["rows"] if r["variant"] == f"alone: {n}") for n in names}
    metric = {s["name"]: s["main_metric"] for s in result["sources"]}
    header = ["variant"] + [h for n in names for h in (f"{n} {metric[n]}", "Δ vs own")] + ["note"]
    rows, numbers = [], []
    for row in result["rows"]:
        cells = [row["variant"]]
        for n in names:
            value = row["metrics"].get(n)
            cells += [DASH, DASH] if value is None else [f"{value:.4f}", f"{value - own[n]:+.4f}"]
            numbers.append({"variant": row["variant"], "task": n, "value": value,
                            "delta_vs_own": None if value is None else value - own[n]})
        rows.append(cells + [row["reason"]])
    title = (f"Adapters of {', '.join(s['run_id'] for s in result['sources'])} on {result['model']} combined "
             f"(weights {result['weights']}, density {result['density']}); each task's dev set with its own head")
    return Table(title, header, rows, numbers=pd.DataFrame(numbers))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", help="finished LoRA-family runs with saved weights, one per task")
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES),
                    help=f"peft combination types, comma-separated (of {', '.join(COMBINATION_TYPES)})")
    ap.add_argument("--weights", default=None, help="one weight per run, comma-separated (default: 1/N each)")
    ap.add_argument("--density", type=float, default=0.5, help="TIES/DARE/magnitude pruning: fraction kept")
    ap.add_argument("--seed", type=int, default=0, help="DARE's random drop")
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        raise SystemExit(f"error: --weights {args.weights!r} is not a comma-separated list of numbers") from None
    try:
        result = compose(args.run_dirs, tuple(t for t in args.types.split(",") if t), weights, args.density,
                         args.seed)
    except BenchError as exc:
        raise SystemExit(f"error: {exc}") from None
    tab = table(result)
    print(tab.title + "\n\n" + tab.markdown())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
