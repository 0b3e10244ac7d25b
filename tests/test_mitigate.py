"""Intruder-dimension mitigation (analysis/mitigate.py) on a tiny LoRA run whose adapter carries a constructed
intruder: a rank-1 ΔW = s·u vᵀ with u at |cos| = 1/√64 to every left singular vector of W0 (s = 3 σ_max(W0)), written
into the saved adapter's first rank component of one layer. A 4-step smoke run alone has no intruders. With one
intruder that is one rank component of ΔW, both definitions leave 0 at λ = 0; with several, vectors from below the top
k can slide in (analysis/mitigate.py's docstring), which these tests do not construct."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis import mitigate
from analysis.mitigate import Mitigation, parse_lambdas
from analysis.report import build_report
from bench import BenchError
from bench.model.rebuild import base_model, read_run
from bench.orchestrate.runner import run
from bench.record import RECORD_FILE
from tests.conftest import GLUE_DIR, compose_cfg

pytestmark = pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set and ../shared/data/glue missing")

LAYER = "bert.encoder.layer.0.attention.self.value"  # a LoRA target of conf/method/lora.yaml on BERT
WEIGHT_TOL = 1e-5  # |W_λ=1 − W_merged| (peft's path re-factorises ΔW by a float32 SVD: ~1e-7 measured)
LOGIT_TOL = 1e-4  # |logits_λ=1 − logits| on a fixed batch


def inject_intruder(run_dir: Path, layer: str = LAYER, strength: float = 3.0) -> None:
    """Overwrite the adapter's first rank component at `layer` with a rank-1 intruder s·u vᵀ (ΔW = scale·B·A)."""
    record, cfg = read_run(run_dir)
    w0 = base_model(record, cfg).get_submodule(layer).weight.detach().double()
    u0, s0, _ = torch.linalg.svd(w0)
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (w0.shape[0],), generator=g).double() * 2 - 1
    u = u0 @ signs / w0.shape[0] ** 0.5  # |cos| = 1/8 with every left singular vector of W0
    v = torch.randn(w0.shape[1], generator=g, dtype=torch.float64)
    v /= v.norm()
    conf = json.loads((run_dir / "weights" / "adapter_config.json").read_text())
    root = (strength * float(s0[0]) / (conf["lora_alpha"] / conf["r"])) ** 0.5
    path = run_dir / "weights" / "adapter_model.safetensors"
    state = load_file(str(path))
    state[f"base_model.model.{layer}.lora_B.weight"][:, 0] = root * u.float()
    state[f"base_model.model.{layer}.lora_A.weight"][0, :] = root * v.float()
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("mitigate") / "runs"
    rec = run(compose_cfg("method=lora", "rank=4", "forgetting=sts", "forgetting.max_pairs=48",
                          "forgetting.max_seq_len=32", results_dir=results))
    assert rec["status"] == "ok", rec.get("error")
    folder = next(results.glob("*-lora-r4-*"))
    inject_intruder(folder)
    return folder


@pytest.fixture(scope="module")
def mit(run_dir) -> Mitigation:
    return Mitigation(run_dir)


def _logits(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1000, 2000, (4, 12), generator=g),
             "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    with torch.no_grad():
        return model(**batch).logits


def test_the_constructed_run_has_an_intruder_where_it_was_put(mit):
    assert mit.detected == {LAYER: 1}


@pytest.mark.parametrize("definition", ["paper", "peft"])
def test_lambda_one_leaves_the_model_unchanged(mit, definition):
    model = mit.model(1.0, definition)
    weights = mit.weights(model)
    diff = max(float((weights[n] - mit.w_merged[n]).abs().max()) for n in mit.w_merged)
    assert diff <= WEIGHT_TOL, diff
    # outputs too: peft's helper alone gives the new adapter an untrained copy of the task head
    assert float((_logits(model) - _logits(mit.merged0)).abs().max()) <= LOGIT_TOL
    if definition == "paper":
        assert all(torch.equal(weights[n], mit.w_merged[n]) for n in mit.w_merged)


@pytest.mark.parametrize("definition", ["paper", "peft"])
def test_lambda_zero_removes_the_intruders_where_they_were_found(mit, definition):
    assert mit.counts(mit.merged0)[LAYER] == 1  # before: the counter sees it
    after = mit.counts(mit.model(0.0, definition))
    assert {n: after[n] for n in mit.detected} == {LAYER: 0}
    assert sum(after.values()) == 0
    if definition == "peft":
        assert mit.peft_detected == {LAYER: 1}  # peft's own test found the same one


