"""analysis.reproduce --table peft-metamathqa on constructed generation records: a run of peft's setup gives the
differences and verdicts worked out here; a CPU SmolLM2 run on GSM-Symbolic lists the deviations and is not judged;
one run stands for one experiment; the published file is self-consistent and the peft_metamathqa preset follows its
protocol."""
from __future__ import annotations

import math

import pytest
from scipy.stats import binomtest

from analysis import reproduce as rp
from analysis import reproduce_experiments as ex
from analysis.collect import load_records
from bench.config import compose_config
from bench.record import RECORD_FILE, SCHEMA_VERSION, write_json_atomic
from methods import REGISTRY

TEMPLATE = "Question: {text_a} Think step by step.\nAnswer:"
GSM_NOTE = "generated from reasoning-gym's GSM-Symbolic templates, not GSM8K itself"


def gen_record(method: str, correct: int, *, rank: int | None = None, seed: int = 0, model: str = "llama-3.2-3b",
               task: str = "metamathqa", examples: int = 1319, steps: int = 5000, batch: int = 4, lr: float = 1e-4,
               weight_decay: float = 0.1, dropout: float = 0.0, budget: str = "peft_metamathqa", cuda: bool = True,
               probe: str | None = "wiki", forgetting: float = 0.06, trainable: int = 9_175_040,
               adapter_bytes: int = 36_715_216, train_rows: int = 20_000, note: str = "", max_seq_len: int = 768,
               max_new_tokens: int = 300, schedule: str = "cosine", warmup: float = 0.1, loss_on: str = "all",
               chat_template: bool = False, shots: int = 0, few_shot_correct: int = 0) -> dict:
    """A schema-valid record of a generation run, with the fields analysis.reproduce reads."""
    budget_cfg = {"name": budget, "max_steps": steps, "epochs": None, "batch_size": batch, "grad_accum_steps": 1,
                  "max_seq_len": max_seq_len, "train_samples": train_rows, "eval_samples": None,
                  "max_grad_norm": 1.0, "keep_best": False, "lr_schedule": schedule}
    effective = {"task": {"name": task, "kind": "generation", "prompt": {"template": TEMPLATE}},
                 "model": {"name": model}, "rank": rank, "budget": budget_cfg, "seed": seed,
                 "method": {"name": method, "lr": lr, "warmup_ratio": warmup, "weight_decay": weight_decay,
                            "dropout": dropout},
                 "precision": "bf16" if cuda else "fp32", "device_type": "cuda" if cuda else "cpu"}
    acc = correct / examples
    ci = binomtest(correct, examples).proportion_ci(confidence_level=0.95, method="wilson")
    gen_eval = {"examples": examples, "correct": correct, "accuracy_ci95": [ci.low, ci.high],
                "generated_tokens": examples * 150, "mean_generated_tokens": 150.0, "unfinished_fraction": 0.01,
                "generate_s": 300.0, "eval_wall_s": 320.0, "generated_tokens_per_s": examples * 150 / 300.0,
                "answer_rule": "peft-metamathqa", "samples_file": "samples.jsonl"}
    zero = {"accuracy": 0.05, "no_answer_fraction": 0.6, "eval_loss": 0.9}
    if cuda:
        memory = {"train": {"kind": "cuda", "peak_allocated_bytes": 15 * 2**30, "peak_reserved_bytes": 18 * 2**30},
                  "eval": {"kind": "cuda", "peak_allocated_bytes": 17 * 2**30, "peak_reserved_bytes": 21 * 2**30}}
        peak, peak_kind, device = 15 * 2**30, "cuda_allocated", "NVIDIA L40S"
    else:
        memory = {"train": {"kind": "cpu_rss", "peak_rss_bytes": 2 * 2**30, "peak_rss_scope": "phase"}}
        peak, peak_kind, device = 2 * 2**30, "cpu_rss_phase", "cpu: AMD EPYC (2 cores)"
    rank_part = f"-r{rank}" if rank else ""
    rec = {
        "schema_version": SCHEMA_VERSION, "run_id": f"{task}-{model}-{method}{rank_part}-s{seed}-{lr:g}",
        "config_hash": f"{task}{model}{method}{rank}{seed}{lr}".ljust(16, "0"),
        "config_group": f"{task}-{model}-{method}{rank_part}-{lr:g}", "status": "ok", "task": task, "model": model,
        "method": method, "rank": rank, "seed": seed, "lr": lr, "budget": budget, "effective_config": effective,
        "model_kind": "causal_lm", "main_metric": "accuracy", "main_metric_value": acc,
        "metrics": {"accuracy": acc, "no_answer_fraction": 0.02, "eval_loss": 0.35},
        "higher_is_better": {"accuracy": True, "no_answer_fraction": False, "eval_loss": False},
        "generation_eval": gen_eval, "zero_shot_metrics": zero,
        "zero_shot_generation_eval": {**gen_eval, "correct": 66},
        "train": {"steps": steps, "samples": steps * batch, "wall_s": 700.0, "tokens_per_s": 6500.0},
        "train_tokens_per_s": 6500.0, "memory": memory, "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        "adapter_bytes": adapter_bytes, "trainable_params": trainable, "trainable_params_excl_head": trainable,
        "run_wall_s": 1500.0,
        "provenance": {"device": device, "versions": {"torch": "2.13.0+cu130" if cuda else "2.13.0+cpu",
                                                      "transformers": "5.13.1", "peft": "0.19.2.dev0"}},
        "data": {"train_rows": train_rows, "dev_rows": examples, "note": note,
                 "prompt": {"chat_template": chat_template, "loss_on": loss_on, "eval_mode": "generate",
                            "max_new_tokens": max_new_tokens, "shots": shots}},
    }
    if probe:
        rec["forgetting"] = {"probe": probe, "metric": "mean token cross-entropy" if probe == "wiki" else "perplexity",
                             "higher_is_better": False, "before": 1.6, "after": 1.6 + forgetting,
                             "forgetting": forgetting, "text_source": "enwiki_sample.jsonl (85 articles)"}
    if shots:
        rec["few_shot_metrics"] = {"accuracy": few_shot_correct / examples, "no_answer_fraction": 0.1,
                                   "eval_loss": 0.9}
        rec["few_shot_generation_eval"] = {**gen_eval, "correct": few_shot_correct}
    return rec


