"""Rebuild a run's fine-tuned linear weights next to the pre-trained ones, from its folder alone.

    python -m analysis.weights <run dir>      # lists the (layer, shape, ||ΔW||_F / ||W0||_F) it finds

A run folder holds `record.json` and `weights/`. The pre-trained model is rebuilt from the record's model
config (`bench.model.load_model`); the fine-tuned one is that model plus the method's saved weights through
the method registry (`get_method(name).load(...)`, given the method config the run hashed: the record's
`effective_config["method"]`), merged into the base weights where the method merges (`full` is already the
model). Random-init test models are rebuilt by seeding with the run's seed before building the model, as the
runner does.

Yields `(layer name, W0, W_tuned)` for every `nn.Linear` except embeddings, the task head (`model.head`)
and the pooler (BERT's pooler only feeds the classification head). Weights follow PyTorch's `nn.Linear`
layout: `out_features x in_features`.

The base model is loaded as the run loaded it (`Method.load_kwargs`): for `qlora` the 4-bit NF4 base, on the
GPU, with 4-bit weights dequantised for analysis. Where this machine cannot (no CUDA or no bitsandbytes), the
run is reported as not applicable with that one-line reason: the fp32 base would be a different model.

Methods that leave every pre-trained weight matrix as it is (bottleneck adapters and prompt/prefix tuning
add modules or inputs; they do not merge) are reported as not applicable, with the reason, from the record alone
(`not_applicable`), without loading anything. BitFit changes only biases: its pairs are returned and give ΔW = 0
(0 intruders). A run without saved weights (`saved_weights`) is an error raised before any model is loaded.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bench import BenchError
from bench.record import WEIGHTS_DIR, read_record, record_path
from methods.base import HeadSpec, head_modules, is_head_param

# What a method does to W is its own fact (its yaml's `facts:`: changes_base_weights, merges, edits_in_place).
EXCLUDED_PARTS = ("embeddings", "embed_tokens", "pooler", "lm_head")


@dataclass
class WeightPairs:
    """The linear weights of one run: `pairs` of (name, W0, W_tuned), or `applicable=False` with a reason."""

    run_id: str
    method: str
    applicable: bool
    reason: str = ""
    pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    load_s: float = 0.0


def read_run(run_dir: str | Path) -> tuple[dict, DictConfig]:
    """(record, resolved config) of a finished run; BenchError when it is not an ok run with saved weights."""
    path = record_path(run_dir)
    record = read_record(path)
    if record is None:
        raise BenchError(f"{path}: no readable run record; pass a run folder")
    if record.get("status") != "ok":
        raise BenchError(f"{record.get('run_id', path)}: status is {record.get('status')!r}, not ok")
    if "config" not in record:
        raise BenchError(f"{path}: the record has no resolved config; it was written by an older version")
    return record, OmegaConf.create(record["config"])


def effective_method(record: dict) -> dict:
    """The method config the run was built with and identified by (`effective_config["method"]` of its record)."""
    eff = (record.get("effective_config") or {}).get("method")
    if not isinstance(eff, dict):
        raise BenchError(f"{record.get('run_id')}: the record has no effective_config.method to rebuild its method")
    return eff


def task_num_labels(record: dict) -> int:
    from bench.data.tasks import record_num_labels

    return record_num_labels(record)


def analysis_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cannot_rebuild(record: dict) -> str | None:
    """Why this machine cannot load the run's base model as the run did (QLoRA's 4-bit base needs CUDA and
    bitsandbytes), in one line; None when it can."""
    from methods import get_method

    try:
        get_method(record["method"]).validate(analysis_device())
    except BenchError as exc:
        return (f"the run's base model cannot be rebuilt here as the run loaded it, and an fp32 base would be a "
                f"different model: {str(exc).split(';')[0]}")
    return None


def base_model(record: dict, cfg: DictConfig) -> nn.Module:
    """The pre-trained model the run started from, loaded as the run loaded it (e.g. 4-bit for qlora; same seed,
    so random-init test models match too). BenchError when this machine cannot (`cannot_rebuild`)."""
    from bench.model import load_model, seed_everything
    from methods import get_method

    reason = cannot_rebuild(record)
    if reason:
        raise BenchError(f"{record.get('run_id')}: {reason}")
    device = analysis_device()
    load_kwargs = get_method(record["method"]).load_kwargs(effective_method(record), cfg.model, device)
    seed_everything(int(record["seed"]))
    model, _ = load_model(cfg.model, task_num_labels(record), **load_kwargs)
    return model.eval()


def saved_weights(run_dir: str | Path, record: dict) -> dict[str, int]:
    """{path inside the weights folder: size in bytes} of the run's saved weights; {} when it saved none.
    Reads the folder listing only."""
    folder = Path(run_dir) / str(record.get("weights_dir") or WEIGHTS_DIR)
    if not folder.is_dir():
        return {}
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def saved_weights_dir(run_dir: str | Path, record: dict) -> Path:
    """The run's weights folder; BenchError when it saved none (checked before any model is loaded)."""
    weights_dir = Path(run_dir) / str(record.get("weights_dir") or WEIGHTS_DIR)
    if not saved_weights(run_dir, record):
        raise BenchError(
            f"{record['run_id']}: no saved weights in {weights_dir} (run with save_weights=adapter)"
        )
    return weights_dir


