"""Convert the BITA authors' released checkpoints (LAVIS .pth) to bita checkpoint folders and back.

    python tools/convert_bita_checkpoint.py to-bita AUTHORS.pth CHECKPOINT_DIR [OVERRIDE ...]
    python tools/convert_bita_checkpoint.py to-official CHECKPOINT_DIR AUTHORS_LAYOUT.pth

`to-bita` writes a complete checkpoint folder (model.safetensors, config.yaml,
trainer_state.json) that `python -m bita.caption --checkpoint CHECKPOINT_DIR` and
`python -m bita.run stage=evaluate init_from=CHECKPOINT_DIR` (or any stage's `init_from`) use
as it is. Its config.yaml is composed as `python -m bita.run experiment=paper_pretrain2
OVERRIDE ...` composes it: the paper's model (CLIP ViT-L/14, IFT-base, OPT-2.7B, whose frozen
public weights are fetched by name, not stored) and its decoding. Keys that do not map are an
error listing them; the authors' unused heads are dropped with a logged note.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from bita.engine.checkpoint import CONFIG, STATE, WEIGHTS, TrainState
from bita.errors import reports_user_errors
from bita.models.official import from_official, read_official, to_official

CONF = Path(__file__).resolve().parents[1] / "conf"
PAPER_MODEL = "experiment=paper_pretrain2"  # every paper experiment has this model and decoding


def checkpoint_config(overrides: list[str]) -> DictConfig:
    """The run config `python -m bita.run experiment=paper_pretrain2 OVERRIDES` composes,
    resolved, with nothing to start from (the folder is the start)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[PAPER_MODEL, *overrides])
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.init_from = None
    return cfg


def write_checkpoint_folder(state: dict[str, torch.Tensor], cfg: DictConfig, target: Path) -> None:
    """Weights, config and a step-0 trainer state, written to a temporary sibling and renamed
    into place, so an interrupted conversion leaves no half folder. An existing target is
    never overwritten."""
    if target.exists():
        raise FileExistsError(f"{target} exists: give a new folder for the converted checkpoint")
    tmp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
    OmegaConf.save(cfg, tmp / CONFIG)
    (tmp / STATE).write_text(json.dumps(asdict(TrainState()), indent=1))
    tmp.rename(target)


def _bita_weights(source: Path) -> dict[str, torch.Tensor]:
    """A bita checkpoint folder's weights, or a bare model.safetensors file."""
    return load_file(str(source / WEIGHTS if source.is_dir() else source))


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("direction", choices=["to-bita", "to-official"])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="to-bita: overrides as for python -m bita.run (after experiment=paper_pretrain2)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.direction == "to-bita":
        state = from_official(read_official(args.source))
        write_checkpoint_folder(state, checkpoint_config(args.overrides), args.target)
    else:
        if args.overrides:
            parser.error("to-official takes no config overrides")
        state = to_official(_bita_weights(args.source))
        torch.save({"model": state}, args.target)
    print(f"{args.direction}: wrote {len(state)} tensors to {args.target}")


if __name__ == "__main__":
    main()
