"""Every method through the runner (the real Hydra config, the shared loop, the record), run dedup for
rank-less methods, a method that attaches nothing, and hot-swapping saved adapters."""
from __future__ import annotations

import pytest
import torch

from bench import BenchError
from bench.orchestrate.runner import run
from bench.record import RECORD_FILE
from methods.base import head_modules
from methods.hotswap import load_adapters, switch
from tests.conftest import needs_glue
from tests.method_helpers import ALL_METHODS, MERGING, build, fresh_base, logits, perturb, registry_cases
from tests.test_methods import _dims, hand_counts

# A run through the runner costs seconds: the fast suite runs the yaml tuners of four kinds (a merging tuner, a
# virtual-token one, a LoRA init that moves W, one from a data pass); every other one runs under `slow`.
RUNNER_CASES = registry_cases(ALL_METHODS, fast={"vera", "p_tuning", "pissa", "corda"})


@needs_glue
@pytest.mark.parametrize("name", RUNNER_CASES)
def test_every_method_runs_through_the_runner(make_cfg, name):
    cfg = make_cfg(f"method={name}", "rank=4")
    rec = run(cfg)
    assert rec["status"] == "ok", rec.get("error")
    expected = hand_counts(*_dims(cfg), 4).get(name)
    if expected is not None:
        assert rec["trainable_params_excl_head"] == expected
    assert rec["adapter_bytes"] > 0
    lat = rec["latency"]
    assert 0 < lat["unmerged"]["p50_ms"] <= lat["unmerged"]["p95_ms"]
    if name in MERGING:
        assert rec["merged_max_abs_logit_diff"] < 1e-4 and "merged" in lat
    else:
        assert "merged_max_abs_logit_diff" not in rec
    if name == "adalora":
        info = rec["method_info"]
        assert info["reallocated"] and info["total_rank"] == 4 * len(info["rank_pattern"])


@needs_glue
def test_sweep_runs_rankless_methods_once(make_cfg, capsys):
    """`--multirun method=full,bitfit,lora rank=4,8` in-process, in Hydra's job order."""
    records = [run(make_cfg(f"method={m}", f"rank={r}")) for m in ("full", "bitfit", "lora") for r in (4, 8)]
    assert all(r["status"] == "ok" for r in records)
    skipped = [r["method"] for r in records if r.get("skipped")]
    assert skipped == ["full", "bitfit"]
    assert len({r["run_id"] for r in records}) == 4
    assert capsys.readouterr().out.count("skip ") == 2


@needs_glue
def test_method_that_attaches_nothing_is_an_error_record(make_cfg):
    rec = run(make_cfg("method=lora", "method.target_modules=[nonexistent]"))
    assert rec["status"] == "error"
    assert "could not attach" in rec["error"] and "nonexistent" in rec["error"] and "\n" not in rec["error"]
    assert "traceback_file" not in rec  # a BenchError: a clear message, no traceback wall


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning"])
def test_virtual_tokens_past_the_positions_fail_before_training(make_cfg, name):
    # max_seq_len 16 truncates SST-2's longer sentences to exactly 16 tokens; the model gets 24 positions.
    short = ["budget.max_seq_len=16", "model.config.max_position_embeddings=24"]
    ok = run(make_cfg(f"method={name}", "rank=8", *short))
    assert ok["status"] == "ok", ok.get("error")
    rec = run(make_cfg(f"method={name}", "rank=9", *short))
    assert rec["status"] == "error" and "\n" not in rec["error"] and "train" not in rec
    assert "adds 9 virtual tokens, and the longest tokenised example has 16: 25 > the model's 24 positions" \
        in rec["error"] and "budget.max_seq_len=15" in rec["error"]


def _saved_adapter(make_cfg, tmp_path, name: str, seed: int):
    cfg, method, base, ctx, eff = build(make_cfg, name)
    model = method.attach(base, eff, ctx)
    perturb(model, head_modules(cfg.model), seed=seed)
    with torch.no_grad():  # a different head per adapter too
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.5 * seed)
    folder = tmp_path / f"{name}{seed}"
    method.save(model, folder)
    return cfg, folder, logits(model)


@pytest.mark.parametrize("name", ["lora", "ia3"])
def test_hot_swap_gives_each_adapter_its_own_logits(make_cfg, tmp_path, name):
    cfg, dir_a, want_a = _saved_adapter(make_cfg, tmp_path, name, seed=1)
    _, dir_b, want_b = _saved_adapter(make_cfg, tmp_path, name, seed=2)
    assert (want_a - want_b).abs().max() > 1e-3
    model = load_adapters(fresh_base(cfg), {"a": dir_a, "b": dir_b})
    for adapter, want in [("a", want_a), ("b", want_b), ("a", want_a)]:
        switch(model, adapter)
        torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=0)
    with pytest.raises(BenchError, match="no adapter 'c'"):
        switch(model, "c")


def test_hot_swap_refuses_non_peft_folders(make_cfg, tmp_path):
    cfg, method, base, ctx, eff = build(make_cfg, "houlsby")
    method.save(method.attach(base, eff, ctx), tmp_path / "h")
    with pytest.raises(BenchError, match="not a peft adapter folder"):
        load_adapters(fresh_base(cfg), {"h": tmp_path / "h"})


def test_hot_swap_benchmark_script_runs(capsys):
    from bench.tools.perf.hotswap import main

    main(["--iters", "5", "--n-adapters", "2", "--seq-len", "16", "--batch-size", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "swap (set_adapter)" in out and "p95" in out


@needs_glue
@pytest.mark.slow
def test_multirun_cli_runs_rankless_methods_once(tmp_path):
    """The command itself: 6 jobs, 4 runs, 2 skips (full and bitfit at rank 8)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--multirun", "method=full,bitfit,lora", "rank=4,8", "model=tiny-bert",
         "budget=smoke", f"results_dir={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'multirun'}",
         "measure.latency_iters=2", "measure.latency_warmup_iters=1"],
        check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("skip ") == 2
    assert len(list((tmp_path / "runs").glob(f"*/{RECORD_FILE}"))) == 4
