import math

import pytest
import torch

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
