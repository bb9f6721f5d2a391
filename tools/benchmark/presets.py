"""What is benchmarked: the phases, the presets (config groups, batch sizes, targets) and
the captions both stacks are fed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

PHASES = (
    "pretrain1",
    "pretrain2",
    "pretrain2_cached",
    "caption",
    "caption_eager",
    "caption_transformers",
)
# our captioning phases besides "caption", and the decode settings that make each
CAPTION_LOOPS = {
    "caption_eager": {"beam_loop": "bita", "cuda_graph": False},
    "caption_transformers": {"beam_loop": "transformers"},
}
IGNORE_INDEX = -100
BEAMS = 5
Step = Callable[[], None]

# Remote-sensing-like captions, as long as the longer RSICD ones: the padded LM text is then
# about 30 tokens, the length gpu_reference.py feeds its stacks.
CAPTIONS = (
    "many buildings and some green trees are around a playground with a red track and a green "
    "football field in the middle of a dense residential area",
    "several large white storage tanks stand in rows beside a wide road next to some factory "
    "buildings with grey roofs and a few green trees",
    "a long bridge crosses a wide river with dark green water and many cars are on the bridge "
    "while some boats are parked near the bank",
    "an airport with two long runways and several planes parked near the terminal building "
    "surrounded by bare land and some roads",
    "dense green trees surround a small pond with dark water and a narrow road passes near it "
    "with several houses on the other side",
    "many cars are parked in neat rows in a large parking lot beside a commercial building with "
    "a flat white roof and some trees",
    "a baseball field with a brown diamond is located next to several tennis courts and a "
    "parking lot surrounded by green trees and houses",
    "a harbour with many white boats moored along the piers is next to a road lined with "
    "buildings and a few green trees",
    "a church with a tall tower and a grey roof stands in a square surrounded by old buildings "
    "and several narrow streets with some cars",
    "the farmland is divided into many rectangular fields of different colours with a few "
    "houses and a small road crossing them",
    "a railway station with several parallel tracks and long platforms lies beside a large "
    "building and a road with many cars",
    "some sparse trees and bushes are scattered over the yellow bare desert with a few dunes "
    "and a narrow path winding through the sand",
    "a large stadium with a green football field and red seats is surrounded by parking lots "
    "roads and many tall buildings in a city",
    "white waves break on a long sandy beach next to the blue sea and a row of buildings with "
    "a road runs along the coast",
    "an industrial area with many large factories with blue and white roofs is crossed by "
    "roads and has some bare land and trees",
    "a meandering river flows through a green forest with dense trees and a small bridge "
    "crosses the river near a few houses",
)


@dataclass(frozen=True)
class Preset:
    """One benchmark size: config groups, per-phase batch sizes, iteration counts, targets.

    `targets` maps a figure's key in the JSON (`ours.<phase>` in images/s or
    `ratio.<phase>` = ours/theirs) to the minimum the issue asks for."""

    groups: dict[str, str]
    overrides: tuple[str, ...]
    device: str
    batch: dict[str, int]
    warmup: int
    iters: int
    targets: dict[str, float]
    reference: dict[str, float] = field(default_factory=dict)


def caption_batches(size: int) -> dict[str, int]:
    return {"caption": size, **dict.fromkeys(CAPTION_LOOPS, size)}


def cpu_preset(**groups: str) -> Preset:
    """A CPU preset at equal sizes for both stacks; target: stage 2 at 1.5x BLIP-2's speed."""
    return Preset(
        groups={**groups, "hardware": "cpu"},
        overrides=(),
        device="cpu",
        batch={"pretrain1": 16, "pretrain2": 16, "pretrain2_cached": 16, **caption_batches(8)},
        warmup=1,
        iters=3,
        targets={"ratio.pretrain2": 1.5},
    )


PRESETS = {
    "tiny": cpu_preset(encoder="tiny", qformer="tiny", llm="tiny"),
    "small": cpu_preset(encoder="effnet_lite0", qformer="ift_small", llm="small"),
    "paper": Preset(
        groups={
            "encoder": "clip_vit_l14",
            "qformer": "ift_base",
            "llm": "opt_2.7b",
            "hardware": "gpu",
        },
        # random weights: nothing to download, and the GPU machine is offline
        overrides=("encoder.pretrained=null", "qformer.init_from=null", "llm.pretrained=null"),
        device="cuda",
        batch={"pretrain1": 256, "pretrain2": 64, "pretrain2_cached": 64, **caption_batches(32)},
        warmup=2,
        iters=5,
        targets={"ours.pretrain1": 2000.0, "ours.pretrain2": 700.0, "ours.caption": 250.0},
        # transformers' stacks on one H100, bf16 (../shared/bench/gpu_reference.py)
        reference={"pretrain2": 423.0, "caption": 72.5},
    ),
}
