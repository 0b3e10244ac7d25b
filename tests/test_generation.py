"""Generation tasks (question -> worked solution -> final number), the way peft's MetaMathQA benchmark runs them:
the answer rule, the data files and Hub loaders, the solution-only loss, batched greedy decoding, and a whole run."""
from __future__ import annotations

import json
from decimal import Decimal

import pandas as pd
import pytest
import torch

from bench import BenchError
from bench.data import answers, load_data, text
from bench.data.tasks import get_task, load_generation_task
from bench.orchestrate.runner import run
from bench.plan import plan
from bench.record import CURVE_FILE, SAMPLES_FILE, load_records
from tests.conftest import compose_cfg, needs_gsm

EXTRACTION = [  # generation -> the number read (None: no answer)
    ("She pays 3 + 9 = 12 dollars.\n#### 12", Decimal("12")),
    ("#### 1,234", None),  # peft's rule reads no number with a thousands separator
    ("The answer is: 5.0", Decimal("5.0")),
    ("The answer is: $12", Decimal("12")),
    ("So the loss is 7.\nThe answer is: -7", Decimal("-7")),
    ("The answer is 2.50.", Decimal("2.50")),
    ("The final answer is 3/4", Decimal("0.75")),
    ("#### 7\nthen again\n#### 8", Decimal("8")),  # the last occurrence
    ("The answer is: 8\n#### 9", Decimal("8")),  # the first delimiter in the rule's order wins
    ("The answer is: 5 apples and 3 pears", None),  # several numbers: not a number
    ("There are 12 apples.", None),  # no delimiter: no answer
    ("", None),
]


@pytest.mark.parametrize(("generation", "number"), EXTRACTION)
def test_the_final_number_is_read_by_pefts_rule(generation, number):
    assert answers.final_number(generation) == number
    if number is not None:
        assert answers.is_correct(generation, number) and answers.is_correct(generation, Decimal(float(number)))
        assert not answers.is_correct(generation, number + 1)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _gsm_folder(tmp_path, train, test):
    folder = tmp_path / "gsm"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", train)
    _jsonl(folder / "test.jsonl", test)
    return folder


GOOD = {"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"}


@pytest.mark.parametrize(("bad", "says"), [
    ({"question": "q?"}, "line 2: no 'answer'"),
    ({"question": "q?", "answer": "  "}, "line 2: no 'answer'"),
    ({"question": "q?", "answer": "it is five"}, "line 2: the worked solution does not end in a final number"),
    ("{not json", "line 2: not a JSON object"),
])
def test_a_bad_data_file_is_one_line_naming_the_file_and_line(tmp_path, bad, says):
    folder = tmp_path / "gsm"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(GOOD) + "\n" + (bad if isinstance(bad, str) else json.dumps(bad)))
    _jsonl(folder / "test.jsonl", [GOOD])
    with pytest.raises(BenchError) as err:
        load_generation_task(get_task("gsm_symbolic"), str(folder))
    assert str(folder / "train.jsonl") in str(err.value) and says in str(err.value) and "\n" not in str(err.value)


def test_an_empty_or_missing_data_file_is_one_line(tmp_path):
    folder = _gsm_folder(tmp_path, [GOOD], [GOOD])
    (folder / "test.jsonl").write_text("")
    with pytest.raises(BenchError, match="test.jsonl: the file is empty"):
        load_generation_task(get_task("gsm_symbolic"), str(folder))
    (folder / "test.jsonl").unlink()
    with pytest.raises(BenchError, match="GSM_SYMBOLIC_DIR=.* has no .*test.jsonl"):
        load_generation_task(get_task("gsm_symbolic"), str(folder))


