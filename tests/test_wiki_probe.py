"""The Wikipedia forgetting probe (forgetting=wiki), as peft's method comparison measures forgetting: its value is
the token-weighted mean next-token cross-entropy, computed here by hand; a prompt-tuned model is scored with its
virtual tokens in front and they are not counted; a run records it; an encoder with an MLM head gets the masked-LM
loss and one without (MiniLM) is refused before training; the offline file and the Hub path (monkeypatched) each
fail in one line; the configs that choose it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from bench import BenchError
from bench.measure.probes import make_probe, probe_config, wiki_texts
from bench.model import load_model, load_tokenizer
from bench.orchestrate.runner import run
from bench.record import load_records
from tests.conftest import GLUE_DIR, compose_cfg, needs_gsm

# Two texts of very different lengths: the pooled mean and the mean of per-document means differ.
TEXTS = ["Albedo is the fraction of sunlight that is diffusely reflected by a body. It is measured on a scale from "
         "zero, for a black body that absorbs all incident radiation, to one, for a body that reflects it all.",
         "Alabama is a state in the Southeastern United States."]
DEVICE = torch.device("cpu")


def _wiki_dir(tmp_path, monkeypatch, texts=TEXTS):
    folder = tmp_path / "wiki"
    folder.mkdir()
    (folder / "enwiki_sample.jsonl").write_text("".join(json.dumps({"title": f"t{i}", "text": t}) + "\n"
                                                        for i, t in enumerate(texts)))
    monkeypatch.setenv("WIKI_DIR", str(folder))
    return folder


def _tiny_llama():
    cfg = compose_cfg("model=tiny-llama")
    torch.manual_seed(0)
    return load_model(cfg.model, 0)[0].eval(), load_tokenizer(cfg.model), cfg


def _by_hand(model, tokenizer, max_tokens: int, virtual: int = 0) -> tuple[float, int, float]:
    """(pooled CE, tokens, mean of per-document CEs): each text alone, no padding, F.cross_entropy summed."""
    total, n, per_doc = 0.0, 0, []
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]])
            logits = model(input_ids=ids).logits[0, virtual:]  # a prompt-tuned model's virtual positions first
            ce = F.cross_entropy(logits[:-1].float(), ids[0, 1:], reduction="sum")
            total += float(ce)
            n += ids.shape[1] - 1
            per_doc.append(float(ce) / (ids.shape[1] - 1))
    return total / n, n, sum(per_doc) / len(per_doc)


def test_the_probe_is_the_pooled_next_token_cross_entropy(tmp_path, monkeypatch):
    _wiki_dir(tmp_path, monkeypatch)
    model, tokenizer, cfg = _tiny_llama()
    tokenizer.padding_side = "left"  # as a generation task's batches are: the probe pads on the right by itself
    # The first text is cut at 24 tokens; both share one padded batch.
    probe = make_probe(probe_config("wiki", documents=2, max_tokens=24, batch_size=2), cfg.model, tokenizer)
    value = probe.measure(model, DEVICE)
    pooled, tokens, mean_of_means = _by_hand(model, tokenizer, 24)
    assert probe.tokens == tokens and tokens < 2 * 24
    assert value == pytest.approx(pooled, rel=1e-5)
    assert abs(pooled - mean_of_means) > 1e-3  # the test can tell the two means apart
    res = probe.result(value, value + 0.5)
    assert res["metric"] == "next_token_ce_nats_per_token" and res["higher_is_better"] is False
    assert res["forgetting"] == pytest.approx(0.5) and res["tokens"] == tokens
    assert res["text_source"].startswith("file enwiki_sample.jsonl (sha256 ")
    assert "first 2 of 2 documents, each cut to 24 tokens" in res["text_source"]
    assert tokenizer.padding_side == "left"  # the run's tokenizer is not changed


def test_a_prompt_tuned_model_is_scored_with_its_virtual_tokens_which_are_not_counted(tmp_path, monkeypatch):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    _wiki_dir(tmp_path, monkeypatch)
    model, tokenizer, cfg = _tiny_llama()
    probe = make_probe(probe_config("wiki", documents=2, max_tokens=24, batch_size=2), cfg.model, tokenizer)
    torch.manual_seed(1)
    tuned = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)).eval()
    value = probe.measure(tuned, DEVICE)
    pooled, tokens, _ = _by_hand(tuned, tokenizer, 24, virtual=4)
    assert probe.tokens == tokens and value == pytest.approx(pooled, rel=1e-5)
    with tuned.disable_adapter():
        assert probe.measure(tuned, DEVICE) != pytest.approx(value, rel=1e-4)  # the virtual tokens change the loss


@needs_gsm
def test_a_tiny_llama_run_on_gsm_symbolic_records_the_wiki_probe(tmp_path):
    """gsm_symbolic's default probe, shrunk; the record validates against the schema (strict in tests)."""
    rec = run(compose_cfg("model=tiny-llama", "task=gsm_symbolic", "method=lora", "rank=4", "lr=5e-2",
                          "forgetting.documents=3", "forgetting.max_tokens=32", "lm.max_new_tokens=4",
                          "budget.eval_samples=4", "measure.latency=false", "lm.generation=false",
                          results_dir=tmp_path))
    assert rec["status"] == "ok", rec.get("error")
    (stored,), problems = load_records(tmp_path)
    assert problems == []
    f = stored["forgetting"]
    assert f["probe"] == "wiki" and f["metric"] == "next_token_ce_nats_per_token" and not f["higher_is_better"]
    assert f["tokens"] == 3 * 31 and "enwiki_sample.jsonl (sha256 " in f["text_source"]
    # Near-zero logits of a random-init LM head: close to the uniform loss ln 49,152 = 10.8 nats.
    assert 9.8 < f["before"] < 11.8
    assert f["after"] != f["before"] and f["forgetting"] == pytest.approx(f["after"] - f["before"])
    assert stored["effective_config"]["forgetting"]["probe"] == "wiki"


@pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set and ../shared/data/glue missing")
def test_minilm_is_refused_in_one_line_before_training(tmp_path):
    cfg = compose_cfg("model=minilm")
    with pytest.raises(BenchError) as err:
        make_probe(probe_config("wiki"), cfg.model, load_tokenizer(cfg.model))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("forgetting=wiki: model 'minilm' has no pre-trained masked-LM head")
    assert "is not a causal LM; use forgetting=sts" in msg
    rec = run(compose_cfg("model=minilm", "forgetting=wiki", "measure.latency=false", results_dir=tmp_path))
    assert rec["status"] == "error" and rec["error"].startswith("forgetting=wiki: model 'minilm'")
    assert "train" not in rec


def test_an_encoder_with_an_mlm_head_gets_the_masked_lm_loss(tmp_path, monkeypatch):
    """A tiny BERT saved with its MLM head (no offline pre-trained encoder ships one): the masked-LM scorer on the
    same text, each document cut at the encoder's positions."""
    from transformers import BertConfig, BertForMaskedLM

    _wiki_dir(tmp_path, monkeypatch, TEXTS * 4)
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               vocab_size=30522)).save_pretrained(folder)
    minilm = compose_cfg("model=minilm")
    load_tokenizer(minilm.model).save_pretrained(folder)
    cfg = compose_cfg("model=tiny-bert", "model.random_init=false", f"model.hub_id={folder}",
                      "model.tokenizer_from=null")
    tokenizer = load_tokenizer(cfg.model)
    probe = make_probe(probe_config("wiki", documents=8, max_tokens=4096), cfg.model, tokenizer)
    assert probe.metric == "mlm_loss_nats_per_token" and "each cut to 512 tokens" in probe.source
    model, _ = load_model(cfg.model, 2)
    value = probe.measure(model, DEVICE)
    assert value == pytest.approx(torch.log(torch.tensor(30522.0)).item(), abs=0.5)  # an untrained head: ~ ln V
    assert 0 < probe.tokens < sum(len(tokenizer(t)["input_ids"]) for t in TEXTS * 4)
    assert probe.measure(model, DEVICE) == value  # the same masked positions every time


