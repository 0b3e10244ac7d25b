"""A smoke run through the real Hydra config: the record exists, is complete, and has the right types."""
from __future__ import annotations

import json
from pathlib import Path

from bench.orchestrate.runner import run
from bench.record import RECORD_FILE
from tests.conftest import needs_glue


@needs_glue
def test_smoke_run_writes_complete_record(make_cfg):
    rec = run(make_cfg("method=lora", "rank=4"))
    assert rec["status"] == "ok", rec.get("error")
    on_disk = json.loads((Path(make_cfg().results_dir) / rec["run_id"] / RECORD_FILE).read_text())
    assert on_disk["config_hash"] == rec["config_hash"] and on_disk["status"] == "ok"
    for key in ("accuracy", "eval_loss"):
        assert isinstance(on_disk["metrics"][key], float)
    assert 0 < on_disk["trainable_params_excl_head"] < on_disk["trainable_params"] < on_disk["total_params"]
    assert on_disk["train"]["samples_per_s"] > 0 and on_disk["train_tokens_per_s"] > 0
    assert on_disk["memory"]["train"]["kind"] in ("cpu_rss", "cuda")
    lat = on_disk["latency"]
    for variant in ("base", "unmerged", "merged"):
        assert 0 < lat[variant]["p50_ms"] <= lat[variant]["p95_ms"]
    assert on_disk["merged_max_abs_logit_diff"] < 1e-4
    assert 0 < on_disk["adapter_bytes"] < on_disk["full_model_bytes"]
    assert on_disk["provenance"]["versions"]["torch"]
    assert on_disk["model_note"].startswith("random-init")
