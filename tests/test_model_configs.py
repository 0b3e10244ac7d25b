"""Every model config composes with its family's module names (conf/model/family/), and every method attaches
to every random-init model config: the tiny ones for real, the big ones on the meta device (shapes only)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForSequenceClassification

from bench.config import compose_config
from bench.models import attach_context, load_model
from methods import REGISTRY
from methods.base import head_modules, is_head_param
from methods.lora import LoraInit
from tests.conftest import CONF
from tests.method_helpers import ALL_METHODS, batch, registry_cases

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
FAMILY_KEYS = ("family", "lora_targets", "layers", "ia3_targets", "ia3_feedforward", "attention_output",
               "ffn_output", "head", "first_token_reader")
RANDOM = [m for m in MODELS if OmegaConf.load(CONF / "model" / f"{m}.yaml").get("random_init")]
TINY = [m for m in RANDOM if m.startswith("tiny-")]


@pytest.mark.parametrize("name", MODELS)
def test_model_config_composes_with_its_family_module_names(name):
    model = compose_config([f"model={name}"]).model
    family = OmegaConf.load(CONF / "model" / "family" / "bert.yaml")
    own = OmegaConf.load(CONF / "model" / "family" / f"{model.family}.yaml")
    family = OmegaConf.merge(family, {k: v for k, v in own.items() if k != "defaults"})
    assert model.name == name
    for key in FAMILY_KEYS[1:]:
        assert model[key] == family[key], (name, key)  # roberta keeps BERT's module names, except its task head


@pytest.mark.parametrize("model_name", RANDOM)
@pytest.mark.parametrize("method_name", registry_cases(ALL_METHODS))
def test_every_method_attaches_to_every_random_init_model(model_name, method_name):
    cfg = compose_config([f"model={model_name}", f"method={method_name}", "rank=4"])
    method = REGISTRY[method_name]
    ctx = attach_context(cfg.model, 4 if method.uses_rank else None, 2, 10,
                         calibration=lambda: [batch(i) for i in range(2)])  # EVA, CorDA, LoRA-GA's data pass
    if model_name not in TINY and isinstance(method, LoraInit):
        pytest.skip("a LoRA initialisation computes from W or data: it needs real tensors, not meta shapes")
    if model_name in TINY:
        torch.manual_seed(0)
        model, _ = load_model(cfg.model, 2)
    else:  # big: shapes only, no memory and no init time
        config = AutoConfig.for_model(cfg.model.family, num_labels=2, **dict(cfg.model.config))
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    model = method.attach(model, cfg.method, ctx)
    head = head_modules(cfg.model)
    assert any(p.requires_grad for n, p in model.named_parameters() if not is_head_param(n, head))
