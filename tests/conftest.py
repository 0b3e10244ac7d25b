"""Shared fixtures: compose the real Hydra configs with small overrides, offline."""
from __future__ import annotations

import os
from pathlib import Path

# One OpenMP/BLAS thread for the tests and every process they start, set before torch and numpy load: tiny models
# gain nothing from threads, and on a busy 2-core machine spinning threads make them many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from bench.config import compose_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["BENCH_PROGRESS"] = "0"
os.environ["PEFT_BENCH_STRICT_RECORDS"] = "1"  # a record that does not follow its schema fails the test
for _env, _folder in (("GLUE_DIR", "glue"), ("GSM_SYMBOLIC_DIR", "gsm_symbolic"), ("WIKI_DIR", "wiki")):
    if _env not in os.environ and (REPO.parent / "shared" / "data" / _folder).is_dir():
        os.environ[_env] = str(REPO.parent / "shared" / "data" / _folder)

# Tiny test models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning
# threads make each tiny backward ~50x slower (1.5 s instead of 0.02 s measured here).
torch.set_num_threads(1)

GLUE_DIR = os.environ.get("GLUE_DIR")
needs_glue = pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR not set and ../shared/data/glue missing")
GSM_SYMBOLIC_DIR = os.environ.get("GSM_SYMBOLIC_DIR")
needs_gsm = pytest.mark.skipif(not GSM_SYMBOLIC_DIR, reason="GSM_SYMBOLIC_DIR not set and ../shared/data/gsm_symbolic "
                                                            "missing")

# Tiny, fast defaults for tests: random-init 2-layer BERT, smoke budget, few latency iterations.
TINY = ["model=tiny-bert", "budget=smoke", "measure.latency_iters=3", "measure.latency_warmup_iters=1",
        "measure.latency_seq_len=16", "measure.latency_batch_size=4", "measure.latency_max_warmup_s=0.5"]


def compose_cfg(*overrides: str, results_dir: Path | None = None, tiny: bool = True) -> DictConfig:
    """The real `conf/config.yaml` composed with overrides (tiny test defaults first)."""
    extra = [f"results_dir={results_dir}"] if results_dir is not None else []
    return compose_config([*(TINY if tiny else []), *extra, *overrides])


def planned_record(cfg: DictConfig, **fields) -> dict:
    """A record of the current schema for the run `cfg` plans (nothing runs): its identity, config and `fields`."""
    from omegaconf import OmegaConf

    from bench.orchestrate.runner import record_identity
    from bench.plan import plan
    from bench.record import SCHEMA_VERSION

    return {"schema_version": SCHEMA_VERSION, **record_identity(plan(cfg)),
            "config": OmegaConf.to_container(cfg, resolve=True), **fields}


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg('method=lora', 'rank=4') -> composed config writing results under tmp_path."""

    def _make(*overrides: str, tiny: bool = True) -> DictConfig:
        return compose_cfg(*overrides, results_dir=tmp_path / "runs", tiny=tiny)

    return _make
