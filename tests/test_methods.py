"""Every method, on a tiny random-init BERT through the real configs: what trains, identity at init,
change after one step, merge equivalence, parameter counts by hand, AdaLoRA's reallocation, save/load."""
from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from peft import PromptLearningConfig
from transformers import RobertaConfig, RobertaForSequenceClassification

from bench import BenchError
from bench.model import is_causal_lm
from bench.plan import plan
from methods import REGISTRY, AttachContext, get_method
from methods.base import count_params, head_modules, is_head_param
from methods.peft_generic import method_yamls
from tests.conftest import REPO
from tests.method_helpers import (
    ALL_METHODS,
    IDENTITY_AT_INIT,
    MERGING,
    batch,
    build,
    fresh_base,
    logits,
    perturb,
    registry_cases,
    train_steps,
    trainable,
)

# Every trainable parameter outside the head matches this, and every parameter that matches trains. Methods written
# here; a yaml-only peft method (methods/peft_generic.py) is checked against its own tuner's names instead.
TRAINS = {
    "full": r".*",
    "bitfit": r".*\.bias",
    "lora": r".*\.lora_[AB]\.default\.weight",
    "lora_fixed_alpha": r".*\.lora_[AB]\.default\.weight",
    "rslora": r".*\.lora_[AB]\.default\.weight",
    "loraplus": r".*\.lora_[AB]\.default\.weight",
    "lora_fa": r".*\.lora_B\.default\.weight",  # A frozen at its init
    "dylora": r".*\.lora_[AB]\.default\.weight",
    "dora": r".*\.(lora_[AB]|lora_magnitude_vector)\.default\.weight",
    "adalora": r".*\.lora_[ABE]\.default",
    "houlsby": r".*(\.adapter\.(down|up)\.(weight|bias)|\.LayerNorm\.(weight|bias))",
    "pfeiffer": r".*\.adapter\.(down|up)\.(weight|bias)",
    "prompt_tuning": r"prompt_encoder\.default\.embedding\.weight",
    "prefix_tuning": r"prompt_encoder\.default\.embedding\.weight",
    "ia3": r".*\.ia3_l\.default",
    "trainable_tokens": r".*\.word_embeddings\.trainable_tokens_delta\.default",
}
YAML_ONLY = sorted(set(ALL_METHODS) & set(method_yamls()))
HAND_WRITTEN = ["full", "bitfit", "lora", "lora_fixed_alpha", "rslora", "dora", "adalora", "qlora", "ia3", "houlsby",
                "pfeiffer", "prompt_tuning", "prefix_tuning"]


def test_every_method_is_registered_with_a_config():
    """The registry is the hand-written methods plus one entry per yaml that names a peft config or a LoRA init;
    every registered method has its yaml and every yaml its method; the facts agree with what the methods do."""
    configs = {p.stem for p in (REPO / "conf" / "method").glob("*.yaml")}
    assert configs == set(REGISTRY)
    assert set(HAND_WRITTEN) <= set(REGISTRY)
    assert set(REGISTRY) - set(HAND_WRITTEN) - set(method_yamls()) <= {"loraplus", "dylora", "lora_fa", "osf",
                                                                       "trainable_tokens", "cartridge", "shadow"}
    assert len(YAML_ONLY) >= 20
    # qlora and loftq need CUDA + bitsandbytes; adaption_prompt, shadow and cpt a decoder; arrow, xlora, poly and
    # multitask prompt tuning what no run of the suite has (trained adapters, task ids): every other method runs here.
    assert set(REGISTRY) - set(ALL_METHODS) == {"qlora", "loftq", "adaption_prompt", "shadow", "cpt", "arrow", "xlora",
                                                "poly", "multitask_prompt_tuning"}
    assert {n for n, m in REGISTRY.items() if not m.uses_rank} >= {"full", "bitfit", "ia3", "vera", "oft"}
    assert all(m.display_label != m.name or not m.label for m in REGISTRY.values())


