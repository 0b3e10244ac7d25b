"""One run over two processes on gloo (CPU): DDP and FSDP2 train the same curve as one process with the same global
batch, rank 0 records and saves the whole (gathered) weights, a killed rank is a failure record and the sweep goes on;
and the plan's checks and the batch sharding, in-process."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench import BenchError
from bench.model import distributed
from bench.model.distributed import World, shard
from bench.orchestrate.runner import run
from bench.plan import plan
from bench.record import RECORD_FILE
from tests.conftest import REPO, compose_cfg, needs_glue

# tiny-llama: a causal LM, so the ranks' shares hold different numbers of label tokens and the loss weighting counts.
# Dropout 0: each rank draws its own dropout masks, so with dropout the curves agree in distribution only.
# (`++method.dropout=0` reaches full fine-tuning's config too, where nothing reads it: the same for both ways.)
RUN = ["model=tiny-llama", "budget=smoke", "measure.latency=false", "budget.log_every_steps=1", "lr=1e-2",
       "++method.dropout=0"]
METHODS = ("lora", "full")
# Measured: the largest relative difference of a 2-rank curve from the 1-process one is ~1e-7 (float32 sums taken in
# another order); 1e-4 leaves room for other CPUs' kernels and still fails on a wrong weighting (~1e-2).
REL_TOL = 1e-4


def _env() -> dict[str, str]:
    return {**os.environ, "BENCH_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def _curve(run_dir: Path) -> list[float]:
    with open(run_dir / "curve.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def _records(results: Path) -> dict[tuple[str, str | None], dict]:
    out = {}
    for path in results.glob(f"*/{RECORD_FILE}"):
        rec = json.loads(path.read_text())
        out[rec["method"], (rec.get("distributed") or {}).get("strategy")] = rec
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
    """LoRA and full fine-tuning in one process (in this one) and on 2 ranks with DDP and with FSDP (one torchrun,
    a multirun of four runs: ranks stay in step from run to run)."""
    results = tmp_path_factory.mktemp("dist") / "runs"
    for method in METHODS:
        assert run(compose_cfg(f"method={method}", *RUN, results_dir=results))["status"] == "ok"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bench",
           "--multirun", "method=lora,full", *RUN, "distributed=ddp,fsdp",
           f"results_dir={results}", f"hydra.sweep.dir={results.parent / 'sweep'}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-3000:]
    return results, _records(results)


@needs_glue
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_train_the_one_process_curve(runs, method, strategy):
    results, recs = runs
    one, two = recs[method, None], recs[method, strategy]
    assert two["status"] == "ok", two.get("error")
    assert two["config_hash"] != one["config_hash"]  # the world size and strategy are part of the identity
    assert two["effective_config"]["distributed"]["world_size"] == 2
    assert two["train"]["steps"] == one["train"]["steps"] and two["train"]["samples"] == one["train"]["samples"]
    curve_one, curve_two = _curve(results / one["run_id"]), _curve(results / two["run_id"])
    assert len(curve_two) == len(curve_one) == 4
    assert curve_one[-1] != curve_one[0]  # lr 1e-2: the weights moved, so a wrong gradient would show
    for a, b in zip(curve_one, curve_two):
        assert abs(a - b) <= REL_TOL * abs(a), (curve_one, curve_two)
    assert two["metrics"]["eval_loss"] == pytest.approx(one["metrics"]["eval_loss"], rel=REL_TOL)
    block = two["distributed"]
    assert block["strategy"] == strategy and block["world_size"] == 2 and block["launcher"] == "torchrun"
    assert block["backend"] == "gloo" and len(block["rank_peak_memory_bytes"]) == 2
    assert all(b > 0 for b in block["rank_peak_memory_bytes"])
    assert block["max_rank_peak_memory_bytes"] == max(block["rank_peak_memory_bytes"])


@needs_glue
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_rank_0_saves_the_whole_trained_weights(runs, strategy):
    """FSDP's shards are gathered before saving: the same tensors, at full shape, as the one-process run's."""
    results, recs = runs
    for method in METHODS:
        one, two = (_weights(results / recs[method, way]["run_id"]) for way in (None, strategy))
        assert one.keys() == two.keys() and one
        for key, tensor in one.items():
            assert two[key].shape == tensor.shape, key
            assert torch.allclose(two[key], tensor, rtol=1e-3, atol=1e-5), key
        if method == "lora":
            assert any("lora_B" in k and two[k].abs().max() > 0 for k in two)  # trained, not B's zero init


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    (path,) = (run_dir / "weights").glob("*.safetensors")
    return load_file(path)


@needs_glue
def test_a_killed_rank_is_a_failure_record_and_the_sweep_goes_on(tmp_path):
    """Rank 1 of the LoRA run is SIGKILLed at step 2: torchrun stops rank 0, rank 0 records the run as failed (its
    collective saw the peer go) and the next run of the sweep ends ok."""
    results = tmp_path / "runs"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "bench", "--multirun", "model=tiny-llama", "budget=smoke",
                           "measure.latency=false", "save_weights=none", "distributed=ddp", "method=lora,full",
                           f"results_dir={results}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                          env={**_env(), "BENCH_INJECT_FAULT": "lora:killrank1"})
    elapsed_s = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    recs = _records(results)
    failed, ok = recs["lora", None], recs["full", "ddp"]  # a run that failed in training has no distributed block
    assert failed["status"] == "error"
    assert "rank" in failed["error"], failed["error"]
    assert ok["status"] == "ok"
    assert "1 ran ok, 0 skipped (ok record exists), 1 failed" in done.stdout
    assert elapsed_s < 240  # two runs of seconds each: the failure is seen at once, not after a collective's timeout


def test_distributed_none_under_a_launcher_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(BenchError, match="distributed=ddp"):
        plan(compose_cfg())


def test_the_global_batch_must_split_evenly_over_the_ranks():
    with pytest.raises(BenchError, match="budget.batch_size=6 .* 4 ranks"):
        plan(compose_cfg("distributed=ddp", "distributed.nproc_per_node=4", "budget.batch_size=6"))


def test_world_size_and_strategy_are_identity_and_one_process_runs_keep_theirs():
    hashes = {name: plan(compose_cfg(*overrides)).config_hash for name, overrides in {
        "none": [], "ddp2": ["distributed=ddp"], "ddp4": ["distributed=ddp", "distributed.nproc_per_node=4"],
        "fsdp2": ["distributed=fsdp"], "ddp2_timeout": ["distributed=ddp", "distributed.timeout_s=60"]}.items()}
    assert len({hashes[k] for k in ("none", "ddp2", "ddp4", "fsdp2")}) == 4
    assert hashes["ddp2_timeout"] == hashes["ddp2"]  # how long to wait changes no result
    assert "distributed" not in plan(compose_cfg()).effective


def test_several_nodes_need_a_launcher(tmp_path):
    with pytest.raises(BenchError, match="nnodes=2.*torchrun on each node or use hydra/launcher=slurm"):
        run(compose_cfg("distributed=ddp", "distributed.nnodes=2", results_dir=tmp_path))


def test_slurm_tasks_become_ranks(monkeypatch):
    """Under `srun` (hydra/launcher=slurm with distributed=...), each task reads its rank from Slurm's variables."""
    pytest.importorskip("submitit")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                "SUBMITIT_EXECUTOR"):
        monkeypatch.setenv(key, "")  # recorded, so the values the code exports are undone after the test
        monkeypatch.delenv(key)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_STEP_NODELIST": "gpu[07-08]"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    cfg = compose_cfg("distributed=ddp", "distributed.nnodes=2", "distributed.nproc_per_node=4")
    world = distributed.planned_world(cfg.distributed)
    assert world == World("ddp", 8, 5, 1, "slurm")
    assert distributed.planned_world(cfg.distributed) == world  # again, now that torch's variables are exported
    assert os.environ["MASTER_ADDR"] == "gpu07" and os.environ["RANK"] == "5" and os.environ["WORLD_SIZE"] == "8"


