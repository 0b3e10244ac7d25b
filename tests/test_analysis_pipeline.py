"""Analysis on real records: a few smoke runs (tiny random-init BERT, budget=smoke) through the real Hydra
config, then weight rebuild, intruders/spectrum cache, forgetting, tables, plots, claims and the report."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import claims
from analysis.analyse import ANALYSIS_FILE, analyse_run
from analysis.collect import collect
from analysis.html import external_urls
from analysis.tables import method_task_tables, ok_frame, rank_tables
from analysis.weights import weight_pairs
from bench import BenchError
from bench.model.rebuild import read_run, tuned_model
from bench.orchestrate.runner import run
from bench.record import RECORD_FILE
from tests.conftest import GLUE_DIR, compose_cfg

pytestmark = pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set and ../shared/data/glue missing")

STS = ["forgetting=sts", "forgetting.max_pairs=48", "forgetting.max_seq_len=32"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Full FT and LoRA at ranks 2 and 8 with the STS forgetting probe, plus one failed run."""
    results = tmp_path_factory.mktemp("analysis") / "runs"
    for overrides in (["method=full"], ["method=lora", "rank=2"], ["method=lora", "rank=16"]):
        rec = run(compose_cfg(*overrides, *STS, results_dir=results))
        assert rec["status"] == "ok", rec.get("error")
    failed = run(compose_cfg("method=lora", "rank=4", "forgetting=sequential", results_dir=results))
    assert failed["status"] == "error" and "bench.tools.sequential" in failed["error"]
    return results


def _run_dir(results: Path, method: str, rank: int | None = None) -> Path:
    pattern = f"*-{method}-r{rank}-*" if rank else f"*-{method}-s*"
    return next(
        p for p in results.glob(pattern) if json.loads((p / RECORD_FILE).read_text())["status"] == "ok"
    )


def _dev_loss(model, record) -> float:
    from bench.data.encode import make_loader, subset, tokenize
    from bench.data.tasks import get_task, load_task
    from bench.loop.evaluate import predict
    from bench.model import load_tokenizer

    _, cfg = read_run(Path(record["record_dir"]))
    _, dev, _ = load_task(get_task(record["task"]))
    tok = load_tokenizer(cfg.model)
    loader = make_loader(
        tokenize(subset(dev, cfg.budget.eval_samples), tok, cfg.budget.max_seq_len),
        tok,
        cfg.measure.eval_batch_size,
        shuffle=False,
        seed=0,
    )
    return predict(model, loader, torch.device("cpu"), "fp32")[2]


@pytest.mark.parametrize("method,rank", [("full", None), ("lora", 16)])
def test_rebuilt_model_reproduces_the_recorded_eval_loss(runs, method, rank):
    run_dir = _run_dir(runs, method, rank)
    record, _ = read_run(run_dir)
    record["record_dir"] = str(run_dir)
    loss = _dev_loss(tuned_model(run_dir), record)
    assert loss == pytest.approx(record["metrics"]["eval_loss"], abs=1e-5)


def test_weight_pairs_cover_the_encoder_linears_only(runs):
    wp = weight_pairs(_run_dir(runs, "lora", 2))
    names = [n for n, _, _ in wp.pairs]
    assert len(names) == 12 and not any(
        "classifier" in n or "pooler" in n or "embeddings" in n for n in names
    )
    changed = {n for n, w0, wt in wp.pairs if not torch.equal(w0, wt)}
    assert changed == {n for n in names if n.endswith(("query", "value"))}  # LoRA targets q and v only


def test_methods_that_keep_w_are_not_applicable_without_loading(runs, tmp_path):
    fake = tmp_path / "houlsby-run"
    shutil.copytree(_run_dir(runs, "lora", 2), fake)
    rec = json.loads((fake / RECORD_FILE).read_text())
    rec["method"] = "houlsby"
    (fake / RECORD_FILE).write_text(json.dumps(rec))
    wp = weight_pairs(fake)
    assert not wp.applicable and "adapters" in wp.reason
    (fake / ANALYSIS_FILE).unlink(missing_ok=True)
    assert analyse_run(fake)["status"] == "n/a"


