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
    assert mixed == parts  # autocast over fp32 weights: the same 16 bytes (autocast's copies come on top)
    master = mem.training_state_bytes(7e9, 7e9, "bf16-master", "adamw")
    assert master == {"weights_bytes": 14e9, "master_weights_bytes": 28e9, "gradients_bytes": 14e9,
                      "optimizer_bytes": 56e9}  # 2 (weights) + 4 (master) + 2 (grads) + 8 (moments): also 16 bytes
    assert mem.training_state_bytes(7e9, 1e6, "fp32", "adamw8bit")["optimizer_bytes"] == 2e6


def test_full_finetuning_in_bf16_is_8_bytes_per_param_as_peers_hold_it():
    """precision=bf16, full fine-tuning: weights, gradients and AdamW's two moments all bf16, no master copy
    (peft's benchmark, torchtune): 2 + 2 + 4 = 8 bytes per parameter, 56 GB for 7e9."""
    parts = mem.training_state_bytes(7e9, 7e9, "bf16", "adamw")
    assert parts == {"weights_bytes": 14e9, "master_weights_bytes": 0.0, "gradients_bytes": 14e9,
                     "optimizer_bytes": 28e9}
    assert mem.training_state_bytes(7e9, 7e9, "bf16", "adamw8bit")["optimizer_bytes"] == 14e9  # 8-bit: 2 bytes
    arch = mem.resolve_arch("7b", None)
    full = mem.estimate(arch, mem.Setting(method="full", batch=1, seq=8, precision="bf16", optimizer_impl="foreach"))
    assert full["autocast_weight_copies_bytes"] == 0  # already bf16: autocast copies nothing
    assert full["optimizer_step_working_bytes"] == 2 * arch.params  # foreach: one bf16 temporary per parameter


def test_lora_in_bf16_holds_the_frozen_base_in_2_bytes_per_param():
    """precision=bf16, LoRA r=16 on q_proj, v_proj of the Llama-2 7B shape, by hand: the frozen base 2 bytes per
    parameter, the adapters fp32 with fp32 gradients and moments, and autocast copies only the adapters; against
    bf16-mixed (the frozen base fp32, every linear weight of the layers copied to bf16 per use)."""
    arch = mem.resolve_arch("7b", None)
    p, lora = 6_738_415_616, 32 * 2 * 16 * (4096 + 4096)  # parameters; LoRA: 32 layers x (q, v) x r x (in + out)
    st = mem.Setting(method="lora", rank=16, targets=("q_proj", "v_proj"), batch=1, seq=512, precision="bf16")
    bf16 = mem.estimate(arch, st)
    assert bf16["trainable_params"] == lora == 8_388_608
    assert bf16["weights_bytes"] == 2 * p + 4 * lora == 13_510_385_664
    assert (bf16["gradients_bytes"], bf16["optimizer_bytes"]) == (4 * lora, 8 * lora)
    assert bf16["autocast_weight_copies_bytes"] == 2 * lora
    mixed = mem.estimate(arch, mem.Setting(**{**st.__dict__, "precision": "bf16-mixed"}))
    assert mixed["weights_bytes"] == 4 * p + 4 * lora == 26_987_216_896
    # every linear weight of the 32 layers: q, k, v, o (4096 x 4096) and gate, up, down (4096 x 11008)
    assert mixed["autocast_weight_copies_bytes"] == 2 * 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert mixed["peak_bytes"] - bf16["peak_bytes"] == pytest.approx(
        2 * p + 2 * 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) - 2 * lora)
    # QLoRA keeps what it quantises in NF4 and the rest fp32 (prepare_model_for_kbit_training) under any precision
    q = mem.Setting(**{**st.__dict__, "method": "qlora"})
    assert mem.estimate(arch, q)["weights_bytes"] == mem.estimate(arch, mem.Setting(
        **{**q.__dict__, "precision": "bf16-mixed"}))["weights_bytes"]


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


