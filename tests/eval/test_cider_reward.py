import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from bita.eval.cider_reward import CiderReward, reward_tokens

REFERENCES = [
    ["many cars are parked near a building", "a parking lot with many cars"],
    ["a river runs through green fields", "green fields beside a river"],
    ["an airport with two planes", "two planes are parked at an airport"],
    ["a baseball field surrounded by trees", "green trees around a baseball field"],
]
CAPTIONS = [
    "many cars are parked in a parking lot",
    "a river and green fields",
    "two planes at a big airport",
    "a field with trees",
]


def test_equals_pycocoevalcap_cider_when_the_corpus_is_the_scored_set():
    reward = CiderReward(REFERENCES)(CAPTIONS, REFERENCES)
    gts = {i: refs for i, refs in enumerate(REFERENCES)}
    res = {i: [caption] for i, caption in enumerate(CAPTIONS)}
    _, per_image = Cider().compute_score(gts, res)
    assert reward.dtype == torch.float32
    assert torch.allclose(reward, torch.tensor(per_image, dtype=torch.float32), atol=1e-5)


def test_idf_comes_from_the_corpus_not_the_batch():
    """Scored alone, a batch of one image would give every n-gram zero weight (log 1 - log 1);
    with the corpus's document frequencies the caption matching its references scores high."""
    reward = CiderReward(REFERENCES)
    alone = reward(["many cars are parked near a building"], [REFERENCES[0]])
    other = reward(["a river runs through green fields"], [REFERENCES[0]])
    assert alone.item() > 1.0 and other.item() < 0.05  # shares only "a"
    _, batch_idf = Cider().compute_score({0: REFERENCES[0]}, {0: [CAPTIONS[0]]})
    assert batch_idf[0] == 0.0


def test_tokens_are_lower_case_words_without_punctuation():
    assert (
        reward_tokens("Many  cars, parked. Near 2 Buildings!")
        == "many cars parked near 2 buildings"
    )


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="non-empty corpus"):
        CiderReward([])
    reward = CiderReward(REFERENCES)
    with pytest.raises(ValueError, match="2 captions but 1 reference lists"):
        reward(CAPTIONS[:2], REFERENCES[:1])
    with pytest.raises(ValueError, match="'a field' has no references"):
        reward(["a field"], [[]])


def test_pairwise_equals_scoring_each_pair_alone():
    """The sparse pairwise matrix against pycocoevalcap's own loop, one reference per pair,
    with repeated words (count clipping) and an n-gram outside the corpus."""
    captions = [*CAPTIONS, "many many cars cars are parked", "a red zeppelin", "trees"]
    reward = CiderReward(REFERENCES)
    matrix = reward.pairwise(captions)
    for i, caption in enumerate(captions):
        expected = reward([caption] * len(captions), [[other] for other in captions])
        assert matrix[i] == pytest.approx(expected.double().numpy(), abs=1e-5)
