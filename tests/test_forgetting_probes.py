"""The mlm and ppl forgetting probes end to end: mlm on a tiny BERT checkpoint saved with its MLM head (no offline
pre-trained encoder ships one; the checkpoint's own head goes on the run's fine-tuned backbone), ppl on the tiny
random-init Llama, whose own LM head is the probe's."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from analysis.forgetting import make_probe, probe_config
from bench.model import load_model, load_tokenizer
from bench.orchestrate.runner import run
from tests.conftest import GLUE_DIR

pytestmark = pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set and ../shared/data/glue missing")
VOCAB = 30522  # MiniLM's tokenizer, saved beside each checkpoint


def _checkpoint(tmp_path, make_cfg, lm) -> str:
    folder = tmp_path / "ckpt"
    lm.save_pretrained(folder)
    load_tokenizer(make_cfg().model).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def bert_mlm(tmp_path, make_cfg):
    torch.manual_seed(0)
    lm = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, vocab_size=VOCAB))
    folder = _checkpoint(tmp_path, make_cfg, lm)
    return ["model.random_init=false", f"model.hub_id={folder}", "model.tokenizer_from=null"]


def test_mlm_probe_runs_in_a_run_and_measures_the_tuned_encoder(make_cfg, bert_mlm):
    probe = ["forgetting=mlm", "forgetting.max_sentences=48", "forgetting.max_seq_len=32"]
    lora = run(make_cfg("method=lora", "rank=4", "lr=5e-2", *bert_mlm, *probe))
    assert lora["status"] == "ok", lora.get("error")
    f = lora["forgetting"]
    assert f["probe"] == "mlm" and f["metric"] == "mlm_loss_nats_per_token" and not f["higher_is_better"]
    # An untrained head over 30,522 tokens: close to the uniform loss ln V.
    assert f["before"] == pytest.approx(math.log(VOCAB), abs=0.5)
    assert f["after"] != f["before"] and f["forgetting"] == pytest.approx(f["after"] - f["before"])
    # Prompt tuning leaves the encoder as it was: exactly no forgetting, same masked positions both times.
    prompt = run(make_cfg("method=prompt_tuning", "rank=4", *bert_mlm, *probe))
    assert prompt["status"] == "ok", prompt.get("error")
    assert prompt["forgetting"]["after"] == prompt["forgetting"]["before"] == pytest.approx(f["before"], abs=1e-6)


def test_mlm_probe_puts_its_own_backbone_back(make_cfg, bert_mlm):
    cfg = make_cfg(*bert_mlm)
    probe = make_probe(probe_config("mlm", max_sentences=16), cfg.model, load_tokenizer(cfg.model))
    own = probe.lm.bert
    model, _ = load_model(cfg.model, 2)
    before = probe.measure(model, torch.device("cpu"))
    assert probe.lm.bert is own
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight.mul_(5.0)
    assert probe.measure(model, torch.device("cpu")) != before  # the run's encoder, not the probe's copy
    assert probe.measure(load_model(cfg.model, 2)[0], torch.device("cpu")) == pytest.approx(before)  # reloaded


def test_ppl_probe_in_a_causal_lm_run(make_cfg):
    """The real tiny-llama config: perplexity of the run's own LM (no second head model), before and after."""
    rec = run(make_cfg("model=tiny-llama", "method=lora", "rank=4", "lr=5e-2", "forgetting=ppl",
                       "forgetting.max_sentences=32", "forgetting.max_seq_len=32", "measure.latency=false"))
    assert rec["status"] == "ok", rec.get("error")
    f = rec["forgetting"]
    assert f["probe"] == "ppl" and f["metric"] == "perplexity" and f["text_source"].startswith("STS-B dev")
    # Near-zero logits of a random-init LM head: perplexity close to the vocabulary size (49,152).
    assert 49152 / 2 < f["before"] < 2 * 49152
    assert f["after"] != f["before"] and f["forgetting"] == pytest.approx(f["after"] - f["before"])


def test_ppl_probe_refuses_an_encoder(make_cfg, bert_mlm):
    from bench import BenchError

    cfg = make_cfg(*bert_mlm)
    with pytest.raises(BenchError, match="is an encoder, not a causal LM"):
        make_probe(probe_config("ppl", max_sentences=8), cfg.model, load_tokenizer(cfg.model))
