"""The validation split (budget.validation_rows): carved from train, fixed, disjoint from train and dev, the same for
every method and seed, and what evaluations during training read; keep_best refuses to run without it."""
from __future__ import annotations

import pandas as pd
import pytest

from bench import BenchError
from bench.data import read_rows
from bench.data.encode import carve_validation
from bench.data.tasks import get_task
from bench.plan import plan
from tests.conftest import compose_cfg, needs_glue


def _texts(df: pd.DataFrame) -> set[str]:
    return set(df["text_a"].astype(str) + "\t" + df["text_b"].fillna("").astype(str))


def _frame(texts: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"text_a": texts, "text_b": None, "label": [i % 2 for i in range(len(texts))]})


def test_carved_rows_are_disjoint_by_text_and_nested_by_size():
    train = _frame([f"s{i}" for i in range(200)] + ["dup", "dup", "in dev"])
    dev = _frame(["in dev", "other"])
    rest, val = carve_validation(train, dev, 50)
    assert len(val) == 50 and not _texts(val) & _texts(dev) and not _texts(val) & _texts(rest)
    assert len(rest) + len(val) <= len(train) and "in dev" not in set(val["text_a"])
    assert list(val["text_a"]) == sorted(val["text_a"], key=lambda t: list(train["text_a"]).index(t))  # file order
    smaller = carve_validation(train, dev, 20)[1]
    assert _texts(smaller) <= _texts(val)  # the first 20 of the same permutation
    again = carve_validation(train, dev, 50)[1]
    pd.testing.assert_frame_equal(val, again)


@needs_glue
def test_sst2_validation_is_disjoint_and_the_same_for_every_method_and_seed():
    rows = {}
    for method, seed in (("lora", 1), ("full", 2), ("bitfit", 3)):
        cfg = compose_cfg("task=sst2", f"method={method}", f"seed={seed}", "budget.validation_rows=300",
                          "budget.train_samples=2000", "budget.eval_samples=null")
        rows[method] = read_rows(get_task("sst2"), cfg.budget)
    val = rows["lora"].validation
    assert len(val) == 300
    for r in rows.values():
        pd.testing.assert_frame_equal(r.validation, val)
        pd.testing.assert_frame_equal(r.train, rows["lora"].train)
    assert not _texts(val) & _texts(rows["lora"].train) and not _texts(val) & _texts(rows["lora"].dev)
    assert len(rows["lora"].dev) == 872  # the reported split is untouched
    no_split = read_rows(get_task("sst2"), compose_cfg("task=sst2", "budget.train_samples=2000").budget)
    assert no_split.validation is None and not no_split.train.equals(rows["lora"].train)


def test_keep_best_without_a_validation_split_is_refused():
    with pytest.raises(BenchError, match="selects on the validation split, never on dev"):
        plan(compose_cfg("budget.keep_best=true", "budget.eval_every_steps=2"))
    plan(compose_cfg("budget.keep_best=true", "budget.eval_every_steps=2", "budget.validation_rows=20"))


def test_a_validation_split_of_half_the_training_rows_is_refused():
    with pytest.raises(BenchError, match="half or more"):
        read_rows(get_task("rte"), compose_cfg("task=rte", "budget.validation_rows=1500").budget)


def test_neutral_validation_rows_leave_the_identity_alone_and_a_split_changes_it():
    base = plan(compose_cfg()).effective
    from bench.record.identity import config_hash

    without_key = {**base, "budget": {k: v for k, v in base["budget"].items() if k != "validation_rows"}}
    assert config_hash(base) == config_hash(without_key)  # finished runs from before the knob keep their ids
    split = plan(compose_cfg("budget.validation_rows=20")).effective
    assert config_hash(split) != config_hash(base)


def test_paper_budget_carves_the_tasks_suggested_split():
    cfg = compose_cfg("budget=paper", "task=rte", tiny=False)
    assert int(cfg.budget.validation_rows) == get_task("rte").validation_rows == 249 and cfg.budget.keep_best


@needs_glue
def test_a_run_selects_on_validation_and_reports_dev(make_cfg, monkeypatch):
    """keep_best's evaluations read the validation rows (their count is validation's, not dev's); the record says which
    split selected, fingerprints it, and carries the trained model's validation metrics beside the dev ones."""
    from bench.loop import evaluate as ev
    from bench.orchestrate.runner import run

    seen: list[int] = []
    real = ev.evaluate

    def counting(model, loader, *args, **kwargs):
        seen.append(len(loader.dataset))
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr("bench.recipe.evaluate", counting)
    rec = run(make_cfg("measure.latency=false", "save_weights=none", "budget.validation_rows=24",
                       "budget.eval_samples=40", "budget.eval_every_steps=2", "budget.keep_best=true"))
    assert rec["status"] == "ok", rec.get("error")
    assert rec["data"]["validation_rows"] == 24 and rec["data"]["selection_split"] == "validation"
    assert len(rec["fingerprints"]["validation_rows_sha256"]) == 64
    evals = rec["train"]["evals"]
    assert evals and rec["train"]["best_step"] in {e["step"] for e in evals}
    assert seen.count(24) == len(evals) + 1  # every evaluation during training, and the final validation metrics
    assert seen.count(40) == 2  # dev: the reported evaluations only, unmerged and merged (LoRA merges)
    assert set(rec["validation_metrics"]) >= {"accuracy", "eval_loss"}
    assert rec["validation_main_metric_value"] == rec["validation_metrics"]["accuracy"]
    pred, label = rec["dev_predictions"]["pred"], rec["dev_predictions"]["label"]
    assert len(pred) == len(label) == 40  # each dev example's outcome: what intervals resample
    assert sum(p == g for p, g in zip(pred, label)) / 40 == rec["metrics"]["accuracy"]
