"""Sweeps survive faults and resume: a raise, a NaN and a SIGKILL in one 4-run sweep, then the same command
again. Plus the runner's resume rules, OOM retry and locks, in-process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.orchestrate import lock as run_lock
from bench.orchestrate import oom, runner
from bench.orchestrate.runner import run
from bench.record import RECORD_FILE, read_record
from tests.conftest import REPO, needs_glue

SWEEP = ["--multirun", "model=tiny-bert", "budget=smoke", "measure.latency=false", "save_weights=none",
         "seed=1,2,3,4"]
FAULTS = "-s2-:error,-s3-:nan,-s4-:kill"  # seed 1 ends ok


def bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          check=False,
                          env={**os.environ, "BENCH_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


def records(results: Path) -> dict[int, dict]:
    return {r["seed"]: r for r in (json.loads(p.read_text()) for p in results.glob(f"*/{RECORD_FILE}"))}


@needs_glue
def test_four_run_sweep_with_raise_nan_kill_then_resume(tmp_path):
    """Each run of a sweep is its own process (bench/orchestrate/isolate.py): the SIGKILLed run becomes an error
    record and the sweep goes on. Four runs: one ok run shows the skip as well as three, and each run is a process
    start of ~15 s."""
    results = tmp_path / "runs"
    args = [*SWEEP, f"results_dir={results}"]
    first = bench(*args, f"hydra.sweep.dir={tmp_path / 'sweep1'}", env={"BENCH_INJECT_FAULT": FAULTS})
    assert first.returncode == 0, first.stderr[-2000:]  # the sweep finished despite the SIGKILL

    recs = records(results)
    assert sorted(recs) == [1, 2, 3, 4]
    assert recs[1]["status"] == "ok"
    assert recs[2]["status"] == "error" and "injected fault" in recs[2]["error"]
    assert recs[3]["status"] == "nan" and "nan" in recs[3]["error"]
    assert recs[4]["status"] == "error" and "killed by SIGKILL" in recs[4]["error"] and recs[4]["exit_code"] == -9
    assert (results / recs[2]["run_id"] / "traceback.txt").is_file()
    for path in results.rglob("*"):  # no half-written or temporary file anywhere, no lock left
        assert not path.name.endswith(".tmp") and path.name != ".lock", path
        if path.name == "record.json":
            assert read_record(path) is not None, path
    assert "[sweep] 4/4 finished: 1 ran ok, 0 skipped (ok record exists), 3 failed, 0 left" in first.stdout
    ok_before = {1: ((results / recs[1]["run_id"] / "record.json").stat().st_mtime_ns, recs[1]["started_at"])}

    second = bench(*args, f"hydra.sweep.dir={tmp_path / 'sweep2'}")
    assert second.returncode == 0, second.stderr[-2000:]
    after = records(results)
    assert sorted(after) == [1, 2, 3, 4] and all(r["status"] == "ok" for r in after.values())
    for seed, (mtime, started) in ok_before.items():  # the ok run was not redone
        assert (results / after[seed]["run_id"] / "record.json").stat().st_mtime_ns == mtime
        assert after[seed]["started_at"] == started and after[seed]["attempt"] == 1
        assert f"skip {after[seed]['run_id']}: an ok record exists" in second.stdout
    for seed in (2, 3, 4):  # failed runs are tried again by default (skip_failed=false)
        assert after[seed]["attempt"] == 2 and after[seed]["previous_status"] == recs[seed]["status"]
    assert not (results / after[2]["run_id"] / "traceback.txt").exists()  # the stale traceback went
    assert "[sweep] 4/4 finished: 3 ran ok, 1 skipped (ok record exists), 0 failed, 0 left" in second.stdout
    summary = second.stdout[second.stdout.index("[sweep] done"):]
    assert summary.count("ok (skipped)") == 1 and all(r["run_id"] in summary for r in after.values())


@pytest.mark.slow  # two 20-run sweeps (~4 min on 2 quiet cores); CI skips it: python -m pytest -m slow
@needs_glue
def test_twenty_run_joblib_sweep_survives_a_killed_worker_run_a_nan_and_an_oom(tmp_path):
    """A faulty sweep on a parallel launcher: 2 joblib workers, 20 runs, one SIGKILL, one NaN, one OOM: 17 ok records
    and 3 failed in the first invocation; the second invocation runs only those 3."""
    results = tmp_path / "runs"
    args = ["--multirun", "model=tiny-bert", "budget=smoke", "measure.latency=false", "save_weights=none",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            f"seed={','.join(str(s) for s in range(1, 21))}", f"results_dir={results}"]
    first = bench(*args, f"hydra.sweep.dir={tmp_path / 'sweep1'}",
                  env={"BENCH_INJECT_FAULT": "-s7-:kill,-s12-:nan,-s16-:oom"})
    assert first.returncode == 0, first.stderr[-3000:]
    recs = records(results)
    assert len(recs) == 20 and sum(r["status"] == "ok" for r in recs.values()) == 17
    assert (recs[7]["status"], recs[12]["status"], recs[16]["status"]) == ("error", "nan", "oom")
    assert "killed by SIGKILL" in recs[7]["error"]
    assert "20/20 finished: 17 ran ok, 0 skipped (ok record exists), 3 failed, 0 left" in first.stdout
    second = bench(*args, f"hydra.sweep.dir={tmp_path / 'sweep2'}")
    assert second.returncode == 0, second.stderr[-3000:]
    after = records(results)
    assert all(r["status"] == "ok" for r in after.values())
    assert sorted(s for s, r in after.items() if r["attempt"] == 2) == [7, 12, 16]
    assert "20/20 finished: 3 ran ok, 17 skipped (ok record exists), 0 failed, 0 left" in second.stdout


@needs_glue
def test_failed_record_is_retried_unless_skip_failed(make_cfg, monkeypatch):
    monkeypatch.setenv("BENCH_INJECT_FAULT", "-s7-:error")
    tiny = ("seed=7", "measure.latency=false", "save_weights=none")
    first = run(make_cfg(*tiny))
    assert first["status"] == "error" and first["attempt"] == 1
    kept = run(make_cfg(*tiny, "skip_failed=true"))
    assert kept["skipped"] and kept["status"] == "error" and kept["started_at"] == first["started_at"]
    monkeypatch.delenv("BENCH_INJECT_FAULT")
    again = run(make_cfg(*tiny))
    assert again["status"] == "ok" and again["attempt"] == 2 and again["previous_status"] == "error"
    assert run(make_cfg(*tiny))["skipped"]
    rerun = run(make_cfg(*tiny, "rerun=true"))
    assert not rerun.get("skipped") and rerun["attempt"] == 3


@needs_glue
def test_oom_retry_splits_the_micro_batch_and_keeps_the_effective_batch(make_cfg, monkeypatch):
    monkeypatch.setenv("BENCH_INJECT_FAULT", "-s8-:oom")  # OOM unless gradient accumulation is on
    tiny = ("seed=8", "measure.latency=false", "save_weights=none", "budget.batch_size=6")
    failed = run(make_cfg(*tiny))
    assert failed["status"] == "oom" and "injected out of memory" in failed["error"]
    ok = run(make_cfg(*tiny, "oom_retries=1"))
    assert ok["status"] == "ok" and ok["config_hash"] == failed["config_hash"]  # same run identity
    retry = ok["oom_retry"]
    assert retry["failed_attempts"][0]["batch_size"] == 6 and retry["failed_attempts"][0]["grad_accum_steps"] == 1
    assert (retry["batch_size"], retry["grad_accum_steps"]) == (3, 2)  # 6 = 3 x 2: same effective batch
    assert ok["train"]["samples"] == 4 * 6  # 4 optimiser steps of 6 samples each, as without the split


def test_smaller_micro_batch_uses_the_smallest_factor(make_cfg):
    p = runner.plan(make_cfg("budget.batch_size=15", "budget.grad_accum_steps=2"))
    smaller = oom.smaller_micro_batch(p)
    assert (smaller.cfg.budget.batch_size, smaller.cfg.budget.grad_accum_steps) == (5, 6)
    assert p.cfg.budget.batch_size == 15 and smaller.config_hash == p.config_hash  # original untouched
    one = runner.plan(make_cfg("budget.batch_size=1"))
    assert oom.smaller_micro_batch(one) is None


def test_locks_live_stale_and_foreign(tmp_path):
    lock = run_lock.RunLock(tmp_path)
    assert lock.acquire() and not run_lock.RunLock(tmp_path).acquire()  # held by a live process (this one)
    lock.release()
    assert not (tmp_path / ".lock").exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    (tmp_path / ".lock").write_text(f"{socket.gethostname()}:{dead.stdout.strip()}")  # holder died here
    assert run_lock.RunLock(tmp_path).acquire()
    (tmp_path / ".lock").write_text("some-other-node:123")  # a holder on another host, still fresh
    assert not run_lock.RunLock(tmp_path).acquire()
    old = time.time() - run_lock.LOCK_STALE_S - 5  # ... that stopped refreshing its lock: taken over
    os.utime(tmp_path / ".lock", (old, old))
    assert run_lock.RunLock(tmp_path).acquire()


def test_records_are_readable_by_the_team(tmp_path):
    from bench.record import write_json_atomic

    write_json_atomic(tmp_path / RECORD_FILE, {"a": 1})
    mode = (tmp_path / RECORD_FILE).stat().st_mode & 0o777
    assert mode & 0o044 == 0o044 & ~_umask(), oct(mode)  # not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_gpu_claims_are_exclusive_per_process(tmp_path):
    from bench.model.device import claim_gpu

    n_gpus = 3
    code = ("import sys, time; from pathlib import Path; from bench.model.device import claim_gpu; "
            f"print(claim_gpu({n_gpus}, Path(sys.argv[1])), flush=True); time.sleep(30)")
    holders = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True) for _ in range(2)]
    try:
        claimed = sorted(int(h.stdout.readline()) for h in holders)
        assert claimed == [0, 1]
        assert claim_gpu(n_gpus, tmp_path) == 2 and claim_gpu(n_gpus, tmp_path) is None
    finally:
        for h in holders:
            h.kill()
            h.wait()
    holders[0].stdout.close()
    holders[1].stdout.close()


def test_summary_is_one_screen_for_long_sweeps():
    from bench.orchestrate.sweep import SUMMARY_MAX_ROWS, summary_table

    recs = sorted((REPO / "results" / "baselines" / "cpu-smoke").glob(f"*/{RECORD_FILE}"))
    jobs = [{"status": "ok", "record": str(p), "skipped": False} for p in recs]
    jobs.append({"status": "error", "error": "BenchError: bad config", "skipped": False})
    short = summary_table(jobs)  # 2,053,376: full FT excl. its head (pooler + classifier)
    assert len(short.splitlines()) == len(jobs) + 2 and "2,053,376" in short and "bad config" in short
    long = summary_table(jobs[:-1] * 10 + jobs[-1:])  # past SUMMARY_MAX_ROWS: one row per config
    assert len(jobs[:-1] * 10) > SUMMARY_MAX_ROWS
    lines = long.splitlines()
    assert lines[0].split()[:6] == ["task", "model", "method", "rank", "runs", "ok"] and len(lines) == 1 + 3 + 1
