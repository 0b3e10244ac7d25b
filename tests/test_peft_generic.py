"""The yaml-only methods (methods/peft_generic.py), LoRA's initialisations (methods/lora.py LoraInit) and variants
(methods/lora_variants.py), and the peft tuners with a module of their own: a broken yaml is one line, facts stay out
of the run's identity, `rank` fills the peft arguments the yaml names, a method that cannot apply stops at plan time
(to one family, or to every model), the data-pass inits read the run's batches, the inits that move W save a plain
LoRA, a variant's regulariser is in the training loss only, OSF's rank is its trained width, trainable tokens are
picked by role. What every method does (trains, identity, one step, merge, save/load, counts) is
tests/test_methods.py; the facts of every method, tests/test_method_facts.py."""
from __future__ import annotations

import json

import pytest
import torch
from peft.tuners.lora import LoraModel

from bench import BenchError
from bench.plan import plan
from methods import REGISTRY, AttachContext
from methods.base import head_modules
from methods.peft_generic import GenericPeftMethod, from_yaml, method_yamls
from tests.method_helpers import batch, build, fresh_base, logits, perturb, train_steps

_FACTS = {"label": "X", "summary": "s", "defaults_source": "guess", "lr_source": "guess", "rank_meaning": None,
          "merges": True, "identity_at_init": True}
_GOOD = {"name": "x", "peft_config": "VeraConfig", "facts": _FACTS}


@pytest.mark.parametrize(("change", "message"), [
    ({"peft_config": "NoSuchConfig"}, "NoSuchConfig is not a peft config class"),
    ({"name": "y"}, "must equal the file's name"),
    ({"facts": {**_FACTS, "rank_meaning": "r"}}, "facts.rank_meaning and rank_fills go together"),
    ({"facts": {**_FACTS, "rank_fills": {"r": "one"}}}, "facts.rank_fills.r: Input should be a valid number"),
    ({"peft_config": None, "lora_init": "nope"}, "lora_init: nope; choose one of"),
    ({"peft_config": None, "lora_variant": "nope"}, "lora_variant: nope; choose one of"),
    ({"peft_config": None, "lora_init": "pissa", "facts": {**_FACTS, "rank_fills": {"r": 1}}},
     "facts.rank_fills: unknown fact"),  # a LoRA init's rank is LoRA's r, not a tuner's peft argument
])
def test_a_broken_tuner_yaml_is_one_line_naming_the_file(change, message):
    with pytest.raises(BenchError, match=message) as err:
        from_yaml("x", {**_GOOD, **change})
    assert "\n" not in str(err.value) and str(err.value).startswith("conf/method/")


def test_facts_stay_out_of_the_identity_and_rank_fills_the_named_arguments(make_cfg):
    p = plan(make_cfg("method=loha", "rank=6"))
    assert "facts" not in p.effective["method"]
    assert p.effective["method"]["peft_args"]["r"] == 6 and p.effective["method"]["peft_args"]["alpha"] == 6
    gralora = plan(make_cfg("method=gralora", "rank=4")).effective["method"]["peft_args"]
    assert (gralora["r"], gralora["alpha"]) == (4, 8)
    # A rank-less tuner leaves `rank` out; a label edit would not change any run's hash.
    a, b = plan(make_cfg("method=vera", "rank=4")), plan(make_cfg("method=vera", "rank=8", "method.facts.label=V"))
    assert a.rank is None and a.config_hash == b.config_hash


def test_yaml_only_tuners_are_instances_of_one_class():
    tuners = {name for name, raw in method_yamls().items() if raw.get("peft_config")}
    assert len(tuners) >= 20 and {type(REGISTRY[name]) for name in tuners} == {GenericPeftMethod}
    assert REGISTRY["vera"].peft_config_class == "VeraConfig" and REGISTRY["vera"].facts.label == "VeRA"


def test_a_method_that_cannot_apply_to_the_model_stops_at_plan_time(make_cfg, monkeypatch):
    raw = {**_GOOD, "facts": {**_GOOD["facts"], "cannot_apply": {"bert": "it needs a decoder"}}}
    monkeypatch.setitem(REGISTRY, "x", from_yaml("x", raw))
    with pytest.raises(BenchError, match=r"method 'x' cannot apply to model 'tiny-bert' \(bert family\): it needs "
                                         r"a decoder") as err:
        plan(make_cfg("method=vera", "method.name=x"))
    assert "\n" not in str(err.value)
    plan(make_cfg("method=vera", "model=tiny-roberta", "method.name=x"))  # another family: fine