def test_analysis_is_cached_per_run(runs):
    run_dir = _run_dir(runs, "lora", 2)
    first = analyse_run(run_dir, force=True)
    assert first["status"] == "ok" and (run_dir / ANALYSIS_FILE).is_file()
    assert first["spectrum"]["changed_layers"] == 4
    assert all(v["numerical_rank"] <= 2 for v in first["spectrum"]["per_layer"].values())
    start = time.perf_counter()
    again = analyse_run(run_dir, epsilon=1.5)  # from the cache; counts at a new ε from the stored scores
    assert time.perf_counter() - start < 0.5
    assert again["intruders"]["total"] == 10 * 12


def test_the_cache_is_keyed_by_what_changes_its_numbers(runs, tmp_path):
    from analysis.analyse import analysis_key, cached_analysis, stored_analysis
    from analysis.collect import load_records

    run_dir = tmp_path / "run"
    shutil.copytree(_run_dir(runs, "lora", 2), run_dir)
    record = json.loads((run_dir / RECORD_FILE).read_text())
    first = analyse_run(run_dir)
    key = first["key"]
    assert (key["k"], key["epsilon"], key["config_hash"], key["ended_at"]) == (10, 0.5, record["config_hash"],
                                                                              record["ended_at"])
    assert key["weights"] and all(size > 0 for size in key["weights"].values())
    # ε alone differs: re-summarised from the stored scores and written under the new key, never left behind
    analyse_run(run_dir, epsilon=1.5)
    on_disk = json.loads((run_dir / ANALYSIS_FILE).read_text())
    assert on_disk["key"] == {**key, "epsilon": 1.5} and on_disk["intruders"]["total"] == 120
    # k differs: recomputed (the scores are of the top-k vectors)
    five = analyse_run(run_dir, k=5)
    assert five["key"]["k"] == 5 and all(len(s) == 5 for s in five["intruders"]["scores"].values())
    assert cached_analysis(run_dir, analysis_key(run_dir, record, k=5)) is not None
    # a file that does not follow analysis.json's schema is not read, whatever its key says
    (run_dir / ANALYSIS_FILE).write_text(json.dumps({**json.loads((run_dir / ANALYSIS_FILE).read_text()),
                                                     "intruders": {"total": "many"}}))
    assert cached_analysis(run_dir, analysis_key(run_dir, record, k=5)) is None
    analyse_run(run_dir, k=5)
    # other weights (here: a file that grew): the cache is not theirs
    weights_file = next((run_dir / "weights").glob("*.safetensors"))
    weights_file.write_bytes(weights_file.read_bytes() + b" ")
    assert cached_analysis(run_dir, analysis_key(run_dir, record, k=5)) is None
    # a re-run's record (another end time): readers of the folder do not show the old analysis as its own
    assert stored_analysis(run_dir, record) is not None
    record["ended_at"] = "2099-01-01T00:00:00+00:00"
    (run_dir / RECORD_FILE).write_text(json.dumps(record))
    assert stored_analysis(run_dir, record) is None
    assert "analysis" not in load_records(run_dir)[0][0]


def test_forgetting_of_the_base_model_against_itself_is_zero(runs):
    from analysis.forgetting import make_probe, probe_config
    from bench.model import load_tokenizer
    from bench.model.rebuild import base_model

    record, cfg = read_run(_run_dir(runs, "full"))
    probe = make_probe(
        probe_config("sts", max_pairs=48, max_seq_len=32), cfg.model, load_tokenizer(cfg.model)
    )
    model = base_model(record, cfg)
    before = probe.measure(model, torch.device("cpu"))
    res = probe.result(before, probe.measure(model, torch.device("cpu")))
    assert res["forgetting"] == 0.0 and -1 <= before <= 1
    # the run measured the same base model before training
    assert record["forgetting"]["before"] == pytest.approx(before, abs=1e-6)
    assert record["forgetting"]["forgetting"] == pytest.approx(before - record["forgetting"]["after"])


def test_forgetting_from_saved_weights_matches_the_in_run_measurement(runs):
    from analysis.forgetting import probe_run

    run_dir = _run_dir(runs, "lora", 16)
    record, _ = read_run(run_dir)
    res = probe_run(run_dir, "sts", max_pairs=48, max_seq_len=32)
    for key in ("before", "after", "forgetting"):
        assert res[key] == pytest.approx(record["forgetting"][key], abs=1e-6), key


