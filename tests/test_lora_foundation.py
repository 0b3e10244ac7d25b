"""LoRA as the foundation needs it: parameter count on a known config, B = 0 at init (outputs unchanged),
and only the intended parameters receive gradients."""
from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, RobertaConfig

from bench.model import is_causal_lm
from methods import AttachContext, get_method
from methods.base import count_params


def _ctx(cfg, rank):
    return AttachContext(rank=rank, model_cfg=cfg.model, causal_lm=is_causal_lm(cfg.model),
                         num_labels=2, total_steps=10)


def _eff(cfg, rank):
    return get_method("lora").effective_config(cfg.method, rank)


def test_lora_param_count_roberta_base_qv_r8(make_cfg):
    cfg = make_cfg("method=lora", "rank=8", "model=roberta-base")
    model = AutoModelForSequenceClassification.from_config(RobertaConfig(num_labels=2))
    model = get_method("lora").attach(model, _eff(cfg, 8), _ctx(cfg, 8))
    # 12 layers x 2 matrices (q, v) x (A: 8x768 + B: 768x8)
    assert count_params(model, "classifier")["trainable_params_excl_head"] == 12 * 2 * (8 * 768 + 768 * 8) == 294_912


def test_lora_starts_as_base_and_only_adapters_and_head_get_gradients(make_cfg):
    from bench.model import load_model

    cfg = make_cfg("method=lora", "rank=4")
    torch.manual_seed(0)
    model, _ = load_model(cfg.model, 2)
    model.eval()
    ids = torch.randint(1000, 2000, (3, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    model = get_method("lora").attach(model, _eff(cfg, 4), _ctx(cfg, 4))
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # B = 0: exactly the base model
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(bool((p == 0).all()) for p in lora_b)

    model.train()
    model(input_ids=ids, labels=torch.tensor([0, 1, 0])).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all("lora_" in n or ".classifier." in n or ".pooler.dense." in n for n in trainable)  # + the task head
    assert any("query.lora_A" in n for n in trainable) and any("value.lora_B" in n for n in trainable)
    assert not any("key" in n for n in trainable)
