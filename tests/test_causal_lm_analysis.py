"""Analysis of causal-LM runs: their own report section and table, the memory estimator on a Llama shape, and
intruders / ΔW spectrum over the decoder's projections (embeddings and the tied LM head excluded).

The fast tests build records in the test from the real composed configs (tiny-llama); the one that trains real
tiny-llama runs through the runner is marked slow."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from analysis import tables
from analysis.collect import to_frame
from analysis.report import build_report
from bench.config import compose_config
from bench.plan import plan
from bench.record import RECORD_FILE, SCHEMA_VERSION, migrate, write_json_atomic
from bench.tools import memory_estimate as mem

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VOCAB, HIDDEN = 49152, 128  # conf/model/tiny-llama.yaml


@functools.cache
def _plan(method: str, rank: int | None):
    """The real composed config's plan (nothing is written), once per test module: planning takes seconds here."""
    from tests.conftest import compose_cfg

    return plan(compose_cfg("model=tiny-llama", f"method={method}", *((f"rank={rank}",) if rank else ())))


def _causal_record(method: str, accuracy: float, *, rank: int | None = None, trainable: int = 3584,
                   seq: int = 40) -> dict:
    p = _plan(method, rank)
    return {
        "schema_version": SCHEMA_VERSION, "run_id": p.run_id, "config_hash": p.config_hash,
        "config_group": p.config_hash, "lr": p.lr, "status": "ok", "task": "sst2",
        "model": "tiny-llama", "method": method, "rank": p.rank, "seed": 42, "budget": "smoke",
        "effective_config": {**p.effective, "device_type": "cpu", "precision": "fp32"},
        "model_kind": "causal_lm", "model_note": "random-init test model: metrics are meaningless",
        "main_metric": "accuracy", "main_metric_value": accuracy, "metrics": {"accuracy": accuracy},
        "zero_shot_main_metric_value": 0.5, "zero_shot_metrics": {"accuracy": 0.5},
        "trainable_params": trainable, "trainable_params_excl_head": trainable, "total_params": 3_219_776,
        "train_tokens_per_s": 1234.0, "train": {"steps": 4, "max_batch_seq_len": seq},
        "memory": {"train": {"kind": "cpu_rss", "peak_rss_bytes": 900 * 2**20}},
        "forgetting": {"probe": "ppl", "metric": "perplexity", "higher_is_better": False, "before": 20.0,
                       "after": 22.0, "forgetting": 2.0, "text_source": "test"},
        "generation": {"batch_size": 4, "prompt_len": 32, "new_tokens": 16,
                       "base": {"decode_tokens_per_s": 500.0}, "unmerged": {"decode_tokens_per_s": 300.0},
                       "merged": {"decode_tokens_per_s": 480.0}, "unmerged_over_base_ratio": 1.6},
    }


def _write(root, rec: dict) -> None:
    write_json_atomic(root / rec["run_id"] / RECORD_FILE, json.loads(json.dumps(rec, default=str)))


