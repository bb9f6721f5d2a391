"""The training transform follows the run's `augment` setting (SPEC §2 crop + flip, or the
eval view)."""

import torch
from PIL import Image

from bita.data.transforms import eval_transform, training_transform

SIZE, MEAN, STD = 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def picture() -> Image.Image:
    pixels = torch.arange(48 * 64 * 3, dtype=torch.int64).reshape(48, 64, 3) % 251
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def test_without_augment_training_images_get_the_eval_view():
    train = training_transform(SIZE, MEAN, STD, augment=False)
    expected = eval_transform(SIZE, MEAN, STD)(picture())
    for seed in range(3):
        torch.manual_seed(seed)
        torch.testing.assert_close(train(picture()), expected)


def test_with_augment_training_images_are_random_crops():
    train = training_transform(SIZE, MEAN, STD, augment=True)
    torch.manual_seed(0)
    first = train(picture())
    torch.manual_seed(1)
    assert first.shape == (3, SIZE, SIZE)
    assert not torch.equal(first, train(picture()))
