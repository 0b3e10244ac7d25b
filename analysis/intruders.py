"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
arXiv:2410.21228).

    python -m analysis.intruders <run dir> [--k 10] [--epsilon 0.5] [--peft-check]

Definition used here: for each fine-tuned weight matrix W_tuned (PyTorch `nn.Linear` layout,
out_features x in_features), take its top-k left singular vectors (largest singular values first). Each one
is an *intruder* when its largest absolute cosine similarity with every left singular vector of the
pre-trained W0 is below ε. "Every left singular vector of W0" means the min(out, in) vectors of the thin SVD
(`full_matrices=False`): the rest of a full basis would span W0's null space, an arbitrary basis that
carries no information about W0. Counted over every linear layer except embeddings, pooler and task head.

The *score* of a top-k vector is that largest |cosine|; counts for any ε come from the scores without
another SVD (score < ε). So ε = 0 never counts an intruder and ε > 1 counts all k per layer.

peft's `peft.tuners.lora.intruders.reduce_intruder_dimension` (0.21) finds intruders with the same test
(`(U_merged.T @ U_base).abs().max(dim=1) < ε` over the top-k, thin SVD, same weight layout). Differences:
it looks only at layers that carry a LoRA adapter (others have ΔW = 0 and so, up to SVD round-off, no
intruders), it only accepts LoRA models (here: any method whose weights can be rebuilt), it computes in the
weights' dtype (float32; here float64, so a vector whose score lies within ~1e-6 of ε could fall on the
other side), and its purpose is mitigation (it builds a new adapter), not counting.
`--peft-check` runs it on the same run and prints both counts per layer.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import re
import time
from collections.abc import Iterator

import numpy as np
import torch

from bench import BenchError

DEFAULT_K = 10
DEFAULT_EPSILON = 0.5
EPSILON_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's LAPACK calls on one thread. Small SVDs gain little from threads, and on a loaded machine
    OpenMP threads waiting for each other made them 20-50x slower (here: 5 s vs 0.24 s for a 384x384)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def left_singular_vectors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, S) of the thin SVD in float64 (a wide matrix is decomposed through its transpose: faster)."""
    w = w.double()
    if w.shape[0] < w.shape[1]:
        _, s, vh = torch.linalg.svd(w.T, full_matrices=False)
        return vh.T, s
    u, s, _ = torch.linalg.svd(w, full_matrices=False)
    return u, s


_U0_CACHE: dict[str, torch.Tensor] = {}


def base_vectors(w0: torch.Tensor) -> torch.Tensor:
    """Left singular vectors of a pre-trained weight, cached by content: runs of one base model share them."""
    key = hashlib.sha1(w0.detach().contiguous().cpu().numpy().tobytes()).hexdigest() + str(tuple(w0.shape))
    if key not in _U0_CACHE:
        if len(_U0_CACHE) > 512:
            _U0_CACHE.clear()
        _U0_CACHE[key] = left_singular_vectors(w0)[0]
    return _U0_CACHE[key]


def intruder_scores(
    w0: torch.Tensor, w_tuned: torch.Tensor, k: int = DEFAULT_K, u0: torch.Tensor | None = None
) -> np.ndarray:
    """For each of the top-k left singular vectors of `w_tuned`: its largest |cosine| with any left singular
    vector of `w0` (1 = found in W0, 0 = orthogonal to all of them). `u0` may be passed to reuse W0's SVD."""
    if w0.shape != w_tuned.shape:
        raise BenchError(f"shapes differ: W0 {tuple(w0.shape)} vs W_tuned {tuple(w_tuned.shape)}")
    if torch.equal(w0, w_tuned):  # unchanged layer: its vectors are W0's own (score 1), no SVD needed
        return np.ones(min(k, *w0.shape))
    if u0 is None:
        u0 = base_vectors(w0)
    ut, _ = left_singular_vectors(w_tuned)
    ut = ut[:, :k]
    return (ut.T @ u0).abs().max(dim=1).values.numpy()


def count(scores: np.ndarray, epsilon: float = DEFAULT_EPSILON) -> int:
    """Intruders among the scored vectors: largest |cosine| with W0's vectors below ε."""
    return int((np.asarray(scores) < epsilon).sum())


