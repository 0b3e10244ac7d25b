"""Precision: which dtype holds the frozen weights, the trainable ones and autocast, decided once
(bench/model/precision.py); the one-line refusals at plan time; and bf16 end to end on the CPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bench import BenchError
from bench.model.precision import (
    Dtypes,
    hold_trainable,
    param_bytes_by_dtype,
    precision_dtypes,
    resolve_precision,
    uses_loss_scaler,
)
from bench.plan import plan
from bench.record.identity import config_hash
from tests.conftest import compose_cfg

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize("device_type, name, bf16_ok, mode", [
    ("cuda", "auto", True, "bf16"),          # auto on a GPU with bf16: peers' mode
    ("cuda", "auto", False, "fp32"),         # a GPU without bf16 (V100, T4)
    ("cpu", "auto", True, "fp32"),           # the CPU: fp32
    ("cuda", "bf16-mixed", True, "bf16-mixed"),
    ("cuda", "fp16-mixed", False, "fp16-mixed"),
    ("cpu", "bf16", True, "bf16"),           # bf16 runs on a CPU (slowly): a test runs it end to end
    ("cpu", "bf16-mixed", True, "bf16-mixed"),
    ("cpu", "fp32", True, "fp32"),
])
def test_a_precision_name_resolves_to_a_mode_per_device(device_type, name, bf16_ok, mode):
    assert resolve_precision(name, device_type, bf16_ok) == mode


@pytest.mark.parametrize("mode, trains_all, dtypes", [
    ("fp32", False, Dtypes(F32, F32, None)),
    ("fp32", True, Dtypes(F32, F32, None)),
    ("bf16", False, Dtypes(BF16, F32, BF16)),    # bf16 base; adapters and head fp32 (peft's autocast_adapter_dtype)
    ("bf16", True, Dtypes(BF16, BF16, BF16)),    # full fine-tuning: pure bf16, no fp32 master copy
    ("bf16-mixed", False, Dtypes(F32, F32, BF16)),
    ("bf16-mixed", True, Dtypes(F32, F32, BF16)),  # full fine-tuning with fp32 master weights
    ("fp16-mixed", False, Dtypes(F32, F32, F16)),
])
def test_each_mode_holds_base_trainable_and_autocast_in_its_dtypes(mode, trains_all, dtypes):
    assert precision_dtypes(mode, trains_all) == dtypes
    assert uses_loss_scaler(mode) == (mode == "fp16-mixed")


def test_the_record_names_the_dtypes():
    assert precision_dtypes("bf16", False).names() == {"weight_dtype": "bf16", "trainable_dtype": "fp32",
                                                       "autocast_dtype": "bf16"}
    assert precision_dtypes("fp32", True).names() == {"weight_dtype": "fp32", "trainable_dtype": "fp32",
                                                      "autocast_dtype": None}


@pytest.mark.parametrize("device_type, name, bf16_ok, match", [
    ("cpu", "fp16-mixed", True, "precision=fp16-mixed is for CUDA"),
    ("cuda", "bf16", False, "this GPU does not support bf16"),
    ("cuda", "bf16-mixed", False, "this GPU does not support bf16"),
])
def test_a_mode_the_device_cannot_run_is_one_line(device_type, name, bf16_ok, match):
    with pytest.raises(BenchError, match=match) as err:
        resolve_precision(name, device_type, bf16_ok)
    assert "\n" not in str(err.value)


def test_plan_refuses_a_bad_precision_in_one_line_listing_the_choices():
    with pytest.raises(BenchError) as err:
        plan(compose_cfg("precision=fp16"))
    (line,) = str(err.value).splitlines()[1:]  # "invalid config:" then one line per problem
    assert line.strip() == "precision='fp16': Input should be 'auto', 'fp32', 'bf16', 'bf16-mixed' or 'fp16-mixed'"
    with pytest.raises(BenchError, match="precision=fp16-mixed is for CUDA") as err:
        plan(compose_cfg("device=cpu", "precision=fp16-mixed"))
    assert "\n" not in str(err.value)


def test_a_bf16_plan_names_its_weight_dtype_in_its_identity():
    fp32 = plan(compose_cfg("device=cpu"))
    assert fp32.precision == "fp32" and "weight_dtype" not in fp32.effective  # fp32 runs keep their identity
    bf16 = plan(compose_cfg("device=cpu", "precision=bf16"))
    assert bf16.effective["precision"] == "bf16" and bf16.effective["weight_dtype"] == "bf16"
    assert bf16.dtypes == Dtypes(BF16, F32, BF16)
    # a record whose effective config says bf16 without weight_dtype ran autocast over fp32 weights: not this run
    legacy = {k: v for k, v in bf16.effective.items() if k != "weight_dtype"}
    assert config_hash(legacy) != bf16.config_hash
    mixed = plan(compose_cfg("device=cpu", "precision=bf16-mixed"))
    assert "weight_dtype" not in mixed.effective and len({fp32.config_hash, mixed.config_hash, bf16.config_hash}) == 3
    assert plan(compose_cfg("device=cpu", "precision=bf16", "method=full")).dtypes == Dtypes(BF16, BF16, BF16)


def test_hold_trainable_upcasts_what_trains_and_leaves_the_frozen_base():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(BF16)
    for p in model.parameters():
        p.requires_grad = False
    model[0].bias.requires_grad = True  # BitFit: a bias of a frozen linear layer
    model[1].bias.requires_grad = True  # and of a LayerNorm
    model[2].requires_grad_(True)  # a task head
    hold_trainable(model, F32)
    assert model[0].weight.dtype == BF16 and model[0].bias.dtype == F32
    assert model[1].weight.dtype == F32 and model[1].bias.dtype == F32  # the LayerNorm's weight follows its bias
    assert model[2].weight.dtype == F32
    assert param_bytes_by_dtype(model) == {"frozen": {"bf16": 16 * 2, "fp32": 4 * 4},
                                           "trainable": {"fp32": (4 + 4 + 10) * 4}}
    with torch.autocast("cpu", dtype=BF16):
        out = model(torch.randn(3, 4))
    out.float().sum().backward()
    assert model[0].bias.grad.dtype == F32 and model[2].weight.grad.dtype == F32


def _bf16_run(tmp_path, *overrides, latency: bool = False):
    from bench.orchestrate.runner import run

    rec = run(compose_cfg("device=cpu", "precision=bf16", f"measure.latency={str(latency).lower()}",
                          "budget.max_steps=2", *overrides, results_dir=tmp_path / "runs"))
    assert rec["status"] == "ok", rec.get("error")
    return rec, tmp_path / "runs" / rec["run_id"]


def test_lora_in_bf16_on_the_cpu_end_to_end(tmp_path):
    """The bf16 path runs on a CPU: bf16 base, fp32 adapters and head, bf16 autocast; the record says so, and weight
    analysis rebuilds the base as the run held it, so ΔW is the adapter's B·A unrounded."""
    from analysis.weights import weight_pairs
    from bench.record import read_record

    rec, run_dir = _bf16_run(tmp_path, "method=lora", "rank=4", "budget.eval_samples=16")
    stored = read_record(run_dir / "record.json")
    assert (stored["weight_dtype"], stored["trainable_dtype"], stored["autocast_dtype"]) == ("bf16", "fp32", "bf16")
    held = stored["param_bytes_by_dtype"]
    assert set(held["frozen"]) == {"bf16"} and set(held["trainable"]) == {"fp32"}
    assert held["trainable"]["fp32"] == 4 * stored["trainable_params"]
    assert stored["full_model_bytes"] < 2.1 * stored["total_params"]  # bf16: 2 bytes per parameter (+ buffers)
    assert stored["effective_config"]["weight_dtype"] == "bf16"
    wp = weight_pairs(run_dir)
    changed = {name.rsplit(".", 1)[-1] for name, w0, wt in wp.pairs if not torch.equal(w0, wt)}
    assert changed == {"query", "value"}
    for name, w0, wt in wp.pairs:
        assert w0.dtype == F32 and torch.equal(w0, w0.to(BF16).float())  # the run's bf16 values, held in fp32
        if name.endswith(("query", "value")):
            assert not torch.equal(wt, wt.to(BF16).float())  # merged in fp32: not rounded to bf16


def test_full_finetuning_in_bf16_on_the_cpu_is_pure_bf16(tmp_path):
    rec, _ = _bf16_run(tmp_path, "method=full", "budget.eval_samples=16")
    assert (rec["weight_dtype"], rec["trainable_dtype"]) == ("bf16", "bf16")
    assert rec["param_bytes_by_dtype"] == {"frozen": {}, "trainable": {"bf16": 2 * rec["trainable_params"]}}


@pytest.mark.slow
def test_a_causal_lm_in_bf16_on_the_cpu_end_to_end(tmp_path):
    """tiny-llama (vocabulary 49152: its LM head is most of the time; bf16 matmuls are slow on a CPU without bf16
    instructions) with LoRA, generation speed included."""
    rec, _ = _bf16_run(tmp_path, "model=tiny-llama", "method=lora", "budget.batch_size=4", "budget.eval_samples=8",
                       "lm.gen_iters=1", "lm.gen_new_tokens=2", "lm.gen_prompt_len=16", latency=True)
    assert (rec["weight_dtype"], rec["trainable_dtype"]) == ("bf16", "fp32")
    assert rec["merged_max_abs_logit_diff"] is not None and rec["generation"]["base"]["decode_tokens_per_s"] > 0
