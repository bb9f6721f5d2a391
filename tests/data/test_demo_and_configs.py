from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bita.data.stream import eval_batches, steps_per_epoch, train_batches
from bita.locations import resolve_location

CONF = Path(__file__).resolve().parents[2] / "conf" / "dataset"
OPTIONS = ("ucm", "rsicd", "nwpu", "all", "demo", "demo_mini")
KEYS = {"name", "root", "sources", "train_split", "val_split", "test_split", "eval_source"}


@pytest.mark.parametrize("option", OPTIONS)
def test_dataset_config_has_contract_keys_and_a_run_comment(option):
    path = CONF / f"{option}.yaml"
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and first_line.endswith(
        f"python -m bita.run dataset={option}"
    )
    cfg = OmegaConf.load(path)
    assert set(cfg) >= KEYS and cfg.name == option
    assert cfg.eval_source in [s.name for s in cfg.sources]


def test_all_mixes_the_three_datasets_by_size():
    cfg = OmegaConf.load(CONF / "all.yaml")
    assert [(s.name, s.weight) for s in cfg.sources] == [
        ("ucm", None),
        ("rsicd", None),
        ("nwpu", None),
    ]


@pytest.mark.parametrize(
    ("option", "captions", "val_images"), [("demo", 3100, 93), ("demo_mini", 310, 31)]
)
def test_bundled_samples_stream_without_download(transforms, option, captions, val_images):
    cfg = OmegaConf.load(CONF / f"{option}.yaml")
    assert steps_per_epoch(cfg, split=cfg.train_split, global_batch_size=16) == captions // 16
    batch = next(
        iter(
            train_batches(
                cfg,
                split=cfg.train_split,
                batch_size=16,
                transform=transforms["train"],
                num_workers=0,
                seed=0,
                epoch=0,
            )
        )
    )
    assert batch["image"].shape == (16, 3, 16, 16)
    ids = [
        i
        for b in eval_batches(
            cfg, split=cfg.val_split, batch_size=32, transform=transforms["eval"], num_workers=2
        )
        for i in b["image_id"]
    ]
    assert len(ids) == len(set(ids)) == val_images


def test_bundled_samples_stay_small_and_cite_their_source():
    roots = [Path(resolve_location(OmegaConf.load(CONF / f"{o}.yaml").root)) for o in OPTIONS[-2:]]
    size = sum(p.stat().st_size for root in roots for p in root.rglob("*") if p.is_file())
    assert size < 14e6  # the package stays under ~15 MB
    assert (roots[0] / "SOURCE.md").read_text().count("doi:10.1109/TGRS.2017.2776321") == 1
