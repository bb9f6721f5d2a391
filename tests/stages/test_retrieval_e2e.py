"""`model.retrieval=true` through the stages: the datastore is built once, travels with the
checkpoints, and `stage=evaluate` and `python -m bita.caption` use it without a flag."""

import json
import tarfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bita.caption import main as caption_main
from bita.engine.checkpoint import load_model

from .runner import bita_run

DEMO_VAL = Path(__file__).resolve().parents[2] / "bita/data/demo_mini/rsicd/val/rsicd-val-00000.tar"


def _val_images(folder: Path, count: int) -> dict[str, Path]:
    """The first `count` demo_mini val images as files, by image id (the shard key)."""
    folder.mkdir()
    images = {}
    with tarfile.open(DEMO_VAL) as shard:
        for member in shard:
            key, _, extension = member.name.partition(".")
            if extension == "jpg" and len(images) < count:
                images[key] = folder / member.name
                images[key].write_bytes(shard.extractfile(member).read())
    return images


@pytest.mark.parametrize("rerank", ["none", "mbr"])
def test_stages_build_the_datastore_once_and_evaluate_and_caption_use_it(tmp_path, rerank):
    """With decode.rerank=mbr the captions may be the neighbours' own: `bita.caption` must
    find the same neighbours, with all their captions, from the checkpoint alone."""
    bita_run(
        tmp_path,
        "experiment=tiny",
        "stage.order=[lm,finetune,scst,evaluate]",
        "+stage.recipes.lm.train.max_steps=2",
        "+stage.recipes.finetune.train.max_steps=3",
        "+stage.recipes.scst.train.max_steps=1",
        "model.retrieval.enabled=true",
        f"decode.rerank={rerank}",
        "decode.rerank_neighbours=3",
        "tracking.enabled=false",
    )
    run = next((tmp_path / "runs/tiny").iterdir())
    built = run / "finetune/retrieval"
    assert (built / "datastore.json").is_file()
    assert not (run / "scst/retrieval").exists()  # scst reused the fine-tune checkpoint's
    checkpoint = run / "scst/checkpoints/last"
    model, cfg = load_model(checkpoint)
    assert model.datastore.fingerprint == cfg.model.retrieval.fingerprint
    assert json.loads((built / "datastore.json").read_text())["fingerprint"] == (
        cfg.model.retrieval.fingerprint
    )
    assert OmegaConf.load(checkpoint / "config.yaml").model.retrieval.datastore == (
        "assets/retrieval"
    )
    evaluated = {
        c["image_id"]: c["caption"]
        for c in json.loads((run / "evaluate/results/rsicd_val_captions.json").read_text())
    }
    images = _val_images(tmp_path / "val", 4)
    out = tmp_path / "captions.jsonl"
    assert (
        caption_main(["--checkpoint", str(checkpoint), str(tmp_path / "val"), "--out", str(out)])
        == 0
    )
    lines = {Path(line["image"]).name: line["caption"] for line in map(json.loads, out.open())}
    assert {key: lines[path.name] for key, path in images.items()} == {
        key: evaluated[key] for key in images
    }