def test_report_shows_causal_lm_runs_in_their_own_section_with_their_figures(tmp_path):
    runs = tmp_path / "runs"
    lora = _causal_record("lora", 0.75, rank=8)
    lora["train_flops"] = {"mfu_ratio": 0.412, "hfu_ratio": 0.412, "peak_flops_per_s": 989.5e12,
                           "peak_source": "datasheet", "peak_name": "h100-sxm bf16", "world_size": 1}
    full = _causal_record("full", 0.625, trainable=3_219_776)
    for rec in (lora, full):
        _write(runs, rec)
    index = build_report(runs, tmp_path / "report", analyse=False, table=None)
    text = index.read_text()
    section = text.split("## Causal language models", 1)[1].split("## Runs that did not finish")[0]
    assert "### tiny-llama, budget smoke" in section and "Random-init test model" in section
    assert "Method × task (LoRA paper Table 2 style)" not in text  # no encoder group: no encoder table
    row = next(line for line in section.splitlines() if line.startswith("| SST-2 | LoRA"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    est = mem.record_estimate(json.loads((runs / lora["run_id"] / RECORD_FILE).read_text()))["estimate_bytes"]
    assert cells[2:5] == ["75.0 (Acc)", "50.0", "3.58K"]
    assert cells[5:] == ["900", f"{est / 2**20:.0f}", "1,234", "41.2%", "300 / 480", "20.0 → 22.0", "–", "1"]
    assert "base model decodes 500 tokens/s" in section
    csv = (tmp_path / "report" / "tables" / "causal_lm.csv").read_text()
    assert "zero_shot_pct_mean" in csv and "decode_tokens_per_s_merged_median" in csv
    html = (tmp_path / "report" / "index.html").read_text()
    assert 'id="causal-lm"' in html and "Zero-shot" in html


def test_old_records_without_model_kind_are_encoders():
    """Schema 1 records written before causal LMs have no model_kind: the reader migrates them as encoders."""
    causal = _causal_record("lora", 0.75, rank=8)
    old = {k: v for k, v in causal.items() if k not in ("model_kind", "zero_shot_main_metric_value", "generation")}
    old.update(run_id="old-encoder", model="tiny-bert", schema_version=1)
    old = migrate(old)
    df = to_frame([causal, old])
    assert list(tables.kind_of(df)) == ["causal_lm", "classifier"]
    (table,) = tables.causal_lm_tables(df)
    assert table.title.startswith("Causal LM: tiny-llama") and len(table.rows) == 1
    assert tables.causal_lm_tables(to_frame([old])) == []


def test_estimator_counts_a_llama_shape_and_the_logits_over_the_vocabulary():
    arch = mem.resolve_arch("tiny-llama", None)
    shape = compose_config(["model=tiny-llama"]).model.config
    h, ffn = int(shape.hidden_size), int(shape.intermediate_size)
    kv = h // int(shape.num_attention_heads) * int(shape.num_key_value_heads)  # k and v outputs
    assert HIDDEN == h
    # by hand: embeddings (tied with the LM head, counted once) + 2 layers of q, k, v, o (grouped-query: k and v
    # project to kv), a SwiGLU MLP (3 x h x ffn) and two RMSNorms, + the final norm
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * ffn + 2 * h
    assert arch.causal_lm and arch.head_params == 0
    assert arch.params == VOCAB * HIDDEN + 2 * per_layer + h
    setting = mem.Setting(method="lora", rank=8, targets=("q_proj", "v_proj"), batch=4, seq=32, precision="fp32",
                          fused_attention=False, optimizer_impl="single_tensor")
    lora = mem.estimate(arch, setting)
    tokens = 4 * 32
    assert lora["trainable_params"] == 2 * (8 * (h + h) + 8 * (h + kv))  # q: h -> h, v: h -> kv, 2 layers
    assert lora["backward_working_bytes"] == 8 * tokens * VOCAB  # two fp32 tokens x vocab gradients
    layers = mem.activation_bytes_per_layer(arch, 4, 32, "fp32", False, lora=True)
    assert lora["activations_bytes"] == 2 * layers + 4 * tokens * VOCAB - 4 * tokens * HIDDEN
    # the LM head is frozen under LoRA: the largest trainable tensor is a LoRA matrix (8 x h), not 49152 x h
    assert lora["optimizer_step_working_bytes"] == 8 * 8 * h
    doubled = mem.estimate(arch, mem.Setting(**{**setting.__dict__, "seq": 64}))
    assert doubled["peak_bytes"] - lora["peak_bytes"] > 12 * tokens * VOCAB * 0.99  # the vocabulary term grows


def test_estimator_in_bf16_on_a_llama_shape_by_hand():
    """precision=bf16 on tiny-llama: LoRA keeps the frozen base in 2 bytes per parameter and its adapters fp32;
    full fine-tuning is pure bf16 (2 + 2 + 4 bytes per parameter, temporaries of the largest tensor in bf16)."""
    arch = mem.resolve_arch("tiny-llama", None)
    p = arch.params
    setting = mem.Setting(method="lora", rank=8, targets=("q_proj", "v_proj"), batch=4, seq=32, precision="bf16",
                          fused_attention=False, optimizer_impl="single_tensor")
    lora = mem.estimate(arch, setting)
    t = lora["trainable_params"]
    assert lora["weights_bytes"] == 2 * p + 4 * t and lora["gradients_bytes"] == 4 * t
    assert lora["optimizer_bytes"] == 8 * t and lora["autocast_weight_copies_bytes"] == 2 * t
    assert lora["optimizer_step_working_bytes"] == 8 * 8 * HIDDEN  # fp32 LoRA matrix (8 x h), two temporaries
    full = mem.estimate(arch, mem.Setting(**{**setting.__dict__, "method": "full"}))
    assert (full["weights_bytes"], full["gradients_bytes"], full["optimizer_bytes"]) == (2 * p, 2 * p, 4 * p)
    assert full["optimizer_step_working_bytes"] == 2 * 2 * VOCAB * HIDDEN  # the embedding, two bf16 temporaries
    fp32 = mem.estimate(arch, mem.Setting(**{**setting.__dict__, "precision": "fp32"}))
    assert fp32["weights_bytes"] - lora["weights_bytes"] == 2 * p  # the frozen base, halved


def test_record_estimate_for_causal_lm_runs_of_any_method():
    lora = mem.record_estimate(_causal_record("lora", 0.7, rank=8, seq=40))
    arch = mem.resolve_arch("tiny-llama", None)
    by_hand = mem.estimate(arch, mem.Setting(method="lora", rank=8, targets=("q_proj", "v_proj"), batch=8, seq=40,
                                             precision="fp32", fused_attention=False,
                                             optimizer_impl="single_tensor"))
    assert lora["causal_lm"] and lora["estimate_bytes"] == by_hand["peak_bytes"]
    assert lora["measured_rss_bytes"] == 900 * 2**20 and "estimate_over_measured_ratio" not in lora  # CPU: no ratio
    ia3 = mem.record_estimate(_causal_record("ia3", 0.7, trainable=384))
    assert ia3["parts"]["trainable_params"] == 384 and "frozen base" in ia3["modelled_as"]
    prompt = mem.record_estimate(_causal_record("prompt_tuning", 0.7, rank=10, trainable=640, seq=40))
    assert prompt["seq"] == 50 and prompt["estimate_bytes"] > ia3["estimate_bytes"]  # + 10 virtual tokens


def test_analysed_layers_of_a_llama_are_its_seven_projections(make_cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    from analysis import weights
    from methods.base import head_modules

    cfg = make_cfg("model=tiny-llama")
    config = AutoConfig.for_model("llama", **dict(cfg.model.config))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "lm_head" in names  # tied to the embeddings: a Linear that must not count as a layer
    analysed = [n for n, m in model.named_modules() if weights.is_analysed_linear(n, m, head_modules(cfg.model))]
    assert sorted(analysed) == sorted(f"model.layers.{i}.{part}.{p}" for i in range(2)
                                      for part, projs in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:]))
                                      for p in projs)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])  # full: tiny-llama's tied embed_tokens / lm_head saved once
