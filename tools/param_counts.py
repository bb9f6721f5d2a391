"""Print parameter counts of a model preset, built with random weights on the meta device.

    python tools/param_counts.py                                   # paper scale
    python tools/param_counts.py --encoder effnet_lite0 --qformer ift_small --llm small

No weights are downloaded and no memory is allocated, so paper scale runs on any machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from bita.models.build import count_parameters

CONF = Path(__file__).resolve().parents[1] / "conf"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="clip_vit_l14")
    parser.add_argument("--qformer", default="ift_base")
    parser.add_argument("--llm", default="opt_2.7b")
    parser.add_argument(
        "--llm-vocab",
        type=int,
        default=4096,
        help="vocabulary of an LM whose config takes it from its tokenizer",
    )
    args = parser.parse_args(argv)
    cfg = {
        g: OmegaConf.load(CONF / g / f"{getattr(args, g)}.yaml")
        for g in ("encoder", "qformer", "llm")
    }
    cfg["llm"].config.setdefault("vocab_size", args.llm_vocab)
    for part, count in count_parameters(cfg).items():
        print(f"{part:16s} {count / 1e6:10.1f} M")


if __name__ == "__main__":
    main()
