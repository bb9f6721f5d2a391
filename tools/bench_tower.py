r"""Time `stage=tower`'s training step at a run's sizes: per-sample CPU and wall time.

    python tools/bench_tower.py experiment=offline_rsicd paths.shards=SHARDS \
        --adapt-blocks 1 2 6 [--batch 256] [--steps 5] [--distinct 512]

Takes the overrides of `python -m bita.run` (encoder, stage.text_encoder, model sizes,
hardware.num_threads and hardware.autocast as the run uses them). For each cut it times the
step the stage runs on a cut-point feature cache: the units above the cut and the contrastive
head, forward, backward and AdamW, on cached activations of one batch of real training images,
with every caption's embedding already remembered. It also times the sentence encoder per
distinct caption, which the stage pays once per caption (RSICD's train split: 13.0 k distinct
captions of 43.7 k). CPU time counts every thread; on a shared machine it is the steadier of
the two figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_features import compose_config  # noqa: E402

from bita.data import stream  # noqa: E402
from bita.data.transforms import eval_transform  # noqa: E402
from bita.engine.distributed import apply_thread_count  # noqa: E402
from bita.models.tower_adaptation import build_tower_adaptation  # noqa: E402
from bita.models.trainable import set_trainable  # noqa: E402
from bita.stages.pipeline import effective_config  # noqa: E402

AUTOCAST = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_pairs(cfg, count: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """`count` training images (eval view) with one caption each, and every distinct caption
    of the split, read from the run's image shards."""
    transform = eval_transform(cfg.encoder.size, cfg.encoder.mean, cfg.encoder.std)
    batch = next(
        iter(
            stream.train_batches(
                cfg.dataset,
                split="train",
                batch_size=count,
                transform=transform,
                num_workers=0,
                seed=0,
                epoch=0,
            )
        )
    )
    distinct = sorted(
        {c for refs in stream.caption_groups(cfg.dataset, split="train") for c in refs}
    )
    return batch["image"], batch["caption"], distinct


def tower_config(cfg):
    """The run config as `stage=tower` sees it (its recipe inside a pipeline)."""
    stage = cfg.stage.recipes.tower if "recipes" in cfg.stage else cfg.stage
    return effective_config(cfg, stage, {}, None)


def timed(fn, repeats: int) -> tuple[float, float]:
    """CPU seconds (all threads) and wall seconds per call of `fn`, after one warm-up call."""
    fn()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.process_time() - cpu) / repeats, (time.perf_counter() - wall) / repeats


def bench_cut(cfg, adapt_blocks: int, images, captions, args) -> dict:
    with open_dict(cfg):
        cfg.encoder.adapt_blocks = adapt_blocks
    model = build_tower_adaptation(OmegaConf.to_container(cfg, resolve=True))
    set_trainable(model, model.adapted_names() + list(cfg.stage.trainable))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    features = model.encoder.bottom(images).to(torch.float16)  # as the cut cache stores them
    model.text_encoder(captions)  # remembered, as after the first epoch's steps
    dtype = AUTOCAST[cfg.hardware.get("autocast")]
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else nullcontext()

    def step() -> None:
        with autocast:
            loss = model({"features": features, "caption": captions})["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cpu, wall = timed(step, args.steps)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "adapt_blocks": adapt_blocks,
        "cut_activations": list(features.shape[1:]),
        "trained_parameters": trained,
        "step_cpu_ms_per_sample": 1000 * cpu / len(captions),
        "step_wall_ms_per_sample": 1000 * wall / len(captions),
    }


def bench_text(cfg, distinct: list[str], args) -> dict:
    with open_dict(cfg):
        cfg.encoder.adapt_blocks = 1
    text = build_tower_adaptation(OmegaConf.to_container(cfg, resolve=True)).text_encoder
    dtype = AUTOCAST[cfg.hardware.get("autocast")]
    timed_captions = distinct[: args.distinct + args.batch]
    chunks = [timed_captions[i : i + args.batch] for i in range(0, len(timed_captions), args.batch)]
    text(chunks[0])  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    with torch.autocast("cpu", dtype=dtype) if dtype else nullcontext():
        for chunk in chunks[1:]:
            text(chunk)
    n = sum(len(c) for c in chunks[1:])
    return {
        "text_cpu_ms_per_distinct_caption": 1000 * (time.process_time() - cpu) / n,
        "text_wall_ms_per_distinct_caption": 1000 * (time.perf_counter() - wall) / n,
        "distinct_captions_in_split": len(distinct),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapt-blocks", type=int, nargs="+", default=[1])
    parser.add_argument("--batch", type=int, default=256, help="pairs per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per cut")
    parser.add_argument("--distinct", type=int, default=1024, help="captions timed (+1 batch)")
    args, overrides = parser.parse_known_args(argv)
    cfg = tower_config(compose_config(overrides))
    apply_thread_count(cfg.hardware)
    torch.manual_seed(0)
    images, captions, distinct = training_pairs(cfg, args.batch)
    rows = [bench_cut(cfg, n, images, captions, args) for n in args.adapt_blocks]
    text = bench_text(cfg, distinct, args)
    settings = {
        "threads": torch.get_num_threads(),
        "autocast": cfg.hardware.get("autocast"),
        "batch": args.batch,
        "encoder": cfg.encoder.model,
    }
    for row in rows:
        print(
            f"adapt_blocks={row['adapt_blocks']:>2}  cut {row['cut_activations']}  "
            f"{row['trained_parameters'] / 1e6:.2f} M trained  "
            f"{row['step_cpu_ms_per_sample']:.2f} ms CPU / {row['step_wall_ms_per_sample']:.2f} ms "
            "wall per pair"
        )
    print(
        f"sentence encoder: {text['text_cpu_ms_per_distinct_caption']:.2f} ms CPU / "
        f"{text['text_wall_ms_per_distinct_caption']:.2f} ms wall per distinct caption "
        f"({text['distinct_captions_in_split']} distinct in the split)"
    )
    print(json.dumps({"settings": settings, "cuts": rows, "text": text}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
