"""The memory estimator's arithmetic against hand calculations, its activation coefficients against the bytes
autograd really keeps, and estimate-vs-measured from a record."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig

from analysis import memory as mem
from bench.plan import plan
from bench.record import RECORD_FILE, SCHEMA_VERSION, write_json_atomic


def test_full_finetuning_fp32_adam_is_16_bytes_per_param():
    parts = mem.training_state_bytes(7e9, 7e9, "fp32", "adamw")
    assert parts == {"weights_bytes": 28e9, "master_weights_bytes": 0.0, "gradients_bytes": 28e9,
                     "optimizer_bytes": 56e9}
    assert sum(parts.values()) == 112e9  # 4 + 4 + 8 bytes per parameter = 112 GB for 7e9 parameters
    mixed = mem.training_state_bytes(7e9, 7e9, "bf16-mixed", "adamw")
    assert sum(mixed.values()) == 112e9  # 2 (weights) + 4 (master) + 2 (grads) + 8 (moments): also 16 bytes
    assert mem.training_state_bytes(7e9, 1e6, "fp32", "adamw8bit")["optimizer_bytes"] == 2e6


def test_llama_7b_preset_has_llama2_7b_parameter_count():
    arch = mem.resolve_arch("7b", None)
    assert arch.params == 6_738_415_616 and arch.layers == 32 and arch.causal_lm
    # LoRA r=16 on q_proj, v_proj: 32 layers x 2 modules x 16 x (4096 + 4096)
    assert mem.lora_trainable(arch, 16, ["q_proj", "v_proj"]) == 32 * 2 * 16 * 8192


def test_lora_count_on_roberta_base_matches_hand_calculation():
    arch = mem.arch_from_config(RobertaConfig(num_labels=2))
    assert mem.lora_trainable(arch, 8, ["query", "value"]) == 294_912  # 12 layers x 2 x 8 x (768 + 768)
    assert arch.head_params == 768 * 768 + 768 + 768 * 2 + 2  # classifier.dense + classifier.out_proj
    est = mem.estimate(arch, mem.Setting(method="lora", rank=8, targets=("query", "value")))
    assert est["trainable_params"] == 294_912 + arch.head_params


def test_meta_model_counts_match_the_real_model(make_cfg):
    cfg = make_cfg()
    arch = mem.resolve_arch("tiny-bert", None)
    real = BertForSequenceClassification(BertConfig(num_labels=2, **dict(cfg.model.config)))
    assert arch.params == sum(p.numel() for p in real.parameters())


def test_qlora_weights_are_nf4_plus_double_quant_constants():
    arch = mem.resolve_arch("7b", None)
    st = mem.Setting(method="qlora", rank=16, targets=("q_proj", "v_proj"))
    est = mem.estimate(arch, st)
    quantised = arch.quantisable_params
    lora = mem.lora_trainable(arch, 16, ["q_proj", "v_proj"])
    per_param = 0.5 + 1 / 64 + 4 / (64 * 256)  # NF4 + 8-bit absmax per 64 + fp32 constant per 256 absmax
    assert est["weights_bytes"] == pytest.approx(quantised * per_param + 4 * (arch.params - quantised + lora))
    assert per_param * 8 == pytest.approx(4.127, abs=1e-3)  # QLoRA paper: 0.127 bit/param for the constants
    no_dq = mem.estimate(arch, mem.Setting(**{**st.__dict__, "double_quant": False}))
    assert no_dq["weights_bytes"] - est["weights_bytes"] == pytest.approx(quantised * (4 / 64 - 1 / 64 - 4 / 16384))
    assert est["peak_bytes"] < mem.estimate(arch, mem.Setting(**{**st.__dict__, "method": "lora"}))["peak_bytes"]


def _saved_activation_bytes(model, batch: int, seq: int) -> int:
    """Bytes of the (non-parameter) tensors autograd keeps for the backward pass of one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(1000, 30000, (batch, seq))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(batch, dtype=torch.long))
    return sum(seen.values())


def test_activation_coefficients_match_what_autograd_keeps():
    torch.manual_seed(0)
    config = BertConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=2, intermediate_size=512,
                        num_labels=2, attn_implementation="eager")
    arch = mem.arch_from_config(config)
    batch, seq = 4, 64
    measured = _saved_activation_bytes(BertForSequenceClassification(config), batch, seq)
    est = mem.estimate(arch, mem.Setting(method="full", batch=batch, seq=seq, precision="fp32",
                                         fused_attention=False))
    assert est["activations_bytes"] == pytest.approx(measured, rel=0.05)
    lora_model = get_peft_model(BertForSequenceClassification(config),
                                LoraConfig(task_type=TaskType.SEQ_CLS, r=8, target_modules=["query", "value"]))
    lora_measured = _saved_activation_bytes(lora_model, batch, seq)
    lora_est = mem.estimate(arch, mem.Setting(method="lora", batch=batch, seq=seq, precision="fp32",
                                              fused_attention=False))
    assert lora_measured <= lora_est["activations_bytes"] <= 1.3 * lora_measured  # an upper bound for LoRA


