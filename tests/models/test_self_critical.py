import pytest
import torch

from bita.models.self_critical import SelfCritical
from bita.models.trainable import set_trainable

from .conftest import CAPTIONS

PROMPT = "a photo of "


def test_token_log_probs_average_to_the_prefix_lm_loss(tiny_model):
    tiny_model.eval()
    prefix = tiny_model.lm_prefix(tiny_model.image_tokens(torch.randn(3, 3, 64, 64)))
    captions = CAPTIONS[:3]
    log_probs, owner = tiny_model.llm.caption_token_log_probs(prefix, captions, PROMPT)
    loss = tiny_model.llm.prefix_loss(prefix, captions, PROMPT)
    assert torch.allclose(-log_probs.mean(), loss, atol=1e-6)
    labels = tiny_model.llm.tokenize_captions(captions, PROMPT, 32)[2]
    per_caption = (labels[:, 1:] != -100).sum(1)  # caption tokens and the closing "\n"
    assert torch.equal(torch.bincount(owner, minlength=3), per_caption)


class FavourFirstSample:
    """Reward 1 for each image's first sample, 0 for the others; keeps what it saw."""

    def __init__(self, k):
        self.k, self.seen = k, []

    def __call__(self, captions, references):
        self.seen.append((list(captions), [list(r) for r in references]))
        return torch.tensor([1.0 if i % self.k == 0 else 0.0 for i in range(len(captions))])


def sequence_log_probs(model, tokens, captions, k):
    with torch.no_grad():
        prefix = model.lm_prefix(tokens).repeat_interleave(k, dim=0)
        log_probs, owner = model.llm.caption_token_log_probs(prefix, captions, PROMPT)
    return torch.zeros(len(captions)).index_add_(0, owner, log_probs)


def test_a_step_makes_the_rewarded_samples_likelier(tiny_model):
    torch.manual_seed(0)
    set_trainable(tiny_model, ["query_tokens", "ift.*", "llm_proj.*", "llm.*"])
    tiny_model.eval()  # no dropout: the before/after log-probabilities are comparable
    k, refs = 4, [CAPTIONS[:2], CAPTIONS[2:4]]
    reward = FavourFirstSample(k)
    settings = SelfCritical(reward=reward, samples_per_image=k, max_new_tokens=6)
    batch = {"image": torch.randn(2, 3, 64, 64), "references": refs}
    out = tiny_model(batch, objective="scst", prompt=PROMPT, self_critical=settings)
    assert out["reward"].item() == pytest.approx(1 / k) and out["reward_best"].item() == 1.0
    captions, seen_refs = reward.seen[0]
    assert len(captions) == 2 * k and seen_refs == [refs[0]] * k + [refs[1]] * k
    tokens = tiny_model.image_tokens(batch["image"])
    before = sequence_log_probs(tiny_model, tokens, captions, k)
    out["loss"].backward()
    with torch.no_grad():
        for p in tiny_model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    change = sequence_log_probs(tiny_model, tokens, captions, k) - before
    first = change.view(2, k)[:, 0]
    others = change.view(2, k)[:, 1:]
    assert (first > 0).all() and (first > others.max(1).values).all()


def test_settings_and_objective_errors_are_named(tiny_model):
    with pytest.raises(ValueError, match="samples_per_image=1: at least 2"):
        SelfCritical(reward=FavourFirstSample(1), samples_per_image=1)
    with pytest.raises(ValueError, match="temperature=0"):
        SelfCritical(reward=FavourFirstSample(2), temperature=0)
    batch = {"image": torch.randn(1, 3, 64, 64), "references": [["a road"]]}
    with pytest.raises(ValueError, match="needs self_critical settings"):
        tiny_model(batch, objective="scst")