def test_gradient_checkpointing_keeps_no_autocast_weight_copies_across_layers():
    """Autocast over fp32 weights: without checkpointing autograd keeps a bf16 copy of the linear weights of the
    layers for the backward pass; with checkpointing it keeps none (a layer's copies are made again when its forward
    is recomputed), so the estimator counts one layer's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=176, vocab_size=500)
    arch = mem.arch_from_config(config)
    kept = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        weights = {n: m.weight.detach().to(torch.bfloat16) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers." in n and "lora_" not in n}
        saved = []
        ids = torch.randint(0, 500, (2, 8))
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
                lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            model(input_ids=ids, labels=ids)
        # a weight's copy is saved as it is or transposed
        kept[ckpt] = {n for n, w in weights.items() for t in saved if t.dtype == torch.bfloat16 and any(
            t.shape == v.shape and torch.equal(t, v) for v in (w, w.T))}
    # every copy but the first layer's q, k, v: their input (the frozen embeddings) needs no gradient
    assert kept[False] == {n for n in weights if not any(f"layers.0.self_attn.{p}_proj" in n for p in "qkv")}
    assert len(kept[False]) == 3 * 7 - 3 and kept[True] == set()
    st = mem.Setting(method="lora", rank=4, targets=("q_proj", "v_proj"), batch=2, seq=8, precision="bf16-mixed")
    assert mem.estimate(arch, st)["autocast_weight_copies_bytes"] == 2 * arch.layer_linear_params
    ckpt = mem.estimate(arch, mem.Setting(**{**st.__dict__, "grad_checkpointing": True}))
    assert ckpt["autocast_weight_copies_bytes"] == 2 * arch.layer_linear_params / 3


def test_estimate_vs_measured_from_a_record(make_cfg, tmp_path):
    p = plan(make_cfg("method=lora", "rank=4"))
    arch = mem.resolve_arch("tiny-bert", None)
    est = mem.estimate(arch, mem.Setting(method="lora", rank=4, batch=8, seq=24, precision="bf16"))
    rec = {"schema_version": SCHEMA_VERSION, "run_id": p.run_id, "config_hash": p.config_hash,
           "config_group": p.config_hash, "task": "sst2", "model": "tiny-bert", "seed": 42, "lr": p.lr,
           "budget": "smoke", "status": "ok", "method": "lora", "rank": 4,
           "effective_config": {**p.effective, "device_type": "cuda", "precision": "bf16", "weight_dtype": "bf16"},
           "train": {"max_batch_seq_len": 24},
           "memory": {"train": {"kind": "cuda", "peak_allocated_bytes": int(est["peak_bytes"] / 1.1)}}}
    write_json_atomic(tmp_path / "runs" / p.run_id / RECORD_FILE, json.loads(json.dumps(rec, default=str)))
    rows = mem.compare_records(str(tmp_path / "runs"))
    assert len(rows) == 1 and rows[0]["estimate_over_measured_ratio"] == pytest.approx(1.1, rel=1e-6)
    # a record that says bf16 without a weight_dtype ran autocast over fp32 weights: modelled as bf16-mixed
    legacy = {**rec["effective_config"]}
    del legacy["weight_dtype"]
    assert mem.record_precision(legacy) == "bf16-mixed"
    assert mem.record_precision({**legacy, "precision": "fp16"}) == "fp16-mixed"
    assert mem.record_precision(rec["effective_config"]) == "bf16"
    old = mem.record_estimate({**rec, "effective_config": legacy})
    assert old["estimate_bytes"] == mem.estimate(arch, mem.Setting(method="lora", rank=4, batch=8, seq=24,
                                                                   precision="bf16-mixed"))["peak_bytes"]
    # a 2-rank FSDP run: estimated per GPU with each rank's half of the batch, against the largest rank's peak
    fsdp = {"strategy": "fsdp", "world_size": 2, "reshard_after_forward": True}
    per_gpu = mem.estimate(arch, mem.Setting(method="lora", rank=4, batch=4, seq=24, precision="bf16",
                                             strategy="fsdp", gpus=2))["peak_bytes"]
    two = mem.record_estimate({**rec, "effective_config": {**rec["effective_config"], "distributed": fsdp},
                               "distributed": {**fsdp, "rank_peak_memory_bytes": [100, int(per_gpu)],
                                               "max_rank_peak_memory_bytes": int(per_gpu)}})
    assert two["estimate_bytes"] == per_gpu and two["measured_bytes"] == int(per_gpu)
    assert "fsdp over 2 GPUs" in two["modelled_as"]


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
def test_bf16_weights_gradients_and_moments_match_what_the_loop_holds(method):
    """precision=bf16 runs on the CPU, so the estimator's bf16 arithmetic is checked against the suite's own loop:
    the weights (bf16 base; fp32 adapters and head, or all bf16 for full fine-tuning) and AdamW's moments to 1%.
    The activations follow CPU autocast's op lists, not CUDA's, so the peak is only held within 20%."""
    from bench.config import compose_config
    from bench.tools.perf.memory import estimate_for, measure

    cfg = compose_config(["model=tiny-bert", f"method={method}", "rank=8", "budget.batch_size=8",
                          "budget.max_seq_len=32", "device=cpu", "precision=bf16"])
    measured = measure(cfg, steps=2)
    assert measured["precision"] == "bf16"
    est = estimate_for(cfg, "bf16", fused_attention=False, device_type="cpu")
    assert measured["by_kind"]["weights"] == pytest.approx(est["weights_bytes"], rel=0.01)
    # at the peak: the moments, and in the optimiser step its temporaries (two of the largest tensor, in its dtype)
    assert measured["by_kind"]["optimizer"] == pytest.approx(est["by_kind"]["optimizer"], rel=0.01)
    per_param = 4 if method == "full" else 8  # AdamW's two moments in the trainable parameters' dtype
    assert est["optimizer_bytes"] == per_param * est["trainable_params"]
    assert est["peak_bytes"] == pytest.approx(measured["peak_bytes"], rel=0.2)


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


# ---------------------------------------------------------------- one run over several GPUs (per GPU)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _per_gpu(arch, method: str, strategy: str, gpus: int, **kw) -> dict[str, float]:
    return mem.estimate(arch, mem.Setting(method=method, rank=8, targets=ALL_LINEAR, batch=1, seq=2048,
                                          precision="bf16", grad_checkpointing=True, strategy=strategy, gpus=gpus,
                                          **kw))


def test_llama3_presets_have_their_parameter_counts():
    """8b and llama3-70b: Llama-3's shapes (128256-entry vocabulary, untied LM head); 70b stays Llama-2's."""
    assert mem.resolve_arch("8b", None).params == 8_030_261_248
    big = mem.resolve_arch("llama3-70b", None)
    assert big.params == 70_553_706_496 and big.layers == 80
    assert mem.resolve_arch("70b", None).params == 68_976_648_192  # Llama-2 70B
    arch = mem.resolve_arch("8b", None)  # one block: attention (GQA: 8 of 32 heads for k, v), SwiGLU MLP, 2 norms
    assert arch.block_params == 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("gpus", [2, 8])
def test_fsdp_divides_weights_gradients_and_optimizer_by_n_plus_the_gathered_units(method, gpus):
    arch = mem.resolve_arch("8b", None)
    one = _per_gpu(arch, method, "none", 1)
    per = _per_gpu(arch, method, "fsdp", gpus)
    whole = arch.quantisable_params * (1 / 64 + 4 / (64 * 256)) if method == "qlora" else 0  # constants: not sharded
    state = ("weights_bytes", "master_weights_bytes", "gradients_bytes", "optimizer_bytes")
    assert sum(per[k] for k in state) == pytest.approx((sum(one[k] for k in state) - whole) / gpus + whole)
    # the unsharded working set: the root (embeddings, final norm, LM head) and two blocks, as stored
    root, block = 2 * 128256 * 4096 + 4096, arch.block_params
    adapters = (one["trainable_params"]) / 32  # LoRA per block (a causal LM has no task head)
    if method == "full":
        gathered, grads = 2 * (root + 2 * block), 2 * (root + block)  # pure bf16, gradients too
    elif method == "lora":
        gathered, grads = 2 * root + 2 * (2 * block + 4 * adapters), 4 * adapters  # bf16 base, fp32 adapters
    else:
        linear = arch.layer_linear_params / 32  # NF4 in a block; norms, embeddings, LM head, adapters fp32
        gathered, grads = 4 * root + 2 * (0.5 * linear + 4 * (block - linear) + 4 * adapters), 4 * adapters
    assert per["fsdp_gathered_params_bytes"] == pytest.approx(gathered)
    assert per["fsdp_unsharded_grads_bytes"] == pytest.approx(grads)
    # activations are per GPU (each GPU's micro-batch), not divided
    assert per["activations_bytes"] == one["activations_bytes"]
    # FSDP pays off: it holds less than one process from 2 GPUs on (QLoRA only from 8: its fp32 root is large)
    assert (per["peak_bytes"] < one["peak_bytes"]) == (method != "qlora" or gpus == 8)


def test_fsdp_keeping_gathered_blocks_costs_the_whole_unsharded_model():
    """reshard_after_forward=False (ZeRO-2-like): every block stays gathered from its forward into the backward pass,
    so each GPU holds its shard and the whole model as stored: for LoRA more than DDP's one copy."""
    arch = mem.resolve_arch("8b", None)
    keep = _per_gpu(arch, "lora", "fsdp", 8, reshard_after_forward=False)
    weights = _per_gpu(arch, "lora", "none", 1)["weights_bytes"]  # the model as stored (bf16 base, fp32 adapters)
    assert keep["fsdp_gathered_params_bytes"] == pytest.approx(weights)
    assert keep["weights_bytes"] + keep["fsdp_gathered_params_bytes"] == pytest.approx(weights * (1 + 1 / 8))
    assert keep["peak_bytes"] > _per_gpu(arch, "lora", "ddp", 8)["peak_bytes"]
    full = _per_gpu(arch, "full", "fsdp", 8, reshard_after_forward=False)
    assert full["peak_bytes"] < _per_gpu(arch, "full", "ddp", 8)["peak_bytes"]  # full FT: gradients, moments shard


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_ddp_is_one_process_plus_a_copy_of_the_trainable_gradients(method):
    arch = mem.resolve_arch("8b", None)
    one = _per_gpu(arch, method, "none", 1)
    for gpus in (1, 2, 8):  # a full replica whatever N
        ddp = _per_gpu(arch, method, "ddp", gpus)
        assert ddp["ddp_buckets_bytes"] == one["gradients_bytes"]
        assert ddp["peak_bytes"] == pytest.approx(one["peak_bytes"] + one["gradients_bytes"])
        view = _per_gpu(arch, method, "ddp", gpus, gradient_as_bucket_view=True)
        assert view["peak_bytes"] == one["peak_bytes"]
    if method == "lora":  # only trainable parameters are reduced: the adapters' fp32 gradients, ~84 MB
        assert one["gradients_bytes"] == 4 * one["trainable_params"] < 0.01 * one["peak_bytes"]


