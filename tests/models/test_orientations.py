"""Orientation averaging: every turn is undone by its inverse, a tower that follows the image's
orientation is left unchanged by averaging, and bad names are refused by field."""

import pytest
import torch
from torch.nn import functional as F

from bita.models.encoders import build_image_encoder
from bita.models.orientations import (
    ORIENTATIONS,
    average_over_orientations,
    check_orientations,
    turn_images,
    unturn_tokens,
)


def patch_tower(images: torch.Tensor) -> torch.Tensor:
    """Mean colour of each 4x4 patch as a token, after a global-mean "class" token: its grid
    turns exactly as the image does, so averaging over orientations must change nothing."""
    grid = F.avg_pool2d(images, 4).flatten(2).transpose(1, 2)
    return torch.cat([images.mean((2, 3)).unsqueeze(1), grid], dim=1)


def test_the_eight_orientations_are_distinct_and_each_is_undone():
    images = torch.randn(2, 3, 16, 16)
    turned = {name: turn_images(images, name) for name in ORIENTATIONS}
    assert len(ORIENTATIONS) == 8
    for a in ORIENTATIONS:
        for b in ORIENTATIONS:
            assert (a == b) == torch.equal(turned[a], turned[b]), (a, b)
    tokens = patch_tower(images)
    for name in ORIENTATIONS:
        back = unturn_tokens(patch_tower(turned[name]), name, grid_start=1)
        torch.testing.assert_close(back, tokens, rtol=0, atol=1e-6)


def test_averaging_a_tower_that_follows_the_image_changes_nothing():
    images = torch.randn(3, 3, 16, 16)
    calls = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return patch_tower(x)

    averaged = average_over_orientations(counted, images, ORIENTATIONS, grid_start=1)
    torch.testing.assert_close(averaged, patch_tower(images), rtol=0, atol=1e-6)
    assert calls == [3 * 8]  # one tower call for all views


def test_averaging_a_real_tower_is_the_mean_of_its_turned_back_views(compose):
    cfg = compose("tiny", "tiny", "tiny").encoder
    torch.manual_seed(0)
    plain = build_image_encoder(cfg)
    names = ["identity", "hflip", "rot90"]
    torch.manual_seed(0)
    averaging = build_image_encoder({**cfg, "orientations": names})
    images = torch.randn(2, 3, 64, 64)
    expected = torch.stack(
        [unturn_tokens(plain(turn_images(images, n)), n, grid_start=1) for n in names]
    ).mean(0)
    tokens = averaging(images)
    assert tokens.shape == (2, plain.num_tokens, plain.width)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tokens, plain(images), atol=1e-3)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], r"encoder.orientations: expected at least one"),
        ("hflip", r"encoder.orientations='hflip': expected a list, e.g. \[identity,hflip\]"),
        (["identity", "rotate90"], r"encoder.orientations: unknown \['rotate90'\]; expected"),
        (["hflip", "hflip"], r"each orientation may appear once"),
    ],
)
def test_bad_orientation_lists_are_refused_by_field(names, message):
    with pytest.raises(ValueError, match=message):
        check_orientations(names)


def test_a_grid_that_is_not_square_is_refused():
    with pytest.raises(ValueError, match="square token grid, got 6"):
        unturn_tokens(torch.zeros(1, 6, 4), "hflip", grid_start=0)