def layer_scores(pairs, k: int = DEFAULT_K) -> dict[str, list[float]]:
    """{layer: scores of its top-k vectors} for (name, W0, W_tuned) pairs."""
    with one_thread():
        return {name: intruder_scores(w0, wt, k).tolist() for name, w0, wt in pairs}


def summarise(
    scores: dict[str, list[float]], epsilon: float = DEFAULT_EPSILON, grid: tuple[float, ...] = EPSILON_GRID
) -> dict:
    """Counts per layer and in total at ε, and totals over the ε grid."""
    per_layer = {name: count(s, epsilon) for name, s in scores.items()}
    return {
        "epsilon": epsilon,
        "total": sum(per_layer.values()),
        "layers": len(per_layer),
        "layers_with_intruders": sum(1 for v in per_layer.values() if v),
        "per_layer": per_layer,
        "total_by_epsilon": {f"{e:g}": sum(count(s, e) for s in scores.values()) for e in grid},
    }


def peft_counts(run_dir, k: int = DEFAULT_K, epsilon: float = DEFAULT_EPSILON) -> dict[str, int]:
    """Per-layer intruder counts from peft's own helper on the run's (unmerged) LoRA model, layer names
    without peft's `base_model.model.` prefix. Only for LoRA-family runs."""
    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    from bench.model.rebuild import tuned_model

    model = tuned_model(run_dir, merge=False)
    if not isinstance(model, PeftModel) or model.peft_type != "LORA":
        raise BenchError("peft's intruder helper needs a LoRA (peft) model; this run's method is not one")
    lines: list[str] = []
    reduce_intruder_dimension(model, top_k=k, threshold_epsilon=epsilon, logging_sink=lines.append)
    out: dict[str, int] = {}
    for line in lines:
        m = re.match(r"(.+): (?:No intruders|Intruders: (\d+))$", line)
        if m:
            out[m.group(1).removeprefix("base_model.model.")] = int(m.group(2) or 0)
    return out


def main(argv: list[str] | None = None) -> None:
    from analysis.weights import weight_pairs

    ap = argparse.ArgumentParser(description="Count intruder dimensions of one run")
    ap.add_argument("run_dir")
    ap.add_argument("--k", type=int, default=DEFAULT_K, help="top-k singular vectors of W_tuned (default 10)")
    ap.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON, help="|cosine| threshold (default 0.5)")
    ap.add_argument("--peft-check", action="store_true", help="also count with peft's helper and compare")
    args = ap.parse_args(argv)
    try:
        wp = weight_pairs(args.run_dir)
        if not wp.applicable:
            print(f"{wp.run_id}: intruders n/a ({wp.reason})")
            return
        start, cpu = time.perf_counter(), time.process_time()
        scores = layer_scores(wp.pairs, args.k)
        svd_s, svd_cpu_s = time.perf_counter() - start, time.process_time() - cpu
        summary = summarise(scores, args.epsilon)
        print(f"{wp.run_id} ({wp.method}): k={args.k}, epsilon={args.epsilon}")
        for name, n in summary["per_layer"].items():
            print(f"  {name:55s} {n:3d}   min score {min(scores[name]):.3f}")
        print(
            f"total intruders: {summary['total']} in {summary['layers_with_intruders']} of "
            f"{summary['layers']} layers"
        )
        print("total by epsilon: " + ", ".join(f"{e}: {n}" for e, n in summary["total_by_epsilon"].items()))
        print(
            f"time: rebuild weights {wp.load_s:.1f} s, SVDs and scores {svd_s:.2f} s wall "
            f"({svd_cpu_s:.2f} s CPU)"
        )
        if args.peft_check:
            start = time.perf_counter()
            theirs = peft_counts(args.run_dir, args.k, args.epsilon)
            peft_s = time.perf_counter() - start
            ours = summary["per_layer"]
            diff = {n: (ours.get(n), v) for n, v in theirs.items() if ours.get(n) != v}
            print(
                f"peft helper: {sum(theirs.values())} intruders over its {len(theirs)} LoRA layers "
                f"(ours on the same layers: {sum(ours.get(n, 0) for n in theirs)}; {peft_s:.1f} s); "
                + ("per-layer counts agree" if not diff else f"differ on {diff}")
            )
    except BenchError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