def test_mlm_probe_on_a_model_without_mlm_head_is_a_clear_error():
    from analysis.forgetting import make_probe, probe_config
    from bench.model import load_tokenizer

    cfg = compose_cfg()
    with pytest.raises(BenchError, match="no pre-trained masked-LM head"):
        make_probe(probe_config("mlm"), cfg.model, load_tokenizer(cfg.model))


def test_sequential_forgetting_trains_task_b_and_re_evaluates_task_a(runs):
    from bench.tools.sequential import sequential

    res = sequential(_run_dir(runs, "lora", 2), "rte", max_steps=2)
    assert res["task_a"] == "sst2" and res["task_b"] == "rte" and res["steps_b"] == 2
    assert 0 <= res["before"] <= 1 and 0 <= res["after"] <= 1
    assert res["forgetting"] == pytest.approx(res["before"] - res["after"])


def test_tables_plots_and_report(runs, tmp_path):
    from analysis.report import build_report

    df = collect(runs)
    assert set(df["status"]) == {"ok", "error"}
    main = method_task_tables(df)
    assert len(main) == 1
    labels = [row[0] for row in main[0].rows]
    assert labels == ["Full FT", "LoRA (α=2r, r=2)", "LoRA (α=2r, r=16)"]  # LoRA's label names its scaling rule
    assert main[0].header[2] == "SST-2 (Acc)" and main[0].best
    paths = main[0].write(tmp_path / "t", "main")
    assert all(p.stat().st_size > 0 for p in paths) and "\\toprule" in paths[2].read_text()
    rank = rank_tables(df)[0]
    assert [r[2] for r in rank.rows] == ["–", "2", "16"]

    index = build_report(runs, tmp_path / "report")
    text = index.read_text()
    for heading in (
        "Method × task",
        "Rank table",
        "Claims checked",
        "LoRA matches full fine-tuning",
        "LoRA does not forget",
        "merged LoRA adds no latency",
        "intruders grow as rank falls",
        "Runs that did not finish",
        "Random-init test model",
    ):
        assert heading in text, heading
    lab = text[text.index("Rank lab (relative"):]
    assert lab.index("LoRA r=2") < lab.index("LoRA r=16"), "rank-lab rows in rank order, not A-Z"
    plots = tmp_path / "report" / "plots"
    for name in (
        "metric_vs_params",
        "metric_vs_memory",
        "metric_vs_rank",
        "intruders_vs_rank",
        "forgetting_vs_metric",
        "latency",
        "rank_lab",
    ):
        assert (plots / f"{name}.png").stat().st_size > 5000 and (plots / f"{name}.svg").is_file(), name
    assert (tmp_path / "report" / "tables" / "main.tex").is_file()
    assert (tmp_path / "report" / "runs.csv").is_file()
    assert "## Published results: reproduction" in text and "not judged (model differs)" in text
    page = (tmp_path / "report" / "index.html").read_text()  # the same report as one page: real runs' sections
    assert external_urls(page) == [] and page.count('<details id="run-') == 4
    assert "intruders (ε=0.5, top-10)" in page and "Training loss" in page


