"""The cluster launcher and search-space configs compose into what their plugins expect."""

from pathlib import Path

from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parents[1] / "conf"


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launchers_give_each_job_its_nodes_and_gpus():
    one = composed("hydra/launcher=slurm", "hydra.launcher.tasks_per_node=4").hydra.launcher
    assert one._target_.endswith("SlurmLauncher")
    assert (one.nodes, one.tasks_per_node, one.gpus_per_node) == (1, 4, 4)
    assert one.max_num_timeout > 0  # a timed-out job is requeued and resumes
    multi = composed("hydra/launcher=slurm_multinode").hydra.launcher
    assert (multi.nodes, multi.tasks_per_node, multi.gpus_per_node) == (2, 8, 8)


def test_finetune_search_space_uses_the_optuna_sweeper():
    cfg = composed("hparams_search=finetune_optuna")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("BitaOptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) >= {"optim.lr", "optim.weight_decay"}
    assert sweeper.sampler.seed == cfg.seed


def test_search_space_grammar_maps_to_optuna_distributions():
    import optuna
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.bita_optuna_sweeper.optuna_sweeper import distribution

    parse = OverridesParser.create().parse_override
    lr = distribution(parse("optim.lr=tag(log, interval(1e-6, 1e-4))"))
    assert lr == optuna.distributions.FloatDistribution(1e-6, 1e-4, log=True)
    steps = distribution(parse("optim.warmup_steps=range(0, 300, 100)"))
    assert steps == optuna.distributions.IntDistribution(0, 200, step=100)
    assert distribution(parse("model.lm_label_smoothing=0.0,0.1")).choices == (0.0, 0.1)
    assert distribution(parse("seed=3")) is None
