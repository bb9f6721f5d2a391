"""`stage=tower` as a user runs it: the paper-scale config in a tiny form, an adapted checkpoint
loaded by `Captioner` and `load_model` and captioned by `bita.caption` exactly as
`stage=evaluate` captions it (slow), and the whole chain with a cut-point cache handed over to
the later stages (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from bita import caption
from bita.engine.checkpoint import TrainState, load_model, save_checkpoint
from bita.engine.distributed import DistInfo
from bita.locations import resolve_location
from bita.models.build import build_model
from bita.models.llm import train_caption_tokenizer
from bita.stages.common import build_stage_model
from bita.stages.context import StageContext
from bita.stages.pipeline import effective_config, stage_sequence

from .runner import bita_run

REPO = Path(__file__).resolve().parents[2]
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_paper_tower_runs_two_steps_on_random_weights_in_a_tiny_form(tmp_path):
    """experiment=paper_tower (CLIP ViT-L/14, last 4 of 21 blocks, dataset=all) composes; shrunk
    to a 4-block 64-px ViT on the demo data it trains the last two blocks for two steps."""
    cfg = composed("experiment=paper_tower")
    assert (cfg.encoder.model, cfg.encoder.keep_layers, cfg.encoder.adapt_blocks) == (
        "ViT-L-14",
        21,
        4,
    )
    assert cfg.dataset.name == "all" and cfg.stage.name == "tower"
    tiny_vit = [
        f"+encoder.vision_cfg.{k}={v}"
        for k, v in {
            "image_size": 64,
            "layers": 5,
            "width": 64,
            "patch_size": 16,
            "head_width": 32,
        }.items()
    ]
    bita_run(
        tmp_path,
        "experiment=paper_tower",
        "hardware=cpu",
        "dataset=demo_mini",
        "encoder.pretrained=null",
        *tiny_vit,
        "encoder.keep_layers=4",
        "encoder.adapt_blocks=2",
        "encoder.size=64",
        "train.max_steps=2",
        "train.global_batch_size=8",
        "hardware.micro_batch_size=4",
        "tracking.enabled=false",
        "hydra.run.dir=runs/paper_tower_tiny",
    )
    last = tmp_path / "runs/paper_tower_tiny/tower/checkpoints/last"
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 2
    tower = {
        k.split(".")[5]
        for k in load_file(str(last / "model.safetensors"))
        if k.startswith("encoder.")
    }
    assert tower == {"2", "3"}  # resblocks 2 and 3 of the 4 kept
    assert OmegaConf.load(last / "config.yaml").encoder.adapt_blocks == 2


def test_a_stage_after_the_tower_without_its_checkpoint_is_an_error():
    """With encoder.adapt_blocks set, a stage built without init_from would silently run the
    public (ImageNet) tower: it stops and says where the adapted tower comes from."""
    cfg = composed("experiment=tiny", "stage=pretrain1", "encoder.adapt_blocks=1")
    eff = effective_config(cfg, stage_sequence(cfg)[0], {}, None)
    ctx = StageContext(cfg=eff, stage_dir=Path("unused"), dist=CPU, tracker=None)
    with pytest.raises(ValueError, match=r"encoder.adapt_blocks=1 but no init_from.*stage=tower"):
        build_stage_model(ctx)


def demo_val_images(folder: Path) -> dict[str, Path]:
    """The demo's val images as files, by file name."""
    demo = Path(resolve_location(str(composed("dataset=demo_mini").dataset.root))) / "rsicd" / "val"
    folder.mkdir()
    files = {}
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(sorted(str(p) for p in demo.glob("*.tar"))), wds.tarfile_to_samples()
    )
    for sample in pipeline:
        name = json.loads(sample["json"])["filename"]
        (folder / name).write_bytes(sample["jpg"])
        files[name] = folder / name
    return files


