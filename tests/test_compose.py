"""analysis.compose: adapters of finished runs combined with peft's add_weighted_adapter and scored per task."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from analysis import compose
from bench import BenchError
from bench.orchestrate.runner import run
from bench.record import RECORD_FILE
from tests.conftest import GLUE_DIR, compose_cfg

pytestmark = pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set and ../shared/data/glue missing")

QUICK = ["measure.latency=false", "budget.max_steps=6"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """LoRA r=8 on SST-2 and on RTE, LoRA r=4 on RTE and DoRA on SST-2 (tiny-bert, a few steps each)."""
    results = tmp_path_factory.mktemp("compose") / "runs"
    out = {}
    for key, overrides in {"sst2": ["task=sst2", "method=lora", "rank=8"], "rte": ["task=rte", "method=lora", "rank=8"],
                           "rte_r4": ["task=rte", "method=lora", "rank=4"],
                           "dora": ["task=sst2", "method=dora", "rank=8"]}.items():
        rec = run(compose_cfg(*overrides, *QUICK, results_dir=results))
        assert rec["status"] == "ok", rec.get("error")
        out[key] = next(p for p in results.iterdir()
                        if json.loads((p / RECORD_FILE).read_text())["run_id"] == rec["run_id"])
    return out


def _deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    return {name: mod.get_delta_weight(adapter) for name, mod in model.named_modules()
            if hasattr(mod, "lora_A") and adapter in mod.lora_A}


def test_two_identical_adapters_combine_to_the_adapter(runs):
    """The same adapter twice at (0.5, 0.5): `cat` and `svd` give its ΔW exactly; peft's `linear` combines A and B
    separately, so it gives 2ΔW at (0.5, 0.5) and ΔW at (0.25, 0.25), as the module docstring says."""
    base, sources = compose.load_sources([runs["sst2"], runs["sst2"]])
    assert [s.name for s in sources] == ["sst2", "sst2#2"]
    model = compose.composition_model(base, sources)
    own = _deltas(model, "sst2")
    assert own and all(d.abs().max() > 0 for d in own.values())
    for ctype, weights, factor in (("cat", [0.5, 0.5], 1.0), ("svd", [0.5, 0.5], 1.0),
                                   ("linear", [0.5, 0.5], 2.0), ("linear", [0.25, 0.25], 1.0)):
        name = compose.combine(model, sources, ctype, weights, density=0.5, seed=0)
        combined = _deltas(model, name)
        assert combined.keys() == own.keys()
        for layer, delta in own.items():
            torch.testing.assert_close(combined[layer], factor * delta, atol=1e-6, rtol=1e-4,
                                       msg=f"{ctype} {weights} at {layer}")
        model.delete_adapter(name)
    # and the combined model computes what the adapter computes
    x = {"input_ids": torch.randint(5, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    with torch.no_grad():
        model.set_adapter("sst2")
        alone = model(**x).logits
        model.set_adapter(compose.combine(model, sources, "cat", [0.5, 0.5], density=0.5, seed=0))
        torch.testing.assert_close(model(**x).logits, alone, atol=1e-5, rtol=1e-5)


def test_compose_scores_every_variant_on_every_task_with_its_own_head(runs):
    result = compose.compose([runs["sst2"], runs["rte"]], types=("cat", "ties", "dare_linear"))
    assert [r["variant"] for r in result["rows"]] == ["alone: sst2", "alone: rte", "cat", "ties", "dare_linear"]
    assert all(r["status"] == "ok" and set(r["metrics"]) == {"sst2", "rte"} for r in result["rows"])
    # each adapter alone on its own task, rebuilt and scored here, is what its run recorded
    for src in result["sources"]:
        own = next(r for r in result["rows"] if r["variant"] == f"alone: {src['name']}")["metrics"][src["name"]]
        assert own == pytest.approx(src["record_main_metric_value"], abs=1e-9)
    tab = compose.table(result)
    assert tab.header[:3] == ["variant", "sst2 accuracy", "Δ vs own"] and len(tab.rows) == 5
    assert tab.rows[0][2] == "+0.0000" and result["schema"] == compose.SCHEMA
    assert result["provenance"]["versions"]["peft"]


def test_a_type_peft_refuses_is_a_row_and_the_others_run(runs):
    result = compose.compose([runs["sst2"], runs["rte_r4"]], types=("linear", "cat"))
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["linear"]["status"] == "refused" and "same r" in rows["linear"]["reason"]
    assert "\n" not in rows["linear"]["reason"] and rows["cat"]["status"] == "ok"


@pytest.mark.parametrize("which, types, weights, message", [
    (["sst2"], compose.DEFAULT_TYPES, None, "at least two runs"),
    (["sst2", "dora"], compose.DEFAULT_TYPES, None, "DoRA"),
    (["sst2", "rte"], ("average",), None, "unknown combination type"),
    (["sst2", "rte"], ("cat",), [1.0], "one finite weight per run"),
])
def test_refusals_are_one_line(runs, which, types, weights, message):
    with pytest.raises(BenchError, match=message) as exc:
        compose.compose([runs[w] for w in which], types=types, weights=weights)
    assert "\n" not in str(exc.value)


def test_the_command_line_prints_the_table_and_writes_json(runs, tmp_path, capsys):
    out = tmp_path / "compose.json"
    compose.main([str(runs["sst2"]), str(runs["rte"]), "--types", "cat", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| alone: sst2 |" in printed and "| cat |" in printed
    assert json.loads(out.read_text())["rows"][-1]["variant"] == "cat"
    with pytest.raises(SystemExit, match="error: compose needs at least two runs"):
        compose.main([str(runs["sst2"])])