def not_applicable(record: dict) -> str | None:
    """Why the weight analysis does not apply to this run, from its record alone (nothing loaded): the method
    leaves the pre-trained weights unchanged or does not merge into them, or this machine cannot rebuild its base
    model as the run loaded it. None when it applies."""
    from methods import get_method

    name = record["method"]
    method = get_method(name)
    if not method.changes_base_weights:
        return method.unchanged_reason
    if not (method.merges or method.edits_in_place):
        return f"method '{name}' does not merge into the pre-trained weights"
    return cannot_rebuild(record)


def attach_context(record: dict, cfg: DictConfig):
    from bench.model import attach_context as context

    steps = int((record.get("train") or {}).get("steps") or cfg.budget.get("max_steps") or 1)
    return context(cfg.model, record.get("rank"), task_num_labels(record), steps)


def tuned_model(run_dir: str | Path, base: nn.Module | None = None, merge: bool = True) -> nn.Module:
    """The fine-tuned model rebuilt from the run folder; merged into plain weights when `merge` and the
    method merges. `base` (not modified) saves rebuilding the pre-trained model."""
    from methods import get_method

    run_dir = Path(run_dir)
    record, cfg = read_run(run_dir)
    reason = cannot_rebuild(record)
    if reason:
        raise BenchError(f"{record.get('run_id')}: {reason}")
    weights_dir = saved_weights_dir(run_dir, record)  # before any model is loaded
    method = get_method(record["method"])
    start = copy.deepcopy(base) if base is not None else base_model(record, cfg)
    try:
        model = method.load(start, effective_method(record), attach_context(record, cfg), weights_dir)
    except BenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt weights file, a shape mismatch, ...: one line
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise BenchError(f"{record['run_id']}: cannot load its saved weights from {weights_dir} "
                         f"({type(exc).__name__}: {first}); re-run it with rerun=true") from None
    if merge and method.merges and not method.edits_in_place:
        model = method.merged(model)
    return model.eval()


def is_analysed_linear(name: str, module: nn.Module, head: HeadSpec) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    parts = name.split(".")
    return not is_head_param(f"{name}.weight", head) and not any(part in EXCLUDED_PARTS for part in parts)


def dense_weight(module: nn.Linear) -> torch.Tensor:
    """The layer's weight as the values it computes with, fp32 on the CPU (bitsandbytes 4-bit: dequantised)."""
    weight = module.weight
    if weight.__class__.__name__ == "Params4bit":
        import bitsandbytes.functional as bnb_functional

        weight = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    return weight.detach().float().cpu()


def linear_weights(model: nn.Module, head: HeadSpec) -> dict[str, torch.Tensor]:
    return {
        name: dense_weight(mod)
        for name, mod in model.named_modules()
        if is_analysed_linear(name, mod, head)
    }


def weight_pairs(run_dir: str | Path) -> WeightPairs:
    """(layer, W0, W_tuned) for every analysed linear layer of a run, or not applicable with the reason."""
    import time

    record, cfg = read_run(run_dir)
    name = record["method"]
    reason = not_applicable(record)
    if reason:
        return WeightPairs(record["run_id"], name, False, reason)
    saved_weights_dir(run_dir, record)  # no weights: say so before loading the base model
    start = time.perf_counter()
    head = head_modules(cfg.model)
    base = base_model(record, cfg)
    w0 = linear_weights(base, head)
    tuned = linear_weights(tuned_model(run_dir, base=base), head)
    if set(w0) != set(tuned):
        raise BenchError(
            f"{record['run_id']}: the rebuilt model's linear layers differ from the base model's "
            f"(only in one: {sorted(set(w0) ^ set(tuned))[:3]})"
        )
    pairs = [(layer, w0[layer], tuned[layer]) for layer in w0]
    return WeightPairs(record["run_id"], name, True, pairs=pairs, load_s=time.perf_counter() - start)


def pairs_for_cli(run_dir: str | Path, what: str) -> WeightPairs | None:
    """For the command lines: the run's weight pairs; None after printing "n/a" when the method leaves W
    unchanged; a one-line exit when the run folder cannot be used."""
    try:
        wp = weight_pairs(run_dir)
    except BenchError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not wp.applicable:
        print(f"{wp.run_id}: {what} n/a ({wp.reason})")
        return None
    return wp


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    args = ap.parse_args(argv)
    wp = pairs_for_cli(args.run_dir, "weights")
    if wp is None:
        return
    print(f"{wp.run_id} ({wp.method}): {len(wp.pairs)} linear layers, rebuilt in {wp.load_s:.1f} s")
    for layer, w0, wt in wp.pairs:
        rel = float((wt - w0).norm() / w0.norm())
        print(f"  {layer:55s} {tuple(w0.shape)!s:14s} ||dW||/||W0|| = {rel:.2e}")


if __name__ == "__main__":
    main()