def test_a_method_that_cannot_apply_to_any_model_stops_at_plan_time_on_each(make_cfg, monkeypatch):
    raw = {**_GOOD, "facts": {**_GOOD["facts"], "cannot_apply": {"*": "it needs trained adapters"}}}
    monkeypatch.setitem(REGISTRY, "x", from_yaml("x", raw))
    for model in ("tiny-bert", "tiny-roberta", "tiny-llama"):
        with pytest.raises(BenchError, match=rf"method 'x' cannot apply to model '{model}' \(\w+ family\): it needs "
                                             "trained adapters") as err:
            plan(make_cfg("method=vera", f"model={model}", "method.name=x"))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["arrow", "xlora", "poly", "multitask_prompt_tuning", "cpt", "shadow"])
def test_the_tuners_that_need_what_the_suite_lacks_refuse_encoders_saying_why(make_cfg, name):
    with pytest.raises(BenchError, match=f"method '{name}' cannot apply to model 'tiny-bert'") as err:
        plan(make_cfg(f"method={name}"))
    assert "\n" not in str(err.value) and REGISTRY[name].cannot_apply


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-roberta"])
def test_a_decoder_only_tuner_refuses_the_suites_encoders_at_plan_time(make_cfg, model):
    with pytest.raises(BenchError, match="method 'adaption_prompt' cannot apply to model .*LLaMA-style decoders only"
                       ) as err:
        plan(make_cfg("method=adaption_prompt", f"model={model}"))
    assert "\n" not in str(err.value)


