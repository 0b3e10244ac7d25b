"""Every model config composes with its family's module names (conf/model/family/), and every method attaches
to every random-init model config: the tiny ones for real, the big ones on the meta device (shapes only)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from bench import BenchError
from bench.config import compose_config
from bench.model import attach_context, is_causal_lm, load_model
from methods import REGISTRY, in_display_order
from methods.base import head_modules, is_head_param
from methods.lora import LoraInit
from tests.conftest import CONF
from tests.method_helpers import FAST_YAML, batch, registry_cases

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
RANDOM = [m for m in MODELS if OmegaConf.load(CONF / "model" / f"{m}.yaml").get("random_init")]
TINY = [m for m in RANDOM if m.startswith("tiny-")]


def _runs_here(method) -> bool:
    try:
        method.validate(torch.device("cpu"))
    except BenchError:
        return False
    return True


# Tuners that read W's values at attach outside a LoRA initialisation: AdaMSS clusters W's singular vectors (k-means
# on the CPU), FRoD builds its shared basis from the layers' weights.
NEEDS_WEIGHT_VALUES = {"adamss", "frod"}

# Every method this machine can run (qlora and loftq need CUDA); whether it applies to a model is the test's to ask.
ON_CPU = [name for name in in_display_order() if _runs_here(REGISTRY[name])]


def _family(name: str) -> dict:
    """conf/model/family/<name>.yaml with the family yamls it builds on (its defaults list) merged in first."""
    own = OmegaConf.load(CONF / "model" / "family" / f"{name}.yaml")
    merged = OmegaConf.create()
    for parent in own.get("defaults") or []:
        if parent != "_self_":
            merged = OmegaConf.merge(merged, _family(str(parent)))
    return OmegaConf.to_container(OmegaConf.merge(merged, {k: v for k, v in own.items() if k != "defaults"}))


@pytest.mark.parametrize("name", MODELS)
def test_model_config_composes_with_its_family_module_names(name):
    """Each model has exactly its own family's module names (roberta: BERT's, except its task head; llama: its own)."""
    model = OmegaConf.to_container(compose_config([f"model={name}"]).model)
    family = _family(str(model["family"]))
    assert model["name"] == name
    assert {"family", "layers", "head"} <= set(family)
    for key, value in family.items():
        assert model[key] == value, (name, key)


def _attach_cases() -> list:
    """(model, method) for every random-init model and method. The yaml tuners outside FAST_YAML are slow
    everywhere (registry_cases); on the big Llama shapes every yaml tuner is: some build their structures per layer
    even on meta tensors (FourierFT's spectral indices: ~2 min on the 8B shape)."""
    out = []
    for model in RANDOM:
        big_decoder = model not in TINY and model.startswith("llama-")
        for case in registry_cases(ON_CPU, fast=set() if big_decoder else FAST_YAML):
            name, marks = (case, ()) if isinstance(case, str) else (case.values[0], case.marks)
            out.append(pytest.param(model, name, marks=marks, id=f"{name}-{model}"))
    return out


@pytest.mark.parametrize("model_name, method_name", _attach_cases())
def test_every_method_attaches_to_every_random_init_model(model_name, method_name):
    """Every method attaches to every random-init model, or refuses it at plan time with one line (validate_model:
    BitFit on bias-free Llama, adaption prompt on encoders)."""
    cfg = compose_config([f"model={model_name}", f"method={method_name}", "rank=4"])
    method = REGISTRY[method_name]
    try:
        method.validate_model(cfg.model)
    except BenchError as exc:
        assert str(exc).strip() and "\n" not in str(exc)
        pytest.skip(f"refuses at plan time: {exc}")
    causal = is_causal_lm(cfg.model)
    ctx = attach_context(cfg.model, 4 if method.uses_rank else None, 2, 10,
                         calibration=lambda: [_calibration(i, causal) for i in range(2)])  # EVA, CorDA, LoRA-GA
    if model_name not in TINY and (isinstance(method, LoraInit) or method_name in NEEDS_WEIGHT_VALUES):
        pytest.skip("the method computes from W's values or data at attach: it needs real tensors, not meta shapes")
    if model_name in TINY:
        torch.manual_seed(0)
        model, _ = load_model(cfg.model, 2)
    else:  # big: shapes only, no memory and no init time
        head_kwargs = {} if causal else {"num_labels": 2}
        config = AutoConfig.for_model(cfg.model.family, **head_kwargs, **dict(cfg.model.config))
        with torch.device("meta"):
            model = (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_config(config)
    model = method.attach(model, method.effective_config(cfg.method, ctx.rank), ctx)
    head = head_modules(cfg.model)
    assert any(p.requires_grad for n, p in model.named_parameters() if not is_head_param(n, head))


def _calibration(seed: int, causal: bool) -> dict:
    """A training batch of the model's kind: BERT pairs (token_type_ids), or a causal LM's ids with answer labels."""
    b = batch(seed)
    if not causal:
        return b
    labels = torch.full_like(b["input_ids"], -100)
    labels[:, -2:] = b["input_ids"][:, -2:]
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels}


def test_smollm2_brings_its_own_cpu_budget_and_ppl_probe_and_explicit_choices_win():
    """A 135M-parameter causal LM at the encoders' 400 x 32 would take hours on a CPU: its yaml picks llm_cpu."""
    from tests.conftest import compose_cfg

    smol = compose_cfg("model=smollm2", tiny=False)
    assert smol.budget.name == "llm_cpu" and smol.forgetting.probe == "ppl"
    assert compose_cfg("model=smollm2", "~forgetting", tiny=False).get("forgetting") is None
    assert compose_cfg("model=smollm2", "budget=default", tiny=False).budget.max_steps == 400
    minilm = compose_cfg("model=minilm", tiny=False)
    assert minilm.budget.name == "default" and minilm.get("forgetting") is None
    assert compose_cfg("model=tiny-llama", "budget=smoke", tiny=False).budget.name == "smoke"
