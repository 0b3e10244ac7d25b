"""LoRA+ (B's learning rate a ratio of A's, through the method's optimiser groups) and DyLoRA (one training run,
models of every rank): the values each promises, and a tiny-bert smoke run of each through the runner."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import get_linear_schedule_with_warmup

from analysis import plots
from analysis.collect import collect
from analysis.tables import ok_frame
from bench import BenchError
from bench.orchestrate.runner import run
from bench.plan import plan
from methods import get_method
from methods.base import decays, head_modules, is_head_param
from methods.dylora import rank_state, truncated
from tests.conftest import needs_glue
from tests.method_helpers import batch, build, fresh_base, logits, perturb, train_steps

QUICK = ["measure.latency=false", "save_weights=none"]


# ---------------------------------------------------------------- LoRA+


def test_loraplus_groups_give_b_ratio_times_the_lr_and_keep_the_loops_rules(make_cfg):
    ratio = 4  # the knob, not the default 16 (test_loraplus_ratio_is_part_of_the_runs_identity)
    cfg, method, base, ctx, eff = build(make_cfg, "loraplus", f"method.loraplus_lr_ratio={ratio}")
    head = head_modules(cfg.model)
    model = method.attach(base, eff, ctx)
    lr, wd = 3e-4, 0.1
    optimizer = torch.optim.AdamW(method.optimizer_param_groups(model, lr, wd), lr=lr)
    seen = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen[id(p)] = (group["lr"], group["weight_decay"])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(seen) == len(named)  # every trainable parameter, once
    for n, p in named:
        param_lr, param_wd = seen[id(p)]
        if ".lora_B." in n:
            assert param_lr == pytest.approx(ratio * lr), n
        else:  # A and the whole task head (its biases too) at the run's lr
            assert param_lr == pytest.approx(lr), n
            assert ".lora_A." in n or is_head_param(n, head), n
        assert param_wd == (wd if decays(n, p) else 0.0), n  # the loop's rule: no decay on biases, LayerNorm
    assert sum(".lora_B." in n for n, _ in named) == sum(".lora_A." in n for n, _ in named) > 0
    # The shared schedule scales every group alike: B stays at ratio x A's lr through warm-up and decay.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)  # the loss curve logs the first group's lr
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, 10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        lrs = sorted({g["lr"] for g in optimizer.param_groups})
        assert lrs[-1] == pytest.approx(ratio * lrs[0])


def test_loraplus_ratio_below_one_is_one_line_error(make_cfg):
    with pytest.raises(BenchError, match="loraplus_lr_ratio must be >= 1") as err:
        plan(make_cfg("method=loraplus", "method.loraplus_lr_ratio=0.5"))
    assert "\n" not in str(err.value)


def test_loraplus_ratio_is_part_of_the_runs_identity(make_cfg):
    """The record's effective_config (what the run hashes) says the ratio; another ratio is another run. (The run
    itself: tests/test_method_runs.py runs every registered method through the runner.)"""
    default, other = plan(make_cfg("method=loraplus")), plan(make_cfg("method=loraplus", "method.loraplus_lr_ratio=4"))
    assert default.effective["method"]["loraplus_lr_ratio"] == 16.0
    assert other.effective["method"]["loraplus_lr_ratio"] == 4.0 and other.config_hash != default.config_hash


# ---------------------------------------------------------------- LoRA-FA


def test_lora_fa_keeps_a_at_its_init_and_trains_b(make_cfg):
    cfg, method, base, ctx, eff = build(make_cfg, "lora_fa")
    model = method.attach(base, eff, ctx)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    train_steps(model, method, cfg, steps=3, lr=1e-2)
    after = dict(model.named_parameters())
    a = [n for n in before if ".lora_A." in n]
    b = [n for n in before if ".lora_B." in n]
    assert a and len(a) == len(b)
    assert all(torch.equal(after[n], before[n]) and not after[n].requires_grad for n in a)
    assert all(before[n].abs().max() == 0 and after[n].abs().max() > 0 for n in b)  # B = 0 at init, then trained


# ---------------------------------------------------------------- DyLoRA


def _plain_lora_of_first_components(cfg, dylora_model, b: int):
    """A peft LoRA of rank b with the first b components of `dylora_model`'s adapter (scale alpha/b) and its head."""
    alpha = float(cfg.method.alpha_over_rank) * rank_state(dylora_model).max_rank
    plain = get_peft_model(fresh_base(cfg), LoraConfig(
        task_type=TaskType.SEQ_CLS, r=b, lora_alpha=alpha, lora_dropout=0.0,
        target_modules=list(cfg.method.target_modules), modules_to_save=list(head_modules(cfg.model))))
    source = dict(dylora_model.named_parameters())
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if ".lora_A." in n:
                p.copy_(source[n][:b])
            elif ".lora_B." in n:
                p.copy_(source[n][:, :b])
            elif p.requires_grad:
                p.copy_(source[n])
    return plain


