"""Causal LMs (bench/data/text.py): tasks as text, answer-only loss, label log-likelihood scoring, and a run's record,
on the tiny random Llama composed from the real configs (its accuracy is meaningless; its numbers are exact)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from bench import BenchError
from bench.data import text as lm
from bench.model import load_model, load_tokenizer
from bench.orchestrate.runner import run
from bench.plan import plan
from tests.conftest import needs_glue

LLAMA = ["model=tiny-llama", "lm.gen_iters=2", "lm.gen_new_tokens=4", "lm.gen_prompt_len=16"]
ROWS = pd.DataFrame({"text_a": ["a fine film", "bad, bad, terrible and long-winded"], "text_b": [None, None],
                     "label": [1, 0]})


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tests.conftest import compose_cfg

    cfg = compose_cfg(*LLAMA, results_dir=tmp_path_factory.mktemp("runs"))
    torch.manual_seed(0)
    return cfg, load_tokenizer(cfg.model), load_model(cfg.model, 2)[0].eval()


def _prompting(cfg, tok, **lm_overrides):
    return lm.prompting(cfg.task, OmegaConf.merge(cfg.lm, lm_overrides), tok, "sst2")


def _brute_force(model, feats) -> torch.Tensor:
    """Each (example, answer): its own unpadded forward pass, the answer tokens' log-probabilities summed."""
    out = torch.zeros(len(feats), len(feats[0]["answer_ids"]))
    with torch.no_grad():
        for i, f in enumerate(feats):
            for k, answer in enumerate(f["answer_ids"]):
                ids = torch.tensor([f["prompt_ids"] + answer])
                logp = model(input_ids=ids).logits[0].log_softmax(-1)
                n = len(f["prompt_ids"])
                out[i, k] = sum(logp[n - 1 + t, tok] for t, tok in enumerate(answer))
    return out


def test_answer_only_loss_masks_the_prompt_and_trains_the_end_of_sequence(llama):
    cfg, tok, _ = llama
    pr = _prompting(cfg, tok)
    assert pr.chat and pr.loss_on == "answer"  # SmolLM2's tokenizer has a chat template
    feats, cut = lm.encode(ROWS, tok, pr, 128)
    assert cut == 0
    for f, row in zip(lm.train_features(feats, tok, pr), feats):
        n = len(row["prompt_ids"])
        answer = row["answer_ids"][row["label"]]
        assert f["input_ids"] == row["prompt_ids"] + answer + [tok.eos_token_id]
        assert f["labels"] == [-100] * n + answer + [tok.eos_token_id]
    everything = lm.train_features(feats, tok, _prompting(cfg, tok, loss_on="all"))
    assert all(f["labels"] == f["input_ids"] for f in everything)
    assert tok.decode(feats[0]["answer_ids"][1]) == "positive"  # class id 1 is SST-2's positive


def test_a_long_prompt_loses_its_middle_not_its_ends():
    ids, cut = lm._fit(list(range(100)), 10)
    assert cut and ids == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    assert lm._fit([1, 2], 10) == ([1, 2], False)


def test_label_scores_equal_each_answers_own_log_likelihood(llama):
    """One-token answers (one left-padded forward per example) and multi-token answers (every answer appended,
    right-padded) give exactly the sum of the answer's token log-probabilities of an unpadded pass."""
    cfg, tok, model = llama
    pr = _prompting(cfg, tok)
    feats, _ = lm.encode(ROWS, tok, pr, 128)
    assert len({len(f["prompt_ids"]) for f in feats}) == 2  # different lengths: padding is exercised
    batch = lm.ChoiceCollator(tok.pad_token_id)(feats)
    assert "answer_ids" in batch  # the one-token path
    with torch.no_grad():
        scores, gold_nll = lm.score_choices(model, batch)
    torch.testing.assert_close(scores, _brute_force(model, feats), atol=1e-4, rtol=0)
    assert torch.allclose(gold_nll, -scores[torch.arange(2), torch.tensor([1, 0])])

    multi = lm.Prompting(pr.template, ("rather negative", "quite positive indeed"), pr.chat, pr.loss_on)
    feats, _ = lm.encode(ROWS, tok, multi, 128)
    assert max(len(a) for a in feats[0]["answer_ids"]) > 1
    batch = lm.ChoiceCollator(tok.pad_token_id)(feats)
    assert "answer_ids" not in batch and batch["input_ids"].shape[0] == 4  # 2 examples x 2 answers
    with torch.no_grad():
        scores, _ = lm.score_choices(model, batch)
    torch.testing.assert_close(scores, _brute_force(model, feats), atol=1e-4, rtol=0)


