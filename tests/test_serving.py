"""Serving many adapters on one base model: a mixed-adapter batch (peft's `adapter_names=`) gives each row exactly its
own adapter's outputs, hot-swapping returns to the base model and back to identical outputs, and the serving
benchmark (`python -m bench.tools.perf.serving --quick`) runs end to end, counts each adapter's bytes exactly,
refuses in one line what it cannot measure, and writes a record the report shows."""
from __future__ import annotations

import json

import pytest
import torch

from bench import BenchError
from bench.config import compose_config
from bench.measure.latency import latency_batch
from bench.model import load_model
from bench.record import RECORD_FILE, write_json_atomic
from bench.tools.perf import serving
from bench.tools.perf.adapters import make_adapters
from methods.hotswap import check_mixed_batches, load_adapters, switch
from tests.conftest import compose_cfg, planned_record

MODELS = ["tiny-bert", "tiny-llama"]  # an encoder with a task head per adapter, a causal LM
# Each row alone and the rows of a mixed batch run the same fp32 ops on different batch shapes: equal to rounding.
TOL = dict(atol=1e-5, rtol=1e-5)
# Different adapters give outputs this far apart at least, so a row routed to the wrong adapter cannot pass TOL.
APART = 1e-3


def _served(name: str, tmp_path, n: int = 3):
    """`n` LoRA adapters (random values, each its own task head) loaded onto a fresh base model; the batch rows."""
    cfg = compose_config([f"model={name}", "method=lora", "rank=4"])
    dirs = make_adapters(cfg, n, tmp_path, num_labels=2)
    torch.manual_seed(0)
    base, _ = load_model(cfg.model, 2)
    model = load_adapters(base, dirs).eval()
    batch = latency_batch(int(base.config.vocab_size), 6, 12, torch.device("cpu"))
    batch["attention_mask"][1, -4:] = 0  # a padded row
    return cfg, model, batch


def _rows(batch: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in batch.items()}


@pytest.mark.parametrize("name", MODELS)
def test_mixed_batch_gives_each_row_exactly_its_adapters_outputs(name, tmp_path):
    _, model, batch = _served(name, tmp_path)
    check_mixed_batches(model)  # LoRA can
    rows = ["adapter2", "adapter0", "adapter1", "adapter0", "adapter2", "adapter1"]
    with torch.inference_mode():
        mixed = model(**batch, adapter_names=rows).logits
        for i, adapter in enumerate(rows):
            switch(model, adapter)
            alone = model(**_rows(batch, i)).logits[0]
            torch.testing.assert_close(mixed[i], alone, **TOL)
            switch(model, next(a for a in ("adapter0", "adapter1") if a != adapter))
            assert (model(**_rows(batch, i)).logits[0] - alone).abs().max() > APART  # another adapter's differ
        # The benchmark's sorted batch (one call per adapter group after set_adapter) gives the same rows.
        grouped = serving.Sorted(model, rows)
        for rows_of, out in zip(grouped.groups.values(), grouped(**batch)):
            torch.testing.assert_close(out.logits, mixed[rows_of], **TOL)


def test_mixed_generation_gives_each_row_its_adapters_tokens(tmp_path):
    _, model, batch = _served("tiny-llama", tmp_path)
    batch["attention_mask"][:] = 1  # no padding: a row alone is the same prompt
    rows = ["adapter1", "adapter0", "adapter2", "adapter1", "adapter0", "adapter2"]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=2)
    with torch.inference_mode():
        mixed = serving.Mixed(model, rows).generate(**batch, **kw)
        for i, adapter in enumerate(rows):
            switch(model, adapter)
            assert torch.equal(mixed[i], model.generate(**_rows(batch, i), **kw)[0]), (i, adapter)


@pytest.mark.parametrize("name", MODELS)
def test_hot_swap_returns_to_the_base_model_and_back_to_identical_outputs(name, tmp_path):
    cfg, model, batch = _served(name, tmp_path, n=2)
    torch.manual_seed(0)
    base, _ = load_model(cfg.model, 2)
    with torch.inference_mode():
        want_base = base.eval()(**batch).logits
        switch(model, "adapter0")
        first = model(**batch).logits
        with model.disable_adapter():  # no adapter active: the base model (its own task head)
            torch.testing.assert_close(model(**batch).logits, want_base, atol=1e-6, rtol=0)
        assert (first - want_base).abs().max() > APART
        switch(model, "adapter1")
        other = model(**batch).logits
        switch(model, "adapter0")
        again = model(**batch).logits
    assert (other - first).abs().max() > APART
    assert torch.equal(again, first)  # identical, not merely close


