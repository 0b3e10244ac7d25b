"""Where the suite's files are (the checkout or editable install: `conf/`, `requirements.lock`), and the real
`conf/` composed outside the Hydra app (benchmark scripts, analysis, tests): the config `python -m bench
<overrides>` would run with."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF = REPO_ROOT / "conf"


def compose_config(overrides: Iterable[str] = (), hydra: bool = False) -> DictConfig:
    """`conf/config.yaml` with Hydra overrides; `hydra=True` keeps the `hydra` node (sweeper, launcher)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)
