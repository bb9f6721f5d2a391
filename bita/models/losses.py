"""Image–text contrastive loss (SPEC §2), correct with or without torch.distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_batch(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' batches concatenated, and this rank's offset in it.

    The gather carries gradients: in the backward, each rank's gradient for a slice goes back
    to the rank that owns it and is summed there. A sample is a negative in every rank's rows,
    so without this its gradient would miss those terms, and N processes would not train as one
    process on their concatenated batch (the authors' gather, like BLIP-2's, has no gradient).
    One process (no process group) returns `x` unchanged, so stage 1 runs outside distributed
    mode (an authors' defect)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGradient.apply(x), dist.get_rank() * x.shape[0]


class _GatherWithGradient(torch.autograd.Function):
    """`all_gather` of equal-sized batches, concatenated; the backward sums the gradient of the
    whole concatenation over ranks and hands each rank the slice of its own samples.
    (`torch.distributed.nn.all_gather` is deprecated, and on gloo its backward failed the
    two-process test in tests/models/test_losses.py.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def contrastive_loss(
    image_feats: torch.Tensor, text_feats: torch.Tensor, temp: torch.Tensor, label_smoothing: float
) -> dict[str, torch.Tensor]:
    """ITC over L2-normalised query features [B, Q, E] and text features [B, E].

    A pair's similarity is the best-matching query's dot product, divided by `temp`. Negatives
    are every other pair on every rank, including other captions of the same image.

    Similarities are computed in fp32 whatever the autocast: at temperature 0.07, bf16 logits
    (about 14 at most) fall on a grid of 0.0625, coarser than the differences the loss ranks."""
    with torch.autocast(device_type=image_feats.device.type, enabled=False):
        image_feats, text_feats, temp = image_feats.float(), text_feats.float(), temp.float()
        all_images, offset = gather_batch(image_feats)
        all_texts, _ = gather_batch(text_feats)
        sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, all_texts).amax(-1) / temp
        sim_t2i = torch.einsum("be,nqe->bnq", text_feats, all_images).amax(-1) / temp
        targets = torch.arange(image_feats.shape[0], device=image_feats.device) + offset
        loss = (
            F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)
        ) / 2
    hits = (sim_i2t.argmax(-1) == targets).float().mean() + (
        sim_t2i.argmax(-1) == targets
    ).float().mean()
    return {"loss": loss, "acc": hits.detach() / 2}