def test_estimate_vs_measured_from_a_record(make_cfg, tmp_path):
    p = plan(make_cfg("method=lora", "rank=4"))
    est = mem.estimate(mem.resolve_arch("tiny-bert", None),
                       mem.Setting(method="lora", rank=4, batch=8, seq=24, precision="amp"))
    rec = {"schema_version": SCHEMA_VERSION, "run_id": p.run_id, "config_hash": p.config_hash,
           "config_group": p.config_hash, "task": "sst2", "model": "tiny-bert", "seed": 42, "lr": p.lr,
           "budget": "smoke", "status": "ok", "method": "lora", "rank": 4,
           "effective_config": {**p.effective, "device_type": "cuda", "precision": "bf16"},
           "train": {"max_batch_seq_len": 24},
           "memory": {"train": {"kind": "cuda", "peak_allocated_bytes": int(est["peak_bytes"] / 1.1)}}}
    write_json_atomic(tmp_path / "runs" / p.run_id / RECORD_FILE, json.loads(json.dumps(rec, default=str)))
    rows = mem.compare_records(str(tmp_path / "runs"))
    assert len(rows) == 1 and rows[0]["estimate_over_measured_ratio"] == pytest.approx(1.1, rel=1e-6)


def test_cli_prints_a_table_and_plots(tmp_path, capsys):
    out = tmp_path / "mem.png"
    mem.main(["--model", "tiny-bert", "--batch-size", "8", "--seq-len", "32", "--plot", str(out),
              "--plot-sizes", "1e8,1e9"])
    text = capsys.readouterr().out
    assert "| peak_bytes |" in text and "| optimizer_bytes |" in text and out.stat().st_size > 10_000
    mem.main(["--params", "7e9", "--precision", "fp32", "--method", "full", "--json"])
    data = json.loads(capsys.readouterr().out)
    full = data["estimates"]["full"]
    assert full["weights_bytes"] + full["gradients_bytes"] + full["optimizer_bytes"] == 16 * full["total_params"]


def test_adamw_step_temporaries_by_implementation():
    arch = mem.resolve_arch("tiny-bert", None)
    assert arch.largest_param == 30522 * 64  # the token embedding
    full = mem.Setting(method="full", batch=1, seq=8, precision="fp32")
    work = {impl: mem.estimate(arch, mem.Setting(**{**full.__dict__, "optimizer_impl": impl}))
            for impl in mem.OPTIMIZER_IMPLS}
    assert work["fused"]["optimizer_step_working_bytes"] == 0
    assert work["foreach"]["optimizer_step_working_bytes"] == 4 * arch.params
    assert work["single_tensor"]["optimizer_step_working_bytes"] == 8 * 30522 * 64
    # With a tiny batch the optimiser step is the peak: weights + gradients + moments + its temporaries.
    assert work["foreach"]["peak_bytes"] == (4 + 4 + 8 + 4) * arch.params
    lora = mem.estimate(arch, mem.Setting(method="lora", rank=8, optimizer_impl="single_tensor"))
    # largest trainable: the pooler's dense, 64 x 64, part of the task head (a LoRA matrix is r x 64)
    assert lora["optimizer_step_working_bytes"] == 8 * (64 * 64)


def test_tensor_bytes_counts_live_storages_once():
    from bench.tools.perf.memory import TensorBytes

    model = torch.nn.Linear(10, 10)  # 110 fp32 parameters = 440 bytes
    with TensorBytes(model) as tracker:
        x = torch.empty(1000)
        view = x.view(10, 100)  # same storage: not counted again
        assert tracker.bytes == {"weights": 440, "gradients": 0, "optimizer": 0, "activations+temp": 4000}
        del x, view
        assert tracker.bytes["activations+temp"] == 0
        model(torch.ones(3, 10)).sum().backward()
        assert tracker.bytes["gradients"] == 440
    tracker.close()
    assert tracker.peak_bytes >= 440 + 4000


@pytest.mark.parametrize("method", ["full", "lora"])
def test_estimate_matches_the_tensor_memory_the_training_loop_holds(method):
    """The estimator against a measurement of the suite's own loop (fp32 CPU; the autocast path needs a GPU)."""
    from bench.config import compose_config
    from bench.tools.perf.memory import estimate_for, measure

    cfg = compose_config(["model=tiny-bert", f"method={method}", "rank=8", "budget.batch_size=8",
                       "budget.max_seq_len=32", "device=cpu"])
    measured = measure(cfg, steps=2)
    est = estimate_for(cfg, measured["precision"], fused_attention=False, device_type="cpu")
    assert est["peak_bytes"] == pytest.approx(measured["peak_bytes"], rel=0.1)
    trainable = est["trainable_params"]
    assert measured["by_kind"]["weights"] == pytest.approx(4 * est["total_params"], rel=0.01)
    assert measured["by_kind"]["optimizer"] >= 8 * trainable  # AdamW's two fp32 moments