def test_intermediate_lambda_scales_the_intruder_singular_value_and_nothing_else(mit):
    idx, u, s, vh = mit.found[LAYER]
    for lam in (0.25, 0.5, 0.75):
        model = mit.model(lam, "paper")
        (ratio,) = mit.sigma_ratios(model)[LAYER]
        assert ratio == pytest.approx(lam, abs=1e-6)
        spectrum = torch.linalg.svdvals(mit.weights(model)[LAYER].double())
        expected = s.clone()
        expected[idx] *= lam
        assert torch.allclose(spectrum, expected.sort(descending=True).values, atol=1e-5)
        others = [n for n in mit.w_merged if n != LAYER]
        assert all(torch.equal(mit.weights(model)[n], mit.w_merged[n]) for n in others)
    # peft's helper truncates to rank r; on this run (the intruder is one rank component) it scales it by λ too
    (ratio,) = mit.sigma_ratios(mit.model(0.5, "peft"))[LAYER]
    assert ratio == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("grid", ["", "1.5", "-0.1", "0,nan", "a"])
def test_a_bad_lambda_grid_is_one_line(run_dir, grid):
    with pytest.raises(BenchError):
        parse_lambdas(grid)
    with pytest.raises(SystemExit) as exc:
        mitigate.main([str(run_dir), "--lambdas", grid])
    msg = str(exc.value)
    assert msg.startswith("error: ") and "\n" not in msg and ("λ" in msg or "lambdas" in msg)


def _copy_as(run_dir: Path, dst: Path, method: str | None = None, weights: bool = True) -> Path:
    shutil.copytree(run_dir, dst, ignore=None if weights else shutil.ignore_patterns("weights"))
    if method:
        rec = json.loads((dst / RECORD_FILE).read_text())
        rec["method"] = method
        (dst / RECORD_FILE).write_text(json.dumps(rec))
    return dst


@pytest.mark.parametrize("method,words", [("dora", "magnitude"), ("full", "not one"), ("houlsby", "not one")])
def test_a_method_that_is_not_plain_lora_is_refused_in_one_line(run_dir, tmp_path, method, words):
    folder = _copy_as(run_dir, tmp_path / "run", method=method)
    with pytest.raises(SystemExit) as exc:
        mitigate.main([str(folder)])
    msg = str(exc.value)
    assert msg.startswith("error: ") and "\n" not in msg and f"'{method}'" in msg and words in msg
    assert not (folder / mitigate.RESULT_FILE).exists()


def test_a_run_without_saved_weights_is_one_line(run_dir, tmp_path):
    folder = _copy_as(run_dir, tmp_path / "run", weights=False)
    with pytest.raises(SystemExit) as exc:
        mitigate.main([str(folder)])
    assert str(exc.value).startswith("error: ") and "no saved weights" in str(exc.value)


def test_cli_end_to_end_writes_json_and_plot_and_the_report_shows_them(run_dir, tmp_path, capsys):
    folder = _copy_as(run_dir, tmp_path / "runs" / run_dir.name)
    mitigate.main([str(folder), "--lambdas", "1,0"])
    out = capsys.readouterr().out
    assert "as trained" in out and "forgetting" in out
    res = json.loads((folder / mitigate.RESULT_FILE).read_text())
    assert [r["lambda"] for r in res["rows"]] == [0.0, 1.0] and res["definition"] == "paper"
    assert res["detected"] == {LAYER: 1}
    zero, one = res["rows"]
    assert zero["intruders_at_detected_layers"] == 0 and one["intruders"] == res["unmitigated"]["intruders"] == 1
    # λ = 1 is the model as trained (here: with the constructed intruder); the probe is the run's own, its settings kept
    assert one["metric"] == res["unmitigated"]["metric"] and one["forgetting"] == res["unmitigated"]["forgetting"]
    assert res["probe"]["name"] == "sts" and res["probe"]["settings"]["max_pairs"] == 48
    for ext in ("png", "svg"):
        assert (folder / f"mitigation.{ext}").stat().st_size > 1000
    index = build_report(tmp_path / "runs", tmp_path / "report", analyse=False, table=None)
    text = index.read_text()
    assert "## Intruder mitigation" in text and f"](plots/mitigation_{res['run_id']}.png)" in text
    assert (tmp_path / "report" / "plots" / f"mitigation_{res['run_id']}.png").stat().st_size > 1000
    page = (tmp_path / "report" / "index.html").read_text()  # the HTML page: the section, its table, its plot inlined
    assert "<h2>Intruder mitigation" in page and 'src="data:image/png;base64,' in page
    assert page.count("<th>λ</th>") >= 1