def test_dylora_truncated_to_b_is_the_lora_of_its_first_b_components(make_cfg):
    cfg, method, base, ctx, eff = build(make_cfg, "dylora", rank=4)
    model = method.attach(base, eff, ctx)
    perturb(model, head_modules(cfg.model))
    for b in (1, 2, 3, 4):
        with truncated(model, b):
            got = logits(model)
        expected = logits(_plain_lora_of_first_components(cfg, model, b))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (logits(model) - got).abs().max() == 0  # outside the context: the full rank again
    with pytest.raises(BenchError, match="ranks 1..4"), truncated(model, 5):
        pass


def test_dylora_samples_every_rank_and_trains_only_the_bth_component(make_cfg):
    steps = 24  # seeded: the draws are the same every time (P(a rank missing) = 4 * (3/4)^24 < 0.5% per seed)
    cfg, method, base, ctx, eff = build(make_cfg, "dylora", rank=4)
    model = method.attach(base, eff, ctx)
    train_steps(model, method, cfg, steps=steps, lr=1e-3)
    sampled = method.info(model)["sampled_ranks"]
    assert set(sampled) == {"1", "2", "3", "4"} and all(n > 0 for n in sampled.values())
    assert sum(sampled.values()) == steps  # one draw per optimiser step
    # Frozen (the default, the paper's rule): the gradient reaches row b-1 of A and column b-1 of B only.
    for frozen, rows in ((True, [False, False, True, False]), (False, [True, True, True, False])):
        state = rank_state(model)
        state.frozen, state.train_rank = frozen, 3
        model.train().zero_grad()
        model(**batch(5)).loss.backward()
        for n, p in model.named_parameters():
            if ".lora_A." in n:
                assert (p.grad.abs().sum(1) > 0).tolist() == rows, (frozen, n)
            elif ".lora_B." in n:
                assert (p.grad.abs().sum(0) > 0).tolist() == rows, (frozen, n)


def test_dylora_merges_and_reloads_at_full_rank_and_reloads_every_rank(make_cfg, tmp_path):
    cfg, method, base, ctx, eff = build(make_cfg, "dylora", rank=4)
    model = method.attach(base, eff, ctx)
    perturb(model, head_modules(cfg.model))
    full = logits(model)
    with truncated(model, 2):
        two = logits(model)
        merged = method.merged(model)  # merging is always the full-rank adapter (peft's merge_and_unload)
    torch.testing.assert_close(logits(merged), full, atol=1e-5, rtol=0)
    method.save(model, tmp_path / "w")
    loaded = method.load(fresh_base(cfg), eff, ctx, tmp_path / "w")
    torch.testing.assert_close(logits(loaded), full, atol=1e-5, rtol=0)
    with truncated(loaded, 2):
        torch.testing.assert_close(logits(loaded), two, atol=1e-5, rtol=0)


def test_dylora_eval_ranks_are_those_up_to_the_maximum_plus_the_maximum(make_cfg):
    assert plan(make_cfg("method=dylora", "rank=8")).effective["method"]["eval_ranks"] == [1, 2, 4, 8]
    method = get_method("dylora")
    cfg = {"alpha_over_rank": 2, "eval_ranks": [1, 2, 4, 8], "frozen": True}
    for rank, expected in ((4, [1, 2, 4]), (6, [1, 2, 4, 6]), (16, [1, 2, 4, 8, 16]), (1, [1])):
        assert method.effective_config(cfg, rank)["eval_ranks"] == expected


@needs_glue
def test_dylora_record_holds_metrics_at_every_eval_rank_and_the_report_plots_them(make_cfg, tmp_path):
    rec = run(make_cfg("method=dylora", "rank=8", *QUICK))
    assert rec["status"] == "ok", rec.get("error")
    ranks = rec["rank_metrics"]
    assert list(ranks) == ["1", "2", "4", "8"]
    assert all({"accuracy", "eval_loss"} <= set(m) for m in ranks.values())
    assert ranks["8"] == rec["metrics"]  # the main metric is the full rank's
    assert rec["method_info"]["frozen"] and sum(rec["method_info"]["sampled_ranks"].values()) == rec["train"]["steps"]
    assert rec["merged_max_abs_logit_diff"] < 1e-4
    df = ok_frame(collect(tmp_path / "runs"))
    long = plots.rank_metrics_long(df)
    assert sorted(long["eval_rank"]) == [1, 2, 4, 8]
    assert long.set_index("eval_rank")["metric_pct"].to_dict() == \
        {int(k): pytest.approx(100 * m["accuracy"]) for k, m in ranks.items()}
    png = plots.metric_vs_eval_rank(df, tmp_path / "plots")
    assert png.is_file() and png.with_suffix(".svg").is_file()
    # A results folder without such a record: the plot is skipped with its reason.
    assert "no run evaluated at several ranks" in plots.metric_vs_eval_rank(df[df["method"] != "dylora"], tmp_path)
