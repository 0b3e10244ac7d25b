"""The CI regression smoke: run the `smoke` sweep preset and compare it against the committed CPU baseline.

Metrics (accuracy and eval loss) with compare's default thresholds: fixed seeds on CPU repeat exactly with
the same torch build, so a drop of 0.01 or more is flagged (a few flipped dev sentences are not); memory
and speed only when this machine's CPU string, torch version and thread count match the baseline's, and
then loosely (CI machines are shared: a 3x speed factor, 50% memory). One torch thread, as the baseline:
on a busy 2-core machine two threads per process make a tiny model several times slower (threads spin
waiting for each other), and one thread is as fast when the machine is idle. A config whose hash is not in the baseline
means the effective config changed (a default, a record field of the identity): regenerate the baseline
with the command in results/baselines/cpu-smoke/README.md and commit it with the change."""
from __future__ import annotations

import os
import subprocess
import sys

from analysis.compare import main as compare
from tests.conftest import REPO, needs_glue

BASELINE = REPO / "results" / "baselines" / "cpu-smoke"


@needs_glue
def test_smoke_sweep_matches_the_cpu_baseline(tmp_path, capsys):
    out = subprocess.run([sys.executable, "-m", "bench", "--multirun", "+sweep=smoke", "device=cpu",
                          f"results_dir={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
                         env={**os.environ, "BENCH_PROGRESS": "0", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[sweep] done: 4/4 finished: 4 ran ok" in out.stdout, out.stdout[-2000:]
    code = compare(["--baseline", str(BASELINE), "--current", str(tmp_path / "runs"),
                    "--metric", "main_metric_value", "--metric", "metrics.eval_loss",
                    "--time-factor", "3", "--memory-tol", "0.5"])
    report = capsys.readouterr().out
    assert code == 0, ("regression against results/baselines/cpu-smoke (if the effective config changed on "
                       "purpose, regenerate the baseline: see its README.md):\n" + report)
