"""Bad input and faults: each ends in one clear line (BenchError, exit != 0, no traceback) or the documented
safe behaviour, never a traceback, an `ok` record of an invalid config, or a lost ok record. Table-driven over
config values, data corruptions and results-folder faults, plus a property test over numeric knobs."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf, open_dict

from bench import BenchError
from bench.data import read_rows
from bench.data.tasks import get_task
from bench.orchestrate.runner import run
from bench.plan import plan
from bench.plan.fingerprint import fingerprints
from bench.record import FAILED_ATTEMPT_FILE, RECORD_FILE, read_record
from tests.conftest import GLUE_DIR, REPO, compose_cfg, needs_glue

FAST = ("measure.latency=false", "save_weights=none")

# (override, the key the one-line message must name)
BAD_CONFIG = [
    ("lr=abc", "lr='abc'"), ("seed=x", "seed='x'"), ("device=tpu", "device='tpu'"),
    ("cpu_threads=-1", "cpu_threads=-1"), ("budget.max_steps=0", "budget.max_steps=0"),
    ("budget.max_steps=-1", "budget.max_steps=-1"), ("budget.log_every_steps=0", "budget.log_every_steps=0"),
    ("budget.grad_accum_steps=0", "budget.grad_accum_steps=0"), ("budget.max_seq_len=0", "budget.max_seq_len=0"),
    ("budget.batch_size=0", "budget.batch_size=0"), ("save_weights=bogus", "save_weights='bogus'"),
    ("+foo=1", "foo=1: unknown key"), ("+budget.max_step=3", "budget.max_step=3: unknown key"),
    ("precision=fp8", "precision='fp8'"), ("rank=0", "rank=0"), ("rank=2.5", "rank=2.5"),
    ("oom_retries=-1", "oom_retries=-1"), ("rerun=maybe", "rerun='maybe'"),
    ("measure.latency_iters=0", "measure.latency_iters=0"), ("measure.busy_gpu=sometimes", "measure.busy_gpu"),
    ("budget.keep_best=true", "keep_best=true needs budget.eval_every_steps"),
    ("budget.epochs=3", "exactly one of budget.max_steps and budget.epochs"),
    ("method.lr=abc", "method.lr='abc'"),
]


@pytest.mark.parametrize(("override", "named"), BAD_CONFIG, ids=[o for o, _ in BAD_CONFIG])
def test_a_bad_config_value_is_one_clear_line_before_anything_runs(override, named):
    with pytest.raises(BenchError) as err:
        plan(compose_cfg(override))
    assert named in str(err.value)
    assert all(line.startswith(("invalid config:", "  ")) for line in str(err.value).splitlines()) \
        or "\n" not in str(err.value)


def test_values_that_mean_the_same_run_are_one_run():
    assert plan(compose_cfg("seed=1.0")).run_id == plan(compose_cfg("seed=1")).run_id
    assert plan(compose_cfg("lr=0.001")).config_hash == plan(compose_cfg("lr=1e-3")).config_hash


NUMERIC_KNOBS = ["lr", "seed", "rank", "cpu_threads", "oom_retries", "budget.max_steps", "budget.batch_size",
                 "budget.max_seq_len", "budget.log_every_steps", "budget.grad_accum_steps", "budget.train_samples",
                 "measure.latency_iters", "measure.eval_batch_size", "measure.latency_noise_tol"]
BASE_CFG = compose_cfg()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(NUMERIC_KNOBS),
       value=st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                       st.text(max_size=8), st.booleans(), st.none()))
def test_any_value_of_a_numeric_knob_plans_validly_or_is_one_bench_error(key, value):
    cfg = BASE_CFG.copy()
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, force_add=True)
    try:
        p = plan(cfg)
    except BenchError:
        return  # the one-line refusal
    budget, measure = p.effective["budget"], p.effective["measure"]  # what a run would use is valid
    assert p.lr > 0 and p.effective["seed"] >= 0 and (p.rank or 1) >= 1
    assert budget["max_steps"] >= 1 and budget["batch_size"] >= 1 and budget["log_every_steps"] >= 1
    assert budget["grad_accum_steps"] >= 1 and budget["max_seq_len"] >= 8
    assert measure["latency_iters"] >= 1 and 0 < measure["latency_noise_tol"] < 1


# ------------------------------------------------------------------------------------------- data files
def _cut_mid_line(text: str) -> str:
    return text[: len(text) // 2 + 7]


def _tab_in_line_5(text: str) -> str:
    lines = text.splitlines(keepends=True)
    lines[4] = lines[4].replace(" ", "\t", 1)
    return "".join(lines)


CORRUPTIONS = {
    "cut mid-line": (lambda t: _cut_mid_line(t), "tab-separated fields, expected 2 (too few"),
    "random bytes": (lambda t: bytes(random.Random(0).randrange(256) for _ in range(3000)), "not UTF-8 text"),
    "empty": (lambda t: "", "the file is empty"),
    "header only": (lambda t: t.splitlines(keepends=True)[0], "a header and no rows"),
    "wrong header": (lambda t: t.replace("sentence\tlabel", "sentense\tlabel", 1), "no column 'sentence'"),
    "a tab inside a sentence": (_tab_in_line_5, "line 5: 3 tab-separated fields, expected 2 (too many"),
    "a bad label": (lambda t: t.replace("\t1\n", "\tpositive\n", 1), "label 'positive' is not a class id 0..1"),
}


@needs_glue
@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_broken_data_file_names_the_file_and_the_line(tmp_path, monkeypatch, kind):
    corrupt, expected = CORRUPTIONS[kind]
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    text = (Path(GLUE_DIR) / "SST-2" / "dev.tsv").read_text()
    (folder / "train.tsv").write_text(text)
    broken = corrupt(text)
    (folder / "dev.tsv").write_bytes(broken if isinstance(broken, bytes) else broken.encode())
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "glue"))
    with pytest.raises(BenchError) as err:
        read_rows(get_task("sst2"), compose_cfg().budget)
    message = str(err.value)
    assert str(folder / "dev.tsv") in message and expected in message and "\n" not in message
    if kind not in ("random bytes", "empty", "header only", "wrong header"):
        assert "line " in message


# ------------------------------------------------------------------------------------------- results folder
@needs_glue
def test_no_config_value_places_files_outside_results_dir(make_cfg, tmp_path):
    rec = run(make_cfg(*FAST, "model.name=../../../escaped"))
    runs = (tmp_path / "runs").resolve()
    (folder,) = [p.parent for p in runs.rglob(RECORD_FILE)]
    assert folder.resolve().parent == runs and rec["status"] == "ok"
    assert not (tmp_path.parent / "escaped").exists()


@needs_glue
def test_an_unwritable_results_dir_is_one_line_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # root may write anywhere; a file in the path stops even root
    with pytest.raises(BenchError) as err:
        run(compose_cfg(*FAST, results_dir=blocker / "runs"))
    assert "results_dir: cannot write in" in str(err.value) and "\n" not in str(err.value)


@needs_glue
def test_a_record_that_cannot_be_written_is_one_line_and_leaves_no_lock(make_cfg, monkeypatch, tmp_path):
    import bench.record.store as record_module

    def read_only(path, obj):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(record_module, "write_json_atomic", read_only)
    with pytest.raises(BenchError) as err:
        run(make_cfg(*FAST))
    assert "cannot write the run's record (Permission denied)" in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "runs").rglob(".lock"))


@needs_glue
@pytest.mark.parametrize("content", [os.urandom(64), b""], ids=["random bytes", "empty"])
def test_an_unreadable_old_lock_is_taken_over_and_logged(make_cfg, capsys, content):
    cfg = make_cfg(*FAST)
    run_dir = steps_identity(cfg)
    run_dir.mkdir(parents=True)
    lock = run_dir / ".lock"
    lock.write_bytes(content)
    os.utime(lock, (time.time() - 60, time.time() - 60))
    rec = run(cfg)
    assert rec["status"] == "ok" and not rec.get("skipped")
    assert "unreadable lock" in capsys.readouterr().out and not lock.exists()


def steps_identity(cfg) -> Path:
    """The run folder `run(cfg)` will use (the identity includes the data fingerprints)."""
    from bench.plan import identify

    p = plan(cfg)
    return identify(p, fingerprints(read_rows(p.task, cfg.budget), cfg.model)).run_dir


@needs_glue
def test_a_fresh_empty_lock_is_another_process_starting(make_cfg):
    cfg = make_cfg(*FAST)
    run_dir = steps_identity(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / ".lock").write_bytes(b"")  # just created by a worker that has not written its pid yet
    rec = run(cfg)
    assert rec["skipped"] and rec["status"] == "running_elsewhere"


@needs_glue
def test_a_failed_rerun_keeps_the_ok_record(make_cfg, monkeypatch, tmp_path):
    cfg = make_cfg("measure.latency=false")  # weights saved
    ok = run(cfg)
    run_dir = tmp_path / "runs" / ok["run_id"]
    weights_before = {p.name: p.read_bytes() for p in (run_dir / "weights").iterdir()}
    monkeypatch.setenv("BENCH_INJECT_FAULT", f"{ok['run_id']}:error")
    failed = run(make_cfg("measure.latency=false", "rerun=true"))
    assert failed["status"] == "error"
    kept = read_record(run_dir)
    assert kept["status"] == "ok" and kept["started_at"] == ok["started_at"] and kept["metrics"] == ok["metrics"]
    assert read_record(run_dir / FAILED_ATTEMPT_FILE)["status"] == "error"
    assert {p.name: p.read_bytes() for p in (run_dir / "weights").iterdir()} == weights_before
    monkeypatch.delenv("BENCH_INJECT_FAULT")
    again = run(make_cfg("measure.latency=false", "rerun=true"))  # a new ok replaces it, the failure note goes
    assert again["status"] == "ok" and read_record(run_dir)["started_at"] == again["started_at"]
    assert not (run_dir / FAILED_ATTEMPT_FILE).exists()


# ------------------------------------------------------------------------------------------- the command line
def _bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False,
                          env={**os.environ, "BENCH_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env or {})})


@needs_glue
def test_the_command_line_prints_one_line_per_problem_and_no_traceback(tmp_path):
    out = _bench("model=tiny-bert", "budget=smoke", "lr=abc", "budget.max_steps=-1", "+foo=1",
                 f"results_dir={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()
    assert lines[0] == "error: invalid config:" and len(lines) == 4, out.stderr
    assert not list(tmp_path.rglob(RECORD_FILE))  # no record of an invalid config, ok or not


@needs_glue
def test_analysis_tools_skip_a_corrupt_weights_file_and_exit_codes_tell_usage_from_regression(tmp_path, capsys):
    """The analysis commands, called as the command line calls them (`main(argv)`): any exception but their exit
    would fail the test with its traceback."""
    from analysis.analyse import main as analyse
    from analysis.compare import main as compare
    from analysis.intruders import main as intruders
    from analysis.report import main as report

    results = tmp_path / "runs"
    for seed in (1, 2):
        assert run(compose_cfg("measure.latency=false", f"seed={seed}", results_dir=results))["status"] == "ok"
    broken = sorted(results.glob("*-s1-*/weights/*.safetensors"))[0]
    broken.write_bytes(broken.read_bytes()[:100])  # truncated
    capsys.readouterr()
    analyse([str(results)])
    out = capsys.readouterr()
    assert "warning: skipped" in out.err and "cannot load its saved weights" in out.err
    assert "intruders" in out.out  # the other run was analysed
    with pytest.raises(SystemExit) as exit_:
        intruders([str(broken.parent.parent)])
    assert exit_.value.code not in (0, None)
    assert "cannot load its saved weights" in str(exit_.value.code) + capsys.readouterr().err
    report([str(results), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "index.md").is_file()
    assert compare(["--baseline", str(tmp_path / "nope"), "--current", str(results)]) == 2
    assert "no such folder" in capsys.readouterr().err
