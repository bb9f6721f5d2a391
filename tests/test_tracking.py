"""MLflow tracking: SQLite store, params once, resume reuses the run, sweeps nest, and an
unreachable store never stops a run."""

import os
import shutil
import subprocess
import sys
import time
import warnings

import pytest
from omegaconf import OmegaConf

from bita.tracking import RUN_DIR_TAG, Tracker, flatten

CONFIG = {"optim": {"lr": 1e-4, "betas": [0.9, 0.999]}, "train": {"max_steps": None}, "name": "x"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One database for the module (creating its tables takes seconds); tests use their own
    experiment. Absolute, because MLflow caches stores by URI."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_flatten_resolves_and_dots_keys():
    cfg = OmegaConf.create({"a": {"b": 1, "c": "${a.b}"}, "l": [1, 2]})
    assert flatten(cfg) == {"a.b": "1", "a.c": "1", "l": "[1, 2]"}


def test_run_params_metrics_artifacts_and_resume(store, tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    tracker = Tracker(uri=store, experiment="t")
    run_id = tracker.start_run(run_dir, run_name="demo", config=CONFIG, tags={"overrides": "x=1"})
    tracker.log_metrics({"train/loss": 1.5, "note": "text"}, step=3)
    (tmp_path / "results.json").write_text("{}")
    tracker.log_artifact(tmp_path / "results.json", "results")
    tracker.finish()

    resumed = Tracker(uri=store, experiment="t")
    with pytest.warns(RuntimeWarning, match=r"keeps its first values.*optim.lr"):
        again = resumed.start_run(
            run_dir, run_name="demo", config={**CONFIG, "optim": {"lr": 2e-4}}
        )
    assert again == run_id
    resumed.log_metrics({"train/loss": 1.0}, step=4)
    resumed.finish()

    run = _client(store).get_run(run_id)
    assert run.data.params["optim.lr"] == "0.0001" and run.data.params["name"] == "x"
    assert run.data.tags["overrides"] == "x=1" and run.info.status == "FINISHED"
    history = _client(store).get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(3, 1.5), (4, 1.0)]
    assert "note" not in run.data.metrics
    artifacts = [a.path for a in _client(store).list_artifacts(run_id, "results")]
    assert artifacts == ["results/results.json"]
    artifact_root = _client(store).get_experiment_by_name("t").artifact_location
    assert artifact_root.endswith("/mlartifacts")  # beside the database, not in the cwd


def test_sweep_is_one_parent_with_children(store, tmp_path):
    cfg = OmegaConf.create({**CONFIG, "tracking": {"uri": store, "experiment": "sweep"}})
    sweep = tmp_path / "runs/x/sweep"
    children = []
    for job in ("optim.lr=1", "optim.lr=2"):
        tracker = Tracker.start(
            cfg,
            run_dir=sweep / job,
            run_name=f"x/sweep/{job}",
            overrides=[job, "experiment=tiny"],
            sweep_dir=sweep,
            sweep_name="x/sweep",
        )
        children.append(tracker)
        tracker.finish()
    client = _client(store)
    parent = children[0].parent_run_id
    assert parent is not None and children[1].parent_run_id == parent
    assert client.get_run(parent).info.status == "FINISHED"
    for tracker, lr in zip(children, ("1", "2"), strict=True):
        run = client.get_run(tracker.run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["override.optim.lr"] == lr
        assert run.info.run_name == f"x/sweep/optim.lr={lr}"
        assert run.data.tags[RUN_DIR_TAG] == str((sweep / f"optim.lr={lr}").resolve())
        assert run.data.params["optim.lr"] == "0.0001"
        assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["config.yaml"]
        assert tracker.run_id in tracker.where_to_look()


@pytest.mark.parametrize("kind", ["sqlite", "http"])
def test_unreachable_store_warns_once_and_continues(kind, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{blocker}/mlflow.db" if kind == "sqlite" else "http://127.0.0.1:9"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = Tracker(uri=uri, experiment="t")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tracker.start_run(tmp_path / "run", run_name="r", config=CONFIG) is None
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_artifact(blocker)
        assert tracker.sweep_parent("s", run_name="s") is None
        tracker.finish()
    messages = [str(w.message) for w in caught if "unreachable" in str(w.message)]
    assert len(messages) == 1 and "run continues without tracking" in messages[0]
    assert not tracker.enabled


def test_only_rank_zero_tracks(tmp_path):
    tracker = Tracker(uri=f"sqlite:///{tmp_path}/mlflow.db", rank=1)
    assert tracker.start_run(tmp_path, run_name="r", config=CONFIG) is None
    assert not (tmp_path / "mlflow.db").exists()


def test_import_stays_light():
    code = "import sys, bita.tracking; assert 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pattern_keys_are_one_param_and_tracking_goes_on(store, tmp_path):
    """Fault on main: the README's `optim.lr_scales={llm.*:0.25}` flattened to the key
    `optim.lr_scales.llm.*`, which MLflow refuses; the refusal was reported as an unreachable
    store and the run stayed RUNNING with no params or metrics."""
    config = {**CONFIG, "optim": {"lr": 1e-4, "lr_scales": {"llm.*": 0.25}}}
    tracker = Tracker(uri=store, experiment="patterns")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        run_id = tracker.start_run(tmp_path / "run", run_name="p", config=config)
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        tracker.finish()
    run = _client(store).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] == 1.0
    assert run.data.params["optim.lr_scales"] == '{"llm.*": 0.25}'


def test_a_refused_write_is_not_an_unreachable_store(store, tmp_path):
    """Fault on main: any write MLflow refused switched tracking off as "unreachable"."""
    tracker = Tracker(uri=store, experiment="refused")
    run_id = tracker.start_run(tmp_path / "run", run_name="r", config=CONFIG)
    with pytest.warns(RuntimeWarning, match="MLflow refused a write") as caught:
        tracker.log_metrics({"bad*name": 1.0}, step=1)
    assert not any("unreachable" in str(w.message) for w in caught)
    tracker.log_metrics({"good": 2.0}, step=1)
    tracker.finish()
    run = _client(store).get_run(run_id)
    assert run.data.metrics == {"good": 2.0} and run.info.status == "FINISHED"


def test_experiment_kind_run_folder_datasets_and_system_metrics(store, tmp_path):
    cfg = OmegaConf.create(
        {**CONFIG, "tracking": {"uri": store, "experiment": "ui", "system_metrics_every": 0.2}}
    )
    run_dir = tmp_path / "runs/x/stage-lm"
    tracker = Tracker.start(cfg, run_dir=run_dir, run_name="x/stage-lm", overrides=["+a.b=1"])
    profile = {"images": 62, "captions": 310}
    for _ in range(2):  # once per run, however often a stage opens the split
        tracker.log_dataset(
            name="rsicd-train",
            split="train",
            digest="d1",
            location="/d/manifest.json",
            profile=profile,
        )
    time.sleep(1.0)
    tracker.finish()
    client = _client(store)
    experiment = client.get_experiment_by_name("ui")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "x/stage-lm" and run.data.tags[RUN_DIR_TAG] == str(
        run_dir.resolve()
    )
    assert run.data.tags["override.a.b"] == "1"  # Hydra's `+` is not a key character
    assert "mlflow.source.name" in run.data.tags and "mlflow.user" in run.data.tags
    (entry,) = run.inputs.dataset_inputs
    assert (entry.dataset.name, entry.dataset.digest) == ("rsicd-train", "d1")
    assert entry.dataset.source == '{"uri": "/d/manifest.json"}'
    assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "train")]
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics


def test_read_only_folder_falls_back_at_once(tmp_path):
    """Fault on main: a SQLite store in a folder the process cannot write was retried by
    MLflow nine times (about 100 s) before the warning."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    code = (
        "import warnings, bita.tracking as t\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert t.Tracker().start_run('run', run_name='r', config={'a': 1}) is None\n"
        "print(sum('unreachable' in str(x.message) for x in w))\n"
    )
    # root writes anywhere: drop the capability that lets it, so the folder is read-only
    drop = ["setpriv", "--bounding-set=-dac_override"] if os.geteuid() == 0 else []
    if drop and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): no folder is read-only")
    started = time.monotonic()
    result = subprocess.run(
        [*drop, sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1" and time.monotonic() - started < 30
    assert not (folder / "mlflow.db").exists()
