"""Reference floors (bita.eval.baselines, tools/baselines.py) on a hand-made split whose kNN and
oracle captions are known in advance, and the command line on the bundled mini sample."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bita.eval.baselines import (
    SplitFeatures,
    class_oracle_captions,
    consensus_caption,
    knn_captions,
)
from bita.eval.cider_reward import CiderReward

TOOL = Path(__file__).resolve().parents[2] / "tools" / "baselines.py"

BEACH = "a yellow beach next to the blue sea"
FOREST = "many green trees in a dense forest"
RIVER = "a river runs through green fields"


def unit(*xy: float) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(xy), dim=0)


def split(rows: list[tuple[str, tuple[float, float], list[str]]]) -> SplitFeatures:
    return SplitFeatures(
        image_ids=[f"img{i}" for i in range(len(rows))],
        features=torch.stack([unit(*xy) for _, xy, _ in rows]),
        references=[refs for _, _, refs in rows],
        scenes=[scene for scene, _, _ in rows],
    )


# Two tight clusters of train images; in each, one caption is shared by most images (the
# consensus), the others differ. A third class sits far from both.
TRAIN = split(
    [
        ("beach", (1.0, 0.05), [BEACH, "white waves on a beach", BEACH]),
        ("beach", (1.0, 0.0), [BEACH, "the sea is blue", "a beach"]),
        ("beach", (1.0, -0.05), [BEACH, "sand and sea"]),
        ("forest", (0.05, 1.0), [FOREST, "a forest", FOREST]),
        ("forest", (0.0, 1.0), [FOREST, "dark green trees"]),
        ("forest", (-0.05, 1.0), [FOREST, "trees and a road"]),
        ("river", (-1.0, -1.0), [RIVER, "a river"]),
    ]
)
# The last query is a beach that looks like a forest: retrieval follows the looks, the oracle
# the true class.
QUERY = split(
    [
        ("beach", (1.0, 0.02), ["a beach and the sea"]),
        ("forest", (0.01, 1.0), ["a forest with trees"]),
        ("beach", (0.02, 1.0), ["a beach seen from above"]),
    ]
)


def test_knn_picks_the_consensus_of_the_nearest_train_images():
    captions = knn_captions(TRAIN, QUERY, CiderReward(TRAIN.references), k=3)
    assert captions == {"img0": BEACH, "img1": FOREST, "img2": FOREST}


def test_class_oracle_gives_each_true_class_its_consensus_caption():
    captions = class_oracle_captions(TRAIN, QUERY, CiderReward(TRAIN.references))
    assert captions == {"img0": BEACH, "img1": FOREST, "img2": BEACH}


def test_consensus_counts_repeats_and_keeps_the_first_on_ties():
    reward = CiderReward(TRAIN.references)
    assert consensus_caption([RIVER, FOREST, FOREST], reward) == FOREST
    assert consensus_caption(["a b", "c d"], reward) == "a b"  # nothing shared: a tie
    assert consensus_caption([RIVER], reward) == RIVER


def test_bad_input_is_named():
    reward = CiderReward(TRAIN.references)
    with pytest.raises(ValueError, match="k=8"):
        knn_captions(TRAIN, QUERY, reward, k=8)
    unknown = split([("desert", (1.0, 0.0), ["sand"])])
    with pytest.raises(ValueError, match="desert"):
        class_oracle_captions(TRAIN, unknown, reward)


def test_command_line_prints_both_floors_and_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("tools_baselines", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "floors.json"

    assert tool.main(["experiment=tiny", "--k", "5", "--json", str(out)]) == 0

    printed = capsys.readouterr().out
    assert (
        "| kNN retrieval, k=5 (rsicd val) |" in printed
        and "| class oracle (rsicd val) |" in printed
    )
    summary = json.loads(out.read_text())
    assert summary["images"] == {"train": 62, "val": 31} and summary["k"] == 5
    oracle = summary["floors"]["class_oracle"]
    assert oracle["distinct_captions"] == 31  # one caption per scene class of the sample
    knn = summary["floors"]["knn"]
    assert len(knn["captions"]) == 31 and 0 < knn["metrics"]["CIDEr"] < oracle["metrics"]["CIDEr"]


def test_command_line_adds_caption_aligned_knn_and_the_scene_probe(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("tools_baselines", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "floors.json"

    assert (
        tool.main(["experiment=tiny", "--k", "5", "--json", str(out), "--aligned", "--probe"]) == 0
    )

    printed = capsys.readouterr().out
    assert "| kNN retrieval, caption-aligned keys, k=5 (rsicd val) |" in printed
    assert "scene probe on 31 val images of train classes: C=0.1:" in printed
    summary = json.loads(out.read_text())
    aligned = summary["floors"]["knn_caption_aligned"]
    assert len(aligned["captions"]) == 31 and aligned["metrics"]["CIDEr"] > 0
    assert summary["scene_probe"]["images"] == 31
    assert set(summary["scene_probe"]["accuracy"]) == {"0.1", "1.0"}
