"""Spectrum of the weight update ΔW = W_tuned − W0, per layer, and the "rank lab".

    python -m analysis.spectrum <run dir> [--max-rank 64]

Per layer, from the singular values σ_1 ≥ σ_2 ≥ … of ΔW (float64):
- `effective_rank`: Roy & Vetterli (2007) entropy effective rank, exp(−Σ p_i log p_i) with p_i = σ_i / Σ σ_j.
  It equals r for a rank-r matrix whose r non-zero singular values are equal, and is smaller when they
  are spread out (it is a real number, not an integer).
- `numerical_rank`: the number of σ_i > rtol · σ_1 (default rtol = 1e-3, well above the float32 round-off
  of a merged weight, ~1e-5 · σ_1 for a typical update).
- `energy90_rank`: the smallest r with Σ_{i≤r} σ_i² ≥ 0.9 Σ σ_i², the rank that holds 90% of the energy.
- `relative_update`: ‖ΔW‖_F / ‖W0‖_F.
A layer with ΔW = 0 has all ranks 0.

Rank lab: the relative Frobenius error of the best rank-r approximation of ΔW (Eckart–Young),
‖ΔW − ΔW_r‖_F / ‖ΔW‖_F = sqrt(Σ_{i>r} σ_i² / Σ σ_i²), for r = 1…R, per layer and for the whole model (the
stacked layers: sqrt of the summed tail energies over the summed energies). For a full fine-tuning run it
answers "which LoRA rank could have expressed this update?".
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

DEFAULT_RTOL = 1e-3
ENERGY = 0.9


def singular_values(delta: torch.Tensor) -> np.ndarray:
    return torch.linalg.svdvals(delta.double()).numpy()


def effective_rank(s: np.ndarray) -> float:
    """Roy & Vetterli entropy effective rank; 0 for a zero matrix."""
    s = np.asarray(s, dtype=float)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def numerical_rank(s: np.ndarray, rtol: float = DEFAULT_RTOL) -> int:
    s = np.asarray(s, dtype=float)
    if s.size == 0 or s[0] <= 0:
        return 0
    return int((s > rtol * s.max()).sum())


def energy_rank(s: np.ndarray, fraction: float = ENERGY) -> int:
    """Smallest r whose top-r singular values hold `fraction` of Σσ²."""
    e = np.asarray(s, dtype=float) ** 2
    total = e.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(e) / total, fraction - 1e-12) + 1)


def tail_energy(s: np.ndarray, max_rank: int) -> np.ndarray:
    """Σ_{i>r} σ_i² for r = 1..max_rank (the squared error of the best rank-r approximation)."""
    e = np.sort(np.asarray(s, dtype=float))[::-1] ** 2
    tails = e.sum() - np.cumsum(e)
    tails = np.clip(tails, 0.0, None)
    if len(tails) < max_rank:
        tails = np.concatenate([tails, np.zeros(max_rank - len(tails))])
    return tails[:max_rank]


def relative_error_by_rank(s: np.ndarray, max_rank: int) -> np.ndarray:
    """‖ΔW − ΔW_r‖_F / ‖ΔW‖_F for r = 1..max_rank (zeros for a zero ΔW)."""
    total = float((np.asarray(s, dtype=float) ** 2).sum())
    if total <= 0:
        return np.zeros(max_rank)
    return np.sqrt(tail_energy(s, max_rank) / total)


def layer_spectrum(w0: torch.Tensor, w_tuned: torch.Tensor, rtol: float = DEFAULT_RTOL) -> dict:
    delta = w_tuned.double() - w0.double()
    s = singular_values(delta)
    w0_norm = float(torch.linalg.matrix_norm(w0.double()))
    return {
        "shape": list(w0.shape),
        "delta_fro": float(np.sqrt((s**2).sum())),
        "relative_update": float(np.sqrt((s**2).sum()) / w0_norm) if w0_norm else float("nan"),
        "effective_rank": effective_rank(s),
        "numerical_rank": numerical_rank(s, rtol),
        "energy90_rank": energy_rank(s),
        "singular_values": [float(f"{v:.6g}") for v in s],
    }


def spectrum(pairs, rtol: float = DEFAULT_RTOL, max_rank: int = 64) -> dict:
    """Per-layer spectra of ΔW and the whole-model summary and rank lab."""
    from analysis.intruders import one_thread

    with one_thread():
        layers = {name: layer_spectrum(w0, wt, rtol) for name, w0, wt in pairs}
    changed = {n: v for n, v in layers.items() if v["delta_fro"] > 0}
    total_energy = sum(v["delta_fro"] ** 2 for v in layers.values())
    tails = sum((tail_energy(v["singular_values"], max_rank) for v in layers.values()), np.zeros(max_rank))
    model_error = np.sqrt(tails / total_energy) if total_energy > 0 else np.zeros(max_rank)

    def mean(key: str) -> float | None:
        return float(np.mean([v[key] for v in changed.values()])) if changed else None

    return {
        "rtol": rtol,
        "layers": len(layers),
        "changed_layers": len(changed),
        "mean_effective_rank": mean("effective_rank"),
        "mean_numerical_rank": mean("numerical_rank"),
        "mean_energy90_rank": mean("energy90_rank"),
        "mean_relative_update": mean("relative_update"),
        "rank_lab": {
            "ranks": list(range(1, max_rank + 1)),
            "model_relative_error": [float(v) for v in model_error],
        },
        "per_layer": layers,
    }


def main(argv: list[str] | None = None) -> None:
    from analysis.weights import pairs_for_cli

    ap = argparse.ArgumentParser(description="Singular-value spectrum of ΔW for one run, and the rank lab")
    ap.add_argument("run_dir")
    ap.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="numerical rank tolerance (× σ_max)")
    ap.add_argument("--max-rank", type=int, default=64, help="rank lab: r = 1..max-rank")
    args = ap.parse_args(argv)
    wp = pairs_for_cli(args.run_dir, "ΔW spectrum")
    if wp is None:
        return
    start = time.perf_counter()
    sp = spectrum(wp.pairs, args.rtol, args.max_rank)
    print(
        f"{wp.run_id} ({wp.method}): ΔW spectrum, {sp['changed_layers']} of {sp['layers']} layers changed "
        f"({time.perf_counter() - start:.2f} s)"
    )
    print(
        f"  {'layer':55s} {'shape':>12s} {'|dW|/|W0|':>10s} {'eff.rank':>9s} {'num.rank':>9s} {'r(90%)':>7s}"
    )
    for name, v in sp["per_layer"].items():
        print(
            f"  {name:55s} {'x'.join(map(str, v['shape'])):>12s} {v['relative_update']:10.2e} "
            f"{v['effective_rank']:9.1f} {v['numerical_rank']:9d} {v['energy90_rank']:7d}"
        )
    err = sp["rank_lab"]["model_relative_error"]
    picks = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if r <= len(err)]
    print(
        "rank lab (whole model, relative Frobenius error of the best rank-r ΔW): "
        + ", ".join(f"r={r}: {err[r - 1]:.3f}" for r in picks)
    )


if __name__ == "__main__":
    main()