@pytest.fixture(scope="module")
def adapted_checkpoint(tmp_path_factory) -> Path:
    """A BITA (EfficientNet-Lite0 adapted above its head's cut, tiny IFT and LM) whose adapted
    head differs from ImageNet's, saved as a run saves it."""
    root = tmp_path_factory.mktemp("adapted")
    cfg = composed("experiment=tiny", "encoder=effnet_lite0", "encoder.adapt_blocks=1")
    cfg.llm.tokenizer = str(
        train_caption_tokenizer(["a river near green trees"] * 8, 300, root / "tok")
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.encoder.body.net.conv_head.weight.mul_(-1.0)
    model.requires_grad_(False)  # as after a later stage: the adapted units are frozen again
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    return save_checkpoint(
        root / "checkpoints" / "best",
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        state=TrainState(),
        config=cfg,
        dist=CPU,
    )


@pytest.mark.slow
def test_bita_caption_writes_the_captions_evaluate_wrote_for_an_adapted_checkpoint(
    tmp_path, adapted_checkpoint
):
    bita_run(  # decoding as the checkpoint's config says, which bita.caption follows
        tmp_path,
        "experiment=tiny",
        "stage=evaluate",
        f"init_from={adapted_checkpoint}",
        "dataset=demo_mini",
        "tracking.enabled=false",
    )
    results = next((tmp_path / "runs").rglob("evaluate/results"))
    evaluated = json.loads((results / "rsicd_val_captions.json").read_text())
    images = demo_val_images(tmp_path / "images")
    out = tmp_path / "captions.jsonl"
    subprocess.run(  # as a user types it (and without changing this process's logging)
        [
            sys.executable,
            "-m",
            "bita.caption",
            "--checkpoint",
            str(adapted_checkpoint),
            str(tmp_path / "images"),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    written = {
        Path(line["image"]).name: line["caption"]
        for line in map(json.loads, out.read_text().splitlines())
    }
    assert len(evaluated) == len(images) == len(written) == 31
    assert written == {e["filename"]: e["caption"] for e in evaluated}


def test_captioner_and_load_model_run_the_adapted_units_of_a_checkpoint(adapted_checkpoint):
    """What `bita.caption`, `Captioner` and `stage=evaluate` load: the adapted head, not
    ImageNet's (which the fixture negated)."""
    saved = load_file(str(adapted_checkpoint / "model.safetensors"))[
        "encoder.body.net.conv_head.weight"
    ]
    for model in (
        caption.Captioner.from_checkpoint(adapted_checkpoint, device="cpu").model,
        load_model(adapted_checkpoint)[0],
    ):
        assert model.encoder.adapt_blocks == 1
        torch.testing.assert_close(model.encoder.body.net.conv_head.weight, saved)


@pytest.mark.slow
def test_the_tower_stage_hands_its_adapted_cache_to_the_stages_after_it(tmp_path):
    """tools/cache_features.py caches the cut; the pipeline adapts the tower on it, derives the
    adapted tower's tokens cache in its run folder, and every later stage reads that cache
    (its fingerprint matches their adapted tower) and keeps the adapted units."""
    common = [
        "experiment=tiny",
        "encoder=effnet_lite0",
        "encoder.adapt_blocks=2",
        "dataset=demo_mini",
    ]
    cut = tmp_path / "cut"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/cache_features.py"),
            *common,
            f"features.root={cut}",
            "features.activations=cut",
        ],
        check=True,
        cwd=tmp_path,
    )
    order = "stage.order=[lm,tower,pretrain1,pretrain2,finetune,evaluate]"
    bita_run(
        tmp_path,
        *common,
        order,
        f"features.root={cut}",
        "train.max_steps=2",
        "tracking.enabled=false",
        "hydra.run.dir=runs/chain",
    )
    run = tmp_path / "runs" / "chain"
    derived = run / "tower" / "features"
    assert json.loads((derived / "rsicd" / "manifest.json").read_text())["derived_from"]
    tower = load_file(str(run / "tower/checkpoints/last/model.safetensors"))[
        "encoder.body.net.conv_head.weight"
    ]
    for stage in ("pretrain1", "pretrain2", "finetune"):
        ckpt = run / stage / "checkpoints" / "last"
        assert OmegaConf.load(ckpt / "config.yaml").features.root == str(derived)
        saved = load_file(str(ckpt / "model.safetensors"))["encoder.body.net.conv_head.weight"]
        assert torch.equal(saved, tower), stage
    assert (
        json.loads((run / "evaluate/results/rsicd_val.json").read_text())["counts"]["images"] == 31
    )
