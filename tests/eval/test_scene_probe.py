"""The scene probe (bita/eval/scene_probe.py): a diagnostic that must tell features carrying the
class from features that do not, and score only classes it was trained on."""

import pytest
import torch

from bita.eval.baselines import SplitFeatures
from bita.eval.scene_probe import scene_probe_accuracy

CLASSES = ["beach", "forest", "river", "desert"]


def features(scenes: list[str], informative: bool, seed: int) -> SplitFeatures:
    """One-hot class directions plus noise (informative), or noise alone."""
    generator = torch.Generator().manual_seed(seed)
    noise = 0.3 * torch.randn(len(scenes), 8, generator=generator)
    signal = torch.zeros(len(scenes), 8)
    if informative:
        for row, scene in enumerate(scenes):
            signal[row, CLASSES.index(scene)] = 1.0
    n = len(scenes)
    return SplitFeatures([f"i{i}" for i in range(n)], signal + noise, [["x"]] * n, scenes)


TRAIN_SCENES = ["beach", "forest", "river"] * 20
QUERY_SCENES = ["beach", "forest", "river"] * 5 + ["desert"] * 4  # desert is not in train


def test_the_probe_reads_the_class_only_where_the_features_carry_it():
    informative = scene_probe_accuracy(
        features(TRAIN_SCENES, True, 0), features(QUERY_SCENES, True, 1)
    )
    noise = scene_probe_accuracy(features(TRAIN_SCENES, False, 0), features(QUERY_SCENES, False, 1))
    assert informative["images"] == 15  # the four desert images are left out
    assert all(accuracy == 1.0 for accuracy in informative["accuracy"].values())
    assert all(accuracy < 0.75 for accuracy in noise["accuracy"].values())


def test_a_query_split_without_known_classes_is_refused():
    with pytest.raises(ValueError, match="no query image has a scene class seen in train"):
        scene_probe_accuracy(features(TRAIN_SCENES, True, 0), features(["desert"] * 3, True, 1))
