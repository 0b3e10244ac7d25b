"""Generation runs (question -> worked solution -> final number) in the report: their own group per (model, task,
budget) in index.md and index.html with the figures of their records, never mixed with a causal LM's classification
runs of the same model and budget; how a record is recognised as a generation run; and the published tables the
report picks for the runs it has."""
from __future__ import annotations

import copy
import re

import pytest
from scipy.stats import binomtest

from analysis import tables
from analysis.collect import task_kind_of, to_frame
from analysis.report import build_report, published_tables
from bench.record import RECORD_FILE, write_json_atomic
from tests import browser
from tests.test_reproduce_peft import GSM_NOTE, gen_record

CPU = dict(model="smollm2", task="gsm_symbolic", examples=40, steps=40, batch=4, budget="gsm_cpu", cuda=False,
           train_rows=160, note=GSM_NOTE, max_seq_len=384, max_new_tokens=256, schedule="linear", warmup=0.06,
           loss_on="answer", chat_template=True, trainable=460_800, adapter_bytes=1_900_000, lr=4e-4)


def glue_as_text(rec: dict) -> dict:
    """The same model and budget on SST-2 answered as text: a classification run of a causal LM."""
    out = copy.deepcopy(rec)
    out["effective_config"]["task"] = {"name": "sst2", "kind": "classification"}
    for key in ("generation_eval", "zero_shot_generation_eval", "few_shot_metrics", "few_shot_generation_eval"):
        out.pop(key, None)
    out.update(task="sst2", run_id="sst2-smollm2-lora-r8-s0", config_hash="sst2".ljust(16, "0"),
               config_group="sst2-smollm2-lora", main_metric_value=0.81, metrics={"accuracy": 0.81, "eval_loss": 0.4},
               zero_shot_metrics={"accuracy": 0.55}, zero_shot_main_metric_value=0.55)
    out["data"] = {"train_rows": 160, "dev_rows": 40, "note": "", "prompt": {"eval_mode": "loglik"}}
    return out


def runs() -> list[dict]:
    lora = [gen_record("lora", correct, rank=8, seed=seed, dropout=0.1, probe="wiki", forgetting=0.06, shots=2,
                       few_shot_correct=1, **CPU) for seed, correct in ((0, 3), (1, 5))]
    for rec, mfu in zip(lora, (0.004, 0.006)):  # a CPU run's MFU is a share of a measured peak
        rec["train_flops"] = {"mfu_ratio": mfu, "hfu_ratio": mfu, "peak_flops_per_s": 1.2e11, "peak_source": "measured",
                              "peak_name": "cpu: 1024x1024 fp32 matmuls, 1 threads", "world_size": 1}
    full = gen_record("full", 4, probe="wiki", forgetting=0.02, shots=2, few_shot_correct=1,
                      **{**CPU, "trainable": 134_515_008, "lr": 2e-5})
    return [*lora, full, glue_as_text(lora[0])]


