"""Sweep presets (conf/sweep/) compose with the real config, name only configs that exist, say what they cost,
and expand to the number of runs their header promises; the Slurm launcher config composes and takes its job
shape from conf/distributed."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from bench.config import compose_config
from bench.orchestrate.sweep import count_jobs
from methods import REGISTRY, in_display_order
from tests.conftest import CONF

PRESETS = {"smoke": 4, "glue_table": 11 * 7 * 3, "rank_study": 3 * 4 * 3 * 3, "lora_table2": 3 * 8 * 5,
           "all_methods": len(REGISTRY), "llm_cpu": 5, "llm_gpu": 3 * 4, "tuned_minilm": 8,
           "study_data_size": 4 * 3, "study_target_modules": 2 * 2, "study_rank_scaling": 3 * 4,
           "study_forgetting": 2 * 4 * 3}


def compose_hydra(*overrides: str):
    return compose_config(overrides, hydra=True)


@pytest.mark.parametrize("name, runs", PRESETS.items())
def test_preset_composes_and_expands(name, runs):
    cfg = compose_hydra(f"+sweep={name}")
    params = cfg.hydra.sweeper.params
    assert count_jobs(cfg) == runs
    header = (CONF / "sweep" / f"{name}.yaml").read_text().split("\n\n")[0]
    assert "python -m bench --multirun +sweep=" in header and "CPU" in header and "GPU" in header
    for group in ("task", "model", "budget"):
        for value in str(params.get(group, cfg[group].name)).split(","):
            assert (CONF / group / f"{value}.yaml").is_file(), f"{name}: {group}={value} has no config"
    methods = str(params.get("method", cfg.method.name)).split(",")
    missing = [m for m in methods if not (CONF / "method" / f"{m}.yaml").is_file()]
    if missing:  # this branch alone has full and lora; the other methods land with the methods work
        pytest.skip(f"{name}: methods not in conf/method yet: {missing}")


def test_rank_study_compares_three_scaling_rules_at_one_lr_grid():
    """LoRA alpha=2r, LoRA fixed alpha (alpha/r) and rsLoRA (alpha/sqrt(r)): every arm at every rank of the same
    lr grid, each labelled by its rule, and the effective scales are the rules'."""
    from methods import get_method

    params = compose_hydra("+sweep=rank_study").hydra.sweeper.params
    arms, ranks, lrs = (str(params[k]).split(",") for k in ("method", "rank", "lr"))
    assert sorted(arms) == ["lora", "lora_fixed_alpha", "rslora"] and len(lrs) >= 3 and "1" in ranks
    labels, scales = {}, {}
    for arm in arms:
        for lr in lrs:
            for r in (1, 64):
                cfg = compose_config([f"method={arm}", f"rank={r}", f"lr={lr}"])
                method = get_method(str(cfg.method.name))
                eff = method.effective_config(OmegaConf.to_container(cfg.method, resolve=True), r)
                assert float(cfg.lr) == float(lr)
                labels.setdefault(arm, set()).add(method.config_label(eff))
                scale = eff["lora_alpha"] / (r ** 0.5 if method.use_rslora else r)
                scales.setdefault(arm, {})[r] = scale
    assert {arm: labels[arm] for arm in arms} == {"lora": {"LoRA (α=2r)"}, "lora_fixed_alpha": {"LoRA (α=16)"},
                                                  "rslora": {"rsLoRA (α=16)"}}
    assert scales["lora"] == {1: 2.0, 64: 2.0}
    assert scales["lora_fixed_alpha"] == {1: 16.0, 64: 0.25}
    assert scales["rslora"] == {1: 16.0, 64: 2.0}


def test_smoke_preset_overrides_the_run_config():
    cfg = compose_hydra("+sweep=smoke")
    assert cfg.model.name == "tiny-bert" and cfg.budget.max_steps == 100 and cfg.save_weights == "none"
    assert cfg.lr == 3e-3


def test_slurm_launcher_defaults():
    launcher = compose_hydra("hydra/launcher=slurm").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node) == (1, 1) and launcher.timeout_min >= 60
    assert OmegaConf.select(compose_hydra("hydra/launcher=submitit_local"), "hydra.launcher._target_") \
        .endswith("LocalLauncher")


@pytest.mark.parametrize("overrides, shape", [
    ((), (1, 1)),  # distributed=none: the old one run per GPU
    (("distributed=ddp",), (1, 2)),  # conf/distributed/ddp.yaml: 1 node x 2 ranks
    (("distributed=ddp", "distributed.nnodes=2", "distributed.nproc_per_node=4"), (2, 4)),
    (("distributed=fsdp", "distributed.nproc_per_node=8"), (1, 8)),
])
def test_slurm_launcher_takes_its_shape_from_distributed(overrides, shape):
    """The launcher Hydra instantiates from the composed config asks for distributed.nnodes nodes x
    distributed.nproc_per_node tasks, one GPU per task and host memory per GPU, and submitit writes that into the
    sbatch script (no cluster needed: the script is only written)."""
    from hydra.utils import instantiate
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    launcher = instantiate(compose_hydra("hydra/launcher=slurm", *overrides).hydra.launcher)
    nodes, tasks = shape
    params = launcher.params
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (nodes, tasks, tasks)
    assert params["mem_gb"] is None and params["mem_per_gpu"] == "32G"  # per rank, not per node
    # the launcher's names -> sbatch's, as the plugin hands them to submitit (its generic keys through submitit's
    # equivalence table; the Slurm-only keys as they are)
    names = SlurmExecutor._equivalence_dict()
    sbatch = {names.get(k, k): v for k, v in params.items() if v is not None and k in
              ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "mem_per_gpu", "gpus_per_task")}
    text = _make_sbatch_string(command="python -m bench", folder="/tmp/submitit", **sbatch)
    for line in (f"--nodes={nodes}", f"--ntasks-per-node={tasks}", f"--gpus-per-node={tasks}", "--mem-per-gpu=32G",
                 "--cpus-per-task=8"):
        assert f"#SBATCH {line}\n" in text
    assert "--mem=" not in text and "--gpus-per-task" not in text


