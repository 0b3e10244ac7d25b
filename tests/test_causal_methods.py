"""Every registered method on the tiny random-init Llama (conf/model/tiny-llama.yaml) through the real configs: it
refuses at plan time with one line, or it attaches (trainable parameters outside the empty head), is the base model
at init where it says so, and a few steps of the shared loop on causal batches (answer-only labels) change its
outputs; merging methods merge to the same logits; save/load reproduces them for a few representative methods.

The fast suite runs a small set that covers each Llama-specific path (peft's CAUSAL_LM task type, the layer-regex of
IA3, adapters on o_proj/down_proj with RMSNorms, prefix tuning through the cache API, the decoder-only adaption
prompt, LN-tuning on RMSNorms, ShadowPEFT's decoder-only shadow network); every other method (full FT, AdaLoRA's
hook, the data-pass LoRA inits without token_type_ids, ...) under `-m slow`."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from omegaconf import DictConfig
from peft.tuners.shadow import ShadowModel
from torch import nn

from bench import BenchError
from bench.loop.train import TrainSettings, train
from bench.model import is_causal_lm, load_model, tokenizer_path
from bench.plan import plan
from methods import REGISTRY, AttachContext, Method, in_display_order
from methods.base import head_modules, is_head_param
from tests.conftest import compose_cfg
from tests.method_helpers import perturb

MODEL = "tiny-llama"
VOCAB = 49152
# What refuses on Llama, and why (each one line): no bias terms; a CUDA-only quantiser; BEFT's unmergeable biases;
# several trained adapters (Arrow, X-LoRA), task ids (Poly, multitask prompt tuning), a typed few-shot context (CPT).
EXPECTED_REFUSALS = {"bitfit", "qlora", "loftq", "beft", "arrow", "xlora", "poly", "multitask_prompt_tuning", "cpt"}
FAST = {"lora", "ia3", "houlsby", "prefix_tuning", "adaption_prompt", "ln_tuning", "shadow"}
ROUND_TRIP = ["lora", "houlsby", "prefix_tuning", "adaption_prompt", "pissa", "ia3", "shadow", "cartridge", "kasa",
              "trainable_tokens"]
ROUND_TRIP_FAST = {"lora", "prefix_tuning"}
MERGE_FAST = {"lora", "ia3"}
PLAN_FAST = {"bitfit", "beft", "xlora"}  # plan() composes; qlora's and loftq's plan-time refusals are tested on BERT


def _cases(names, fast=FAST) -> list:
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


def refusal(method: Method, model_cfg) -> str | None:
    """The one line a method refuses this model with on this machine (CPU) at plan time, or None."""
    try:
        method.validate(torch.device("cpu"))
        method.validate_model(model_cfg)
    except BenchError as exc:
        return str(exc)
    return None


@functools.cache
def _cfg(*overrides: str) -> DictConfig:
    """The real composed config on the tiny Llama (composed once per overrides: composing is the slow part)."""
    return compose_cfg(f"model={MODEL}", *overrides)


def _llama_cfg() -> DictConfig:
    return _cfg()


ALL = in_display_order()
RUNS = [n for n in ALL if refusal(REGISTRY[n], _llama_cfg().model) is None]
MERGING = [n for n in RUNS if REGISTRY[n].merges]


@functools.lru_cache(maxsize=1)
def _template(model_cfg_yaml: str) -> nn.Module:
    torch.manual_seed(0)
    model, _ = load_model(_llama_cfg().model, 2)
    return model


def fresh_base(cfg: DictConfig) -> nn.Module:
    """The same random-init tiny Llama every time (built once, copied)."""
    return copy.deepcopy(_template(cfg.model.name))


def causal_batch(seed: int = 0, size: int = 4, length: int = 12, answer: int = 2) -> dict[str, torch.Tensor]:
    """A training batch as bench/data/text.py makes them: prompt + answer, right-padded; labels are the input ids on the
    answer tokens and -100 on the prompt and the padding (the model shifts them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # row 0 is 3 shorter: its answer ends 3 earlier
    ids[0, -3:] = 2  # pad id
    labels = torch.full_like(ids, -100)
    labels[1:, -answer:] = ids[1:, -answer:]
    labels[0, -3 - answer:-3] = ids[0, -3 - answer:-3]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def lm_logits(model: nn.Module, b: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    model.eval()
    b = b if b is not None else causal_batch(99)
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.detach().clone()


def build(name: str, rank: int = 4, total_steps: int = 8):
    cfg = _cfg(f"method={name}", f"rank={rank}")
    p = plan(cfg)
    ctx = AttachContext(rank=p.rank, model_cfg=cfg.model, causal_lm=is_causal_lm(cfg.model),
                        num_labels=2, total_steps=total_steps, tokenizer_path=tokenizer_path(cfg.model),
                        calibration=lambda: [causal_batch(i) for i in range(4)])
    return cfg, p.method, fresh_base(cfg), ctx, p.effective["method"]


def train_steps(model: nn.Module, method: Method, cfg: DictConfig, steps: int, lr: float = 1e-2) -> None:
    settings = TrainSettings(steps=steps, lr=lr, weight_decay=0.0, warmup_ratio=0.0, budget=cfg.budget,
                             device=torch.device("cpu"), precision="fp32", head=head_modules(cfg.model))
    train(model, method, [causal_batch(i) for i in range(steps)], settings)


def test_the_refusals_on_llama_are_the_expected_ones_each_one_line():
    """Which methods refuse the tiny Llama is a fact of the registry; each says why in one line, at plan time."""
    refused = {n: refusal(REGISTRY[n], _llama_cfg().model) for n in ALL}
    refused = {n: why for n, why in refused.items() if why is not None}
    assert set(refused) == EXPECTED_REFUSALS
    for name, why in refused.items():
        assert "\n" not in why and why.strip(), name


@pytest.mark.parametrize("name", _cases(sorted(EXPECTED_REFUSALS), fast=PLAN_FAST))
def test_a_refusal_on_llama_stops_the_run_at_plan_time(name):
    with pytest.raises(BenchError) as info:
        plan(_cfg(f"method={name}", "rank=4"))
    assert str(info.value) == refusal(REGISTRY[name], _llama_cfg().model)


@pytest.mark.parametrize("name", _cases(RUNS))
def test_method_attaches_is_identity_at_init_and_trains_on_the_causal_lm(name):
    cfg, method, base, ctx, eff = build(name)
    head = head_modules(cfg.model)
    assert head == ()  # the Llama family has no task head: every trainable parameter is the method's
    before = lm_logits(base)
    model = method.attach(base, eff, ctx)
    body = [n for n, p in model.named_parameters() if p.requires_grad and not is_head_param(n, head)]
    assert body, "nothing trains outside the (empty) head"
    at_init = lm_logits(model)
    if method.identity_at_init:
        torch.testing.assert_close(at_init, before, atol=1e-5, rtol=0)
    train_steps(model, method, cfg, steps=2)
    assert (lm_logits(model) - at_init).abs().max() > 1e-6


@pytest.mark.parametrize("name", _cases(MERGING, fast=MERGE_FAST))
def test_merged_equals_unmerged_on_the_causal_lm(name):
    cfg, method, base, ctx, eff = build(name)
    model = method.attach(base, eff, ctx)
    perturb(model, head_modules(cfg.model), scale=0.05)
    unmerged = lm_logits(model)
    assert (unmerged - lm_logits(fresh_base(cfg))).abs().max() > 1e-4  # the perturbation moved the outputs
    merged = method.merged(model)
    assert type(merged).__name__ == "LlamaForCausalLM"  # folded in: the plain model, no adapter modules left
    torch.testing.assert_close(lm_logits(merged), unmerged, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", _cases(ROUND_TRIP, fast=ROUND_TRIP_FAST))
def test_save_load_round_trip_reproduces_causal_logits(tmp_path, name):
    cfg, method, base, ctx, eff = build(name)
    model = method.attach(base, eff, ctx)
    perturb(model, head_modules(cfg.model), scale=0.05)
    expected = lm_logits(model)
    method.save(model, tmp_path / "w")
    loaded = method.load(fresh_base(cfg), eff, ctx, tmp_path / "w")
    torch.testing.assert_close(lm_logits(loaded), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", _cases(["prefix_tuning", "prompt_tuning", "adaption_prompt", "cartridge", "shadow"],
                                        fast={"prefix_tuning"}))
def test_virtual_token_methods_generate_on_the_causal_lm(name):
    """Decoding with the method attached: prefix tuning hands its prefix through the model's cache (transformers 5
    cache API), and generation must extend it token by token."""
    cfg, method, base, ctx, eff = build(name)
    model = method.attach(base, eff, ctx)
    model.eval()
    b = causal_batch(5)
    with torch.no_grad():
        out = model.generate(input_ids=b["input_ids"][1:], attention_mask=b["attention_mask"][1:], max_new_tokens=3,
                             do_sample=False, pad_token_id=2)
    assert out.shape == (3, 12 + 3)


def test_shadow_adds_its_own_loss_in_training_only():
    """peft adds the shadow network's loss whenever labels are given; here eval_loss stays the task loss. At init the
    injection is zero, so the task loss is the base model's."""
    cfg, method, base, ctx, eff = build("shadow")
    b = causal_batch(3)
    with torch.no_grad():
        base_loss = base.eval()(**b).loss
    model = method.attach(base, eff, ctx)
    torch.testing.assert_close(model.eval()(**b).loss, base_loss, atol=1e-5, rtol=0)
    peft_eval_loss = ShadowModel.forward(model.base_model, **b).loss.detach()  # peft's own: the shadow loss added
    assert float(peft_eval_loss) > float(base_loss) + 1e-3
    train_loss = model.train()(**b).loss
    weight = float(eff["peft_args"]["auxiliary_loss_weight"])
    torch.testing.assert_close(train_loss, base_loss + weight * model.base_model.last_shadow_loss, atol=1e-5, rtol=0)
