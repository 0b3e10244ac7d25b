"""The report's HTML page (analysis.html via analysis.report) from constructed records: one self-contained file
(no external URL, figures inlined) holding the expected tables and sections; and, marked slow, the page opened
in headless Chromium: the DataTables render, the plots load, no console errors, a screenshot saved. And the report
of the committed 58-method baseline (records without saved weights), built with every model and dataset loader and
the network refusing."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket

import pytest

from analysis.analyse import ANALYSIS_FILE
from analysis.html import external_urls
from analysis.report import build_report
from bench.record import CURVE_FILE, RECORD_FILE, SCHEMA_VERSION, config_group, write_json_atomic
from tests import browser
from tests.conftest import GLUE_DIR, REPO

pytestmark = pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set and ../shared/data/glue missing")

RUNS = [("sst2", "full", None, 1, 0.84), ("sst2", "full", None, 2, 0.85), ("sst2", "lora", 8, 1, 0.82),
        ("sst2", "lora", 8, 2, 0.83), ("sst2", "bitfit", None, 1, 0.80), ("cola", "full", None, 1, 0.30),
        ("cola", "lora", 8, 1, 0.25)]


def record(task, method, rank, seed, value, status="ok"):
    params = {"full": 22_000_000, "lora": 74_000, "bitfit": 30_000}.get(method, 0)
    effective = {"task": {"name": task}, "model": {"name": "minilm"},
                 "method": {"name": method, "lr": 4e-4, "warmup_ratio": 0.06},
                 "rank": rank, "seed": seed, "budget": {"name": "default", "max_steps": 400, "batch_size": 32,
                                                        "grad_accum_steps": 1, "max_seq_len": 128, "keep_best": False}}
    rank_part = f"-r{rank}" if rank else ""
    rec = {"schema_version": SCHEMA_VERSION, "run_id": f"{task}-minilm-{method}{rank_part}-s{seed}", "status": status,
           "config_hash": f"{task}{method}{rank}{seed}".ljust(16, "0"), "config_group": config_group(effective),
           "task": task, "model": "minilm", "method": method, "rank": rank, "seed": seed, "lr": 4e-4,
           "budget": "default", "effective_config": effective, "provenance": {"device": "cpu: Test CPU"}}
    if status != "ok":
        return {**rec, "error": "RuntimeError: out of patience"}
    metric = "accuracy" if task == "sst2" else "matthews_correlation"
    return {**rec, "main_metric": metric, "main_metric_value": value, "metrics": {metric: value},
            "trainable_params_excl_head": params, "trainable_params": params + 148_000,
            "data": {"train_rows": 12_800, "note": ""}, "train": {"steps": 400}, "train_samples_per_s": 50.0,
            "memory": {"train": {"kind": "cpu_rss", "peak_rss_bytes": 900e6 + params * 16}},
            "latency": {"base": {"p50_ms": 10.0, "p95_ms": 10.4}, "unmerged": {"p50_ms": 11.0, "p95_ms": 11.5},
                        "merged": {"p50_ms": 10.1, "p95_ms": 10.5}}}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    runs = root / "runs"
    recs = [record(*r) for r in RUNS] + [record("sst2", "dora", 8, 1, 0, status="error")]
    for rec in recs:
        write_json_atomic(runs / rec["run_id"] / RECORD_FILE, rec)
        if rec["status"] == "ok":
            (runs / rec["run_id"] / CURVE_FILE).write_text(
                "step,loss,lr,elapsed_s\n10,0.69,1e-4,1.0\n20,0.61,2e-4,2.0\n30,0.52,3e-4,3.0\n")
    build_report(runs, root / "report", analyse=False)
    return root / "report" / "index.html", len(recs)


def test_the_page_is_one_file_with_no_external_urls_and_the_expected_sections(report):
    page_path, n_records = report
    page = page_path.read_text(encoding="utf-8")
    assert external_urls(page) == []
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", page)  # scripts and styles inline
    images = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert len(images) == 2 * 2 + len(RUNS)  # Pareto (params, memory) per task, one loss curve per ok run
    for table_id in ("main-0", "repro-minilm", "failed-runs", "runs-index"):  # each a DataTable, once
        assert len(re.findall(rf'<table id="{table_id}[^"]*"', page)) == 1, table_id
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # a repeated id would leave a table uninitialised
    for heading in ("Method × task", "Reproduction of published results", "Pareto: metric vs trainable parameters",
                    "Claims checked", "Runs that did not finish", '"LoRA matches full fine-tuning"'):
        assert heading in page, heading
    assert page.count('<figure class="pareto"') == 4 and 'data-task="cola"' in page
    assert page.count('<details id="run-') == n_records and "RuntimeError: out of patience" in page
    assert "not judged (model differs)" in page and "The model differs from the paper" in page
    assert "itables-2.9.1-ready" in page or "_itables_" in page  # the DataTables bundle is in the page


MISSING_TEXTS = ("NaN", "nan", "<NA>", "&lt;NA&gt;", "None")


def datatables(page: str) -> dict[str, tuple[list[list], list[list[str]], str]]:
    """{table id: (rows of its data, rows of cells of its copy for pages without JavaScript, its DataTables
    arguments)} for every itables table on the page."""
    out = {}
    for table_id in re.findall(r'<table id="([^"]+)" hidden', page):
        block = page[page.index(f'<table id="{table_id}"'):]
        block = block[: block.index("new ITable(")]
        data = json.loads(json.loads(re.search(r'"data_json": ("(?:[^"\\]|\\.)*")', block).group(1)))
        copy = re.search(rf'<div id="{re.escape(table_id)}_fallback">(.*?)</div>', block, re.DOTALL).group(1)
        body = copy[copy.index("<tbody>"):]
        cells = [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.DOTALL)]
                 for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.DOTALL)]
        out[table_id] = (data, cells, block)
    return out


def _flat(rows: list) -> list:
    return [v for row in rows for cell in row for v in (cell if isinstance(cell, list) else [cell])]


def assert_no_missing_text(page: str) -> None:
    """No table cell of the page says NaN, <NA> or None, in its data or in its copy without JavaScript."""
    tables = datatables(page)
    assert tables
    for table_id, (data, cells, _) in tables.items():
        shown = [str(v) for v in _flat(data) if v is not None] + [c for row in cells for c in row]
        bad = sorted({v for v in shown if v in MISSING_TEXTS or v.startswith("___")})
        assert not bad, (table_id, bad)


def test_empty_cells_show_a_dash_not_nan(report):
    page_path, _ = report
    page = page_path.read_text(encoding="utf-8")
    assert_no_missing_text(page)
    data, cells, args = datatables(page)["main-0"]
    header = re.findall(r"<th[^>]*>(?:<sup>.*?</sup>)?([^<]*)</th>", args)
    sd = header.index("SST-2 (Acc) sd")
    bitfit = next(i for i, row in enumerate(data) if row[0] == "BitFit")  # one seed: no std
    assert data[bitfit][sd] is None and cells[bitfit][sd] == ""  # a null: DataTables shows "–" (the slow test)


@pytest.mark.slow
@pytest.mark.skipif(browser.chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_page_renders_in_headless_chromium(report, tmp_path):
    page_path, _ = report
    page = page_path.read_text(encoding="utf-8")
    shot = tmp_path / "report.png"
    r = browser.render(page_path, shot)
    assert r.errors == [], r.errors
    assert browser.count_datatables(r.dom) == page.count("new ITable(") >= 4  # every table initialised
    assert "dt-orderable-asc" in r.dom  # sortable column headers
    assert not re.search(r'<table id="[^"]+"[^>]*hidden', r.dom)  # every table shown (its static copy hidden)
    assert r.dom.count('src="data:image/png;base64,') == page.count('src="data:image/png;base64,')
    assert r.screenshot is not None and r.screenshot.stat().st_size > 50_000
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r.dom, re.DOTALL)]
    assert "–" in cells and not {c for c in cells if c in MISSING_TEXTS}  # empty cells as DataTables shows them
    if os.environ.get("PEFT_BENCH_SCREENSHOT"):  # keep the screenshot to look at
        shutil.copy(r.screenshot, os.environ["PEFT_BENCH_SCREENSHOT"])


BASELINE = REPO / "results" / "baselines" / "all-methods-minilm"


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"the report {what}")

    return refuse


@pytest.fixture(scope="module")
def baseline_report(tmp_path_factory):
    """The report of a copy of the committed 58-method baseline (its records say `weights_dir`, but no run folder
    kept its weights), built without GLUE_DIR, with the model, tokenizer and dataset loaders and the network
    refusing. Returns (root, stderr)."""
    import datasets
    import transformers

    root = tmp_path_factory.mktemp("baseline")
    shutil.copytree(BASELINE, root / "runs", ignore=shutil.ignore_patterns(ANALYSIS_FILE))  # records only
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("GLUE_DIR", raising=False)
        mp.setattr("bench.model.load_model", _refuse("loaded a model"))
        mp.setattr("bench.model.load_tokenizer", _refuse("loaded a tokenizer"))
        mp.setattr("bench.data.tasks.load_task", _refuse("loaded a dataset"))
        mp.setattr(datasets, "load_dataset", _refuse("loaded a dataset"))
        mp.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(_refuse("loaded a model")))
        mp.setattr(socket, "getaddrinfo", _refuse("looked up a host"))
        mp.setattr(socket.socket, "connect", _refuse("opened a connection"))
        with contextlib.redirect_stderr(err):
            build_report(root / "runs", root / "report")
    return root, err.getvalue()


def test_a_report_from_records_without_weights_loads_no_model_no_dataset_and_no_hub(baseline_report):
    root, err = baseline_report
    assert len(list((root / "runs").rglob(RECORD_FILE))) == 58
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["weights analysis: 0 of 58 ok runs have saved weights; the 58 without are skipped (n/a anyway "
                     "for 7: their method leaves W unchanged or does not merge)"], err
    assert not list((root / "runs").rglob(ANALYSIS_FILE))  # nothing written into the records' folders
    text = (root / "report" / "index.md").read_text()
    assert "Chance level (majority class of the dev set; 0 for correlations): SST-2 50.9." in text  # from facts
    assert text.count("not analysed (no saved weights") == 51 and text.count("| n/a: ") == 7


def test_every_table_shows_every_row(baseline_report):
    root, _ = baseline_report
    page = (root / "report" / "index.html").read_text(encoding="utf-8")
    tables = datatables(page)
    data, cells, args = tables["main-0"]
    assert len(data) == len(cells) == 58  # one row per method, none left for a second page or dropped
    assert '"paging": false' in args
    assert len(tables["runs-index"][0]) == len(tables["runs-index"][1]) == 58
    assert_no_missing_text(page)


@pytest.mark.slow
@pytest.mark.skipif(browser.chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_baseline_page_shows_all_58_methods_in_headless_chromium(baseline_report):
    root, _ = baseline_report
    r = browser.render(root / "report" / "index.html")
    assert r.errors == [], r.errors
    table = r.dom[r.dom.index('<table id="main-0"'):]
    body = table[table.index("<tbody"):table.index("</tbody>")]
    assert body.count("<tr") == 58
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", body, re.DOTALL)]
    assert cells.count("–") >= 58 and not {c for c in cells if c in MISSING_TEXTS}  # one seed: no sd, a dash
