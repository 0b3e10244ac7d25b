"""`python -m bench [overrides]`: one run, or a sweep with --multirun. See README.md."""
from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from bench import BenchError


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def app(cfg: DictConfig) -> str | None:
    from bench.runner import run  # imported here so `--help` and config errors stay fast

    try:
        record = run(cfg)
    except BenchError as exc:  # a config problem found before the run could be identified
        print(f"error: {exc}", file=sys.stderr)
        if _is_multirun():
            return "error"
        sys.exit(2)
    if record["status"] not in ("ok",) and not _is_multirun():
        sys.exit(1)
    return record["status"]


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
