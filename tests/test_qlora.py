"""QLoRA on a machine without CUDA: the config composes, and the run stops at plan time with one clear line."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from bench import BenchError
from bench.plan import plan
from methods import get_method
from tests.conftest import REPO


def test_qlora_config_composes(make_cfg):
    cfg = make_cfg("method=qlora", "rank=4")
    assert cfg.method.name == "qlora" and cfg.method.quant_type == "nf4" and cfg.method.double_quant is True
    assert list(cfg.method.target_modules) == list(cfg.model.lora_targets)
    eff = get_method("qlora").effective_config(dict(cfg.method), 4)
    assert eff["r"] == 4 and eff["lora_alpha"] == 8.0


def test_qlora_load_kwargs_ask_for_nf4_with_double_quantisation(make_cfg):
    cfg = make_cfg("method=qlora")
    method = get_method("qlora")
    kwargs = method.load_kwargs(method.effective_config(cfg.method, 4), cfg.model, torch.device("cuda", 0))
    quant = kwargs["quantization_config"]
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert quant.llm_int8_skip_modules == ["pooler.dense", "classifier"]  # the task head stays unquantised, trains
    assert kwargs["device_map"] == {"": 0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_qlora_on_cpu_is_one_clear_error_at_plan_time(make_cfg):
    with pytest.raises(BenchError, match="needs a CUDA GPU") as err:
        plan(make_cfg("method=qlora"))
    assert "\n" not in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_qlora_without_bitsandbytes_names_the_install():
    with pytest.raises(BenchError, match=r"pip install -e '\.\[gpu\]'"):
        get_method("qlora").validate(torch.device("cuda", 0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_qlora_cli_on_cpu_exits_nonzero_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENCH_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-m", "bench", "method=qlora", "model=tiny-bert", "budget=smoke",
                           f"results_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert lines == ["error: method=qlora needs a CUDA GPU (bitsandbytes 4-bit NF4) but this run's device is "
                     "cpu; use method=lora here, or run on a GPU machine"]


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None,
                    reason="this machine can rebuild the 4-bit base")
def test_qlora_record_analysis_says_in_one_line_why_it_cannot_rebuild_the_4bit_base(make_cfg, tmp_path, capsys):
    """A QLoRA run (constructed: it cannot run here) is not analysed on the fp32 base; analysis says why."""
    from omegaconf import OmegaConf

    from analysis.weights import pairs_for_cli, weight_pairs
    from bench.model.rebuild import tuned_model
    from bench.record import write_record
    from methods import get_method
    from tests.conftest import planned_record

    cfg = make_cfg("method=qlora", "rank=4")
    qlora = get_method("qlora").effective_config(OmegaConf.to_container(cfg.method, resolve=True), 4)
    record = planned_record(make_cfg("method=lora", "rank=4"), run_id="qlora-run", method="qlora", status="ok",
                            config=OmegaConf.to_container(cfg, resolve=True), weights_dir="weights")
    record["effective_config"]["method"] = qlora  # planning refuses qlora on a CPU: the record is built by hand
    run_dir = tmp_path / "qlora-run"
    (run_dir / "weights").mkdir(parents=True)
    write_record(run_dir, record)
    wp = weight_pairs(run_dir)
    assert not wp.applicable and not wp.pairs
    assert "\n" not in wp.reason and "needs" in wp.reason and "fp32 base would be a different model" in wp.reason
    assert pairs_for_cli(run_dir, "intruders") is None
    assert capsys.readouterr().out.strip() == f"qlora-run: intruders n/a ({wp.reason})"
    with pytest.raises(BenchError, match="cannot be rebuilt here") as err:
        tuned_model(run_dir)
    assert "\n" not in str(err.value)
