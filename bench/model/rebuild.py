"""A finished run's models rebuilt from its folder alone: the pre-trained model as the run loaded it, and the
fine-tuned model from the method's saved weights through the method registry (`get_method(name).load(...)`, given
the method config the run hashed: the record's `effective_config["method"]`), merged into the base weights where
the method merges (`full` is already the model). Random-init test models are rebuilt by seeding with the run's seed
before building the model, as the recipe does. Weight analysis and the experiments that start from a finished run
(bench/tools/sequential.py) use it.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bench import BenchError
from bench.model import attach_context, load_model, seed_everything
from bench.model.precision import DTYPES
from bench.record import WEIGHTS_DIR, read_record, record_path
from methods import get_method


def read_run(run_dir: str | Path) -> tuple[dict, DictConfig]:
    """(record, resolved config) of a finished run; BenchError when it is not an ok run with saved weights."""
    path = record_path(run_dir)
    record = read_record(path)
    if record is None:
        raise BenchError(f"{path}: no readable run record; pass a run folder")
    if record.get("status") != "ok":
        raise BenchError(f"{record.get('run_id', path)}: status is {record.get('status')!r}, not ok")
    if "config" not in record:
        raise BenchError(f"{path}: the record has no resolved config; it was written by an older version")
    return record, OmegaConf.create(record["config"])


def effective_method(record: dict) -> dict:
    """The method config the run was built with and identified by (`effective_config["method"]` of its record)."""
    eff = (record.get("effective_config") or {}).get("method")
    if not isinstance(eff, dict):
        raise BenchError(f"{record.get('run_id')}: the record has no effective_config.method to rebuild its method")
    return eff


def analysis_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cannot_rebuild(record: dict) -> str | None:
    """Why this machine cannot load the run's base model as the run did (QLoRA's 4-bit base needs CUDA and
    bitsandbytes), in one line; None when it can."""
    try:
        get_method(record["method"]).validate(analysis_device())
    except BenchError as exc:
        return (f"the run's base model cannot be rebuilt here as the run loaded it, and an fp32 base would be a "
                f"different model: {str(exc).split(';')[0]}")
    return None


def base_model(record: dict, cfg: DictConfig) -> nn.Module:
    """The pre-trained model the run started from, loaded as the run loaded it (in its weight dtype; e.g. 4-bit for
    qlora; same seed, so random-init test models match too), then held in fp32 (bf16 -> fp32 is exact): the values
    the run computed with, and merging an adapter into them or subtracting them from a full fine-tuning's weights is
    not rounded to bf16. BenchError when this machine cannot (`cannot_rebuild`)."""
    reason = cannot_rebuild(record)
    if reason:
        raise BenchError(f"{record.get('run_id')}: {reason}")
    device = analysis_device()
    load_kwargs = get_method(record["method"]).load_kwargs(effective_method(record), cfg.model, device)
    seed_everything(int(record["seed"]))
    model, _ = load_model(cfg.model, _num_labels(record), run_weight_dtype(record), **load_kwargs)
    if "quantization_config" not in load_kwargs:
        model = model.float()
    return model.eval()


def run_weight_dtype(record: dict) -> torch.dtype:
    """The dtype the run loaded its pre-trained weights in (its `weight_dtype`; fp32 in records written before the
    field existed, when every run's weights were fp32)."""
    return DTYPES[str(record.get("weight_dtype") or "fp32")]


def saved_weights(run_dir: str | Path, record: dict) -> dict[str, int]:
    """{path inside the weights folder: size in bytes} of the run's saved weights; {} when it saved none.
    Reads the folder listing only."""
    folder = Path(run_dir) / str(record.get("weights_dir") or WEIGHTS_DIR)
    if not folder.is_dir():
        return {}
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def saved_weights_dir(run_dir: str | Path, record: dict) -> Path:
    """The run's weights folder; BenchError when it saved none (checked before any model is loaded)."""
    weights_dir = Path(run_dir) / str(record.get("weights_dir") or WEIGHTS_DIR)
    if not saved_weights(run_dir, record):
        raise BenchError(
            f"{record['run_id']}: no saved weights in {weights_dir} (run with save_weights=adapter)"
        )
    return weights_dir



def record_context(record: dict, cfg: DictConfig):
    """The AttachContext a method's `load` gets for a finished run."""
    steps = int((record.get("train") or {}).get("steps") or cfg.budget.get("max_steps") or 1)
    return attach_context(cfg.model, record.get("rank"), _num_labels(record), steps)


def _num_labels(record: dict) -> int:
    return int(record["effective_config"]["task"]["num_labels"])


def tuned_model(run_dir: str | Path, base: nn.Module | None = None, merge: bool = True) -> nn.Module:
    """The fine-tuned model rebuilt from the run folder; merged into plain weights when `merge` and the
    method merges. `base` (not modified) saves rebuilding the pre-trained model."""
    run_dir = Path(run_dir)
    record, cfg = read_run(run_dir)
    reason = cannot_rebuild(record)
    if reason:
        raise BenchError(f"{record.get('run_id')}: {reason}")
    weights_dir = saved_weights_dir(run_dir, record)  # before any model is loaded
    method = get_method(record["method"])
    start = copy.deepcopy(base) if base is not None else base_model(record, cfg)
    try:
        model = method.load(start, effective_method(record), record_context(record, cfg), weights_dir)
    except BenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt weights file, a shape mismatch, ...: one line
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise BenchError(f"{record['run_id']}: cannot load its saved weights from {weights_dir} "
                         f"({type(exc).__name__}: {first}); re-run it with rerun=true") from None
    if merge and method.merges and not method.edits_in_place:
        model = method.merged(model)
    return model.eval()