def test_intruders_and_spectrum_of_tiny_llama_runs(method, tmp_path):
    from analysis.analyse import analyse_run
    from analysis.weights import weight_pairs
    from bench.orchestrate.runner import run
    from tests.conftest import compose_cfg

    rec = run(compose_cfg("model=tiny-llama", f"method={method}", "measure.latency=false", "budget.max_steps=2",
                          "budget.eval_samples=8", results_dir=tmp_path / "runs"))
    assert rec["status"] == "ok", rec.get("error")
    run_dir = tmp_path / "runs" / rec["run_id"]
    wp = weight_pairs(run_dir)
    names = [name for name, _, _ in wp.pairs]
    assert len(names) == 14 and all(name.rsplit(".", 1)[-1] in PROJECTIONS for name in names), names
    changed = {name.rsplit(".", 1)[-1] for name, w0, wt in wp.pairs if not torch.equal(w0, wt)}
    assert changed == ({"q_proj", "v_proj"} if method == "lora" else set(PROJECTIONS))
    res = analyse_run(run_dir, force=True)
    assert res["status"] == "ok" and res["intruders"]["layers"] == 14
    assert res["spectrum"]["changed_layers"] == (4 if method == "lora" else 14)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_causal_lm_estimate_matches_the_tensor_memory_the_training_loop_holds(method):
    from bench.config import compose_config
    from bench.tools.perf.memory import estimate_for, measure

    cfg = compose_config(["model=tiny-llama", f"method={method}", "rank=8", "budget.batch_size=4",
                          "budget.max_seq_len=32", "device=cpu"])
    # Two steps: AdamW creates its states in the first step, so only from the second backward on are they alive
    # beside the activations, the steady-state peak the estimate models. With one step, full FT's peak is the first
    # optimiser step (at hidden 64: 89.6 MB measured vs 115.8 MB estimated; two steps: 115.4 MB).
    measured = measure(cfg, steps=2)
    est = estimate_for(cfg, measured["precision"], fused_attention=False, device_type="cpu")
    assert est["peak_bytes"] == pytest.approx(measured["peak_bytes"], rel=0.05)