@pytest.mark.parametrize("name", registry_cases(ALL_METHODS))
def test_exactly_the_intended_parameters_train(make_cfg, name):
    cfg, method, base, ctx, eff = build(make_cfg, name)
    head = head_modules(cfg.model)
    model = method.attach(base, eff, ctx)
    body, head_names = trainable(model, head)
    assert body
    if name in TRAINS:
        pattern = re.compile(TRAINS[name])
        should = {n for n, _ in model.named_parameters() if pattern.fullmatch(n) and not is_head_param(n, head)}
        assert body == should
    elif isinstance(model.active_peft_config, PromptLearningConfig):  # P-tuning: the prompt encoder only
        assert all(n.startswith("prompt_encoder.default.") for n in body), sorted(body)[:3]
    else:  # a peft tuner: its own parameters (named by its prefix) inside the target modules, nothing else
        prefix = model.base_model.prefix
        targets = cfg.method.get("peft_args", cfg.method).get("target_modules")
        assert all(prefix in n for n in body), (prefix, sorted(n for n in body if prefix not in n)[:3])
        assert all(any(f".{t}." in n for t in targets) for n in body), sorted(body)[:3]
    # The whole task head trains, for every method (peft: its modules_to_save copy).
    head_numel = sum(p.numel() for n, p in fresh_base(cfg).named_parameters() if is_head_param(n, head))
    assert sum(p.numel() for n, p in model.named_parameters() if n in head_names) == head_numel
    if name == "bitfit":  # LayerNorm gains and every weight matrix stay frozen
        assert not any(n.endswith(".weight") for n in body)
        assert any("LayerNorm.bias" in n for n in body)


def _head_params(model, head) -> dict[str, int]:
    """{parameter name in the base model's terms: size} of the trainable head parameters (peft's wrappers and
    modules_to_save copies stripped from the name)."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad and is_head_param(n, head):
            plain = n.removeprefix("base_model.model.").removeprefix("base_model.").replace(
                ".modules_to_save.default", "")
            out[plain] = p.numel()
    return out


def _head_and_counts(make_cfg, name: str) -> tuple[dict[str, int], dict[str, int]]:
    cfg, method, base, ctx, eff = build(make_cfg, name)
    head = head_modules(cfg.model)
    model = method.attach(base, eff, ctx)
    return _head_params(model, head), count_params(model, head)


def test_full_fine_tuning_trains_the_pooler_and_classifier_as_its_head(make_cfg):
    reference, counts = _head_and_counts(make_cfg, "full")
    assert {n.split(".")[1] for n in reference if n.startswith("bert.")} == {"pooler"}
    assert any(n.startswith("classifier.") for n in reference)
    base = fresh_base(build(make_cfg, "full")[0])
    assert counts["trainable_params_excl_head"] == sum(p.numel() for p in base.parameters()) - sum(reference.values())


@pytest.mark.parametrize("name", registry_cases(ALL_METHODS))
def test_the_same_task_head_trains_for_every_method(make_cfg, name):
    """One head per model family (BERT: pooler + classifier), trained in full by every method and counted apart:
    the counts differ between methods only by the method's own parameters."""
    reference, _ = _head_and_counts(make_cfg, "full")
    head, counts = _head_and_counts(make_cfg, name)
    assert head == reference, sorted(set(head) ^ set(reference))
    assert counts["trainable_params"] - counts["trainable_params_excl_head"] == sum(reference.values())


