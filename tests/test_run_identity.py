"""Data and weights in a run's identity: a truncated copy of a data file, or another checkpoint under the same model
name, is another run and is never skipped as done; the record says which rows and files it used. (That today's
configs keep the committed baselines' identity is tests/test_record.py's.)"""
from __future__ import annotations

import shutil

from bench.orchestrate.runner import run
from bench.record import read_record
from tests.conftest import GLUE_DIR, needs_glue

FAST = ("measure.latency=false", "save_weights=none")


def _glue_copy(tmp_path, train_rows: int | None):
    """A GLUE folder holding SST-2 whose train.tsv keeps its header and the first `train_rows` rows."""
    src = f"{GLUE_DIR}/SST-2"
    dst = tmp_path / "glue" / "SST-2"
    dst.mkdir(parents=True)
    shutil.copy(f"{src}/dev.tsv", dst / "dev.tsv")
    with open(f"{src}/train.tsv") as fh:
        lines = fh.readlines()
    (dst / "train.tsv").write_text("".join(lines if train_rows is None else lines[: train_rows + 1]))
    return tmp_path / "glue"


@needs_glue
def test_a_truncated_train_file_is_another_run_and_never_skipped(make_cfg, tmp_path, monkeypatch, capsys):
    short = _glue_copy(tmp_path / "short", 100)
    monkeypatch.setenv("GLUE_DIR", str(short))
    cut = run(make_cfg(*FAST))  # the smoke budget's 64-row subset of the 100 rows
    assert cut["status"] == "ok" and cut["data"]["train_rows"] == 64
    assert cut["data"]["rows_below_expected"] == {"train": [100, 67349]}
    assert "the train file has 100 rows, 67349 expected" in capsys.readouterr().out

    monkeypatch.setenv("GLUE_DIR", str(GLUE_DIR))
    full = run(make_cfg(*FAST))
    assert full["status"] == "ok" and not full.get("skipped") and full["data"]["train_rows"] == 64
    assert full["run_id"] != cut["run_id"] and full["config_hash"] != cut["config_hash"]
    assert full["fingerprints"]["train_rows_sha256"] != cut["fingerprints"]["train_rows_sha256"]
    assert full["fingerprints"]["dev_rows_sha256"] == cut["fingerprints"]["dev_rows_sha256"]
    assert "rows_below_expected" not in full["data"]
    again = run(make_cfg(*FAST))  # the same data: now it is done
    assert again["skipped"] and again["run_id"] == full["run_id"]


@needs_glue
def test_a_record_names_its_fingerprints_and_lock(make_cfg):
    rec = run(make_cfg(*FAST))
    assert read_record(f"{make_cfg().results_dir}/{rec['run_id']}") == {k: v for k, v in rec.items() if k != "skipped"}
    fp = rec["fingerprints"]
    assert len(fp["train_rows_sha256"]) == 64 and len(fp["dev_rows_sha256"]) == 64
    assert fp["model_files_sha256"] is None  # tiny-bert is random-init: its weights follow from config and seed
    assert "vocab.txt" in fp["tokenizer_files"]
    assert rec["effective_config"]["fingerprints"] == {k: v for k, v in fp.items() if k.endswith("_sha256")}
    assert len(rec["provenance"]["lock_sha256"]) == 64 and isinstance(rec["provenance"]["lock_mismatches"], dict)
