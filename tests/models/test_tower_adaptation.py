"""Tower adaptation (`stage=tower`): what trains, the sentence encoder's memory, and how the
adapted units travel into BITA checkpoints."""

import pytest
import torch

from bita.models.bita import ModelSettings
from bita.models.build import build_model
from bita.models.encoders import build_image_encoder
from bita.models.sentence_encoder import SentenceEncoder
from bita.models.tower_adaptation import TowerAdaptation, load_tower_weights
from bita.models.trainable import set_trainable

from .conftest import CAPTIONS


def adaptation(encoder_cfg, sentence_encoder, **overrides) -> TowerAdaptation:
    settings = ModelSettings(embed_dim=16)
    tower = build_image_encoder({**encoder_cfg, **overrides})
    return TowerAdaptation(tower, sentence_encoder, settings)


def grads_after_one_step(model: TowerAdaptation, size: int) -> set[str]:
    set_trainable(model, model.adapted_names() + ["tower_head.*"])
    batch = {"image": torch.randn(4, 3, size, size), "caption": CAPTIONS[:4]}
    model(batch)["loss"].backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum()}


@pytest.mark.parametrize(
    ("encoder", "adapt_blocks", "size"), [("effnet_lite0", 2, 224), ("tiny", 1, 64)]
)
def test_gradients_reach_exactly_the_tower_units_above_the_cut(
    compose, sentence_encoder, encoder, adapt_blocks, size
):
    """Everything above the cut gets a gradient, nothing below it, nor the sentence encoder."""
    model = adaptation(
        compose(encoder, "tiny", "tiny").encoder, sentence_encoder, adapt_blocks=adapt_blocks
    )
    reached = grads_after_one_step(model, size)
    above = {
        f"encoder.{n}" for n, _ in model.encoder.named_parameters() if model.encoder.is_adapted(n)
    }
    head = {f"tower_head.{n}" for n, _ in model.tower_head.named_parameters()}
    assert above and reached == above | head
    prefixes = [f"encoder.{p}." for p in model.encoder.adapted_prefixes]
    assert all(any(n.startswith(p) for p in prefixes) for n in above)
    frozen = [p for n, p in model.named_parameters() if n not in reached]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_stage_tower_needs_a_cut(compose, sentence_encoder):
    with pytest.raises(ValueError, match="set encoder.adapt_blocks"):
        adaptation(compose("tiny", "tiny", "tiny").encoder, sentence_encoder)


def test_each_distinct_caption_is_encoded_once_with_its_own_embedding(sentence_encoder):
    encoder = SentenceEncoder(sentence_encoder.model, sentence_encoder.tokenizer, max_tokens=16)
    calls = []
    encoder.model.register_forward_hook(lambda module, args, out: calls.append(1))
    first = encoder([CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]])
    again = encoder([CAPTIONS[1], CAPTIONS[2]])
    assert len(calls) == 2 and first.shape == (3, 32)
    torch.testing.assert_close(first[0], first[2])
    torch.testing.assert_close(again[0], first[1])
    fresh = SentenceEncoder(encoder.model, encoder.tokenizer, max_tokens=16)([CAPTIONS[2]])
    torch.testing.assert_close(again[1], fresh[0], atol=1e-5, rtol=1e-5)


def test_adapted_units_travel_into_bita_checkpoints_and_never_silently_drop(
    compose, caption_tokenizer, sentence_encoder
):
    """A BITA started from a tower-stage checkpoint takes the adapted units (not the head),
    keeps them in its own checkpoints although it freezes them, and refuses to load them into
    a frozen tower or to start an adapted tower from a checkpoint without them."""
    cfg = compose("effnet_lite0", "tiny", "tiny")
    cfg.llm.tokenizer = str(caption_tokenizer)
    cfg.encoder.adapt_blocks = 1
    tower_stage = adaptation(cfg.encoder, sentence_encoder)
    with torch.no_grad():
        tower_stage.encoder.body.net.conv_head.weight.mul_(0.5)
    state = tower_stage.checkpoint_state_dict()
    assert {k.split(".")[0] for k in state} == {"encoder", "tower_head"}
    assert {k for k in state if k.startswith("encoder.")} == {
        "encoder.body.net.conv_head.weight",
        "encoder.body.net.conv_head.bias",
    }
    model = build_model(cfg)
    report = model.load_checkpoint_state_dict(state)
    assert "encoder.body.net.conv_head.weight" in report.loaded
    set_trainable(model, ["ift.*"])  # a later stage freezes the tower again
    saved = model.checkpoint_state_dict()
    torch.testing.assert_close(
        saved["encoder.body.net.conv_head.weight"], tower_stage.encoder.body.net.conv_head.weight
    )
    assert not any(k.startswith("tower_head.") for k in saved)
    assert not any(k.startswith("encoder.body.net.blocks.") for k in saved)

    frozen_cfg = cfg.copy()
    frozen_cfg.encoder.adapt_blocks = 0
    with pytest.raises(ValueError, match=r"holds image-tower weights .*adapt_blocks=0"):
        build_model(frozen_cfg).load_checkpoint_state_dict(saved)
    before = {k: v for k, v in saved.items() if not k.startswith("encoder.")}
    with pytest.raises(ValueError, match=r"adapt_blocks=1, but the checkpoint lacks the adapted"):
        build_model(cfg).load_checkpoint_state_dict(before)


def test_feature_tools_load_the_adapted_units_into_a_bare_tower(compose, sentence_encoder):
    cfg = compose("effnet_lite0", "tiny", "tiny").encoder
    tower_stage = adaptation(cfg, sentence_encoder, adapt_blocks=2)
    with torch.no_grad():
        tower_stage.encoder.body.net.conv_head.bias.add_(1.0)
    tower = build_image_encoder({**cfg, "adapt_blocks": 2})
    load_tower_weights(tower, tower_stage.checkpoint_state_dict(), in_checkpoint=False)
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(tower(x), tower_stage.encoder(x))
    with pytest.raises(ValueError, match="lacks the adapted tower weights"):
        load_tower_weights(
            build_image_encoder({**cfg, "adapt_blocks": 3}),
            tower_stage.checkpoint_state_dict(),
            False,
        )


def test_resuming_the_tower_stage_takes_exactly_its_own_keys(compose, sentence_encoder):
    cfg = compose("tiny", "tiny", "tiny").encoder
    model = adaptation(cfg, sentence_encoder, adapt_blocks=1)
    state = model.checkpoint_state_dict()
    # only the units above the cut, unless the tower travels whole (encoder.in_checkpoint)
    assert all(
        model.encoder.is_adapted(k.removeprefix("encoder."))
        for k in state
        if k.startswith("encoder.")
    )
    adaptation(cfg, sentence_encoder, adapt_blocks=1).load_checkpoint_state_dict(state)
    with pytest.raises(KeyError, match="does not match this tower and cut"):
        adaptation(cfg, sentence_encoder, adapt_blocks=2).load_checkpoint_state_dict(state)
    whole = TowerAdaptation(
        model.encoder, sentence_encoder, model.settings, encoder_in_checkpoint=True
    ).checkpoint_state_dict()
    assert {k for k in whole if k.startswith("encoder.")} == {
        f"encoder.{k}" for k in model.encoder.state_dict()
    }