@pytest.mark.parametrize("name", registry_cases(ALL_METHODS))
def test_identity_at_init_and_changed_after_one_step(make_cfg, name):
    cfg, method, base, ctx, eff = build(make_cfg, name)
    head = head_modules(cfg.model)
    before = logits(base)
    model = method.attach(base, eff, ctx)
    at_init = logits(model)
    if name in IDENTITY_AT_INIT:
        torch.testing.assert_close(at_init, before, atol=1e-6, rtol=0)
    head_state = {n: p.detach().clone() for n, p in model.named_parameters() if is_head_param(n, head)}
    train_steps(model, method, cfg, steps=1)
    with torch.no_grad():  # undo the head's step: what changed must be the method's own parameters
        for n, p in model.named_parameters():
            if n in head_state:
                p.copy_(head_state[n])
    # CPU fp32 forward passes are deterministic, so any difference is the step's doing. (AdaLoRA's first
    # step is small: Λ starts at 0 and P, Q at N(0, 0.02²), so ΔW = P·Λ·Q moves by ~1e-6.)
    assert (logits(model) - at_init).abs().max() > 1e-7


@pytest.mark.parametrize("name", registry_cases(sorted(MERGING)))
def test_merged_equals_unmerged(make_cfg, name):
    cfg, method, base, ctx, eff = build(make_cfg, name)
    model = method.attach(base, eff, ctx)
    perturb(model, head_modules(cfg.model))
    unmerged = logits(model)
    merged = method.merged(model)
    assert not any(p.requires_grad and ("lora_" in n or "ia3_" in n) for n, p in merged.named_parameters())
    torch.testing.assert_close(logits(merged), unmerged, atol=1e-4, rtol=0)


def _dims(cfg):
    c = cfg.model.config
    return int(c.hidden_size), int(c.num_hidden_layers), int(c.intermediate_size)


