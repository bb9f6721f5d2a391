"""Sweeps as a team runs them: an Optuna study and a submitit-launched sweep, each one MLflow
parent run with a child per job (slow: every job is a real tiny run)."""

import mlflow
import pytest
import yaml

from .runner import bita_run


def _children(tmp_path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("bita").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    return parents[0], children


@pytest.mark.slow
def test_optuna_study_is_one_parent_with_a_child_per_trial(tmp_path):
    bita_run(
        tmp_path,
        "-m",
        "hparams_search=finetune_optuna",
        "experiment=tiny",
        "stage.order=[lm,finetune]",
        "hydra.sweeper.n_trials=3",
        "hardware.num_threads=1",
    )
    parent, children = _children(tmp_path)
    assert parent.info.run_name == "tiny/optuna-finetune" and len(children) == 3
    objectives = [c.data.metrics["objective"] for c in children]
    for child in children:  # each trial's drawn values are its overrides and its params
        assert child.info.status == "FINISHED"
        drawn = float(child.data.tags["override.optim.lr"])
        assert 3e-6 <= drawn <= 3e-4 and float(child.data.params["optim.lr"]) == drawn
    results = yaml.safe_load(
        (tmp_path / "runs/tiny/optuna-finetune/optimization_results.yaml").read_text()
    )
    assert results["completed"] == 3 and results["best_value"] == pytest.approx(max(objectives))


@pytest.mark.slow
def test_submitit_local_sweep_records_both_jobs(tmp_path):
    bita_run(
        tmp_path,
        "-m",
        "hydra/launcher=submitit_local",
        "experiment=tiny",
        "stage=pretrain1",
        "train.max_steps=2",
        "hardware.num_threads=1",
        "optim.lr=1e-4,2e-4",
    )
    _, children = _children(tmp_path)
    assert sorted(c.data.params["optim.lr"] for c in children) == ["0.0001", "0.0002"]
    assert {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        assert "pretrain1/train/loss" in child.data.metrics