def reproductions(tmp_path, records: list[dict]) -> list[ex.ExperimentReproduction]:
    for rec in records:
        write_json_atomic(tmp_path / rec["run_id"] / RECORD_FILE, rec)
    loaded, problems = load_records(tmp_path)
    assert not problems and len(loaded) == len(records)
    return rp.reproduce(rp.frame(loaded), rp.load_published("peft-metamathqa"))


def test_a_run_of_peft_setup_gives_the_differences_and_verdicts(tmp_path):
    lora = gen_record("lora", 650, rank=32, forgetting=0.06)
    full = gen_record("full", 560, lr=1e-5, weight_decay=0.01, trainable=3_212_749_824,
                      adapter_bytes=6_425_499_648)
    [rep] = reproductions(tmp_path, [lora, full])
    assert rep.same_setup and not rep.model_differs and rep.setup_differences == []
    assert rep.verdicts() == {"LoRA r32": rp.REPRODUCED, "Full FT (lr 1e-5)": "not reproduced (below)"}
    acc = rep.accuracy.set_index("experiment")
    row = acc.loc["LoRA r32"]
    assert row["theirs"] == pytest.approx(631 / 1319 * 100) and row["ours"] == pytest.approx(650 / 1319 * 100)
    assert row["diff"] == pytest.approx(19 / 1319 * 100) and row["examples"] == 1319 and row["runs"] == 1
    ci = binomtest(650, 1319).proportion_ci(confidence_level=0.95, method="wilson")
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low * 100, ci.high * 100))
    se_theirs = math.sqrt(631 / 1319 * (1 - 631 / 1319) / 1319) * 100
    se_ours = (ci.high - ci.low) * 100 / (2 * ex.Z95)
    assert row["diff_halfwidth"] == pytest.approx(ex.Z95 * math.hypot(se_ours, se_theirs))
    assert 3.0 < row["diff_halfwidth"] < 4.5  # two accuracies on 1,319 questions near 0.5
    assert acc.loc["Full FT (lr 1e-5)", "diff"] == pytest.approx((560 - 622) / 1319 * 100)

    cost = rep.measures.set_index(["experiment", "measure"])["compare"]
    assert cost[("LoRA r32", "Forgetting (nats/token, after − before)")] == f"{0.06 - 0.049956:+.4f}"
    assert cost[("LoRA r32", "Peak memory (GiB)")] == f"x {21 * 2**30 / 22_292_725_760:.3g}"  # the eval phase's
    assert cost[("LoRA r32", "Train time (s)")] == f"x {(700 + 320) / 942.0:.3g}"
    assert cost[("LoRA r32", "Train tokens/s")] == f"x {6500 / (4_198_051 / 585.2):.3g}"
    assert cost[("LoRA r32", "Trainable parameters")] == "same"
    assert cost[("Full FT (lr 1e-5)", "Checkpoint size")] == "x 1"
    notes = rep.measures.set_index(["experiment", "measure"])["note"]
    assert "other hardware" not in notes[("LoRA r32", "Train time (s)")]
    assert "estimate" in notes[("Full FT (lr 1e-5)", "Checkpoint size")]

    text = "\n".join(rep.deviations)
    for absent in ("model:", "data:", "training:", "test:", "hardware:", "versions:", "learning rate:", "dropout:",
                   "schedule:", "loss:", "prompt", "max length:", "generated tokens:", "rank:"):
        assert absent not in text, absent
    assert "precision: bf16 autocast over fp32 weights" in text and "shared loop: training rows are shuffled" in text
    assert "forgetting: mean token cross-entropy on enwiki_sample.jsonl" in text
    md = rep.markdown()
    assert f"| LoRA r32 | {row['ours_label']} | 47.8 (631/1319) | 49.3 (1,319, n=1) |" in md
    assert row["ours_label"].startswith("LoRA") and row["ours_label"].endswith("r=32)")
    assert "Not the same setup" not in md and "DoRA r32" in md.split("without a run here:")[1]


