"""`python -m bita.run` as a user types it: single stages, resume, sweeps, the tiny pipeline."""

import io
import json
from pathlib import Path

import pytest

from .runner import bita_run

REPO = Path(__file__).resolve().parents[2]


def trainer_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["step"]


def test_pretrain1_leaves_a_resumable_checkpoint(tmp_path):
    """Faults on main: a path value (`paths.shards=data/shards`) nested the run folder, the
    README's `optim.lr_scales={llm.*:0.25}` left the MLflow run RUNNING with no params under an
    "unreachable store" warning, and DeepSpeed's compiler probes filled the console."""
    args = (
        "experiment=tiny",
        "stage=pretrain1",
        "dataset=demo_mini",
        "train.max_steps=3",
        "paths.shards=data/shards",
        "optim.lr_scales={llm.*:0.25}",
    )
    first = bita_run(tmp_path, *args)
    name = "tiny/dataset-demo+optim.lr_scales-llm.__0.25_c18ce0+paths.shards-shards_e91dff"
    name += "+stage-pretrain1+train.max_steps-3"
    run_dir = tmp_path / "runs" / name
    assert f"run folder: {run_dir}" in first.stdout
    last = run_dir / "pretrain1/checkpoints/last"
    assert trainer_step(last) == 3
    assert {"config.yaml", "model.safetensors", "trainer_state.json"} <= {
        p.name for p in last.iterdir()
    }
    console = first.stdout + first.stderr
    for noise in ("gcc ", "No CUDA runtime", "built successfully", "unreachable"):
        assert noise not in console
    # the same command again finds its run folder and resumes instead of starting over
    again = bita_run(tmp_path, *args)
    assert "resumed from" in again.stderr + again.stdout and trainer_step(last) == 3
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bita").experiment_id])
    assert run.info.run_name == name and run.info.status == "FINISHED"
    assert run.data.params["optim.lr_scales"] == '{"llm.*": 0.25}'
    assert "pretrain1/train/loss" in run.data.metrics


def test_sweep_is_one_parent_with_a_child_per_job(tmp_path):
    bita_run(
        tmp_path,
        "-m",
        "experiment=tiny",
        "stage=pretrain1",
        "dataset=demo_mini",
        "train.max_steps=2",
        "optim.lr=1e-4,2e-4",
    )
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("bita").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.params["optim.lr"] for c in children) == ["0.0001", "0.0002"]


def test_bad_override_fails_before_any_work(tmp_path):
    result = bita_run(tmp_path, "encoder=resnet50", check=False)
    assert result.returncode != 0
    assert "clip_vit_l14" in result.stderr and "effnet_lite0" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_tiny_pipeline_runs_every_stage_to_a_metrics_table(tmp_path):
    result = bita_run(tmp_path, "experiment=tiny")
    run_dir = tmp_path / "runs/tiny"
    for stage in ("lm", "pretrain1", "pretrain2", "finetune"):
        assert (run_dir / stage).is_dir(), stage
    results = run_dir / "evaluate/results"
    metrics = json.loads((results / "rsicd_val.json").read_text())
    assert (results / "rsicd_val_captions.json").is_file()
    assert (results / "rsicd_val_gallery.html").is_file()
    assert "CIDEr" in result.stdout and "mlflow ui" in result.stdout
    assert metrics["counts"]["images"] == 31


def test_self_critical_stage_trains_on_rewards_validates_and_keeps_the_best(tmp_path):
    bita_run(
        tmp_path,
        "experiment=tiny",
        "stage.order=[lm,scst]",
        "+stage.recipes.lm.train.max_steps=2",
        "stage.recipes.scst.self_critical.samples_per_image=3",
    )
    stage_dir = next((tmp_path / "runs/tiny").iterdir()) / "scst"
    assert trainer_step(stage_dir / "checkpoints/best") == 62 // 16  # one epoch of demo images
    validation = json.loads((stage_dir / "validation/epoch_000/results/rsicd_val.json").read_text())
    assert validation["counts"]["images"] == 31
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("bita").experiment_id])[0]
    rewards = client.get_metric_history(run.info.run_id, "scst/train/reward")
    assert rewards and all(r.value >= 0 for r in rewards)