def _table_column(text: str, after: str, column: int) -> tuple[str, list[str]]:
    """Header cell and the row cells of column `column` of the first Markdown table after the line `after`."""
    lines = text[text.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = [line.strip("|").split(" | ") for line in lines[start:] if line.startswith("|")]
    rows = [[c.strip() for c in r] for r in rows if not r[0].startswith("---")]
    end = next((i for i, line in enumerate(lines[start:]) if not line.startswith("|")), None)
    rows = rows[: end - 1] if end is not None else rows
    return rows[0][column], [r[column] for r in rows[1:]]


def test_report_counts_intruders_at_its_own_epsilon_not_at_the_cached_one(runs, tmp_path):
    """`python -m analysis.analyse <results> --epsilon 1.5`, then `python -m analysis.report <results>` (default
    ε = 0.5): every count the report shows, and its label, is at ε = 0.5. Every score of these tiny runs is
    above 0.9, so ε = 1.5 counts all top-10 vectors of all 12 layers (120 per run) and ε = 0.5 none."""
    from analysis.analyse import main as analyse_main
    from analysis.report import build_report

    analyse_main([str(runs), "--epsilon", "1.5"])
    on_disk = json.loads((_run_dir(runs, "full") / ANALYSIS_FILE).read_text())
    assert on_disk["intruders"]["total"] == 120
    index = build_report(runs, tmp_path / "report")
    text = index.read_text()
    header, cells = _table_column(text, "### Intruder dimensions and ΔW spectrum", 1)
    assert header == "Intruders (ε=0.5)" and cells == ["0", "0", "0"], (header, cells)
    header, cells = _table_column(text, "### Rank table", 4)
    assert header == "Intruders (ε=0.5)" and cells == ["0", "0", "0"], (header, cells)
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("<td>intruders (ε=0.5, top-10)</td><td>0</td>") == 3
    assert "ε=1.5" not in text and "ε=1.5" not in page
    on_disk = json.loads((_run_dir(runs, "full") / ANALYSIS_FILE).read_text())  # the cache now holds what it shows
    assert on_disk["key"]["epsilon"] == 0.5 and on_disk["intruders"]["total"] == 0


def test_report_epsilon_option_reaches_every_count_and_label(runs, tmp_path):
    """`python -m analysis.report <results> --epsilon 1.5`: the counts are at ε = 1.5 and the labels say so."""
    from analysis.report import main as report_main

    report_main([str(runs), "--out", str(tmp_path / "report"), "--epsilon", "1.5", "--table", "none"])
    text = (tmp_path / "report" / "index.md").read_text()
    header, cells = _table_column(text, "### Intruder dimensions and ΔW spectrum", 1)
    assert header == "Intruders (ε=1.5)" and cells == ["120", "120", "120"], (header, cells)
    header, cells = _table_column(text, "### Rank table", 4)
    assert header == "Intruders (ε=1.5)" and cells == ["120", "120", "120"], (header, cells)
    assert "ε=0.5" not in text and "ε = 0.5" not in text and "below 0.5" not in text
    assert "top-10" in text and "ε = 1.5" in text  # the plot caption and the notes name the settings used
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("<td>intruders (ε=1.5, top-10)</td><td>120</td>") == 3


def _frame(rows: list[dict]) -> pd.DataFrame:
    base = {
        "status": "ok",
        "model": "m",
        "budget": "b",
        "main_metric": "accuracy",
        "seed": 1,
        "trainable_params_excl_head": 10,
        "lr": 1e-3,
    }
    return ok_frame(pd.DataFrame([{**base, **r} for r in rows]))


def test_claims_say_which_way_the_figures_point():
    rows = [
        {
            "task": "sst2",
            "method": "full",
            "rank": None,
            "main_metric_value": 0.90,
            "forgetting.forgetting": 0.10,
            "analysis.intruders.total": 2,
        }
    ]
    for r, acc, intr, forget in ((1, 0.80, 9, 0.02), (4, 0.895, 5, 0.03), (16, 0.90, 1, 0.05)):
        rows.append(
            {
                "task": "sst2",
                "method": "lora",
                "rank": r,
                "main_metric_value": acc,
                "forgetting.forgetting": forget,
                "forgetting.probe": "sts",
                "forgetting.before": 0.8,
                "analysis.intruders.total": intr,
                "latency.base.p50_ms": 10.0,
                "latency.base.p95_ms": 10.5,
                "latency.merged.p50_ms": 10.2,
                "latency.unmerged.p50_ms": 12.0,
            }
        )
    verdicts = {c.claim: c.verdict for c in claims.check_all(_frame(rows))}
    assert verdicts == {
        "LoRA matches full fine-tuning": "supported",
        "LoRA does not forget": "not supported",
        "merged LoRA adds no latency": "supported",
        "intruders grow as rank falls": "supported",
        "intruder dimensions track forgetting": "not enough data",  # 3 LoRA runs: 5 needed
    }
    lonely = claims.check_all(_frame([rows[1]]))
    assert lonely[0].verdict == "not enough data" and "full" in lonely[0].lines[0]
    assert lonely[3].verdict == "not enough data"
    noisy = _frame([{**rows[1], "latency.base.p95_ms": 30.0}])
    assert claims.merged_lora_no_latency(noisy).verdict == "not enough data"
    assert np.isfinite(_frame(rows)["metric_pct"]).all()


def test_claims_say_what_their_runs_can_detect_and_how_many_more_would_decide():
    """Three seeds a side with a pooled seed sd of 1 point detect (1.96 + 0.84) x 1 x sqrt(2/3) = 2.29 points; an
    observed 2-point gap needs 2 x (2.8 / 2)^2 = 3.92, so 4 runs a side. One run a side falls back to the dev set's
    sampling sd at the two runs' mean: 100 x sqrt(0.89 x 0.11 / 872) = 1.06 points."""
    assert math.isclose(claims.detectable(1.0, 3, 3), 2.8 * math.sqrt(2 / 3))
    assert claims.runs_needed(1.0, 2.0) == 4 and claims.runs_needed(1.0, 0.0) == 0
    rows = [{"task": "sst2", "method": "full", "rank": None, "seed": s, "main_metric_value": v,
             "data.dev_rows": 872} for s, v in ((1, 0.90), (2, 0.91), (3, 0.89))]
    rows += [{"task": "sst2", "method": "lora", "rank": 8, "seed": s, "main_metric_value": v, "data.dev_rows": 872}
             for s, v in ((1, 0.88), (2, 0.89), (3, 0.87))]
    lines = claims.lora_matches_full(_frame(rows)).lines
    power = next(line for line in lines if "power" in line)
    assert "3 vs 3 run(s)" in power and "sd 1.00 points (seed sd over 4 df)" in power
    assert "under 2.3 points" in power and "the observed -2.0 needs about 4 runs a side" in power
    single = claims.lora_matches_full(_frame([rows[0], rows[3]])).lines
    assert "sd 1.06 points (the 872 dev examples' sampling sd)" in next(line for line in single if "power" in line)
    lonely = claims.lora_matches_full(_frame([rows[3]]))
    assert lonely.verdict == "not enough data" and "three seeds each detect" in lonely.lines[0]


def test_forgetting_and_latency_claims_say_what_their_runs_can_detect():
    """Forgetting: LoRA (3 seeds, +0.5/+1.5/+1.0 points) vs full FT (3 seeds, 2/3/4): pooled seed sd
    sqrt((0.5 + 2) / 4) = 0.79 points, detectable 2.8 x 0.79 x sqrt(2/3) = 1.8 points. Latency: merged / base of
    1.00, 1.02, 1.04 has sd 0.02, so a slowdown under 2.8 x 0.02 / sqrt(3) = 3.2% is not detectable."""
    rows = [{"task": "sst2", "method": m, "rank": r, "seed": i, "main_metric_value": 0.85,
             "forgetting.forgetting": f, "forgetting.probe": "sts", "forgetting.before": 0.8,
             "latency.base.p50_ms": 10.0, "latency.base.p95_ms": 10.2, "latency.merged.p50_ms": 10.0 * lat}
            for m, r, fs, lats in (("lora", 8, (0.005, 0.015, 0.01), (1.0, 1.02, 1.04)),
                                   ("full", None, (0.02, 0.03, 0.04), (1.0, 1.0, 1.0)))
            for i, (f, lat) in enumerate(zip(fs, lats), start=1)]
    forget = claims.lora_does_not_forget(_frame(rows))
    power = next(line for line in forget.lines if "power" in line)
    assert "LoRA r=8 vs full FT forgetting" in power and "3 vs 3 run(s) and sd 0.79 points" in power
    assert "under 1.8 points are not detectable" in power
    latency = claims.merged_lora_no_latency(_frame(rows))
    assert "power: 3 runs, merged / base sd 0.020: a slowdown under 3.2% is not detectable" in latency.lines[1]


def test_intruders_track_forgetting_with_an_interval_over_runs():
    def runs(pairs):
        return _frame([{"task": "sst2", "method": "lora", "rank": r, "seed": i, "main_metric_value": 0.85,
                        "analysis.intruders.total": n, "forgetting.forgetting": f, "forgetting.probe": "sts"}
                       for i, (r, n, f) in enumerate(pairs)])

    tracking = [(r, n, n / 100 + 0.001 * (i % 2)) for i, (r, n) in
                enumerate([(1, 9), (2, 7), (4, 6), (8, 4), (16, 3), (32, 2), (64, 1), (1, 10)])]
    c = claims.intruders_track_forgetting(runs(tracking))
    assert c.verdict == "supported" and "ρ(intruders, forgetting) = +1.00" in c.lines[0]
    rho, low, high = claims.spearman_interval(np.arange(8.0), np.arange(8.0))
    assert (rho, low, high) == pytest.approx((1.0, 1.0, 1.0))  # a monotone relation stays monotone in every draw
    opposed = [(r, n, -n / 100) for r, n, _ in tracking]
    assert claims.intruders_track_forgetting(runs(opposed)).verdict == "not supported"
    few = claims.intruders_track_forgetting(runs(tracking[:4]))
    assert few.verdict == "not enough data" and "4 run(s)" in few.lines[0]
    # 15 runs, all but two with 0 intruders (as the forgetting study found): ρ exists but its interval would be an
    # artefact of the draws that hold a non-zero count, so the claim says not enough
    mostly_zero = [(8, 0, 0.01 * i) for i in range(13)] + [(64, 1, 0.2), (64, 2, 0.3)]
    thin = claims.intruders_track_forgetting(runs(mostly_zero))
    assert thin.verdict == "not enough data" and "2 with a count other than the most common" in thin.lines[0]
    third = claims.intruders_track_forgetting(runs(mostly_zero + [(64, 1, 0.25)]))
    assert third.verdict != "not enough data"
    none = claims.intruders_track_forgetting(_frame([{"task": "sst2", "method": "lora", "rank": 8,
                                                      "main_metric_value": 0.8}]))
    assert none.verdict == "not enough data" and "forgetting=sts" in none.lines[0]


def test_intruder_labels_name_the_epsilon_the_counts_were_made_at_or_say_that_it_differs():
    rows = [{"task": "sst2", "method": "lora", "rank": r, "main_metric_value": 0.8, "analysis.intruders.total": n,
             "analysis.intruders.epsilon": e, "analysis.intruders.k": 10} for r, n, e in ((2, 3, 0.3), (8, 5, 0.5))]
    mixed = rank_tables(_frame(rows))[0]
    assert mixed.header[4] == "Intruders (ε differs between runs: 0.3, 0.5)"
    assert "below ε (differs between runs: 0.3, 0.5)" in mixed.notes[0] and "top-10 " in mixed.notes[0]
    same = rank_tables(_frame([{**r, "analysis.intruders.epsilon": 0.3} for r in rows]))[0]
    assert same.header[4] == "Intruders (ε=0.3)" and "below ε = 0.3" in same.notes[0]
    none = rank_tables(_frame([{k: v for k, v in r.items() if not k.startswith("analysis")} for r in rows]))[0]
    assert none.header[4] == "Intruders" and [r[4] for r in none.rows] == ["–", "–"]


def test_chance_levels_come_from_the_task_facts_which_match_the_offline_dev_sets():
    from analysis.tables import chance_level
    from bench.data.tasks import TASKS, load_task

    with_counts = [t for t in TASKS.values() if t.dev_labels]
    assert {t.name for t in with_counts} == {"sst2", "mrpc", "rte", "qnli", "mnli"}
    for task in with_counts:  # the facts are the offline dev files' label counts
        _, dev, _ = load_task(task, GLUE_DIR)
        assert list(dev["label"].value_counts().sort_index()) == task.dev_labels["counts"], task.name
    assert chance_level("sst2") == (pytest.approx(444 / 872 * 100), True)
    assert chance_level("sst2", 872, "hub:nyu-mll/glue/sst2") == (pytest.approx(50.92, abs=0.01), True)
    assert chance_level("sst2", 32)[1] is False  # a subset: the whole set's share, marked as an estimate
    assert chance_level("cola") == (0.0, True) and chance_level("stsb") == (0.0, True)
    assert chance_level("mnli", 1000, "hub:nyu-mll/glue/mnli") is None  # the offline MNLI dev is another set
    assert chance_level("qqp") is None and chance_level("no-such-task") is None


def test_report_cpu_sweep_preset_composes():
    """The preset's per-method rank grid resolves, and its sweeper params reach Hydra from the +sweep file."""
    from bench.config import compose_config

    lora = compose_config(["+sweep=report_cpu", "method=lora", "rank_i=2"], hydra=True)
    full = compose_config(["+sweep=report_cpu", "method=full", "rank_i=3"])
    assert lora.rank == 16 and full.rank == 8
    assert lora.forgetting.probe == "sts" and lora.model.name == "minilm"
    params = lora.hydra.sweeper.params
    assert set(params["method"].split(",")) >= {
        "full",
        "lora",
        "dora",
        "adalora",
        "bitfit",
        "houlsby",
        "pfeiffer",
        "prompt_tuning",
    }
    assert params["task"] == "sst2,cola" and params["rank_i"] == "0,1,2,3"