def test_a_cpu_smollm2_run_on_gsm_symbolic_lists_the_deviations_and_is_not_judged(tmp_path):
    cpu = dict(model="smollm2", task="gsm_symbolic", examples=40, steps=40, batch=4, budget="gsm_cpu", cuda=False,
               train_rows=160, note=GSM_NOTE, max_seq_len=384, max_new_tokens=256, schedule="linear", warmup=0.06,
               loss_on="answer", chat_template=True, trainable=460_800, adapter_bytes=1_900_000, lr=4e-4)
    runs = [gen_record("lora", 3, rank=8, dropout=0.1, probe="ppl", forgetting=1.5, **cpu),
            gen_record("ia3", 2, lr=3e-3, weight_decay=0.0, probe="ppl", forgetting=0.5,
                       **{k: v for k, v in cpu.items() if k != "lr"})]
    [rep] = reproductions(tmp_path, runs)
    assert rep.model_differs and not rep.same_setup
    assert rep.setup_differences == ["model `smollm2`, not `llama-3.2-3b`", "task `gsm_symbolic`, not `metamathqa`",
                                     "40 steps of 4, not 5,000 of 4", "40 test questions, not 1,319"]
    # each run stands for one experiment: LoRA r8 for LoRA r32 (the nearest rank), IA3 at lr 3e-3 for the lr 1e-3 one
    assert rep.verdicts() == {"LoRA r32": rp.experiments.NOT_SAME_SETUP, "IA3 (lr 1e-3)": ex.NOT_SAME_SETUP}
    assert "LoRA r64" in rep.not_run and "IA3 (lr 1e-4)" in rep.not_run and "FRoD" in rep.not_run
    text = "\n".join(rep.deviations)
    for line in ("model: `smollm2`, not peft's `llama-3.2-3b` (meta-llama/Llama-3.2-3B, the base model)",
                 f"data: task `gsm_symbolic` (GSM-Symbolic: {GSM_NOTE}), not peft's `metamathqa`",
                 "training: 40 optimiser steps of 4 examples from 160 training rows; peft: 5,000 steps of 4 from "
                 "20,000 rows",
                 "test: 40 questions; peft: all 1,319 of the GSM8K test set",
                 "max length: 384 tokens; peft: 768", "generated tokens: 256 at most; peft: 300",
                 "warm-up ratio: 0.06; peft: 0.1", "schedule: linear; peft: cosine",
                 "precision: fp32 throughout", "loss: on the answer tokens; peft: on every token",
                 "prompt: wrapped in the tokenizer's chat template", "forgetting: probe ppl, not comparable",
                 "learning rate: LoRA r32: ours 0.0004; peft 0.0001", "learning rate: IA3 (lr 1e-3): ours 0.003",
                 "weight decay: IA3 (lr 1e-3): ours 0; peft 0.01", "dropout: LoRA r32: ours 0.1",
                 "hardware: cpu: AMD EPYC (2 cores); peft: one NVIDIA L40S", "versions: torch 2.13.0+cpu",
                 "rank: LoRA r32 is compared with our r=8 (no r=32 run; ranks run: 8)"):
        assert line in text, line
    cost = rep.measures.set_index(["experiment", "measure"])
    assert cost.loc[("LoRA r32", "Peak memory (GiB)"), "compare"] == "–"
    assert cost.loc[("LoRA r32", "Peak memory (GiB)"), "note"].startswith("not comparable: ours is cpu_rss_phase")
    assert cost.loc[("LoRA r32", "Forgetting (nats/token, after − before)"), "note"] == \
        "not comparable: probe ppl (perplexity)"
    assert "other hardware (ours: cpu: AMD EPYC (2 cores); theirs: NVIDIA L40S)" in \
        cost.loc[("LoRA r32", "Train time (s)"), "note"]
    md = rep.markdown()
    assert "> **Not the same setup**: model `smollm2`, not `llama-3.2-3b`;" in md
    assert "| not the same setup |" in md and "| reproduced |" not in md and "not reproduced" not in md