def test_fsdp_on_one_gpu_is_one_process_plus_its_working_set():
    arch = mem.resolve_arch("8b", None)
    for method in ("full", "lora"):
        one, fsdp = _per_gpu(arch, method, "none", 1), _per_gpu(arch, method, "fsdp", 1)
        extra = fsdp["fsdp_gathered_params_bytes"] + fsdp["fsdp_unsharded_grads_bytes"]
        assert fsdp["peak_bytes"] == pytest.approx(one["peak_bytes"] + extra)
        assert extra < 0.15 * one["peak_bytes"]


@pytest.mark.parametrize("setting, message", [
    ({"strategy": "fsdp", "gpus": 0}, "gpus 0: the number of GPUs is a whole number, at least 1"),
    ({"strategy": "ddp", "gpus": -2}, "gpus -2"),
    ({"strategy": "fsdp", "gpus": 2.5}, "gpus 2.5"),
    ({"strategy": "zero3", "gpus": 2}, "strategy 'zero3': choose one of none, ddp, fsdp"),
    ({"strategy": "none", "gpus": 4}, "strategy none is one process on one GPU; 4 GPUs need ddp or fsdp"),
])
def test_nonsense_strategies_and_gpu_counts_are_refused_in_one_line(setting, message):
    arch = mem.resolve_arch("tiny-bert", None)
    with pytest.raises(ValueError, match=message) as err:
        mem.estimate(arch, mem.Setting(method="lora", **setting))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0", "--strategy", "fsdp"], "error: --gpus '0': GPU counts are whole numbers, at least 1"),
    (["--gpus", "two", "--strategy", "ddp"], "error: --gpus 'two'"),
    (["--strategy", "fsdp1", "--gpus", "2"], "error: --strategy 'fsdp1': choose from none, ddp, fsdp"),
    (["--gpus", "2"], "error: --gpus 2: strategy none is one process on one GPU"),
])
def test_cli_refuses_nonsense_in_one_line(argv, message):
    with pytest.raises(SystemExit) as err:
        mem.main(["--model", "tiny-bert", *argv])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cli_prints_per_gpu_components_for_each_strategy_and_count(capsys):
    mem.main(["--model", "tiny-llama", "--batch-size", "2", "--seq-len", "16", "--strategy", "none,ddp,fsdp",
              "--gpus", "1,2,8"])
    text = capsys.readouterr().out
    header = "| component | none | ddp x1 | ddp x2 | ddp x8 | fsdp x1 | fsdp x2 | fsdp x8 |"
    assert text.count(header) == 3  # full, lora, qlora
    assert "| fsdp_gathered_params |" in text and "| ddp_buckets |" in text and "peak per GPU (GiB)" in text
    mem.main(["--model", "tiny-llama", "--method", "lora", "--strategy", "fsdp", "--gpus", "2",
              "--no-reshard-after-forward", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert list(data["per_gpu"]["lora"]) == ["fsdp x2 keep"]


# Real DDP and FSDP2 on the CPU: what torch allocates, against the arithmetic above.

def _tiny_llama(method: str):
    """A 4-block Llama whose every dimension divides by 2 and 4 (FSDP's shards are then exact), and its Arch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=352, vocab_size=1000, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    return model, mem.arch_from_config(config)


def test_ddp_buckets_are_one_copy_of_the_trainable_gradients(tmp_path):
    """DDP (gloo, one process) hands its bucket buffers to a communication hook: together they hold exactly the
    trainable gradients' bytes, frozen parameters have none, and the gradients are separate tensors unless
    gradient_as_bucket_view=True."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for method in ("full", "lora"):
            for as_view in (False, True):
                model, arch = _tiny_llama(method)
                trainable = [p for p in model.parameters() if p.requires_grad]
                ddp = DistributedDataParallel(model, gradient_as_bucket_view=as_view, bucket_cap_mb=1)
                buckets: dict[int, int] = {}

                def hook(_, bucket, buckets=buckets):
                    buf = bucket.buffer()
                    buckets[buf.untyped_storage().data_ptr()] = buf.numel() * buf.element_size()
                    fut = torch.futures.Future()
                    fut.set_result(buf)
                    return fut

                ddp.register_comm_hook(None, hook)
                ids = torch.randint(0, 1000, (2, 16))
                for _ in range(2):  # gradients become bucket views after the first step
                    buckets.clear()
                    model.zero_grad(set_to_none=True)
                    ddp(input_ids=ids, labels=ids).loss.backward()
                grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable)
                assert sum(buckets.values()) == grads  # the cap splits them, the total is every trainable gradient
                views = [p.grad.untyped_storage().data_ptr() in buckets for p in trainable]
                assert all(views) if as_view else not any(views)
                est = mem.estimate(arch, mem.Setting(method=method, rank=8, targets=("q_proj", "v_proj"), batch=2,
                                                     seq=16, precision="fp32", strategy="ddp", gpus=1,
                                                     gradient_as_bucket_view=as_view))
                assert est["ddp_buckets_bytes"] == (0 if as_view else grads)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("gpus", [2, 4])
def test_fsdp2_shards_and_gathers_what_the_estimate_counts(method, gpus):
    """FSDP2 (fully_shard per block, then the root) over a fake process group of N ranks in this one process
    (torch's FakeStore: collectives move no data, every allocation is real): one rank's local shards of the
    parameters, gradients and AdamW states are the estimate's per-GPU figures; the parameters unsharded while a
    block runs are the root and that block (reshard_after_forward=True: the estimate adds the next block, which a
    GPU prefetches), and the root and every block up to it with False."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from bench.tools.memory_estimate import fsdp_unit_bytes

    def local_bytes(tensors):
        return sum(t.to_local().numel() * t.element_size() for t in tensors)

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        for reshard in (True, False):
            model, arch = _tiny_llama(method)
            blocks = list(model.get_base_model().model.layers if method == "lora" else model.model.layers)
            for block in blocks:
                fully_shard(block, reshard_after_forward=reshard)
            fully_shard(model, reshard_after_forward=reshard)
            unsharded: list[int] = []

            def count(*_, model=model, unsharded=unsharded):
                unsharded.append(sum(p.numel() * p.element_size() for p in model.parameters()
                                     if not isinstance(p, DTensor)))

            for block in blocks:  # inside a block's forward its parameters are unsharded (plain tensors)
                block.self_attn.register_forward_pre_hook(count)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            ids = torch.randint(0, 1000, (2, 16))
            model(input_ids=ids, labels=ids).loss.backward()
            grads = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
            opt.step()
            est = mem.estimate(arch, mem.Setting(method=method, rank=8, targets=("q_proj", "v_proj"), batch=2,
                                                 seq=16, precision="fp32", strategy="fsdp", gpus=gpus,
                                                 reshard_after_forward=reshard))
            assert local_bytes(model.parameters()) == est["weights_bytes"]
            assert grads == est["gradients_bytes"]
            assert local_bytes(v for s in opt.state.values() for k, v in s.items() if k != "step") \
                == est["optimizer_bytes"]
            units = fsdp_unit_bytes(arch, mem.Setting(method=method, precision="fp32"), est["trainable_params"])
            assert unsharded[0] == units["root"] + units["block"]  # the root and the first block
            if reshard:
                assert max(unsharded) == units["root"] + units["block"]
                assert est["fsdp_gathered_params_bytes"] == units["root"] + 2 * units["block"]
            else:
                assert unsharded[-1] == units["root"] + len(blocks) * units["block"] \
                    == est["fsdp_gathered_params_bytes"]
    finally:
        dist.destroy_process_group()
