"""Intruder dimensions and ΔW spectrum on constructed matrices whose answer is known, and the cross-check
against peft's own intruder helper."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from analysis import intruders, spectrum


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def _base(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W0 = U diag(s) V^T with well separated, decreasing singular values 10 ... 0.01."""
    u, v = _orthogonal(n, seed), _orthogonal(n, seed + 1)
    s = torch.logspace(1, -2, n, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T, u, s, v


def test_rank1_update_orthogonal_to_top_vectors_is_exactly_one_intruder():
    w0, u, _s, v = _base()
    # a direction spread evenly over W0's 32 weakest left singular vectors: |cos| = 1/sqrt(32) ~ 0.18 with
    # every one of W0's vectors, orthogonal to the top ones; 5.0 puts it between s[2] and s[3].
    a = u[:, 32:].sum(1) / np.sqrt(32)
    b = v[:, 32:].sum(1) / np.sqrt(32)
    w_tuned = w0 + 5.0 * torch.outer(a, b)
    scores = intruders.intruder_scores(w0, w_tuned, k=10)
    assert intruders.count(scores, 0.5) == 1
    assert scores.min() < 0.25 and np.sort(scores)[1] > 0.99  # the others are W0's own vectors
    # too small to enter the top 10: no intruder
    assert intruders.count(intruders.intruder_scores(w0, w0 + 1e-3 * torch.outer(a, b), k=10), 0.5) == 0


def test_rank1_update_outside_the_column_space_of_a_tall_matrix():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(96, 32, generator=g, dtype=torch.float64)
    u0, _ = intruders.left_singular_vectors(w0)
    a = torch.randn(96, generator=g, dtype=torch.float64)
    a = a - u0 @ (u0.T @ a)  # orthogonal to every left singular vector of W0
    a /= a.norm()
    _, _, vh = torch.linalg.svd(w0, full_matrices=False)
    w_tuned = w0 + 100.0 * torch.outer(a, vh[-1])  # along W0's weakest input direction
    scores = intruders.intruder_scores(w0, w_tuned, k=10)
    assert intruders.count(scores) == 1 and scores[0] < 0.1


def test_rotations_within_w0s_own_subspace_give_no_intruder():
    w0, u, _, _ = _base()
    q = _orthogonal(64, 7)
    assert intruders.count(intruders.intruder_scores(w0, w0 @ q)) == 0  # right rotation: same U
    angle = np.pi / 6  # rotate the top two left singular vectors into each other by 30 degrees
    rot = torch.eye(64, dtype=torch.float64)
    rot[:2, :2] = torch.tensor([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    left = u @ rot @ u.T
    scores = intruders.intruder_scores(w0, left @ w0)
    assert intruders.count(scores) == 0 and scores.min() == pytest.approx(np.cos(angle), abs=1e-9)


def test_epsilon_limits_and_summary():
    w0, u, _, v = _base()
    a = u[:, 32:].sum(1) / np.sqrt(32)
    w_tuned = w0 + 5.0 * torch.outer(a, v[:, 40])
    scores = {
        "l0": intruders.intruder_scores(w0, w_tuned, 10).tolist(),
        "l1": intruders.intruder_scores(w0, w0, 10).tolist(),
    }
    assert intruders.summarise(scores, 0.0)["total"] == 0
    over = intruders.summarise(scores, 1.01)
    assert over["per_layer"] == {"l0": 10, "l1": 10} and over["total"] == 20
    at = intruders.summarise(scores, 0.5)
    assert at["per_layer"] == {"l0": 1, "l1": 0} and at["layers_with_intruders"] == 1
    grid = at["total_by_epsilon"]
    assert list(grid.values()) == sorted(grid.values())  # monotone in ε


@pytest.mark.parametrize("shape,r", [((64, 64), 5), ((128, 48), 3), ((40, 96), 1)])
def test_known_rank_has_that_rank_and_zero_error_at_that_rank(shape, r):
    g = torch.Generator().manual_seed(r)
    m, n = shape
    qa, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    qb, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    w0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    delta = 0.3 * qa @ qb.T  # rank r, r equal singular values
    sp = spectrum.layer_spectrum(w0, w0 + delta)
    assert sp["numerical_rank"] == r
    assert sp["effective_rank"] == pytest.approx(r, rel=1e-6)
    assert sp["energy90_rank"] == int(np.ceil(0.9 * r))
    err = spectrum.relative_error_by_rank(sp["singular_values"], 8)
    assert err[r - 1] == pytest.approx(0.0, abs=1e-6)
    if r > 1:
        assert err[r - 2] == pytest.approx(np.sqrt(1 / r), rel=1e-6)
    # unequal singular values: numerical rank still r, effective rank below r
    skewed = qa @ torch.diag(torch.logspace(0, -1, r, dtype=torch.float64)) @ qb.T
    s = spectrum.singular_values(skewed)
    assert spectrum.numerical_rank(s) == r and spectrum.effective_rank(s) <= r + 1e-9


def test_rank_lab_matches_an_explicit_truncated_svd():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(48, 32, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    err = spectrum.relative_error_by_rank(s.numpy(), 40)
    for r in (1, 5, 20):
        approx = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        assert err[r - 1] == pytest.approx(float((delta - approx).norm() / delta.norm()), rel=1e-9)
    assert err[31:].max() == pytest.approx(0.0, abs=1e-9)  # rank 32 and above: exact
    sp = spectrum.spectrum(
        [("a", torch.zeros(48, 32), delta.float()), ("b", torch.ones(8, 8), torch.ones(8, 8))]
    )
    assert sp["changed_layers"] == 1 and sp["per_layer"]["b"]["numerical_rank"] == 0
    assert sp["rank_lab"]["model_relative_error"][4] == pytest.approx(err[4], rel=1e-5)


def test_counts_agree_with_peft_intruder_helper():
    """peft's reduce_intruder_dimension on a LoRA model whose B matrices were made large, against ours on the
    merged weights: the same count on every LoRA layer (and some intruders, so the check means something)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=100
    )
    base = BertForSequenceClassification(cfg).eval()
    w0 = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["query", "value", "dense"]))
    g = torch.Generator().manual_seed(1)
    for i, (name, mod) in enumerate(model.named_modules()):
        if name.endswith("lora_B.default"):
            mod.weight.data = torch.randn(mod.weight.shape, generator=g) * (0.02 * (i % 5))
    merged = {
        n.removeprefix("base_model.model."): m.get_base_layer().weight + m.get_delta_weight("default")
        for n, m in model.named_modules()
        if hasattr(m, "get_delta_weight") and hasattr(m, "lora_B")
    }
    ours = {n: intruders.count(intruders.intruder_scores(w0[n], w.detach())) for n, w in merged.items()}
    lines: list[str] = []
    reduce_intruder_dimension(model, top_k=10, threshold_epsilon=0.5, logging_sink=lines.append)
    theirs = {}
    for line in lines:
        m = re.match(r"base_model\.model\.(.+): (?:No intruders|Intruders: (\d+))$", line)
        if m:
            theirs[m.group(1)] = int(m.group(2) or 0)
    assert theirs.keys() == ours.keys() and len(ours) == 11  # 2 x (q, v, attn out, ffn in, ffn out) + pooler
    assert theirs == ours
    assert 0 < sum(ours.values()) < 10 * len(ours)
