"""The benchmark scripts run end to end (figures are printed, not asserted: they are scripts, not timed tests)."""
from __future__ import annotations

import re

import pytest

from bench.tools.perf import gpu as perf_gpu
from bench.tools.perf import memory as perf_memory
from bench.tools.perf import overhead as perf_overhead
from tests.conftest import needs_glue


@needs_glue
def test_perf_overhead_quick_trains_all_three_ways_on_the_same_batches(capsys):
    perf_overhead.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    for way in ("| bare |", "| suite |", "| trainer |"):
        assert way in out
    assert "loader" in out and "ratio" in out
    tokens = {line.split(":")[1].split()[0]: int(re.search(r"(\d+) padded tokens in the 20 batches", line)[1])
              for line in out.splitlines() if line.strip().startswith("repeat")}
    assert set(tokens) == {"bare", "suite", "trainer"} and len(set(tokens.values())) == 1, tokens


@needs_glue
def test_perf_overhead_outside_way_is_plain_peft_with_the_runs_lora_shape_and_profiles(capsys):
    """`outside` builds the model with transformers and peft alone: the same LoRA tensors (names and shapes) as the
    suite's model, trained on the same batches; --profile prints each way's operators."""
    perf_overhead.main(["--quick", "--threads", "1", "--ways", "outside,suite", "--profile"])
    out = capsys.readouterr().out
    assert "| outside |" in out and "| suite |" in out and "vs outside" in out
    assert "profile of outside, 5 steps" in out and "profile of suite, 5 steps" in out and "aten::" in out
    cfg = perf_overhead.compose_config(["model=tiny-bert", "budget=smoke"])
    setup = perf_overhead.Setup(cfg, 4)

    def lora(model):
        return {n.split("base_model.model.")[-1]: tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}

    assert lora(perf_overhead.outside_model(setup)) == lora(setup.model()) != {}


@pytest.mark.slow
@needs_glue
def test_perf_gpu_script_runs_and_skips_what_cannot_run_here(tmp_path, capsys):
    perf_gpu.main(["--out", str(tmp_path), "--models", "tiny-bert,tiny-llama", "--methods", "full,lora,qlora",
                   "--llm-methods", "lora,qlora", "--steps", "4", "--batch-size", "8", "lm.gen_iters=2",
                   "lm.gen_new_tokens=4", "lm.gen_prompt_len=16", "measure.latency_iters=3",
                   "measure.latency_max_warmup_s=0.5",
                   "measure.latency_batch_size=4", "measure.latency_seq_len=16", "budget.eval_samples=32"])
    summary = (tmp_path / "summary.md").read_text()
    assert "| tiny-bert | full | fp32 / fp32 | ok |" in summary and "| tiny-bert | lora | fp32 / fp32 | ok |" in summary
    assert "| tiny-llama | lora | fp32 / fp32 | ok |" in summary  # a causal LM, with its decode speed
    assert "qlora" in summary  # run on a GPU with bitsandbytes, or a note saying why it was skipped


def test_perf_memory_quick_prints_estimate_vs_measured(capsys):
    perf_memory.main(["--quick", "--threads", "1"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny-bert |")]
    assert [r[2].strip() for r in rows] == ["full", "lora"]
    for r in rows:
        assert 0.9 < float(r[6]) < 1.1, r  # estimate / measured