@pytest.mark.parametrize("size", [2, 3, 4])
def test_shares_weighted_average_to_the_global_mean_loss(size):
    """Label tokens differ from row to row (a causal LM's answers), so the ranks' shares differ; the weighted mean of
    their mean losses is the whole batch's mean loss, and no row is lost or repeated."""
    gen = torch.Generator().manual_seed(size)
    rows, width = 12, 10
    lengths = torch.randint(2, width + 1, (rows,), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    labels = torch.where(torch.rand(rows, width, generator=gen) < 0.3, -100, 7) * mask + (-100) * (1 - mask)
    losses = torch.rand(rows, width, generator=gen)  # a per-token loss to average
    batch = {"input_ids": torch.arange(rows)[:, None].expand(rows, width) * mask, "attention_mask": mask,
             "labels": labels, "loss": losses}

    def mean_loss(b):  # as a causal LM averages: shifted labels, -100 ignored
        keep = b["labels"][:, 1:] != -100
        return (b["loss"][:, 1:] * keep).sum() / keep.sum()

    shares = [shard(batch, World("ddp", size, r, 0, "torchrun")) for r in range(size)]
    combined = sum(w * mean_loss(b) for b, w in shares) / size
    assert combined == pytest.approx(float(mean_loss(batch)), rel=1e-6)
    assert torch.equal(torch.cat([b["input_ids"][:, 0] for b, _ in shares]), batch["input_ids"][:, 0])
    for b, _ in shares:  # trailing padding no row of a share uses is dropped
        assert bool(b["attention_mask"][:, -1].any())


def test_one_process_takes_the_whole_batch():
    batch = {"input_ids": torch.ones(3, 4, dtype=torch.long), "attention_mask": torch.ones(3, 4, dtype=torch.long)}
    assert shard(batch, distributed.SINGLE) == (batch, 1.0)