def hand_counts(d: int, L: int, f: int, r: int) -> dict[str, int | None]:
    """Trainable parameters outside the head by hand, for a BERT with d = hidden, L = layers, f = FFN width, at
    rank r; LoRA-like methods target W_q, W_v. Methods without a known formula (LoKr, BOFT, RandLoRA) are absent."""
    lora = L * 2 * (d * r + r * d)  # A: r x d, B: d x r, on 2 matrices per layer
    adapter = 2 * d * r + r + d  # down (d->r, bias r) + up (r->d, bias d)
    init_r = max(math.ceil(1.5 * r), r + 1)
    m = L * 2  # adapted matrices (W_q, W_v per layer), each d x d here
    h = 128  # P-tuning's encoder_hidden_size (conf/method/p_tuning.yaml)
    return {
        "full": None,
        "bitfit": d + L * (4 * d + d + f + d + d),  # emb LN; q,k,v,o, LN1, FFN in, FFN out, LN2 (pooler: head)
        "lora": lora,
        "lora_fixed_alpha": lora,
        "rslora": lora,
        "loraplus": lora,
        "lora_fa": lora // 2,  # B only (d x r per matrix)
        "dylora": lora,  # at the maximum rank r
        "dora": lora + L * 2 * d,  # + one magnitude entry per output feature of each adapted matrix
        "adalora": L * 2 * (init_r * d + d * init_r + init_r),  # P, Q and the singular values Λ at init_r
        "houlsby": L * 2 * adapter + (1 + 2 * L) * 2 * d,  # 2 adapters per layer + every LayerNorm (γ, β)
        "pfeiffer": L * adapter,
        "prompt_tuning": r * d,
        "prefix_tuning": L * 2 * r * d,  # a key and a value prefix per layer
        "ia3": L * (d + d + f),  # l_k, l_v, l_ff
        # yaml-only peft tuners (conf/method/<name>.yaml's settings):
        "vera": m * (d + 256),  # λ_b (d_out) + λ_d (r = 256) per matrix; the shared random projections are frozen
        "loha": m * 4 * d * r,  # two factorisations (d x r, r x d) per matrix
        "oft": m * (d // 32) * (32 * 31 // 2),  # d/b skew-symmetric b x b blocks, b(b-1)/2 values each
        "fourierft": m * 1000,  # n_frequency coefficients per matrix
        "hra": m * r * d,  # r Householder vectors of length d_in
        "ln_tuning": (1 + 2 * L) * 2 * d,  # every LayerNorm's γ and β
        "vblora": 90 * 64 + m * (r * d // 64 + d // 64 * r) * 90,  # the bank + top-k logits per sub-vector of A, B
        "c3a": m * d * d // 64,  # one vector of block_size per block
        "shira": m * r * (d + d),  # as many entries as LoRA at rank r
        "waveft": m * 2592,  # n_frequency coefficients per matrix
        "road": m * d,  # road_1: an angle and a scale per pair of output features
        "delora": m * (2 * d * r + 1),  # B, A and the bound λ
        "gralora": m * 2 * d * r,  # k^2 blocks with rank r/k: LoRA's count
        "miss": m * r * d,  # one shard of r x d_out
        "hira": lora,  # the same B, A as LoRA, applied entry-wise to W0
        "pvera": m * (d + 2 * 256),  # as VeRA, λ_d holding a mean and a log-variance per projection row
        "tinylora": m * 64,  # u values per matrix (no weight tying)
        "unilora": 256,  # the one shared vector theta_d
        "beft": m * d,  # one new bias per output feature
        "p_tuning": r * d + (d * h + h) + (h * h + h) + (h * d + d),  # embeddings + the MLP encoder
        "pissa": lora, "olora": lora, "corda": lora, "lora_ga": lora,
        "eva": lora,  # ranks redistributed across layers, total kept; every matrix is d x d here
        "kasa": lora + m * r,  # + the diagonal ΔΣ (r values) between A and B
        "velora": lora,  # LoRA's factors; only the backward pass differs
        "monteclora": lora + m * (r + 8),  # + the sampler's Wishart scale (r) and mixture logits (num_samples 8)
        "bdlora": m * (r * d + d * r // 2),  # A full; B block-diagonal with 2 blocks (d/2 x r/2 each)
        "adamss": m * (r * min(100, d) + d),  # K = r subspaces: A_k (1 x min(100, d)), B_k (its rows x 1)
        "deft": lora,  # P (d_out x r) and R (r x d_in)
        "frod": m * (d + int(d * d * 0.02)),  # a diagonal λ_l (d_in) + sparse_rate 0.02 of d_in² off-diagonal λ_s
        "peanut": m * 2 * d * r,  # A (d_out -> r) and B (r -> d_out), depth 0
        "psoft": m * (r * (r - 1) // 2 + 2 * r),  # a Cayley-parametrised r x r rotation + 2 scale vectors
        "supertuning": m * int(d * d * (1 - 0.99)),  # 1 % of each matrix's entries
        "osf": lora + m * r,  # U_low (d_out x r), S_low (r), V_low (r x d_in)
        "trainable_tokens": 2 * d,  # the [CLS] and [SEP] rows of the input embeddings
        "cartridge": (r - 1) * L * 2 * d,  # a key and a value per layer for each of the r - 1 unfrozen positions
    }


KNOWN_COUNTS = set(hand_counts(64, 2, 128, 4))


@pytest.mark.parametrize("name", registry_cases([n for n in ALL_METHODS if n in KNOWN_COUNTS]))
def test_trainable_parameter_count_matches_hand_calculation(make_cfg, name):
    cfg, method, base, ctx, eff = build(make_cfg, name, rank=4)
    total = sum(p.numel() for p in base.parameters())
    model = method.attach(base, eff, ctx)
    counts = count_params(model, head_modules(cfg.model))
    expected = hand_counts(*_dims(cfg), 4)[name]
    if name == "full":
        assert counts["trainable_params"] == total
    else:
        assert counts["trainable_params_excl_head"] == expected


@pytest.mark.parametrize(("name", "expected"), [("lora", 294_912), ("dora", 294_912 + 12 * 2 * 768)])
def test_lora_on_default_roberta_config(make_cfg, name, expected):
    """LoRA r = 8 on W_q, W_v of a default-size RobertaConfig(): 12 layers x 2 x (8·768 + 768·8)."""
    cfg = make_cfg(f"method={name}", "rank=8", "model=tiny-roberta")
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = RobertaForSequenceClassification(RobertaConfig(num_labels=2))
    ctx = AttachContext(rank=8, model_cfg=cfg.model, causal_lm=is_causal_lm(cfg.model), num_labels=2, total_steps=10)
    model = get_method(name).attach(model, get_method(name).effective_config(cfg.method, 8), ctx)
    assert count_params(model, "classifier")["trainable_params_excl_head"] == expected


@pytest.mark.parametrize("name", registry_cases(ALL_METHODS))
def test_save_load_round_trip_reproduces_logits(make_cfg, tmp_path, name):
    cfg, method, base, ctx, eff = build(make_cfg, name)
    model = method.attach(base, eff, ctx)
    perturb(model, head_modules(cfg.model))
    expected = logits(model)
    method.save(model, tmp_path / "w")
    loaded = method.load(fresh_base(cfg), eff, ctx, tmp_path / "w")
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=0)


def test_adalora_reallocates_rank_during_a_short_run(make_cfg, tmp_path):
    steps = 12
    cfg, method, base, ctx, eff = build(make_cfg, "adalora", "method.deltaT=2", rank=2, total_steps=steps)
    model = method.attach(base, eff, ctx)
    start = method.info(model)
    assert not start["reallocated"] and set(start["rank_pattern"].values()) == {start["init_r"]} == {3}
    tinit, tfinal = method.schedule(eff, steps)
    assert tinit < steps - tfinal
    train_steps(model, method, cfg, steps=steps, lr=5e-3)
    end = method.info(model)
    assert end["reallocated"] and end["rank_pattern"].keys() == start["rank_pattern"].keys()
    # The budget ends at target_r per matrix on average, and the triplets it dropped are zero in the model.
    assert end["total_rank"] == 2 * len(end["rank_pattern"]) < start["total_rank"]
    kept = sum(int((p != 0).sum()) for n, p in model.named_parameters() if ".lora_E." in n)
    assert kept == end["total_rank"]
    # Save -> load keeps the reallocated model (peft resizes the matrices to the rank pattern).
    expected = logits(model)
    method.save(model, tmp_path / "w")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "rank_pattern keys ... ignored" false alarm
        loaded = method.load(fresh_base(cfg), eff, ctx, tmp_path / "w")
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 400])
def test_adalora_schedule_leaves_a_budget_phase_for_any_step_count(make_cfg, steps):
    cfg, method, base, ctx, eff = build(make_cfg, "adalora", total_steps=steps)
    method.attach(base, eff, ctx)  # peft raises when tinit >= total_step - tfinal


def test_adalora_eval_loss_is_the_task_loss(make_cfg):
    """peft adds the orthogonal regulariser whenever a loss is computed; we add it only in training."""
    cfg, method, base, ctx, eff = build(make_cfg, "adalora")
    b = batch(3)
    plain = base.eval()(**b).loss.item()
    model = method.attach(base, eff, ctx)
    assert model.eval()(**b).loss.item() == pytest.approx(plain, abs=1e-6)
    assert model.train()(**b).loss.item() > plain + 1e-3 or cfg.method.orth_reg_weight == 0


@pytest.mark.parametrize("name", registry_cases([n for n in ALL_METHODS if not REGISTRY[n].uses_rank]))
def test_rankless_methods_ignore_rank_in_identity(make_cfg, name):
    a, b = plan(make_cfg(f"method={name}", "rank=4")), plan(make_cfg(f"method={name}", "rank=8"))
    assert a.config_hash == b.config_hash and a.run_id == b.run_id and a.rank is None


@pytest.mark.parametrize("name", registry_cases([n for n in ALL_METHODS if REGISTRY[n].uses_rank]))
def test_ranked_methods_differ_by_rank(make_cfg, name):
    a, b = plan(make_cfg(f"method={name}", "rank=4")), plan(make_cfg(f"method={name}", "rank=8"))
    assert a.config_hash != b.config_hash


def test_unmatched_lora_targets_are_one_line_bench_error(make_cfg):
    cfg, method, base, ctx, eff = build(make_cfg, "lora", "method.target_modules=[nonexistent]")
    with pytest.raises(BenchError, match=r"method 'lora' could not attach to target_modules=.*nonexistent") as err:
        method.attach(base, eff, ctx)
    assert "\n" not in str(err.value)


def test_adapter_with_wrong_module_name_is_bench_error(make_cfg):
    cfg, method, base, ctx, eff = build(make_cfg, "pfeiffer", "model.ffn_output=nope")
    with pytest.raises(BenchError, match="no module 'nope'"):
        method.attach(base, eff, ctx)


def test_ia3_does_not_scale_the_attention_output(make_cfg):
    cfg, method, base, ctx, eff = build(make_cfg, "ia3")
    body, _ = trainable(method.attach(base, eff, ctx), head_modules(cfg.model))
    assert not any("attention.output" in n for n in body)
    assert sum(".output.dense." in n for n in body) == int(cfg.model.config.num_hidden_layers)


def test_prompt_methods_run_without_token_type_ids(make_cfg):
    """The runner's latency batch has only input_ids and attention_mask."""
    for name in ("prompt_tuning", "prefix_tuning"):
        cfg, method, base, ctx, eff = build(make_cfg, name)
        model = method.attach(base, eff, ctx).eval()
        ids = torch.randint(1000, 30000, (2, 16))
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert out.logits.shape == (2, 2)


@pytest.mark.parametrize(("name", "rank", "scale"), [("lora", 4, 2.0), ("lora", 16, 2.0), ("rslora", 4, 16 / 2),
                                                     ("rslora", 16, 16 / 4), ("dora", 4, 2.0)])
def test_lora_family_scaling(make_cfg, name, rank, scale):
    """lora/dora: alpha = 2r so alpha/r = 2 at every rank; rslora: fixed alpha 16 over sqrt(r)."""
    cfg, method, base, ctx, eff = build(make_cfg, name, rank=rank)
    model = method.attach(base, eff, ctx)
    scalings = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert len(scalings) == 1 and scalings.pop() == pytest.approx(scale)


@pytest.mark.parametrize(("name", "model_name"), [("prompt_tuning", "tiny-bert"), ("prompt_tuning", "tiny-roberta"),
                                                 ("p_tuning", "tiny-bert")])
def test_prompt_tuning_head_reads_the_real_first_token(make_cfg, tmp_path, name, model_name):
    """peft puts the virtual tokens first (prompt tuning, P-tuning); the pooler (RoBERTa: the classifier's dense)
    must read the encoder's output at position num_virtual_tokens, the [CLS], after attach, after a deep copy and
    after loading."""
    cfg, method, base, ctx, eff = build(make_cfg, name, f"model={model_name}", rank=3)
    model = method.attach(base, eff, ctx)
    method.save(model, tmp_path / "weights")
    reloaded = method.load(fresh_base(cfg), eff, ctx, tmp_path / "weights")
    reader_input = "pooler.dense" if model_name == "tiny-bert" else "classifier.modules_to_save.default.dense"
    seen: dict[str, torch.Tensor] = {}
    for m in (model, copy.deepcopy(model), reloaded):
        seen.clear()
        encoder = next(mod for n, mod in m.named_modules() if n.endswith(".encoder"))
        dense = next(mod for n, mod in m.named_modules() if n.endswith(reader_input))
        hooks = [encoder.register_forward_hook(lambda mod, a, out: seen.__setitem__("encoder", out[0])),
                 dense.register_forward_hook(lambda mod, a, out: seen.__setitem__("read", a[0]))]
        logits(m)
        for h in hooks:
            h.remove()
        assert seen["encoder"].shape[1] == batch(99)["input_ids"].shape[1] + 3
        torch.testing.assert_close(seen["read"], seen["encoder"][:, 3], rtol=0, atol=0)
