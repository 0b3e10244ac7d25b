"""FLOPs and utilisation (bench/measure/flops.py): the formula against torch's FlopCounterMode on the tiny test
models, the peak table and the measured probe, and MFU in a smoke run's record.

Tolerances. FlopCounterMode counts the matmuls autograd runs (mm, addmm, bmm; attention runs eagerly here, since
it does not count the CPU's fused attention kernel) and nothing else, which is what the formula counts, so the
forward and full fine-tuning agree exactly. With LoRA the formula counts the activation gradient through every
layer, and autograd skips what nothing trainable lies below: layer 0's input projections' input gradient, its
attention's key gradient (K has no adapter) and LoRA A's input gradient in layer 0. The formula is over by exactly
those terms, which the test computes. Under gradient checkpointing BERT's recompute is exact; a Llama layer's last
matmul (the down projection) is not recomputed by PyTorch's non-reentrant checkpointing, and the test says so.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.measure import flops
from bench.measure.flops import Architecture, Trainable, Work
from bench.model.precision import precision_dtypes
from bench.plan import plan
from bench.recipe import attach, build_model
from tests.conftest import compose_cfg, needs_glue

ROWS, SEQ = 3, 16


def _built(*overrides: str):
    """(the plan, the model as a run builds it with the method attached, the trainable count excluding the head),
    with eager attention so FlopCounterMode sees the attention's matmuls."""
    p = plan(compose_cfg(*overrides))
    model = build_model(p)[0]
    model.set_attn_implementation("eager")
    model, counts = attach(p, model, steps=4)
    return p, model, counts["trainable_params_excl_head"]


def _batch(p, causal: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 1000, (ROWS, SEQ), generator=torch.Generator().manual_seed(0))
    labels = ids if causal else torch.tensor([0, 1, 0])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _counted(model, batch, train: bool) -> int:
    model.train(train)
    with FlopCounterMode(display=False) as counter:
        out = model(**batch)
        if train:
            out.loss.backward()
    return counter.get_total_flops()


MODELS = [("tiny-bert", False, ()), ("tiny-llama", True, ()),
          ("tiny-llama", True, ("model.config.tie_word_embeddings=false",))]


@pytest.mark.parametrize("name,causal,extra", MODELS, ids=["bert", "llama-tied", "llama-untied"])
def test_forward_and_full_finetuning_equal_flop_counter(name, causal, extra):
    p, model, _ = _built(f"model={name}", "method=full", *extra)
    arch = Architecture.from_config(model.config, causal)
    assert arch.lm_head is causal and arch.gated_mlp is causal
    if causal:
        assert arch.kv_heads < arch.heads  # grouped-query attention: K and V are smaller than Q
    work = Work.uniform(SEQ, ROWS)
    batch = _batch(p, causal)
    assert _counted(model, batch, train=False) == pytest.approx(flops.forward_flops(arch, work), rel=1e-12)
    assert _counted(model, batch, train=True) == pytest.approx(
        flops.training_flops(arch, work, Trainable(all_weights=True)), rel=1e-12)
    # PaLM's per-token form: 6N + 12·L·H·Q·T, with N the per-token matmul weights (+ the head, per sequence)
    palm = 6 * arch.token_params + 12 * arch.layers * arch.heads * arch.head_dim * SEQ + 6 * arch.sequence_params / SEQ
    assert flops.flops_per_token(arch, SEQ, Trainable(all_weights=True)) == pytest.approx(palm, rel=1e-12)


@pytest.mark.parametrize("name,causal", [("tiny-bert", False), ("tiny-llama", True)])
def test_lora_training_step_is_over_by_exactly_the_layer_0_gradients_autograd_skips(name, causal):
    p, model, adapters = _built(f"model={name}", "method=lora")
    arch = Architecture.from_config(model.config, causal)
    work = Work.uniform(SEQ, ROWS)
    formula = flops.training_flops(arch, work, Trainable(all_weights=False, adapter_params=adapters))
    counted = _counted(model, _batch(p, causal), train=True)
    targets = list(p.cfg.model.lora_targets)  # q and v: K in layer 0 has no adapter
    assert len(targets) == 2
    kv = arch.kv_heads * arch.head_dim
    layer0_inputs = 2 * (arch.hidden * arch.heads * arch.head_dim + 2 * arch.hidden * kv) * work.tokens
    layer0_key_grad = 2 * arch.heads * arch.head_dim * work.token_pairs
    layer0_lora_a = 2 * len(targets) * p.rank * arch.hidden * work.tokens
    assert formula - counted == layer0_inputs + layer0_key_grad + layer0_lora_a
    assert counted < formula < counted * (1.11 if not causal else 1.01)  # an upper bound, and a close one


@pytest.mark.parametrize("name,causal", [("tiny-bert", False), ("tiny-llama", True)])
def test_gradient_checkpointing_adds_the_recomputed_forward(name, causal):
    p, model, _ = _built(f"model={name}", "method=full")
    assert flops.checkpointed_layers(model) == 0
    model.gradient_checkpointing_enable()
    arch = Architecture.from_config(model.config, causal)
    assert flops.checkpointed_layers(model) == arch.layers
    work = Work.uniform(SEQ, ROWS)
    hardware = flops.training_flops(arch, work, Trainable(True)) + flops.recompute_flops(arch, work)
    counted = _counted(model, _batch(p, causal), train=True)
    # non-reentrant checkpointing stops once the saved tensors are back: Llama's down projection is not rerun
    not_rerun = 2 * arch.hidden * arch.intermediate * work.tokens * arch.layers if causal else 0
    assert counted == hardware - not_rerun
    model.gradient_checkpointing_disable()
    model.gradient_checkpointing_enable(every_n_layers=2)
    assert flops.checkpointed_layers(model) == arch.layers // 2


