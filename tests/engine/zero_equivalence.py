"""A CLI that trains the tiny BITA a few stage-1 (ITC) steps on fixed global batches and saves
the final trainable weights: run under torchrun with N processes and under plain python with
one, the two must end on the same weights (tests/engine/test_multiprocess.py).

    python zero_equivalence.py OUT --zero Z --micro M     # 1 process, micro-batch M
    torchrun --nproc_per_node 2 zero_equivalence.py OUT --zero Z --micro M
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bita.engine.checkpoint import model_state
from bita.engine.distributed import init_distributed
from bita.engine.trainer import Trainer
from bita.models.build import build_model
from bita.models.trainable import set_trainable

CONF = Path(__file__).resolve().parents[2] / "conf"
GLOBAL_BATCH, STEPS = 8, 3
CAPTIONS = [
    "many cars are parked in a parking lot near a building",
    "a river runs through green fields and some trees",
    "several white buildings stand beside a wide road",
    "an airport with two planes and a long runway",
    "a baseball field is surrounded by green trees",
    "many storage tanks are near a port with boats",
    "a bridge crosses a wide river",
    "some houses stand near a small pond",
]


def tiny_stage1_model() -> torch.nn.Module:
    """The tiny preset without its LM, dropout off (ranks draw their own masks), seeded so
    every process builds the same weights; stage 1's trainable parts."""
    cfg = OmegaConf.create(
        {
            "encoder": OmegaConf.load(CONF / "encoder/tiny.yaml"),
            "qformer": {**OmegaConf.load(CONF / "qformer/tiny.yaml"), "dropout": 0.0},
            "llm": None,
            "model": OmegaConf.load(CONF / "config.yaml").model,
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    set_trainable(model, list(OmegaConf.load(CONF / "stage/pretrain1.yaml").trainable))
    return model


def global_batch(step: int) -> dict:
    """The same 8 (image, caption) pairs at `step` whatever the process count."""
    gen = torch.Generator().manual_seed(1000 + step)
    order = torch.randperm(len(CAPTIONS), generator=gen).tolist()
    return {
        "image": torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=gen),
        "caption": [CAPTIONS[i] for i in order],
    }


def rank_batches(rank: int, world: int, micro: int):
    """`make_batches` for the trainer: this rank's slice of each global batch."""

    def make(epoch: int, skip: int):
        for step in range(skip, STEPS):
            batch = global_batch(step)
            rows = slice(rank * micro, (rank + 1) * micro)
            yield {"image": batch["image"][rows], "caption": batch["caption"][rows]}

    return make


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--zero", type=int, required=True)
    parser.add_argument("--micro", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    if args.micro * dist.world_size != GLOBAL_BATCH:
        raise SystemExit(f"--micro {args.micro} x {dist.world_size} processes != {GLOBAL_BATCH}")
    model = tiny_stage1_model()
    trainer = Trainer(
        model,
        hardware={
            "accelerator": "cpu",
            "zero_stage": args.zero,
            "precision": "fp32",
            "micro_batch_size": args.micro,
            "gradient_clipping": 1.0,
            "num_workers": 0,
        },
        optim={
            "lr": 1e-3,
            "end_lr": 1e-4,
            "warmup_steps": 0,
            "weight_decay": 0.05,
            "betas": [0.9, 0.999],
        },
        train={
            "epochs": 1,
            "max_steps": STEPS,
            "global_batch_size": GLOBAL_BATCH,
            "resume": "never",
            "log_every": 1,
            "save_every_steps": 0,
        },
        run_dir=args.out / "run",
        dist=dist,
    )
    trainer.fit(
        rank_batches(dist.rank, dist.world_size, args.micro),
        lambda m, batch: m(batch, objective="itc"),
        steps_per_epoch=STEPS,
        epochs=1,
    )
    weights = model_state(trainer.model, args.zero)  # collective under ZeRO-3
    if dist.is_main:
        torch.save(weights, args.out / "weights.pt")


if __name__ == "__main__":
    main()