def test_random_init_encoders_are_refused_in_one_line():
    cfg = compose_cfg()  # tiny-bert
    with pytest.raises(BenchError, match=r"^forgetting=wiki: model 'tiny-bert' is a random-init test model .* "
                                         r"is not a causal LM; use forgetting=sts") as err:
        make_probe(probe_config("wiki"), cfg.model, load_tokenizer(cfg.model))
    assert "\n" not in str(err.value)


def test_a_missing_or_broken_wiki_file_is_one_line(tmp_path, monkeypatch):
    cfg = probe_config("wiki")
    monkeypatch.setenv("WIKI_DIR", str(tmp_path))
    with pytest.raises(BenchError, match=f"WIKI_DIR={tmp_path} has no enwiki_sample.jsonl; point WIKI_DIR") as err:
        wiki_texts(cfg)
    assert "\n" not in str(err.value)
    path = tmp_path / "enwiki_sample.jsonl"
    for content, what in [('{"text": "One."}\n{"text": "Two."\n', "line 2: not a JSON object"),
                          ('{"title": "A"}\n', "line 1: no 'text'")]:
        path.write_text(content)
        with pytest.raises(BenchError, match=f"{path}: {what}") as err:
            wiki_texts(cfg)
        assert "\n" not in str(err.value)
    path.write_text('{"text": "One."}\n')
    with pytest.raises(BenchError, match="holds 1 documents, fewer than forgetting.documents=16"):
        wiki_texts(cfg)


def test_without_wiki_dir_the_text_is_finewikis_first_rows(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, subset=None, **kwargs):
        calls.append((name, subset, kwargs))
        return [{"id": f"r{i}", "title": f"T{i}", "text": f"Article {i}."} for i in range(20)]

    monkeypatch.delenv("WIKI_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    texts, source = wiki_texts(probe_config("wiki", documents=3))
    assert texts == ["Article 0.", "Article 1.", "Article 2."]
    assert calls == [("HuggingFaceFW/finewiki", None, {"split": "train", "streaming": True})]
    assert source == "hub HuggingFaceFW/finewiki split train (streaming): its first 3 rows"
    # source=hub reads the Hub even with WIKI_DIR set (the peft_metamathqa preset)
    monkeypatch.setenv("WIKI_DIR", "/nonexistent")
    assert wiki_texts(probe_config("wiki", documents=2, source="hub"))[0] == texts[:2]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"title": "no text"}])
    with pytest.raises(BenchError, match="HuggingFaceFW/finewiki split train: row 1 has no text"):
        wiki_texts(probe_config("wiki", documents=1, source="hub"))


def test_offline_without_wiki_dir_is_one_line(monkeypatch):
    """The real `datasets.load_dataset` with HF_HUB_OFFLINE=1 (set by conftest): no text, one line, both fixes."""
    monkeypatch.delenv("WIKI_DIR", raising=False)
    with pytest.raises(BenchError, match=r"^forgetting=wiki: no Wikipedia text: WIKI_DIR is not set and the Hub "
                                         r"dataset HuggingFaceFW/finewiki cannot be read .*WIKI_DIR=") as err:
        wiki_texts(probe_config("wiki"))
    assert "\n" not in str(err.value)


def test_the_configs_that_choose_it():
    gsm = compose_cfg("model=smollm2", "task=gsm_symbolic", tiny=False)  # the task's choice wins over the model's ppl
    assert gsm.forgetting.probe == "wiki" and gsm.budget.name == "gsm_cpu"
    assert (gsm.forgetting.documents, gsm.forgetting.max_tokens, gsm.forgetting.source) == (16, 256, "auto")
    assert compose_cfg("model=smollm2", "task=gsm_symbolic", "forgetting=ppl", tiny=False).forgetting.probe == "ppl"
    assert compose_cfg("model=smollm2", "task=gsm_symbolic", "~forgetting", tiny=False).get("forgetting") is None
    from bench.config import compose_config

    peft = compose_config(["+sweep=peft_metamathqa"], hydra=True).forgetting
    assert (peft.probe, peft.source, peft.dataset, peft.split, peft.documents, peft.max_tokens, peft.batch_size) == (
        "wiki", "hub", "HuggingFaceFW/finewiki", "train", 100, 768, 4)
    assert compose_config(["+sweep=gsm_cpu"], hydra=True).forgetting.probe == "wiki"