class _Scripted(torch.nn.Module):
    """A stand-in LM whose greedy output per row is scripted (new tokens after the prompt)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def generate(self, input_ids, max_new_tokens, **_):
        new = torch.tensor([row[:max_new_tokens] for row in self.outputs])
        return torch.cat([input_ids, new], 1)


def test_generated_answers_count_only_when_exact_and_ended():
    eos, pad = 9, 0
    feats = [{"prompt_ids": [5, 6], "answer_ids": [[1], [2, 3]], "label": lab} for lab in (0, 1, 1, 0, 1)]
    batch = lm.GenerateCollator(pad, eos)(feats)
    outputs = [[1, 9, 0], [2, 3, 9],  # label 0 and label 1, each answer then end of sequence
               [2, 9, 0],  # a prefix of label 1's answer: no answer
               [1, 4, 9],  # label 0's answer followed by more text: no answer
               [2, 3, 3]]  # never ends within the answer's length + 1: no answer
    scores = lm.generate_choices(_Scripted(outputs), batch)
    assert scores.tolist() == [[1, 0], [0, 1], [0, -1], [-1, 0], [0, -1]]
    assert scores.argmax(1).tolist() == [0, 1, 0, 1, 0]  # a row without an answer predicts a wrong label
    assert lm.no_answer_fraction(scores.numpy()) == pytest.approx(3 / 5)


def test_greedy_answers_of_left_padded_prompts_are_those_of_unpadded_greedy_decoding(llama):
    cfg, tok, model = llama
    feats, _ = lm.encode(ROWS, tok, _prompting(cfg, tok), 128)
    batch = lm.GenerateCollator(tok.pad_token_id, tok.eos_token_id)(feats)
    assert batch["gen_attention_mask"][:, 0].tolist().count(0) == 1  # the shorter prompt is padded on the left
    with torch.no_grad():
        got = lm.greedy_answers(model, batch)
        for f, tokens in zip(feats, got):
            ids = torch.tensor([f["prompt_ids"]])
            for _ in range(2):  # one-token answers: 2 new tokens; arg-max and append, no padding, no cache
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
            alone = ids[0, -2:].tolist()
            assert tokens == tuple(alone[:alone.index(tok.eos_token_id)] if tok.eos_token_id in alone else alone)


def test_a_regression_task_or_bad_answers_stop_at_plan_time(make_cfg, llama):
    with pytest.raises(BenchError, match="regression"):
        plan(make_cfg(*LLAMA, "task=stsb"))
    cfg, tok, _ = llama
    bad = make_cfg(*LLAMA, "task.prompt.answers=[yes,yes]")
    with pytest.raises(BenchError, match="repeat a text"):
        lm.prompting(bad.task, bad.lm, tok, "sst2")


def test_the_prompt_and_lm_knobs_are_not_part_of_an_encoder_runs_identity(make_cfg):
    encoder = plan(make_cfg()).effective
    assert "lm" not in encoder and "prompt" not in encoder["task"]
    causal = plan(make_cfg(*LLAMA)).effective
    assert causal["lm"]["loss_on"] == "answer" and causal["task"]["prompt"]["answers"] == ["negative", "positive"]
    assert plan(make_cfg(*LLAMA, "lm.loss_on=all")).config_hash != plan(make_cfg(*LLAMA)).config_hash


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    from tests.conftest import compose_cfg

    return run(compose_cfg(*LLAMA, "method=lora", "rank=4", "lr=1e-2", results_dir=tmp_path_factory.mktemp("runs")))


@needs_glue
def test_a_causal_lm_run_records_zero_shot_scores_and_generation(causal_run):
    rec = causal_run
    assert rec["status"] == "ok", rec.get("error")
    assert rec["model_kind"] == "causal_lm"
    assert rec["trainable_params"] == rec["trainable_params_excl_head"] > 0  # no task head
    assert set(rec["zero_shot_metrics"]) == set(rec["metrics"]) == {"accuracy", "eval_loss"}
    assert rec["zero_shot_metrics"] != rec["metrics"]  # the zero-shot score is the base model's, before training
    assert rec["merged_max_abs_logit_diff"] < 1e-4 and rec["merged_metrics"]["accuracy"] == rec["metrics"]["accuracy"]
    gen = rec["generation"]
    assert gen["new_tokens"] == 4 and gen["prompt_len"] == 16
    for name in ("base", "unmerged", "merged"):
        assert gen[name]["prefill_ms"] > 0 and gen[name]["decode_tokens_per_s"] > 0
    assert "merged_over_base_ratio" in gen and rec["latency"]["seq_len"] == 16  # forward latency = the prefill
    assert rec["data"]["prompt"]["answers"] == ["negative", "positive"]
    assert rec["data"]["prompt"]["example"].startswith("<|im_start|>system")


@needs_glue
def test_sequential_forgetting_runs_on_a_causal_lm(causal_run):
    """Task A (SST-2) after training on task B (RTE) as text: no head to swap, the LM head answers both."""
    from bench.tools.sequential import sequential

    out = sequential(_run_dir(causal_run), "rte", max_steps=2, train_samples=16)
    assert out["task_a"] == "sst2" and out["steps_b"] == 2 and 0 <= out["task_b_accuracy"] <= 1
    assert out["forgetting"] == pytest.approx(out["before"] - out["after"])
    assert out["before"] == pytest.approx(causal_run["metrics"]["accuracy"])  # the merged run on A, as recorded


def _run_dir(record: dict):
    from pathlib import Path

    return Path(record["config"]["results_dir"]) / record["run_id"]


@needs_glue
def test_generate_mode_records_exact_match_metrics(tmp_path):
    """lm.eval_mode=generate: the seeded random Llama decodes no label's answer, so every row counts as wrong
    (accuracy 0, not the share of one class), before and after training; the mode is in the record."""
    from tests.conftest import compose_cfg

    rec = run(compose_cfg(*LLAMA, "method=lora", "lm.eval_mode=generate", "measure.latency=false",
                          results_dir=tmp_path))
    assert rec["status"] == "ok", rec.get("error")
    assert rec["data"]["prompt"]["eval_mode"] == "generate"
    assert rec["zero_shot_metrics"]["no_answer_fraction"] == 1.0 and rec["zero_shot_metrics"]["accuracy"] == 0.0
    for metrics in (rec["metrics"], rec["merged_metrics"]):
        assert metrics["accuracy"] <= 1 - metrics["no_answer_fraction"]
    assert rec["merged_metrics"]["accuracy"] == rec["metrics"]["accuracy"]
