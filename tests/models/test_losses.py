import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bita.engine.distributed import free_port
from bita.models.losses import contrastive_loss, gather_batch

# three images with two query features each, three captions; unit vectors in 2-D
IMAGES = [[(1.0, 0.0), (0.0, 1.0)], [(0.6, 0.8), (-1.0, 0.0)], [(0.0, -1.0), (0.8, 0.6)]]
TEXTS = [(1.0, 0.0), (0.0, 1.0), (0.6, -0.8)]
TEMP, SMOOTHING = 0.5, 0.1


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def _smoothed_ce(row, target):
    log_z = math.log(sum(math.exp(v) for v in row))
    logp = [v - log_z for v in row]
    return -(1 - SMOOTHING) * logp[target] - SMOOTHING / len(row) * sum(logp)


def _hand_loss():
    i2t = [[max(_dot(q, t) for q in img) / TEMP for t in TEXTS] for img in IMAGES]
    t2i = [[max(_dot(q, t) for q in img) / TEMP for img in IMAGES] for t in TEXTS]
    rows = [_smoothed_ce(i2t[i], i) for i in range(3)] + [_smoothed_ce(t2i[i], i) for i in range(3)]
    return (sum(rows[:3]) / 3 + sum(rows[3:]) / 3) / 2


def test_itc_matches_hand_computed_3x3():
    out = contrastive_loss(torch.tensor(IMAGES), torch.tensor(TEXTS), torch.tensor(TEMP), SMOOTHING)
    # max-over-queries similarities: i2t rows [1,1,.6] [.6,.8,-.28] [.8,.6,.8]
    assert _hand_loss() == pytest.approx(0.865123, abs=1e-5)
    assert out["loss"].item() == pytest.approx(_hand_loss(), abs=1e-6)
    # i2t: image 2 ties text 0 and 2 (argmax → 0, a miss), image 0 ties 0/1 (hit); t2i: 2 of 3
    assert out["acc"].item() == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_gather_without_process_group_is_identity():
    x = torch.randn(4, 3, requires_grad=True)
    gathered, offset = gather_batch(x)
    assert gathered is x and offset == 0


def test_itc_similarities_are_fp32_under_bf16_autocast():
    """Under bf16 autocast the loss must be the fp32 one. Fails on similarities computed in the
    autocast dtype: at temperature 0.07 bf16 logits fall on a 0.0625 grid."""
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(16, 4, 32), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    temp = torch.tensor(0.07)
    fp32 = contrastive_loss(images, texts, temp, SMOOTHING)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = contrastive_loss(images, texts, temp, SMOOTHING)["loss"]
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, fp32, rtol=0, atol=1e-6)


def _itc_rank(rank: int, world: int, port: int, inputs: dict, out: str) -> None:
    """One rank of data-parallel ITC: its slice of the batch through a shared projection,
    the loss, the backward, and the gradient averaged over ranks as DeepSpeed averages it."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        proj = _projection(inputs["proj"])
        rows = slice(rank * 4, rank * 4 + 4)
        images = inputs["images"][rows].clone().requires_grad_()
        texts = inputs["texts"][rows].clone().requires_grad_()
        loss = _projected_itc(proj, images, texts)
        loss.backward()
        for param in proj.parameters():
            dist.all_reduce(param.grad)
            param.grad /= world
        result = {
            "loss": loss.detach(),
            "proj": {n: p.grad for n, p in proj.named_parameters()},
            "images": images.grad,
            "texts": texts.grad,
        }
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _projection(state: dict) -> torch.nn.Linear:
    proj = torch.nn.Linear(6, 5)
    proj.load_state_dict(state)
    return proj


def _projected_itc(proj, images, texts) -> torch.Tensor:
    normalize = torch.nn.functional.normalize
    image_feats, text_feats = normalize(proj(images), dim=-1), normalize(proj(texts), dim=-1)
    return contrastive_loss(image_feats, text_feats, torch.tensor(0.1), SMOOTHING)["loss"]


def test_two_process_itc_equals_one_process_on_the_concatenated_batch(tmp_path):
    """Two gloo ranks of 4 samples each against one process of all 8: the ranks' mean loss is
    the one-process loss, and the gradients data parallelism applies (summed back to the rank
    that owns each sample, averaged over ranks) are the one-process gradients. Fails on a
    gather without gradient (the authors'), which drops every term where a sample is a
    negative in another rank's rows."""
    torch.manual_seed(0)
    inputs = {
        "images": torch.randn(8, 3, 6),
        "texts": torch.randn(8, 6),
        "proj": torch.nn.Linear(6, 5).state_dict(),
    }
    mp.spawn(_itc_rank, args=(2, free_port(), inputs, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    proj = _projection(inputs["proj"])
    images = inputs["images"].clone().requires_grad_()
    texts = inputs["texts"].clone().requires_grad_()
    loss = _projected_itc(proj, images, texts)
    loss.backward()
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach())
    for name, param in proj.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["proj"][name], param.grad)
    for r, rank in enumerate(ranks):  # each rank's samples: its gradient, averaged over 2 ranks
        rows = slice(r * 4, r * 4 + 4)
        torch.testing.assert_close(rank["images"] / 2, images.grad[rows])
        torch.testing.assert_close(rank["texts"] / 2, texts.grad[rows])
