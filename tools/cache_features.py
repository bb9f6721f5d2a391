r"""Run the frozen image tower once over a shard set and write its frozen-feature cache.

    python tools/cache_features.py encoder=effnet_lite0 dataset=rsicd \
        paths.shards=/tmp/bita_shards features.root=/tmp/bita_features features.views=2

Takes the overrides of `python -m bita.run` (composed from conf/ the same way), so the cache's
fingerprint matches the runs given the same encoder and features settings; then train with
`python -m bita.run ... features.root=/tmp/bita_features features.views=2`. Writes
<features.root>/<source>/<split>/*.tar and <features.root>/<source>/manifest.json for every
source of the dataset (layout and format: bita.data.features). Reruns skip finished image
shards; an up-to-date cache is left as is. The tower runs on CUDA when hardware.accelerator is
cuda (or auto with a GPU visible), decoding uses hardware.num_workers workers.

A tower with random or project-trained weights (encoder.in_checkpoint=true, or adapted by
stage=tower) matches a run only with the same weights: pass init_from=CHECKPOINT_DIR to take the
tower (its config and weights) from that checkpoint. Bad settings and missing inputs end in one
line naming them.

For stage=tower, cache the activations at the cut instead (features.activations=cut, with the
run's encoder.adapt_blocks): the tower stage then runs only the units above the cut per step,
and ends by deriving the adapted tower's tokens cache from this one for the later stages.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from bita.data.cache_writer import CacheOptions, cache_features
from bita.engine.distributed import apply_thread_count
from bita.errors import reports_user_errors
from bita.locations import resolve_location
from bita.run import compose_config
from bita.stages.features import build_tower


def pick_device(accelerator: str) -> str:
    """cuda or cpu from hardware.accelerator (cpu | cuda | auto)."""
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise SystemExit("hardware.accelerator=cuda but no CUDA device is visible")
    if accelerator not in ("cpu", "cuda", "auto"):
        raise SystemExit(f"hardware.accelerator={accelerator!r}: expected cpu, cuda or auto")
    return "cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu"


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = compose_config(argv)
    apply_thread_count(cfg.hardware)
    if not cfg.features.root:
        raise SystemExit("features.root=FOLDER is required: where the cache is written")
    root = Path(resolve_location(str(cfg.features.root)))
    options = CacheOptions.from_run_config(cfg, pick_device(str(cfg.hardware.accelerator)))
    start = time.perf_counter()
    manifests = cache_features(cfg.dataset, cfg.encoder, build_tower(cfg), root, options)
    seconds = time.perf_counter() - start
    for source, manifest in manifests.items():
        for split, entry in manifest["splits"].items():
            size = sum((root / source / s["file"]).stat().st_size for s in entry["shards"])
            print(
                f"{source}/{split}: {entry['images']} images x {entry['views']} views "
                f"({entry['role']}), {entry['captions']} captions, {len(entry['shards'])} "
                f"shards, {size / 1e6:.1f} MB, {len(entry['skipped'])} skipped"
            )
        print(f"{root / source / 'manifest.json'}: fingerprint {manifest['fingerprint']}")
    print(f"done in {seconds:.1f} s on {options.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
