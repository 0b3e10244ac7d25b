"""The tuned protocol: the same lr trials for every method, chosen on validation (never on the reported dev set),
the winner over seeds, with bootstrap intervals over examples and seeds."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from analysis.intervals import bootstrap, paired_difference
from analysis.tuned import main as tuned_main
from analysis.tuned import tuned_results
from bench import BenchError
from bench.record import RECORD_FILE, load_records, write_json_atomic
from bench.record.selection import choose, grid
from tests.conftest import REPO, compose_cfg, needs_glue, planned_record


def _outcome(correct: int, n: int = 40) -> dict:
    return {"pred": [1] * correct + [0] * (n - correct), "label": [1] * n}


def _record(method: str, lr: float, seed: int, validation: float, test_correct: int, *overrides: str) -> dict:
    cfg = compose_cfg(f"method={method}", f"lr={lr}", f"seed={seed}", "budget.validation_rows=20", *overrides)
    return planned_record(cfg, status="ok", main_metric="accuracy", main_metric_value=test_correct / 40,
                          metrics={"accuracy": test_correct / 40, "eval_loss": 0.5},
                          validation_main_metric_value=validation, dev_predictions=_outcome(test_correct))


def test_selection_follows_validation_even_where_the_test_set_disagrees(tmp_path):
    # validation prefers lr 1e-3; the (reported) test set would have preferred 3e-4
    trials = [(1e-4, 0.60, 20), (3e-4, 0.70, 36), (1e-3, 0.80, 25)]
    records = [_record("lora", lr, 1, val, test) for lr, val, test in trials]
    records += [_record("lora", 1e-3, seed, 0.79, 26) for seed in (2, 3)]  # the winner over more seeds
    records += [_record("lora", 3e-4, 2, 0.71, 37)]  # a stray second seed at another lr: not a trial (no seed 2 at all)
    for rec in records:
        write_json_atomic(tmp_path / rec["run_id"] / RECORD_FILE, rec)
    (result,) = tuned_results(records, reference=None, n_boot=200)
    assert result.chosen_lr == 1e-3 and result.edge  # 1e-3 is the grid's largest lr
    assert [t["lr"] for t in result.trials] == [1e-4, 3e-4, 1e-3] and result.selection_seeds == [1]
    assert [r["seed"] for r in result.finals] == [1, 2, 3]
    assert math.isclose(result.test.estimate, (25 + 26 + 26) / 120)
    assert tuned_main([str(tmp_path), "--boot", "100"]) == 0


def test_tables_and_claims_see_each_method_at_its_chosen_lr_only():
    """The lr trials a protocol did not choose would drag a method's mean down (or up) if pooled with its seeds."""
    from analysis.tuned import chosen_only

    trials = [_record("full", lr, 1, val, test) for lr, val, test in ((1e-5, 0.6, 20), (3e-5, 0.8, 30))]
    finals = [_record("full", 3e-5, seed, 0.8, 31) for seed in (2, 3)]
    single = [_record("lora", 1e-3, 1, 0.7, 28)]  # one lr: nothing to choose, kept
    kept, dropped = chosen_only(trials + finals + single)
    assert dropped == 1 and [(r["method"], r["lr"], r["seed"]) for r in kept] == [
        ("full", 3e-5, 1), ("full", 3e-5, 2), ("full", 3e-5, 3), ("lora", 1e-3, 1)]


def test_the_choice_rule_ties_to_the_smaller_lr_and_follows_the_metric_direction():
    trials = [{"lr": 1e-3, "validation": 0.8}, {"lr": 1e-4, "validation": 0.8}, {"lr": 3e-4, "validation": None}]
    assert choose(trials, higher_is_better=True)["lr"] == 1e-4
    losses = [{"lr": 1e-3, "validation": 0.4}, {"lr": 1e-4, "validation": 0.3}]
    assert choose(losses, higher_is_better=False)["lr"] == 1e-4
    assert choose([{"lr": 1e-3, "validation": float("nan")}], True) is None
    assert grid(3e-4, [0.3, 1.0, 3.0, 10.0]) == [9e-05, 3e-4, 9e-4, 3e-3]


