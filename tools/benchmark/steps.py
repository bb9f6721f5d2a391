"""The timed work: one training step or one captioning call of each stack, as a closure."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import Precision
from .models import TheirSpec
from .presets import BEAMS, CAPTIONS, IGNORE_INDEX, Step


@dataclass
class Inputs:
    images: torch.Tensor
    captions: list[str]


def make_inputs(batch: int, size: int, device: torch.device, seed: int = 0) -> Inputs:
    """Random normalised images of the tower's size and captions drawn from CAPTIONS."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    rng = random.Random(seed)
    return Inputs(images, [rng.choice(CAPTIONS) for _ in range(batch)])


def train_step(
    loss_fn: Callable[[], torch.Tensor],
    params: list[nn.Parameter],
    device: torch.device,
    precision: Precision,
) -> Step:
    """Forward + backward + AdamW step on `params` (the only trainable ones)."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        with precision.context(device):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def our_train_step(
    model: nn.Module,
    objective: str,
    inputs: Inputs,
    device: torch.device,
    precision: Precision,
    *,
    cached: bool = False,
) -> Step:
    """`cached`: the step reads the tower's output stored as fp16, as from the feature cache."""
    batch = {
        "caption": inputs.captions,
        "image_id": [f"bench_{i}" for i in range(len(inputs.captions))],
    }
    if cached:
        with torch.no_grad(), precision.context(device):
            batch["features"] = model.encode_images(inputs.images).half()
    else:
        batch["image"] = inputs.images
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return train_step(lambda: model(batch, objective=objective)["loss"], params, device, precision)


def their_train_step(
    blip: nn.Module,
    lm_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    inputs: Inputs,
    spec: TheirSpec,
    device: torch.device,
    precision: Precision,
) -> Step:
    """BLIP-2's stage-2 step on the same captions, tokenised by our LM tokenizer beforehand
    (BLIP-2's processor does that in the data loader; ours tokenises inside forward)."""
    ids, mask, labels = lm_batch
    rows, queries = ids.shape[0], spec.num_queries
    input_ids = torch.cat([torch.full((rows, queries), spec.image_token), ids], 1).to(device)
    attention = torch.cat([torch.ones(rows, queries, dtype=mask.dtype), mask], 1).to(device)
    targets = torch.cat([torch.full((rows, queries), IGNORE_INDEX), labels], 1).to(device)
    blip.train()
    params = [p for p in blip.parameters() if p.requires_grad]

    def loss() -> torch.Tensor:
        out = blip(
            pixel_values=inputs.images,
            input_ids=input_ids,
            attention_mask=attention,
            labels=targets,
        )
        return out.loss

    return train_step(loss, params, device, precision)


def our_caption(
    model: nn.Module,
    inputs: Inputs,
    new_tokens: int,
    device: torch.device,
    precision: Precision,
    **loop: Any,
) -> Step:
    """Our captioning; `loop` = `decode.beam_loop` / `decode.cuda_graph` (default: the config's)."""
    model.eval()

    def run() -> None:
        with torch.no_grad(), precision.context(device):
            model.generate(
                model.image_tokens(images=inputs.images),
                prompt="",
                num_beams=BEAMS,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                length_penalty=1.0,
                repetition_penalty=1.0,
                do_sample=False,
                top_p=1.0,
                temperature=1.0,
                **loop,
            )

    return run


def their_caption(
    blip: nn.Module, inputs: Inputs, new_tokens: int, device: torch.device, precision: Precision
) -> Step:
    blip.eval()

    def run() -> None:
        with torch.no_grad(), precision.context(device):
            blip.generate(
                pixel_values=inputs.images,
                num_beams=BEAMS,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )

    return run
