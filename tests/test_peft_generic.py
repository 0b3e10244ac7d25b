"""The yaml-only methods (methods/peft_generic.py) and LoRA's initialisations (methods/lora.py LoraInit): a broken
yaml is one line, facts stay out of the run's identity, `rank` fills the peft arguments the yaml names, a method
that cannot apply stops at plan time, the data-pass inits read the run's batches, the inits that move W save a
plain LoRA. What every method does (trains, identity, one step, merge, save/load, counts) is tests/test_methods.py;
the facts of every method, tests/test_method_facts.py."""
from __future__ import annotations

import json

import pytest
import torch

from bench import BenchError
from bench.plan import plan
from methods import REGISTRY, AttachContext
from methods.base import head_modules
from methods.peft_generic import GenericPeftMethod, from_yaml, method_yamls
from tests.method_helpers import batch, build, fresh_base, logits, perturb

_FACTS = {"label": "X", "summary": "s", "defaults_source": "guess", "lr_source": "guess", "rank_meaning": None,
          "merges": True, "identity_at_init": True}
_GOOD = {"name": "x", "peft_config": "VeraConfig", "facts": _FACTS}


@pytest.mark.parametrize(("change", "message"), [
    ({"peft_config": "NoSuchConfig"}, "NoSuchConfig is not a peft config class"),
    ({"name": "y"}, "must equal the file's name"),
    ({"facts": {**_FACTS, "rank_meaning": "r"}}, "facts.rank_meaning and rank_fills go together"),
    ({"facts": {**_FACTS, "rank_fills": {"r": "one"}}}, "facts.rank_fills.r: Input should be a valid number"),
    ({"peft_config": None, "lora_init": "nope"}, "lora_init: nope; choose one of"),
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
