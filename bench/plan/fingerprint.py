"""Content fingerprints that make data and weights part of a run's identity, and the environment's lock state.

- `rows_sha256`: sha256 of the rows a run trains or evaluates on (after subsetting): text_a, text_b and label of
  every row, in order, as canonical JSON. An edited or truncated data file under the same name is another run.
- `model_fingerprint`: sha256 of the files the model is loaded from (weights and config) and, apart, of its
  tokenizer's files. Another checkpoint under the same model name is another run. A random-init model has no
  weight files (its weights follow from its config and the seed, both already in the identity); its tokenizer
  files are still hashed.
- `lock_state`: sha256 of requirements.lock and the installed packages whose versions differ from it
  (provenance, not identity: a run on other versions is the same experiment, and `analysis.compare` shows the
  versions that differ).

File hashes are cached per process by (path, size, mtime), so a sweep hashes each file once.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from bench import BenchError
from bench.data import Rows
from bench.hashing import file_sha256
from bench.model import resolve_source

TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
})
_NOT_MODEL = re.compile(r"(^|/)(readme[^/]*|[^/]*\.md|license[^/]*|\.gitattributes|\.[^/]*)$", re.IGNORECASE)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.gguf"]
def rows_sha256(df: pd.DataFrame) -> str:
    """sha256 of the rows (text_a, text_b, label), in order; the same rows give the same hash on any pandas."""
    rows = list(zip(df["text_a"].tolist(), df["text_b"].tolist(), df["label"].tolist()))
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def files_sha256(folder: Path, tokenizer: bool) -> tuple[str | None, list[str]]:
    """(sha256 over the names and contents, names) of the model's files in `folder`: the tokenizer's files when
    `tokenizer`, else every other file (weights, config); docs and dotfiles are left out. None when there are none."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                   and not _NOT_MODEL.search(str(p.relative_to(folder))) and "__pycache__" not in p.parts)
    names = [n for n in names if (Path(n).name in TOKENIZER_FILES) == tokenizer]
    if not names:
        return None, []
    h = hashlib.sha256()
    for name in names:
        h.update(f"{name}\0{file_sha256(folder / name)}\n".encode())
    return h.hexdigest(), names


def _local_folder(source_cfg: Any) -> Path:
    path, _ = resolve_source(source_cfg)
    if os.path.isdir(path):
        return Path(path)
    try:  # a Hub id: the cached snapshot (downloaded first when online, as from_pretrained would)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - offline without a cache, unknown id, ...: one line
        raise BenchError(f"model '{source_cfg.get('name')}': cannot find the files of {path} to fingerprint and "
                         f"load them (offline? use an offline model such as model=minilm): "
                         f"{type(exc).__name__}") from exc


def _gguf_sha256(folder: Path, gguf_file: str) -> tuple[str, list[str]]:
    """A GGUF holds weights, config and tokenizer in one file: its fingerprint is that file's."""
    h = hashlib.sha256(f"{gguf_file}\0{file_sha256(folder / gguf_file)}\n".encode())
    return h.hexdigest(), [gguf_file]


def _files(source_cfg: Any, tokenizer: bool) -> tuple[str | None, list[str]]:
    folder = _local_folder(source_cfg)
    gguf = source_cfg.get("gguf_file")
    if gguf and (folder / str(gguf)).is_file():
        return _gguf_sha256(folder, str(gguf))
    return files_sha256(folder, tokenizer=tokenizer)


def model_fingerprint(model_cfg: Any) -> dict[str, Any]:
    """`model_files_sha256` (None for a random-init model) and `tokenizer_files_sha256`, with the file names."""
    out: dict[str, Any] = {"model_files_sha256": None, "model_files": []}
    if not model_cfg.get("random_init"):
        out["model_files_sha256"], out["model_files"] = _files(model_cfg, tokenizer=False)
    out["tokenizer_files_sha256"], out["tokenizer_files"] = _files(model_cfg.get("tokenizer_from") or model_cfg,
                                                                   tokenizer=True)
    return out


def fingerprints(rows: Rows, model_cfg: Any) -> dict[str, Any]:
    """The content fingerprints of a run (bench/plan/fingerprint.py): sha256 of the rows and of the model's and
    tokenizer's files (these join the identity), with the names of the files hashed."""
    validation = {} if rows.validation is None else {"validation_rows_sha256": rows_sha256(rows.validation)}
    return {"train_rows_sha256": rows_sha256(rows.train), "dev_rows_sha256": rows_sha256(rows.dev), **validation,
            **model_fingerprint(model_cfg)}

