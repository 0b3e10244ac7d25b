"""keep_best (budget.eval_every_steps + budget.keep_best): the model it restores is the one it scored, in every
respect the method depends on (AdaLoRA's rank pattern too), and its copy of the weights lives off the device."""
from __future__ import annotations

import torch

from bench.loop.train import TrainSettings, copy_trainable_to_cpu, train
from methods.base import head_modules
from tests.method_helpers import batch, build, fresh_base, logits

STEPS = 20  # AdaLoRA: tinit 2, tfinal 8; masks every step (deltaT=1) from step 3, final pattern at step 12


def test_keep_best_restores_adalora_rank_pattern_so_evaluated_and_saved_model_agree(make_cfg, tmp_path):
    cfg, method, base, ctx, eff = build(make_cfg, "adalora", "method.deltaT=1", "budget.eval_every_steps=2",
                                   "budget.keep_best=true", "budget.validation_rows=10", rank=4,
                                   total_steps=STEPS)
    model = method.attach(base, eff, ctx)
    scores = iter([0.0, 0.0, 1.0] + [0.0] * 7)  # evaluations at steps 2, 4, ..., 18, then the final one: 6 wins
    scored = {}

    def evaluate_fn() -> dict:
        value = next(scores)
        if value:
            scored["logits"], scored["ranks"] = logits(model), method.info(model)["rank_pattern"]
        return {"accuracy": value}

    settings = TrainSettings(steps=STEPS, lr=1e-2, weight_decay=0.0, warmup_ratio=0.0, budget=cfg.budget,
                             device=torch.device("cpu"), head=head_modules(cfg.model), main_metric="accuracy")
    result = train(model, method, [batch(i) for i in range(STEPS)], settings, evaluate_fn=evaluate_fn)
    assert result.best_step == 6
    final_ranks = method.info(model)["rank_pattern"]
    assert final_ranks == scored["ranks"]  # the record's rank pattern is the scored model's
    torch.testing.assert_close(logits(model), scored["logits"], atol=1e-6, rtol=0)
    method.save(model, tmp_path / "weights")
    reloaded = method.load(fresh_base(cfg), eff, ctx, tmp_path / "weights")
    torch.testing.assert_close(logits(reloaded), scored["logits"], atol=1e-5, rtol=0)


def test_keep_best_copy_is_in_host_memory_and_independent(make_cfg):
    cfg, method, base, ctx, eff = build(make_cfg, "lora")
    model = method.attach(base, eff, ctx)
    copy = copy_trainable_to_cpu(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(copy) == set(trainable)
    for name, param in trainable.items():
        assert copy[name].device.type == "cpu" and not copy[name].requires_grad
        assert copy[name].data_ptr() != param.data_ptr()  # a copy even when the model is on the CPU
    with torch.no_grad():
        next(iter(trainable.values())).add_(1.0)
    name = next(iter(trainable))
    assert not torch.equal(copy[name], trainable[name])
