"""Scale-out through Hydra launchers, offline: joblib runs a 4-run sweep on 2 worker processes; submitit's
local mode runs a 2-run sweep as separate jobs; both end with the sweep summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.record import RECORD_FILE
from tests.conftest import REPO, needs_glue

TINY_SWEEP = ["--multirun", "model=tiny-bert", "budget=smoke", "measure.latency=false", "save_weights=none"]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          check=False,
                          env={**os.environ, "BENCH_PROGRESS": "0", "OMP_NUM_THREADS": "1"}, timeout=300)


def records(folder) -> list[dict]:
    return [json.loads(p.read_text()) for p in folder.glob(f"*/{RECORD_FILE}")]


@needs_glue
def test_joblib_runs_four_runs_on_two_workers(tmp_path):
    out = bench(*TINY_SWEEP, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=full,lora", "seed=1,2",
                f"results_dir={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Joblib.Parallel(n_jobs=2" in out.stderr + out.stdout
    recs = records(tmp_path / "runs")
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs)
    # two worker processes, neither the launcher, each starting every run in a process of its own
    assert len({r["provenance"]["parent_pid"] for r in recs}) == 2
    assert len({r["provenance"]["pid"] for r in recs}) == 4
    assert "[sweep] done: 4/4 finished: 4 ran ok, 0 skipped (ok record exists), 0 failed, 0 left" in out.stdout


@needs_glue
def test_submitit_local_mode_runs_each_run_as_a_job(tmp_path):
    out = bench(*TINY_SWEEP, "hydra/launcher=submitit_local", "seed=1,2", f"results_dir={tmp_path / 'runs'}",
                f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert out.returncode == 0, out.stderr[-2000:]
    recs = records(tmp_path / "runs")
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs)
    assert len({r["provenance"]["pid"] for r in recs}) == 2
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))  # submitit's own job logs
    assert "[sweep] done: 2/2 finished: 2 ran ok" in out.stdout