def test_finetune_batched_by_image_counts_images_per_step(tmp_path):
    bita_run(
        tmp_path,
        "experiment=tiny",
        "stage.order=[lm,finetune]",
        "+stage.recipes.lm.train.max_steps=2",
        "stage.recipes.finetune.batch_by_image=true",
        "train.global_batch_size=8",
    )
    stage_dir = next((tmp_path / "runs/tiny").iterdir()) / "finetune"
    assert trainer_step(stage_dir / "checkpoints/best") == 62 // 8  # demo train images, not pairs


@pytest.mark.parametrize(("stage", "by_image"), [("pretrain1", "true"), ("scst", "false")])
def test_a_stage_that_cannot_batch_as_asked_names_the_option(tmp_path, stage, by_image):
    result = bita_run(
        tmp_path,
        "experiment=tiny",
        f"stage={stage}",
        "dataset=demo_mini",
        f"stage.batch_by_image={by_image}",
        check=False,
    )
    assert result.returncode != 0
    assert f"stage.batch_by_image must be {'false' if by_image == 'true' else 'true'}" in (
        result.stderr
    )


def test_a_mistyped_option_fails_in_one_line_before_any_work(tmp_path):
    """Fault: options of the wrong type (`train.max_steps=abc optim.lr=abc`), which failed
    after the model was built and an MLflow run was opened, with a traceback naming no key."""
    overrides = ("experiment=tiny", "stage=pretrain1", "train.max_steps=abc", "optim.lr=abc")
    result = bita_run(tmp_path, *overrides, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        "error: train.max_steps='abc': expected an integer >= 1 or null; "
        "optim.lr='abc': expected a number > 0 or null"
    )
    assert not (tmp_path / "mlflow.db").exists()  # failed before tracking started


def test_a_stage_chains_by_hand_from_a_checkpoint_and_says_what_it_scored(
    tmp_path, tiny_checkpoint
):
    """Faults: `stage=scst init_from=CHECKPOINT` failed ("llm.tokenizer is null": the model
    came from the composed defaults, not the checkpoint); and a fine-tune that validates no
    epoch scored `last` in place of `best` without a word."""
    result = bita_run(
        tmp_path,
        "stage=scst",
        "dataset=demo_mini",
        f"init_from={tiny_checkpoint}",
        "train.max_steps=1",
        "train.global_batch_size=8",
        "stage.self_critical.samples_per_image=2",
        "stage.final_eval_split=val",
        "decode.num_beams=1",
        "tracking.enabled=false",
    )
    assert "checkpoints/last is scored and handed on" in result.stdout + result.stderr
    summary = json.loads(next((tmp_path / "runs").rglob("scst/results/rsicd_val.json")).read_text())
    assert summary["checkpoint"].endswith("scst/checkpoints/last")
    assert summary["selection"]["checkpoint"] == "last"
    assert "no epoch was validated" in summary["selection"]["reason"]
    assert summary["counts"]["images"] == summary["counts"]["images_expected"] == 31


def test_a_corrupt_val_image_fails_evaluation_naming_it(tmp_path, tiny_checkpoint):
    """Fault: one val image that cannot be decoded, once scored away (30 of 31 images) with
    a single log warning and no word in the results."""
    import shutil
    import tarfile

    root = tmp_path / "data"
    shutil.copytree(REPO / "bita/data/demo_mini/rsicd", root / "rsicd")
    val = root / "rsicd/val/rsicd-val-00000.tar"
    with tarfile.open(val) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(val, "w") as tar:
        for member, data in members:
            data = b"not an image" if member.name == "rsicd_277.jpg" else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    result = bita_run(
        tmp_path,
        "stage=evaluate",
        "dataset=demo_mini",
        f"dataset.root={root}",
        f"init_from={tiny_checkpoint}",
        "decode.num_beams=1",
        "tracking.enabled=false",
        check=False,
    )
    assert result.returncode == 2
    assert "scored 30 of 31 images; not scored: rsicd_277" in result.stderr.splitlines()[-1]
    summary = json.loads(next((tmp_path / "runs").rglob("rsicd_val.json")).read_text())
    assert summary["skipped_images"] == ["rsicd_277"]
    assert (summary["counts"]["images"], summary["counts"]["images_expected"]) == (30, 31)