def test_bootstrap_interval_matches_the_hand_computation():
    # one seed, 400 examples, 300 right: the bootstrap distribution of the mean is ~ normal with sd sqrt(p(1-p)/n)
    p, n = 0.75, 400
    iv = bootstrap([_outcome(300, n)], "accuracy", n_boot=4000)
    half = 1.96 * math.sqrt(p * (1 - p) / n)  # 0.0424
    assert iv.estimate == p and abs(iv.low - (p - half)) < 0.008 and abs(iv.high - (p + half)) < 0.008
    # two examples, one right: the resampled mean is 0, 1/2 or 1 (probabilities 1/4, 1/2, 1/4): 95% interval [0, 1]
    tiny = bootstrap([_outcome(1, 2)], "accuracy", n_boot=2000)
    assert (tiny.estimate, tiny.low, tiny.high) == (0.5, 0.0, 1.0)
    # seeds add their own spread: two seeds at 60% and 90% on the same 400 examples widen the interval
    both = bootstrap([_outcome(240, n), _outcome(360, n)], "accuracy", n_boot=2000)
    assert both.estimate == 0.75 and both.high - both.low > 2 * (iv.high - iv.low)


def test_paired_difference_cancels_what_both_methods_share():
    a = [_outcome(300, 400)]
    same, p = paired_difference(a, a, "accuracy", n_boot=500)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0) and p == 1.0
    better = {"pred": [1] * 310 + [0] * 90, "label": [1] * 400}  # 10 more right, none fewer
    diff, p = paired_difference([better], a, "accuracy", n_boot=500)
    assert math.isclose(diff.estimate, 10 / 400) and diff.low > 0 and p < 0.01
    with pytest.raises(ValueError, match="different test examples"):
        paired_difference(a, [_outcome(20, 40)], "accuracy", n_boot=10)


def test_a_bad_protocol_value_is_one_line():
    from omegaconf import OmegaConf

    from bench.orchestrate.protocol import run_protocol

    cfg = compose_cfg("+protocol=tuned", "protocol.lr_factors=[0,1]")
    with pytest.raises(BenchError, match=r"protocol\.lr_factors"):
        run_protocol(cfg, run_one=lambda c: pytest.fail("nothing may run"))
    assert OmegaConf.select(cfg, "protocol.validation_rows") == 1000  # sst2's suggested split


@needs_glue
def test_the_protocol_runs_trials_then_seeds_and_analysis_makes_the_same_choice(tmp_path):
    runs = tmp_path / "runs"
    out = subprocess.run(
        [sys.executable, "-m", "bench", "+protocol=tuned", "model=tiny-bert", "budget=smoke", "method=lora",
         "protocol.lr_factors=[1,3]", "protocol.seeds=[1,2]", "protocol.validation_rows=32", f"results_dir={runs}",
         "measure.latency=false", "save_weights=none", f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "BENCH_PROGRESS": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(list(runs.glob("*/record.json"))) == 3  # 2 trials at seed 1, then seed 2 at the chosen lr
    chosen = next(line for line in out.stdout.splitlines() if "chosen lr" in line)
    assert "skip " in out.stdout  # the selection seed's run at the chosen lr is the trial's, not repeated
    (result,) = tuned_results(load_records(runs)[0], None, n_boot=100)
    assert f"chosen lr {result.chosen_lr:g}" in chosen
    assert [r["seed"] for r in result.finals] == [1, 2] and result.test is not None
    assert np.isfinite(result.test.low)


def test_each_arm_is_its_own_row_named_by_rank_and_targets():
    """A target-modules or rank study's arms are separate tuning groups, labelled so that rows can be told apart."""
    arms = [_record("lora", 1e-3, 1, 0.8, 30), _record("lora", 1e-3, 1, 0.7, 28, "rank=2"),
            _record("lora", 1e-3, 1, 0.9, 33, "method.target_modules=[query,key,value]")]
    labels = sorted(t.label for t in tuned_results(arms, reference="lora", n_boot=50))
    assert labels == ["LoRA (α=2r), r=2", "LoRA (α=2r), r=8", "LoRA (α=2r), r=8, on query/key/value"]
