"""Rebuild a run's fine-tuned linear weights next to the pre-trained ones, from its folder alone.

    python -m analysis.weights <run dir>      # lists the (layer, shape, ||ΔW||_F / ||W0||_F) it finds

A run folder holds `record.json` and `weights/`; bench/model/rebuild.py rebuilds the pre-trained and the
fine-tuned model from it (merged into the base weights where the method merges).

Yields `(layer name, W0, W_tuned)` for every `nn.Linear` except embeddings, the task head (`model.head`)
and the pooler (BERT's pooler only feeds the classification head). Weights follow PyTorch's `nn.Linear`
layout: `out_features x in_features`.

The base model is loaded as the run loaded it (`Method.load_kwargs`): for `qlora` the 4-bit NF4 base, on the
GPU, with 4-bit weights dequantised for analysis. Where this machine cannot (no CUDA or no bitsandbytes), the
run is reported as not applicable with that one-line reason: the fp32 base would be a different model.

Methods that leave every pre-trained weight matrix as it is (bottleneck adapters and prompt/prefix tuning
add modules or inputs; they do not merge) are reported as not applicable, with the reason, from the record alone
(`not_applicable`), without loading anything. BitFit changes only biases: its pairs are returned and give ΔW = 0
(0 intruders). A run without saved weights is an error raised before any model is loaded.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bench import BenchError
from bench.model.rebuild import base_model, cannot_rebuild, read_run, saved_weights_dir, tuned_model
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