def test_loftq_refuses_on_cpu_at_plan_time(make_cfg):
    with pytest.raises(BenchError, match="method=loftq needs a CUDA GPU and bitsandbytes") as err:
        plan(make_cfg("method=loftq", "device=cpu"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["eva", "corda", "lora_ga"])
def test_data_pass_inits_read_the_runs_batches(make_cfg, name):
    cfg, method, base, ctx, eff = build(make_cfg, name)
    calls = []

    def calibration():
        calls.append(1)
        return [batch(i) for i in range(3)]

    model = method.attach(base, eff, AttachContext(**{**ctx.__dict__, "calibration": calibration}))
    assert calls
    lora = build(make_cfg, "lora")
    plain = lora[1].attach(lora[2], lora[4], lora[3])
    a = {n: p for n, p in model.named_parameters() if ".lora_A." in n}
    a_plain = {n: p for n, p in plain.named_parameters() if ".lora_A." in n}
    assert a.keys() == a_plain.keys() and any(not torch.equal(a[n], a_plain[n]) for n in a)
    with pytest.raises(BenchError, match=f"method={name} initialises from the training data") as err:
        method.attach(fresh_base(cfg), eff, AttachContext(**{**ctx.__dict__, "calibration": None}))
    assert "\n" not in str(err.value)


def test_an_init_that_moves_w_saves_a_plain_lora_on_the_unmodified_w(make_cfg, tmp_path):
    cfg, method, base, ctx, eff = build(make_cfg, "pissa", rank=4)
    w0 = {n: p.detach().clone() for n, p in base.named_parameters() if n.endswith("query.weight")}
    model = method.attach(base, eff, ctx)
    assert any(not torch.equal(p, w0[n.replace("base_model.model.", "").replace(".base_layer", "")])
               for n, p in model.named_parameters() if n.endswith("query.base_layer.weight"))  # W holds the residual
    perturb(model, head_modules(cfg.model))
    method.save(model, tmp_path / "w")
    saved = json.loads((tmp_path / "w" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True and saved["lora_alpha"] == 8
    # The plain LoRA on a fresh (unmodified) base: peft's loader, no SVD, the same outputs, the head included.
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(fresh_base(cfg), str(tmp_path / "w"))
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["vera", "oft"])
def test_yaml_tuners_merge_with_a_roberta_head(make_cfg, name):
    """peft 0.21's generic unload fails on RoBERTa's classification head (no `.weight`); the head is unwrapped first."""
    cfg, method, base, ctx, eff = build(make_cfg, name, "model=tiny-roberta")
    model = method.attach(base, eff, ctx)
    perturb(model, head_modules(cfg.model))
    torch.testing.assert_close(logits(method.merged(model)), logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "regulariser"), [("kasa", "_get_kasa_loss"), ("monteclora", "_get_monteclora_loss")])
def test_a_lora_variants_regulariser_is_in_the_training_loss_only(make_cfg, name, regulariser):
    """peft leaves KaSA's and MonteCLoRA's regularisers to the loop; they join the loss in training mode, and
    eval_loss stays the task loss (B = 0 at init: MonteCLoRA's sampled perturbation of A changes no output yet)."""
    cfg, method, base, ctx, eff = build(make_cfg, name)
    model = method.attach(base, eff, ctx)
    b = batch(3)
    torch.manual_seed(0)
    with_regulariser = model.train()(**b).loss
    added = getattr(model.base_model, regulariser)()
    torch.manual_seed(0)
    task = LoraModel.forward(model.base_model, **b).loss  # peft's own forward: the task loss alone
    assert float(added.detach()) > 0
    torch.testing.assert_close(with_regulariser, task + added, atol=1e-6, rtol=0)
    model.eval()
    torch.testing.assert_close(model(**b).loss, LoraModel.forward(model.base_model, **b).loss, atol=0, rtol=0)


def test_monteclora_trains_merges_and_copies_after_a_step(make_cfg):
    """Its sampler keeps the step's last draw as module state; after a step the model still deep-copies (merge)."""
    cfg, method, base, ctx, eff = build(make_cfg, "monteclora")
    model = method.attach(base, eff, ctx)
    train_steps(model, method, cfg, steps=2)
    torch.testing.assert_close(logits(method.merged(model)), logits(model), atol=1e-5, rtol=0)


def test_kasa_truncates_w_at_attach_and_loading_truncates_a_fresh_w_alike(make_cfg, tmp_path):
    cfg, method, base, ctx, eff = build(make_cfg, "kasa", rank=4)
    w = dict(base.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"].detach().clone()
    model = method.attach(base, eff, ctx)
    truncated = next(p for n, p in model.named_parameters() if n.endswith("layer.0.attention.self.query.base_layer"
                                                                            ".weight"))
    assert int(torch.linalg.matrix_rank(truncated)) == min(w.shape) - 4 < int(torch.linalg.matrix_rank(w))
    perturb(model, head_modules(cfg.model))
    method.save(model, tmp_path / "w")
    torch.testing.assert_close(logits(method.load(fresh_base(cfg), eff, ctx, tmp_path / "w")), logits(model),
                               atol=1e-5, rtol=0)


def test_osf_trains_rank_directions_of_every_target_and_refuses_a_rank_that_leaves_none_frozen(make_cfg):
    cfg, method, base, ctx, eff = build(make_cfg, "osf", rank=4)
    model = method.attach(base, eff, ctx)
    s_low = {n: p for n, p in model.named_parameters() if n.endswith(".S_low")}
    assert len(s_low) == 4 and {p.numel() for p in s_low.values()} == {4}
    cfg, method, base, ctx, eff = build(make_cfg, "osf", rank=64)  # tiny-bert's W_q, W_v are 64 x 64
    with pytest.raises(BenchError, match=r"method 'osf': rank 64 must be between 1 and 63 for .*query") as err:
        method.attach(base, eff, ctx)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("model", "ids"), [("tiny-bert", [101, 102]), ("tiny-llama", [1, 2])])
def test_trainable_tokens_are_the_tokenizers_first_and_last_special_tokens(make_cfg, model, ids):
    cfg, method, base, ctx, eff = build(make_cfg, "trainable_tokens", f"model={model}")
    assert eff["tokens"] == ["first", "last"]
    assert method.info(method.attach(base, eff, ctx)) == {"token_indices": ids}
    cfg, method, base, ctx, eff = build(make_cfg, "trainable_tokens", "method.tokens=[middle]")
    with pytest.raises(BenchError, match="trainable_tokens: tokens has 'middle'; choose among first, last"):
        method.attach(base, eff, ctx)


def test_a_cartridge_of_only_frozen_positions_stops_at_plan_time(make_cfg):
    with pytest.raises(BenchError, match="cartridge: rank 1 leaves no trained virtual token") as err:
        plan(make_cfg("method=cartridge", "rank=1"))
    assert "\n" not in str(err.value)
