"""Run folder names from overrides: one folder level, shell-safe, distinct values distinct."""

from bita.run_names import folder_name, run_name


def test_paths_are_shortened_and_hashed_not_nested():
    name = folder_name("features.root-data/features+paths.shards-/abs/data/shards")
    assert "/" not in name
    assert name.startswith("features.root-features_") and "+paths.shards-shards_" in name
    assert folder_name("paths.shards-a/shards") != folder_name("paths.shards-b/shards")


def test_unsafe_characters_are_replaced_and_hashed():
    name = folder_name("optim.lr_scales-{llm.*:0.25}+stage.order-[lm,finetune]")
    assert name.startswith("optim.lr_scales-llm.__0.25_")
    assert name.endswith("+stage.order-lm,finetune")  # brackets dropped, nothing lost
    star, question = "optim.lr_scales-{llm.*:0.25}", "optim.lr_scales-{llm.?:0.25}"
    assert folder_name(star) != folder_name(question)


def test_plain_overrides_and_no_overrides_are_unchanged():
    plain = "dataset-demo+optim.lr-0.0001+stage-pretrain1+train.max_steps-3"
    assert folder_name(plain) == plain and folder_name("") == ""


def test_long_names_are_capped():
    name = folder_name("+".join(f"key{i}-value{i}" for i in range(60)))
    assert len(name) <= 200


def test_run_name_is_the_folder_below_the_runs_root(tmp_path):
    assert run_name(tmp_path / "runs/tiny/stage-lm", tmp_path / "runs") == "tiny/stage-lm"
    elsewhere = tmp_path / "scratch/x"
    assert run_name(elsewhere, tmp_path / "runs") == elsewhere.as_posix()
