"""The command line as a user meets it: clear one-line errors, and a small sweep that survives a failure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.record import RECORD_FILE
from tests.conftest import REPO, TINY, needs_glue


def bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "BENCH_PROGRESS": "0", **(env or {})}, timeout=600)


@pytest.mark.parametrize("override, choices", [("method=nosuch", "lora"), ("task=imagenet", "sst2"),
                                               ("model=gpt9", "minilm"), ("distributed=dpp", "fsdp")])
def test_unknown_name_is_one_clear_line(override, choices):
    out = bench(override)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown" in lines[0] and choices in lines[0], out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_missing_data_fails_with_the_fix(tmp_path):
    """The data's fingerprint is part of a run's identity, so without data there is no run to record: one line
    with the fix, exit 2, before anything is written."""
    out = bench(*TINY, f"results_dir={tmp_path}", env={"GLUE_DIR": str(tmp_path / "nowhere")})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr + out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "GLUE_DIR" in errors[0] and "nyu-mll/glue" in errors[0]
    assert not list(tmp_path.glob(f"*/{RECORD_FILE}"))


@needs_glue
def test_multirun_2x2_records_a_failure_and_goes_on(tmp_path):
    out = bench("--multirun", *TINY, "method=full,lora", "seed=1,2", "measure.latency=false",
                "save_weights=none", f"results_dir={tmp_path}", env={"BENCH_INJECT_FAULT": "-lora-r8-s2-:error"})
    assert out.returncode == 0, out.stderr[-2000:]
    records = {p.parent.name: json.loads(p.read_text()) for p in Path(tmp_path).glob(f"*/{RECORD_FILE}")}
    assert len(records) == 4
    statuses = sorted(r["status"] for r in records.values())
    assert statuses == ["error", "ok", "ok", "ok"]
    (failed,) = [r for r in records.values() if r["status"] == "error"]
    assert failed["method"] == "lora" and failed["seed"] == 2 and "injected fault" in failed["error"]
    assert (tmp_path / failed["run_id"] / "traceback.txt").is_file()