def test_tables_and_plots_label_each_scaling_rule_apart(tmp_path):
    """Runs of the three arms at one rank are three rows of the table, each named by its rule."""
    from analysis.collect import to_frame
    from analysis.plots import metric_vs_rank
    from analysis.tables import method_task_tables, ok_frame
    from methods import get_method

    records = []
    for i, (arm, r) in enumerate([(a, r) for a in ("lora", "lora_fixed_alpha", "rslora") for r in (4, 16)]):
        cfg = compose_config([f"method={arm}", f"rank={r}"])
        eff = get_method(arm).effective_config(OmegaConf.to_container(cfg.method, resolve=True), r)
        records.append({"run_id": f"run{i}", "config_group": f"group{i}", "status": "ok", "method": arm,
                        "task": "sst2", "model": "minilm",
                        "rank": r, "seed": 1, "lr": 4e-4, "main_metric": "accuracy", "main_metric_value": 0.8 + i / 100,
                        "trainable_params_excl_head": 1000 * r, "effective_config": {"method": eff}})
    df = to_frame(records)
    assert set(df["method_label"]) == {"LoRA (α=2r)", "LoRA (α=16)", "rsLoRA (α=16)"}
    rows = [row[0] for row in method_task_tables(df)[0].rows]
    assert rows == ["LoRA (α=2r, r=4)", "LoRA (α=2r, r=16)", "LoRA (α=16, r=4)", "LoRA (α=16, r=16)",
                    "rsLoRA (α=16, r=4)", "rsLoRA (α=16, r=16)"]
    assert str(metric_vs_rank(ok_frame(df), tmp_path)).endswith(".png")


def test_all_methods_preset_runs_every_registered_method_once():
    cfg = compose_hydra("+sweep=all_methods")
    assert str(cfg.hydra.sweeper.params.method).split(",") == in_display_order()
    assert (cfg.model.name, cfg.task.name, cfg.budget.name, cfg.seed) == ("minilm", "sst2", "default", 1)


def test_tuned_preset_runs_every_method_under_the_protocol():
    """One job per method, each the protocol's lr trials on a validation split and its seeds."""
    cfg = compose_hydra("+sweep=tuned_minilm")
    assert cfg.protocol.name == "tuned" and len(cfg.protocol.lr_factors) == 4 and list(cfg.protocol.seeds) == [1, 2, 3]
    assert cfg.protocol.validation_rows == 1000 and cfg.budget.validation_rows == 0  # the protocol sets it per run
    assert cfg.budget.max_steps == 200  # the 48 runs fit a 3-hour session on 2 CPU cores, as its header says
    assert "lora" in str(cfg.hydra.sweeper.params.method).split(",")


def test_forgetting_study_saves_weights_and_probes_forgetting():
    """Every run keeps what the intruder count and the forgetting claims read."""
    cfg = compose_hydra("+sweep=study_forgetting")
    assert cfg.save_weights == "adapter" and cfg.forgetting.probe == "sts" and cfg.forgetting.max_pairs == 500
    assert str(cfg.hydra.sweeper.params.rank) == "1,4,16,64" and cfg.results_dir == "results/study_forgetting"


def test_target_modules_study_pairs_equal_rank_and_equal_parameters(make_cfg):
    """The arms are LoRA on [query, value] and on every linear layer, at r=8 and r=2; on MiniLM's shapes the
    all-linear r=2 arm trains within 15% of the attention-only r=8 arm's parameters."""
    from methods.base import count_params, head_modules
    from tests.method_helpers import build

    params = compose_hydra("+sweep=study_target_modules").hydra.sweeper.params
    assert str(params["rank"]) == "8,2" and "choice(" in str(params["method.target_modules"])
    trained = {}
    for targets, rank in (("[query,value]", 8), ("[query,key,value,intermediate.dense,output.dense]", 2)):
        cfg, method, base, ctx, eff = build(make_cfg, "lora", "model=minilm-random",
                                            f"method.target_modules={targets}", rank=rank)
        model = method.attach(base, eff, ctx)
        trained[targets] = count_params(model, head_modules(cfg.model))["trainable_params_excl_head"]
        wrapped = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if "lora_A" in n}
        assert len(wrapped) == 6 * (2 if rank == 8 else 6)  # 6 layers; the pooler (head) is never a target
    attention, every = trained.values()
    assert attention == 6 * 12_288 and every == 6 * 13_824 and every / attention < 1.15