def _rows(section: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith(f"| {first_cell}")]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of the runs above, records only: its folder."""
    tmp_path = tmp_path_factory.mktemp("generation")
    for rec in runs():
        write_json_atomic(tmp_path / "runs" / rec["run_id"] / RECORD_FILE, rec)
    build_report(tmp_path / "runs", tmp_path / "report", analyse=False)
    return tmp_path / "report"


def test_report_shows_generation_runs_as_their_own_group_with_their_figures(report):
    text = (report / "index.md").read_text()
    section = text.split("## Generation tasks", 1)[1].split("## Published results")[0]
    causal = text.split("## Causal language models", 1)[1].split("## Generation tasks")[0]
    assert "### smollm2, GSM-Symbolic, budget gsm_cpu:" in section and "test questions: 40" in section
    header = next(line for line in section.splitlines() if line.startswith("| Method |"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Method", "Rank", "Accuracy", "95% CI", "Zero-shot", "2-shot", "No answer % (zero-shot → tuned)",
        "Gold-solution loss (zero-shot → tuned)", "Forgetting", "Peak train memory (MiB)", "Train tokens/s", "MFU",
        "Generated tokens/s", "Trainable params", "Runs"]
    [lora] = _rows(section, "LoRA")
    assert lora[1:] == ["8", "10.0 ± 3.5", "0.0 – 41.8 (t, n=2)", "5.0", "2.5", "60 → 2", "0.900 → 0.350",
                        "+0.06 (wiki 1.600 → 1.660)", "2048 ± 0", "6,500", "0.5%‡", "20", "460.8K", "2"]
    [full] = _rows(section, "Full FT")
    ci = binomtest(4, 40).proportion_ci(confidence_level=0.95, method="wilson")
    assert full[1:5] == ["–", "10.0", f"{ci.low * 100:.1f} – {ci.high * 100:.1f}", "5.0"]
    assert full[8] == "+0.02 (wiki 1.600 → 1.620)" and full[-2:] == ["134.5M", "1"]
    assert full[11] == "–" and "‡ marks a measured peak" in section  # a record without train_flops: no MFU
    assert "SST-2" not in section and "GSM-Symbolic" not in causal  # the two kinds of run stay apart
    assert len(_rows(causal, "SST-2 | ")) == 1 and "Method × task (LoRA paper Table 2 style)" not in text
    assert f"Data: {GSM_NOTE}." in section and "prompted with 2 solved training problems" in section
    csv = (report / "tables" / "generation.csv").read_text()
    assert "ci95_low_pct" in csv and "zero_shot_eval_loss_median" in csv
    # --table auto: peft's table for the generation runs, the LoRA paper's for the classification run
    assert "## Published results: reproduction: peft method comparison" in text
    assert "**Not the same setup**: model `smollm2`, not `llama-3.2-3b`" in text
    assert "## Published results: reproduction: LoRA (Hu et al. 2021)" in text
    page = (report / "index.html").read_text()
    assert 'id="generation"' in page and '<table id="generation-0"' in page and "2-shot" in page
    assert re.search(r'<table id="repro-smollm2-gsm_symbolic-\d+-accuracy"', page) and "Not the same setup" in page
    # each run's section: its MFU and HFU beside tokens/s, with the peak they are shares of and where it came from
    assert "0.4% / 0.4% of 120 GFLOP/s (measured: cpu: 1024x1024 fp32 matmuls, 1 threads)" in page
    assert "ours at MFU 0.5%‡ (of a measured peak)" in text  # the published comparison's throughput row


def test_a_generation_run_is_known_from_its_record():
    rec = gen_record("lora", 3, rank=8, **CPU)
    assert task_kind_of(rec) == "generation"
    old = copy.deepcopy(rec)
    del old["effective_config"]["task"]["kind"]  # written before tasks had a kind: its generation evaluation says so
    assert task_kind_of(old) == "generation"
    older = {k: v for k, v in old.items() if not k.endswith("generation_eval")}
    assert task_kind_of(older) == "generation"  # the task's yaml says so
    assert task_kind_of(glue_as_text(rec)) == "classification"
    glue = glue_as_text(rec)
    del glue["effective_config"]["task"]["kind"]
    assert task_kind_of(glue) == "classification"  # GLUE as text, also when eval_mode is generate
    df = to_frame([rec, glue_as_text(rec)])
    assert list(tables.is_generation(df)) == [True, False]
    assert [t.title.split(" · ")[0] for t in tables.generation_tables(df)] == ["Generation: smollm2"]
    assert [len(t.rows) for t in tables.causal_lm_tables(df)] == [1]
    assert published_tables(df) == ["lora-table2", "peft-metamathqa"]
    assert published_tables(to_frame([rec])) == ["peft-metamathqa"]


def test_an_unknown_table_stops_the_report_at_once_in_one_line(tmp_path, capsys):
    from analysis.report import main as report

    rec = gen_record("lora", 3, rank=8, **CPU)
    write_json_atomic(tmp_path / "runs" / rec["run_id"] / RECORD_FILE, rec)
    with pytest.raises(SystemExit) as exit_:
        report([str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--table", "lora-table2,nope"])
    assert exit_.value.code == 2 and not (tmp_path / "report" / "index.md").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown published table 'nope'; choose one of: lora-table2, peft-metamathqa"]


@pytest.mark.slow
@pytest.mark.skipif(browser.chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_generation_page_renders_in_headless_chromium(report, tmp_path):
    page = (report / "index.html").read_text(encoding="utf-8")
    r = browser.render(report / "index.html", tmp_path / "page.png")
    assert r.errors == [], r.errors
    assert browser.count_datatables(r.dom) == page.count("new ITable(") >= 5  # generation, peft's two, GLUE's, runs
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r.dom, re.DOTALL)]
    assert "not the same setup" in cells and not {c for c in cells if c in ("NaN", "nan", "<NA>", "None")}