def _hub(monkeypatch, tables: dict[tuple[str, str | None, str], list[dict]]):
    """datasets.load_dataset answering from `tables` ({(dataset, config, split): rows in the Hub's schema})."""
    import datasets

    def load_dataset(name, config=None, split=None):
        return datasets.Dataset.from_list(tables[(name, config, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv("GSM8K_DIR", raising=False)
    monkeypatch.delenv("METAMATHQA_DIR", raising=False)


def test_the_gsm8k_hub_loader_reads_train_and_test(monkeypatch):
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(3)]
    _hub(monkeypatch, {("openai/gsm8k", "main", "train"): rows, ("openai/gsm8k", "main", "test"): rows[:2]})
    train, dev, source = load_task_named("gsm8k")
    assert (len(train), len(dev), source) == (3, 2, "hub:openai/gsm8k")
    assert list(dev["answer"]) == ["1", "2"] and dev["label"][1].endswith("#### 2")


def test_the_metamathqa_hub_loader_filters_long_rows_and_tests_on_gsm8k(monkeypatch):
    meta = [{"type": "GSM_Rephrased", "query": "What is 2 + 2?", "original_question": "",
             "response": "2 + 2 = 4.\nThe answer is: 4"},
            {"type": "GSM_SV", "query": "x" * 1200, "original_question": "",
             "response": "y" * 100 + " The answer is: 1"}]
    gsm = [{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}]
    _hub(monkeypatch, {("meta-math/MetaMathQA", None, "train"): meta, ("openai/gsm8k", "main", "test"): gsm})
    train, dev, source = load_task_named("metamathqa")
    assert len(train) == 1 and train["answer"][0] == "4"  # the 1,301-character row is dropped, as peft does
    assert list(dev["answer"]) == ["2"] and source == "hub:meta-math/MetaMathQA+openai/gsm8k"


def test_no_data_offline_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("GSM8K_DIR", raising=False)
    with pytest.raises(BenchError, match="task 'gsm8k': no data. Go online for the Hub dataset openai/gsm8k"):
        load_task_named("gsm8k")


def load_task_named(name: str):
    return load_generation_task(get_task(name))


def _tiny_llama():
    from bench.model import load_model, load_tokenizer

    cfg = compose_cfg("model=tiny-llama", "task=gsm_symbolic")
    torch.manual_seed(0)
    return load_model(cfg.model, 0)[0].eval(), load_tokenizer(cfg.model), cfg


@needs_gsm
def test_the_loss_is_on_the_solution_only_unless_loss_on_all():
    _, tokenizer, cfg = _tiny_llama()
    rows = pd.DataFrame({"text_a": ["What is 2 + 3?"], "text_b": [None], "label": ["2 + 3 = 5\n#### 5"],
                         "answer": ["5"]})
    for loss_on in ("answer", "all"):
        sv = text.Solving("Question: {text_a}\nAnswer:", chat=True, loss_on=loss_on)
        (feature,), cut = text.encode_solutions(rows, tokenizer, sv, 256)
        (train,) = text.solution_train_features([feature], sv)
        n_prompt, solution = len(feature["prompt_ids"]), feature["answer_ids"][0]
        assert cut == 0 and solution[-1] == tokenizer.eos_token_id
        assert train["input_ids"] == feature["prompt_ids"] + solution
        if loss_on == "answer":
            assert train["labels"] == [text.IGNORE] * n_prompt + solution
        else:
            assert train["labels"] == train["input_ids"]
        assert tokenizer.decode(solution, skip_special_tokens=True).strip() == "2 + 3 = 5\n#### 5"


@needs_gsm
def test_k_shot_prompts_get_room_for_their_examples_so_the_question_and_solution_are_not_cut():
    _, tokenizer, cfg = _tiny_llama()
    cfg.lm.shots, cfg.budget.max_seq_len, cfg.budget.eval_samples = 3, 384, 8  # 3 solved problems: ~600 tokens
    data = load_data(get_task("gsm_symbolic"), cfg, tokenizer)
    zero, k_shot = data.dev_loader.dataset, data.few_shot_loader.dataset
    assert data.info["prompts_cut"]["few_shot"] == data.info["prompts_cut"]["dev"] == 0
    for z, k in zip(zero, k_shot):
        assert k["answer_ids"] == z["answer_ids"] and len(k["prompt_ids"]) > len(z["prompt_ids"]) + 300
        question = tokenizer.decode(z["prompt_ids"], skip_special_tokens=True).split("Question:")[-1]
        assert tokenizer.decode(k["prompt_ids"], skip_special_tokens=True).endswith(question)


@needs_gsm
def test_batched_left_padded_greedy_decoding_equals_one_prompt_at_a_time():
    model, tokenizer, cfg = _tiny_llama()
    rows = pd.DataFrame({"text_a": ["Hi?", "What is the sum of two and three apples in the basket?", "Why so many?"],
                         "text_b": [None] * 3, "label": ["#### 1"] * 3, "answer": ["1"] * 3})
    sv = text.Solving("Q: {text_a}\nA:", chat=False, loss_on="answer")
    features, _ = text.encode_solutions(rows, tokenizer, sv, 128)
    assert len({len(f["prompt_ids"]) for f in features}) == 3  # three lengths: the batch is padded
    collate = text.SolutionCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, max_new_tokens=12)
    batched, _ = text.greedy_generations(model, collate(features))
    alone = [text.greedy_generations(model, collate([f]))[0][0] for f in features]
    assert batched == alone and all(len(toks) > 0 for toks in batched)


def test_a_generation_task_needs_a_causal_lm_and_fp16_needs_cuda():
    with pytest.raises(BenchError, match="generation task .* needs a causal LM") as err:
        plan(compose_cfg("task=gsm_symbolic"))
    assert "\n" not in str(err.value)
    with pytest.raises(BenchError, match="precision=fp16-mixed is for CUDA"):
        plan(compose_cfg("model=tiny-llama", "task=gsm_symbolic", "device=cpu", "precision=fp16-mixed"))


@needs_gsm
def test_a_run_on_gsm_symbolic_records_the_generation_evaluation(tmp_path):
    rec = run(compose_cfg("model=tiny-llama", "task=gsm_symbolic", "lm.max_new_tokens=8", "lm.shots=1",
                          "budget.eval_samples=6", "measure.latency=false", results_dir=tmp_path))
    assert rec["status"] == "ok", rec.get("error")
    (stored,), problems = load_records(tmp_path)
    assert problems == [] and stored["run_id"] == rec["run_id"]
    for stage in ("zero_shot", "few_shot", "final"):
        metrics = stored["metrics" if stage == "final" else f"{stage}_metrics"]
        ev = stored["generation_eval" if stage == "final" else f"{stage}_generation_eval"]
        assert set(metrics) == {"accuracy", "no_answer_fraction", "eval_loss"}
        assert ev["examples"] == 6 and 0 <= ev["accuracy_ci95"][0] <= metrics["accuracy"] <= ev["accuracy_ci95"][1]
        assert ev["generated_tokens"] > 0 and ev["generated_tokens_per_s"] > 0 and ev["answer_rule"] == answers.RULE
    assert stored["merged_metrics"].keys() == {"eval_loss"} and stored["merged_max_abs_logit_diff"] < 1e-3
    samples = [json.loads(line) for line in (tmp_path / rec["run_id"] / SAMPLES_FILE).read_text().splitlines()]
    assert [s["stage"] for s in samples] == ["zero_shot"] * 6 + ["few_shot"] * 6 + ["final"] * 6
    assert set(samples[0]) == {"stage", "question", "generation", "extracted", "gold", "correct"}
    assert stored["data"]["prompt"]["shots"] == 1 and stored["higher_is_better"]["no_answer_fraction"] is False


@needs_gsm
def test_dylora_on_a_generation_task_evaluates_each_rank_by_generation(tmp_path):
    rec = run(compose_cfg("model=tiny-llama", "task=gsm_symbolic", "method=dylora", "rank=4", "lm.max_new_tokens=4",
                          "budget.eval_samples=4", "measure.latency=false", "save_weights=none", results_dir=tmp_path))
    assert rec["status"] == "ok", rec.get("error")
    assert set(rec["rank_metrics"]) == {"1", "2", "4"}  # method.eval_ranks up to the rank trained
    assert all(set(m) == {"accuracy", "no_answer_fraction", "eval_loss"} for m in rec["rank_metrics"].values())


@needs_gsm
def test_a_later_run_reads_the_untrained_evaluations_and_trains_as_if_it_had_computed_them(tmp_path):
    common = ("model=tiny-llama", "task=gsm_symbolic", "lm.max_new_tokens=4", "lm.shots=1", "budget.eval_samples=4",
              "budget.max_steps=3", "measure.latency=false", "save_weights=none", "forgetting=wiki")
    first = run(compose_cfg(*common, "method=ia3", results_dir=tmp_path / "sweep"))
    second = run(compose_cfg(*common, "method=lora", results_dir=tmp_path / "sweep"))  # its init draws random numbers
    alone = run(compose_cfg(*common, "method=lora", results_dir=tmp_path / "alone"))
    assert first["status"] == second["status"] == alone["status"] == "ok"
    assert first["untrained_evals"]["reused"] is False and first["untrained_evals"]["computed_by"] == first["run_id"]
    assert second["untrained_evals"] == {**first["untrained_evals"], "reused": True}
    assert alone["untrained_evals"]["reused"] is False
    for key in ("zero_shot_metrics", "few_shot_metrics", "zero_shot_generation_eval"):
        assert second[key] == first[key]
    assert second["forgetting"]["before"] == alone["forgetting"]["before"]
    # the random state after the untrained evaluations is the one before them: the same training either way
    losses = [pd.read_csv(tmp_path / folder / second["run_id"] / CURVE_FILE)[["step", "loss"]].values.tolist()
              for folder in ("sweep", "alone")]
    assert losses[0] == losses[1] and second["metrics"] == alone["metrics"]
    stages = [json.loads(line)["stage"] for line in (tmp_path / "sweep" / second["run_id"] / SAMPLES_FILE).open()]
    assert stages == ["zero_shot"] * 4 + ["few_shot"] * 4 + ["final"] * 4
    off = run(compose_cfg(*common, "method=lora", "measure.reuse_untrained=false", "seed=7",
                          results_dir=tmp_path / "sweep"))
    assert off["status"] == "ok" and "untrained_evals" not in off
