"""Training and captioning throughput of BITA beside transformers' BLIP-2 at the same sizes.

Users ask how fast it trains before anything else (issue 6), and a number alone says little:
so one process builds our model from the Hydra config groups and transformers'
`Blip2ForConditionalGeneration` at the same sizes (image tower width/depth, query-module
width/depth/queries, the same OPT), feeds both the same random images and captions, and times
them the same way: warm-up iterations, then the median of timed ones (synchronised on CUDA).

Phases (images/s):
  pretrain1  our stage-1 step (ITC): forward + backward + AdamW on the stage's trainable params
  pretrain2  our stage-2 step (prefix LM) and BLIP-2's (frozen tower and LM, Q-Former trains)
  pretrain2_cached  our stage-2 step reading the frozen tower's fp16 output as the feature
             cache (tools/cache_features.py) serves it, so the tower does not run; beside
             BLIP-2's stage-2 step again (it has no such cache): what a user of each gets
  caption    beam 5, exactly `--new-tokens` new tokens (min = max), from pixels to text: our
             beam loop (decode.beam_loop=bita: beams share the visual-prefix cache; on CUDA each
             token's step replays a CUDA graph) beside BLIP-2's `generate`
  caption_eager  ours, the same loop with decode.cuda_graph=false (CUDA only)
  caption_transformers  ours through transformers' beam search (decode.beam_loop=transformers):
             what the loop itself gains, same model, same captions

    python tools/bench.py --preset tiny                                   # seconds, CPU
    python tools/bench.py --preset small                                  # EfficientNet-Lite0, CPU
    python tools/bench.py --preset paper --device cuda --json bench.json  # ViT-L/14, OPT-2.7B
    python tools/bench.py --preset small --profile profile.txt            # where the time goes

Weights are random at paper scale (no downloads) and tokenizers are trained on the bench's own
captions, so it runs offline anywhere. Precision follows the `hardware` config group the trainer
uses (parameter dtypes per component, autocast), applied to both stacks alike. The last line of
stdout is one JSON object with every figure (also written to `--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

# the benchmark package beside this file, also when the file is loaded by its path (tests)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark.config import Precision, bench_tokenizers, compose_config, stage_patterns  # noqa: E402
from benchmark.flops import (  # noqa: E402
    caption_flops,
    lm_step_flops,
    our_flop_shape,
    their_flop_shape,
)
from benchmark.models import build_ours, build_theirs, their_spec  # noqa: E402
from benchmark.presets import BEAMS, CAPTION_LOOPS, PHASES, PRESETS, Preset  # noqa: E402
from benchmark.report import report, table  # noqa: E402
from benchmark.steps import (  # noqa: E402
    make_inputs,
    our_caption,
    our_train_step,
    their_caption,
    their_train_step,
)
from benchmark.timing import Bench, release  # noqa: E402

from bita.models.trainable import set_trainable  # noqa: E402


@dataclass(frozen=True)
class Settings:
    """One benchmark run as asked on the command line."""

    preset_name: str
    device: torch.device
    batch: dict[str, int]
    warmup: int
    iters: int
    new_tokens: int
    peak_tflops: float
    profile: Path | None = None

    @property
    def preset(self) -> Preset:
        return PRESETS[self.preset_name]


def run(settings: Settings) -> dict[str, Any]:
    """Build, time and report every phase; see the module docstring."""
    device, batch, new_tokens = settings.device, settings.batch, settings.new_tokens
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    load_before = os.getloadavg()[0]
    bench = Bench(device, settings.warmup, settings.iters, settings.profile)
    flops: dict[str, dict[str, float]] = {"ours": {}, "theirs": {}}
    with tempfile.TemporaryDirectory(prefix="bita-bench-") as tmp:
        cfg = compose_config(settings.preset, bench_tokenizers(Path(tmp)))
        precision = Precision.from_cfg(cfg.hardware)

        ours = build_ours(cfg, device, precision, with_llm=False)
        set_trainable(ours, stage_patterns(cfg, "pretrain1"))
        size = ours.preprocess.size
        flops["ours"]["pretrain1"] = ours.flops_per_sample("itc")
        itc = make_inputs(batch["pretrain1"], size, device)
        bench.measure(
            "pretrain1",
            batch["pretrain1"],
            {"ours": partial(our_train_step, ours, "itc", itc, device, precision)},
        )
        del ours
        release(device)

        ours = build_ours(cfg, device, precision, with_llm=True)
        set_trainable(ours, stage_patterns(cfg, "pretrain2"))
        spec = their_spec(ours)
        theirs = build_theirs(spec, device, precision)
        shape = our_flop_shape(ours)
        their_shape = their_flop_shape(theirs, shape)
        flops["ours"]["pretrain2"] = ours.flops_per_sample("lm")
        flops["theirs"]["pretrain2"] = lm_step_flops(their_shape)
        flops["ours"]["pretrain2_cached"] = lm_step_flops(shape, tower=False)
        flops["theirs"]["pretrain2_cached"] = flops["theirs"]["pretrain2"]
        for side, s in (("ours", shape), ("theirs", their_shape)):
            flops[side]["caption"] = caption_flops(s, BEAMS, new_tokens)
        for phase in CAPTION_LOOPS:
            flops["ours"][phase] = flops["ours"]["caption"]

        lm = make_inputs(batch["pretrain2"], size, device)
        lm_batch = ours.llm.tokenize_captions(lm.captions, "", ours.settings.max_lm_tokens)
        bench.measure(
            "pretrain2",
            batch["pretrain2"],
            {
                "ours": partial(our_train_step, ours, "lm", lm, device, precision),
                "theirs": partial(their_train_step, theirs, lm_batch, lm, spec, device, precision),
            },
        )
        bench.measure(
            "pretrain2_cached",
            batch["pretrain2_cached"],
            {
                "ours": partial(our_train_step, ours, "lm", lm, device, precision, cached=True),
                "theirs": partial(their_train_step, theirs, lm_batch, lm, spec, device, precision),
            },
        )
        captions = make_inputs(batch["caption"], size, device)
        bench.measure(
            "caption",
            batch["caption"],
            {
                "ours": partial(our_caption, ours, captions, new_tokens, device, precision),
                "theirs": partial(their_caption, theirs, captions, new_tokens, device, precision),
            },
        )
        for phase, loop in CAPTION_LOOPS.items():
            if loop.get("cuda_graph") is False and device.type != "cuda":
                continue  # without CUDA there is no graph to leave out: "caption" measured it
            step = partial(our_caption, ours, captions, new_tokens, device, precision, **loop)
            bench.measure(phase, batch[phase], {"ours": step})
        del ours, theirs
        release(device)

    result = report(settings, precision, bench, flops, lm_tokens=lm_batch[0].shape[1])
    result["cpu_load_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: the preset's")
    parser.add_argument(
        "--batch", type=int, help="one batch size for every phase (default: the preset's)"
    )
    parser.add_argument(
        "--iters", type=int, help="timed iterations per phase (default: the preset's)"
    )
    parser.add_argument(
        "--warmup", type=int, help="untimed iterations first (default: the preset's)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's; 1 is steadier on a CPU shared with others)",
    )
    parser.add_argument("--new-tokens", type=int, default=20, help="caption length (min = max)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="device peak for MFU (default: H100 SXM bf16 dense)",
    )
    parser.add_argument("--json", type=Path, help="also write the JSON result to this file")
    parser.add_argument(
        "--profile",
        type=Path,
        help="append each side's busiest operators per phase (torch.profiler) to this file; "
        "on CUDA the profiler slows the launch-bound phases timed after it, so take figures "
        "from a run without it",
    )
    args = parser.parse_args(argv)
    for name in ("batch", "iters", "threads", "new_tokens", "peak_tflops"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    device = torch.device(args.device or preset.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda asked for, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(
        preset_name=args.preset,
        device=device,
        batch={p: args.batch or preset.batch[p] for p in PHASES},
        warmup=preset.warmup if args.warmup is None else args.warmup,
        iters=args.iters or preset.iters,
        new_tokens=args.new_tokens,
        peak_tflops=args.peak_tflops,
        profile=args.profile,
    )
    result = run(settings)
    print(table(result))
    line = json.dumps(result, sort_keys=False)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")
    print(line, flush=True)
    return 1 if result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