def _expected_adapter_bytes(model_cfg, rank: int) -> int:
    """One LoRA adapter's bytes by hand: r x (in + out) per W_q and W_v of each layer, plus (encoders) its own copy of
    the task head (BERT's pooler and classifier), fp32."""
    c = model_cfg.config
    h, layers = int(c.hidden_size), int(c.num_hidden_layers)
    if model_cfg.family == "llama":
        head_dim = h // int(c.num_attention_heads)
        q_out, v_out = h, int(c.num_key_value_heads) * head_dim
        return 4 * layers * rank * ((h + q_out) + (h + v_out))
    return 4 * (layers * rank * 2 * (h + h) + (h * h + h) + (h * 2 + 2))


@pytest.mark.parametrize("name", MODELS)
def test_serving_script_quick_mode_runs_and_the_report_shows_it(name, tmp_path, capsys):
    out = tmp_path / "perf" / f"serving-{name}.json"
    rec = serving.main(["--quick", "--model", name, "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["schema"] == "serving/1" and saved["model"] == name and saved["method"] == "lora"
    assert [e["n_adapters"] for e in saved["by_n"]] == [1, 2]
    assert {"git_commit", "versions", "device", "torch_threads"} <= set(saved["provenance"])
    cfg = compose_config([f"model={name}"])
    each = _expected_adapter_bytes(cfg.model, rank=8)
    for e in saved["by_n"]:
        assert e["adapter_param_bytes"] == each
        assert e["adapters_param_bytes_total"] == e["n_adapters"] * each
        assert e["adapters_in_batch"] == e["n_adapters"]  # batch 4 >= N
        assert e["mixed_vs_sorted_max_abs_logit_diff"] < 1e-4
        assert e["set_adapter_ms"]["p50_ms"] > 0 and e["load_adapter_ms"]["timed_iters"] == 2
        assert {"base", "mixed", "sorted", "sorted_over_mixed_ratio", "mixed_over_base_ratio"} <= set(e["forward"])
    single = saved["single_adapter"]["forward"]
    assert {"base", "unmerged", "merged"} <= set(single)
    if name == "tiny-llama":
        assert saved["model_kind"] == "causal_lm" and saved["settings"]["new_tokens"] == 4
        assert saved["by_n"][1]["generation"]["mixed"]["decode_tokens_per_s"] > 0
        assert single["base"]["prefill_tokens_per_s"] > 0
        assert "| decode (tokens/s) |" in printed and "mixed decode (tokens/s)" in printed
    else:
        assert single["base"]["rows_per_s"] > 0 and "mixed (rows/s)" in printed
    assert rec["by_n"][0]["adapter_param_bytes"] == each

    # The report: a results folder beside perf/ gets the serving section with these tables.
    runs = tmp_path / "runs"
    failed = planned_record(compose_cfg("method=lora", results_dir=runs), status="error", error="x")
    write_json_atomic(runs / failed["run_id"] / RECORD_FILE, failed)
    (tmp_path / "perf" / "serving-old.json").write_text('{"schema": "serving/0"}')  # not shown, and said so
    from analysis.report import build_report

    text = build_report(runs, tmp_path / "report", analyse=False, table=None).read_text()
    section = text.split("## Serving: many adapters on one base model", 1)[1].split("## Runs that did not finish")[0]
    assert f"### {name} + lora r=8" in section and f"serving-{name}.json" in section
    for table, _header, _rows in serving.tables(saved):
        assert f"**{table}**" in section
    mib = f"{each / 2**20:,.3f}"  # the exact per-adapter figure, in MiB
    assert any(line.startswith("| 2 |") and f"| {mib} |" in line for line in section.splitlines()), section
    page = (tmp_path / "report" / "index.html").read_text()  # the HTML page has the same tables
    assert "Serving: many adapters on one base model" in page and f"<td>{mib}</td>" in page
    assert "serving-old.json: schema 'serving/0', this report reads 'serving/1'" in section


@pytest.mark.parametrize(("method", "why"), [
    ("bitfit", "not a peft adapter"),             # saves plain tensors: cannot load by name
    ("ia3", "method 'ia3' cannot serve mixed-adapter batches: IA3 adapters"),  # peft ignores adapter_names for IA3
    ("dora", "method 'dora' cannot serve mixed-adapter batches: DoRA adapters"),  # peft refuses adapter_names
])
def test_serving_refuses_what_it_cannot_measure_in_one_line(method, why, tmp_path):
    with pytest.raises(BenchError, match=why) as err:
        serving.main(["--quick", "--method", method, "--out", str(tmp_path / "x.json")])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x.json").exists()
