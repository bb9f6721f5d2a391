import pytest
import torch

from bita.models.self_critical import SelfCritical, self_critical_loss
from bita.models.trainable import set_trainable

from .conftest import CAPTIONS

PROMPT = "a photo of "


def caption_rows(lm, captions):
    """Each caption's labelled token ids (caption tokens and the closing "\n")."""
    labels = lm.tokenize_captions(captions, PROMPT, 32)[2]
    return [row[row != -100].tolist() for row in labels]


def test_token_log_probs_average_to_the_prefix_lm_loss(tiny_model):
    tiny_model.eval()
    prefix = tiny_model.lm_prefix(tiny_model.image_tokens(torch.randn(3, 3, 64, 64)))
    captions = CAPTIONS[:3]
    rows = caption_rows(tiny_model.llm, captions)
    log_probs, owner = tiny_model.llm.token_log_probs(prefix, rows, PROMPT)
    loss = tiny_model.llm.prefix_loss(prefix, captions, PROMPT)
    assert torch.allclose(-log_probs.mean(), loss, atol=1e-6)
    assert torch.bincount(owner, minlength=3).tolist() == [len(row) for row in rows]


class FavourFirstSample:
    """Reward 1 for each image's first sample, 0 for the others; keeps what it saw."""

    def __init__(self, k):
        self.k, self.seen = k, []

    def __call__(self, captions, references):
        self.seen.append((list(captions), [list(r) for r in references]))
        return torch.tensor([1.0 if i % self.k == 0 else 0.0 for i in range(len(captions))])


def sequence_log_probs(model, tokens, rows, k):
    with torch.no_grad():
        prefix = model.lm_prefix(tokens).repeat_interleave(k, dim=0)
        log_probs, owner = model.llm.token_log_probs(prefix, rows, PROMPT)
    return torch.zeros(len(rows)).index_add_(0, owner, log_probs)


class RecordSamples:
    """Wraps `PrefixLM.sample` and keeps what it drew."""

    def __init__(self, lm):
        self.sample, self.drawn = lm.sample, []

    def __call__(self, *args, **kwargs):
        self.drawn.append(self.sample(*args, **kwargs))
        return self.drawn[-1]


def test_a_step_makes_the_rewarded_samples_likelier(tiny_model):
    torch.manual_seed(0)
    set_trainable(tiny_model, ["query_tokens", "ift.*", "llm_proj.*", "llm.*"])
    tiny_model.eval()  # no dropout: the before/after log-probabilities are comparable
    k, refs = 4, [CAPTIONS[:2], CAPTIONS[2:4]]
    reward = FavourFirstSample(k)
    settings = SelfCritical(reward=reward, samples_per_image=k, max_new_tokens=6)
    batch = {"image": torch.randn(2, 3, 64, 64), "references": refs}
    tiny_model.llm.sample = record = RecordSamples(tiny_model.llm)
    out = tiny_model(batch, objective="scst", prompt=PROMPT, self_critical=settings)
    assert out["reward"].item() == pytest.approx(1 / k) and out["reward_best"].item() == 1.0
    captions, seen_refs = reward.seen[0]
    assert len(captions) == 2 * k and seen_refs == [refs[0]] * k + [refs[1]] * k
    assert captions == record.drawn[0].texts
    rows = record.drawn[0].token_ids
    tokens = tiny_model.image_tokens(batch["image"])
    before = sequence_log_probs(tiny_model, tokens, rows, k)
    out["loss"].backward()
    with torch.no_grad():
        for p in tiny_model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    change = sequence_log_probs(tiny_model, tokens, rows, k) - before
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


def _byte_tokens(lm, text: str) -> list[int]:
    """`text` spelled one byte-level token per byte: a split the BPE tokenizer never makes."""
    pieces = lm.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    chars = "".join(piece for piece, _ in pieces)
    return lm.tokenizer.convert_tokens_to_ids(list(chars))


def test_scst_takes_the_gradient_of_the_token_ids_drawn(tiny_model, monkeypatch):
    """The loss weights the log-probabilities of the exact ids the sampler drew. Two draws a
    re-tokenisation of their text gets wrong: " many cars" spelled byte by byte (its text
    tokenises to the canonical merges) and a sample cut at max_new_tokens (its text gets a
    closing "\n" it never drew). Fails on a loss computed on the decoded text tokenised again
    (the fault of the version before this test)."""
    from bita.models import llm as llm_module
    from bita.models.sampling import SampleRules

    lm = tiny_model.llm
    spelled = _byte_tokens(lm, " many cars") + [lm.caption_end_id]
    canonical = lm.tokenizer(" many cars", add_special_tokens=False).input_ids
    assert spelled != canonical + [lm.caption_end_id]
    width = len(spelled)  # = max_new_tokens: the second sample is cut there, with no end token
    cut = lm.tokenizer(" " + CAPTIONS[1], add_special_tokens=False).input_ids[:width]
    assert len(cut) == width and lm.caption_end_id not in cut
    drawn = torch.tensor([spelled, cut])
    monkeypatch.setattr(
        llm_module, "SEARCHES", ((SampleRules, lambda decoder, step, embeds, rules, mask: drawn),)
    )
    settings = SelfCritical(
        reward=lambda captions, refs: torch.tensor([1.0, 0.0]),
        samples_per_image=2,
        max_new_tokens=width,
    )
    tiny_model.eval()
    tokens = tiny_model.image_tokens(torch.randn(1, 3, 64, 64))
    loss = self_critical_loss(tiny_model, tokens, [CAPTIONS[:2]], PROMPT, settings)["loss"]

    # by hand: log p(token | prefix, bos, prompt, tokens before) over each drawn row
    prefix = tiny_model.lm_prefix(tokens)[0]
    head = [
        lm.tokenizer.bos_token_id,
        *lm.tokenizer(PROMPT.rstrip(), add_special_tokens=False).input_ids,
    ]
    terms = []
    for advantage, row in ((1.0, spelled), (-1.0, cut)):
        embeds = lm.model.get_input_embeddings()(torch.tensor(head + row))
        logits = lm.model(inputs_embeds=torch.cat([prefix, embeds])[None]).logits[0]
        before_each = logits[len(prefix) + len(head) - 1 : -1].log_softmax(-1)
        terms.append(advantage * before_each[torch.arange(len(row)), torch.tensor(row)])
    torch.testing.assert_close(loss, -torch.cat(terms).mean())
