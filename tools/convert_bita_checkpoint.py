"""Convert the BITA authors' released checkpoints (LAVIS .pth) to this project's names and back.

    python tools/convert_bita_checkpoint.py to-bita   AUTHORS.pth      model.safetensors
    python tools/convert_bita_checkpoint.py to-official model.safetensors AUTHORS_LAYOUT.pth

`to-bita` writes a state dict that `BITA.load_checkpoint_state_dict` loads (put it as
`model.safetensors` in a checkpoint folder whose config.yaml selects encoder=clip_vit_l14
qformer=ift_base llm=opt_2.7b). Keys that do not map are an error listing them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bita.errors import reports_user_errors
from bita.models.official import from_official, read_official, to_official


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("direction", choices=["to-bita", "to-official"])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.direction == "to-bita":
        state = from_official(read_official(args.source))
        save_file({k: v.contiguous() for k, v in state.items()}, args.target)
    else:
        state = to_official(load_file(args.source))
        torch.save({"model": state}, args.target)
    print(f"{args.direction}: wrote {len(state)} tensors to {args.target}")


if __name__ == "__main__":
    main()