def test_no_generation_runs_leave_every_experiment_not_run(tmp_path):
    glue = gen_record("lora", 600, rank=32)
    glue["effective_config"]["task"] = {"name": "sst2", "kind": "classification"}
    glue.update(task="sst2", run_id="sst2-llama-lora")
    [rep] = reproductions(tmp_path, [glue])
    assert rep.model is None and rep.accuracy.empty
    assert len(rep.not_run) == len(rp.load_published("peft-metamathqa").rows)
    assert "no ok runs of a generation task" in rep.markdown()
    [glue_rep] = rp.reproduce(rp.frame(load_records(tmp_path)[0]), rp.load_published("lora-table2"))
    assert glue_rep.model == "llama-3.2-3b"  # the classification run goes to the GLUE table, not peft's


def test_cli_prints_the_table_and_an_unknown_name_is_one_line(tmp_path, capsys):
    rec = gen_record("lora", 650, rank=32)
    write_json_atomic(tmp_path / "runs" / rec["run_id"] / RECORD_FILE, rec)
    assert rp.main([str(tmp_path / "runs"), "--table", "peft-metamathqa"]) == 0
    out = capsys.readouterr().out
    assert "### Accuracy" in out and "| reproduced |" in out and "### Forgetting and cost" in out
    assert rp.main([str(tmp_path / "runs"), "--table", "peft-metamath"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert err.startswith("error: unknown published table 'peft-metamath'; choose one of: lora-table2, "
                          "peft-metamathqa")


def test_published_file_is_complete_and_self_consistent():
    pub = rp.load_published("peft-metamathqa")
    assert isinstance(pub, ex.PublishedExperiments) and pub.model == "llama-3.2-3b" and pub.task == "metamathqa"
    assert pub.source["commit"] == "5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40"
    assert pub.environment["gpu"] == "NVIDIA L40S" and pub.measures["memory_max_bytes"]["statistic"] == "reserved"
    labels = [r.label for r in pub.rows]
    assert len(labels) == len(set(labels)) == 30
    for row in pub.rows:
        assert row.checked and row.checked_against and row.file.startswith("results/"), row.label
        assert row.correct == round(row.accuracy * pub.test_examples), row.label  # multiples of 1/1319
        assert abs(row.accuracy - row.correct / pub.test_examples) < 1e-6, row.label
        assert row.method is None or row.method in REGISTRY, row.label
        assert row.train_time_s > row.step_time_s > 0 and row.memory_max_bytes > 2**34, row.label
        assert row.trainable_params > 0 and row.file_size_bytes > 0 and row.lr > 0, row.label
    lora = pub.row("LoRA r32")
    assert (lora.method, lora.rank, lora.correct, lora.memory_max_bytes) == ("lora", 32, 631, 22_292_725_760)
    assert round(pub.train_total_tokens / lora.step_time_s) == 7174  # the notes' tokens/s
    full = pub.row("Full FT (lr 1e-5)")
    assert (full.method, full.rank, full.lr, full.weight_decay) == ("full", None, 1e-5, 0.01)
    assert {r.method for r in pub.rows if r.label.startswith(("IA3", "Prompt tuning", "Lily"))} == \
        {"ia3", "prompt_tuning", "lily"}
    assert [r.label for r in pub.rows if r.method is None] == []
    assert (pub.row("FRoD").method, pub.row("DEFT r32").method, pub.row("DEFT r32").rank) == ("frod", "deft", 32)
    assert pub.row("LoKr r32").environment["peft"] == "0.20.1.dev0"


@pytest.mark.parametrize("method", ["lora", "full", "dora"])
def test_peft_metamathqa_preset_follows_the_published_protocol(method):
    pub = rp.load_published("peft-metamathqa")
    proto = pub.protocol
    cfg = compose_config(["+sweep=peft_metamathqa", f"method={method}"])
    assert cfg.model.name == pub.model and cfg.task.name == pub.task and cfg.seed == proto["seed"]
    assert cfg.budget.max_steps == proto["max_steps"] and cfg.budget.batch_size == proto["batch_size"]
    assert cfg.budget.max_seq_len == proto["max_seq_len"] and cfg.budget.train_samples == proto["train_samples"]
    assert cfg.budget.lr_schedule == proto["schedule"] and cfg.budget.max_grad_norm == proto["grad_norm_clip"]
    assert float(cfg.method.warmup_ratio) == proto["warmup_ratio"] and cfg.precision == proto["precision"]
    assert cfg.lm.max_new_tokens == proto["max_new_tokens"] and cfg.lm.loss_on == proto["loss_on"]
    assert cfg.lm.eval_batch_size == proto["eval_batch_size"]
    assert cfg.task.prompt.template == proto["query_template"].replace("{query}", "{text_a}")
    row = next(r for r in pub.rows if r.method == method)
    assert float(cfg.lr) == row.lr and float(cfg.method.weight_decay) == row.weight_decay