@pytest.mark.parametrize("name,entry", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA A100 80GB PCIe", "a100-80gb"), ("NVIDIA A10G", "a10g"),
    ("NVIDIA L4", "l4"), ("NVIDIA L40S", "l40s"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("Tesla V100-SXM2-16GB", "v100-sxm2"), ("Tesla V100-PCIE-32GB", "v100-pcie"),
    ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None), ("Tesla V100S-PCIE-32GB", None), ("NVIDIA A40", None),
])
def test_device_names_find_their_datasheet_entry(name, entry):
    assert flops.datasheet_entry(name) == entry


def test_a_known_gpu_gets_its_datasheet_peak_in_the_compute_dtype():
    cuda = torch.device("cuda")
    peak = flops.device_peak(cuda, "bf16", device_name="NVIDIA H100 80GB HBM3")
    assert (peak.flops_per_s, peak.source, peak.name) == (989.5e12, "datasheet", "h100-sxm bf16")
    assert flops.device_peak(cuda, "fp32", device_name="NVIDIA A100-SXM4-80GB").flops_per_s == 19.5e12
    assert flops.device_peak(cuda, "tf32", device_name="NVIDIA A100-SXM4-80GB").flops_per_s == 156e12
    assert flops.device_peak(cuda, "tf32", device_name="Tesla V100-SXM2-16GB").flops_per_s == 15.7e12  # no tf32


def test_an_unknown_gpu_is_probed_in_its_dtype(monkeypatch):
    calls = []

    def probe(device_type, device, dtype, threads):
        calls.append((device_type, dtype))
        return 5e13, 4096

    monkeypatch.setattr(flops, "measured_peak", probe)
    peak = flops.device_peak(torch.device("cuda"), "bf16", device_name="NVIDIA A40")
    assert calls == [("cuda", "bf16")]
    assert (peak.flops_per_s, peak.source) == (5e13, "measured") and "A40" in peak.name


def test_a_cpu_peak_is_a_measured_probe_cached_per_process():
    cpu = torch.device("cpu")
    peak = flops.device_peak(cpu, "fp32")
    assert peak.source == "measured" and peak.name.startswith("cpu") and "threads" in peak.name
    assert 1e8 < peak.flops_per_s < 1e14
    hits = flops.measured_peak.cache_info().hits
    assert flops.device_peak(cpu, "fp32").flops_per_s == peak.flops_per_s
    assert flops.measured_peak.cache_info().hits == hits + 1


def test_compute_dtype_is_autocast_or_the_weights():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert flops.compute_dtype(precision_dtypes("bf16"), cuda) == "bf16"
    assert flops.compute_dtype(precision_dtypes("bf16-mixed"), cuda) == "bf16"  # fp32 weights, bf16 autocast
    assert flops.compute_dtype(precision_dtypes("fp16-mixed"), cuda) == "fp16"
    assert flops.compute_dtype(precision_dtypes("fp32"), cpu) == "fp32"
    before = torch.get_float32_matmul_precision()
    try:
        assert flops.compute_dtype(precision_dtypes("fp32"), cuda) == ("fp32" if before == "highest" else "tf32")
        torch.set_float32_matmul_precision("high")
        assert flops.compute_dtype(precision_dtypes("fp32"), cuda) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_utilisation_divides_by_the_peak_of_every_process(monkeypatch):
    monkeypatch.setattr(flops, "measured_peak", lambda *a: (1e12, 1024))
    p, model, adapters = _built("model=tiny-bert", "method=lora")
    tr = SimpleNamespace(timed_tokens=400, timed_token_pairs=400 * 20)
    train = {"tokens_per_s": 1000.0, "samples_per_s": 50.0}

    def block(world_size):
        return flops.train_utilisation(model, tr, train, causal_lm=False, trains_all_weights=False,
                                       trainable_params_excl_head=adapters, dtypes=p.dtypes, device=p.device,
                                       world_size=world_size)

    one, two = block(1), block(2)
    arch = Architecture.from_config(model.config, False)
    expected = flops.training_flops(arch, Work(1000, 1000 * 20, 50), Trainable(False, adapters))
    assert one["model_flops_per_s"] == pytest.approx(expected) and one["attention_seq_len"] == 20
    assert one["mfu_ratio"] == pytest.approx(expected / 1e12) and two["mfu_ratio"] == pytest.approx(expected / 2e12)
    assert one["hfu_ratio"] == one["mfu_ratio"] and one["checkpointed_layers"] == 0


@needs_glue
def test_smoke_run_records_mfu_with_its_labels(make_cfg):
    from bench.orchestrate.runner import run

    rec = run(make_cfg("method=lora", "rank=4", "measure.latency=false", "save_weights=none"))
    assert rec["status"] == "ok", rec.get("error")
    block, train = rec["train_flops"], rec["train"]
    assert 0 < block["mfu_ratio"] <= 1 and block["hfu_ratio"] == block["mfu_ratio"]
    if not torch.cuda.is_available():  # a CPU: a labelled probe, not a datasheet figure
        assert block["peak_source"] == "measured" and block["peak_name"].startswith("cpu")
        assert block["compute_dtype"] == "fp32"
    assert block["world_size"] == 1 and block["weight_gradients"] == "trainable"
    assert "HFU = MFU" in block["note"]
    assert 1 <= block["attention_seq_len"] <= train["max_batch_seq_len"]
    assert block["model_flops_per_s"] == pytest.approx(block["model_flops_per_token"] * train["tokens_per_s"])
    assert block["forward_flops_per_token"] < block["model_flops_per_token"] < 3 * block["forward_flops_per_token"]
