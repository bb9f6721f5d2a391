import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from bita.models.build import build_model
from bita.models.trainable import set_trainable

CONF = Path(__file__).resolve().parents[2] / "conf"
CAPS = ["many cars are parked", "a river runs", "white buildings", "an airport"]


def _stage_patterns(stage: str) -> list[str]:
    return list(OmegaConf.load(CONF / "stage" / f"{stage}.yaml").trainable)


def _grads_reached(model, loss) -> set[str]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}


@pytest.mark.parametrize("stage", ["pretrain1", "pretrain2"])
def test_gradients_reach_exactly_the_declared_trainable_params(tiny_model, stage):
    trainable = set(set_trainable(tiny_model, _stage_patterns(stage)))
    tokens = tiny_model.image_tokens(torch.randn(4, 3, 64, 64))
    if stage == "pretrain1":
        loss = tiny_model.itc_loss(tokens, CAPS)["loss"]
        assert any(n.startswith("ift.layers.0.text_ffn") for n in trainable)
    else:
        loss = tiny_model.lm_loss(tokens, CAPS)["loss"]
        assert not any("text_ffn" in n or "embeddings.word" in n for n in trainable)
    assert _grads_reached(tiny_model, loss) == trainable
    assert not any(n.startswith(("encoder.", "llm.")) for n in trainable)


def test_pattern_matching_nothing_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="ift.layer.*"):
        set_trainable(tiny_model, ["ift.layer.*", "ln_vision.*"])


def test_temperature_is_clamped(tiny_model):
    tokens = tiny_model.image_tokens(torch.randn(4, 3, 64, 64))
    tiny_model.eval()
    with torch.no_grad():
        tiny_model.temp.fill_(0.5)
        at_max = tiny_model.itc_loss(tokens, CAPS)["loss"]
        tiny_model.temp.fill_(3.0)
        assert tiny_model.itc_loss(tokens, CAPS)["loss"] == at_max


@pytest.mark.parametrize("drifted", [3.0, 1e-4])
def test_a_temperature_out_of_range_is_clamped_in_place_and_gets_a_gradient(tiny_model, drifted):
    """An optimizer step that leaves `temp` outside [0.001, 0.5] must not strand it: the
    parameter itself is clamped back (as BLIP-2 does) and keeps its gradient. Fails on clamping
    only the value used, which leaves the parameter where it drifted with a zero gradient."""
    tiny_model.eval()
    with torch.no_grad():
        tiny_model.temp.fill_(drifted)
    tiny_model.itc_loss(tiny_model.image_tokens(torch.randn(4, 3, 64, 64)), CAPS)["loss"].backward()
    low, high = tiny_model.settings.temp_range
    assert tiny_model.temp.item() == pytest.approx(min(max(drifted, low), high))
    assert tiny_model.temp.grad is not None and tiny_model.temp.grad.abs().item() > 0


def test_tiny_forward_and_backward_is_fast(tiny_model):
    images = torch.randn(8, 3, 64, 64)
    tiny_model.itc_loss(tiny_model.image_tokens(images), CAPS * 2)["loss"].backward()  # warm-up
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of one thread: robust to other jobs sharing the cores
    try:
        start = time.process_time()
        tokens = tiny_model.image_tokens(images)
        itc = tiny_model.itc_loss(tokens, CAPS * 2)["loss"]
        (itc + tiny_model.lm_loss(tokens, CAPS * 2)["loss"]).backward()
        spent = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    print(f"tiny ITC + LM forward and backward, batch 8: {spent:.3f} s CPU")
    assert spent < 0.5


def test_checkpoint_round_trip_and_assets(tiny_model, tiny_cfg, tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "assets").mkdir(parents=True)
    state = tiny_model.checkpoint_state_dict()
    assert {"temp", "query_tokens", "llm_proj.weight"} <= set(state)
    assert any(k.startswith("encoder.") for k in state) and any(k.startswith("llm.") for k in state)
    save_file(state, ckpt / "model.safetensors")  # tied LM weights appear once
    overrides = tiny_model.export_assets(ckpt / "assets")
    assert overrides == {"llm.pretrained": "assets/llm", "llm.tokenizer": "assets/llm"}
    cfg = tiny_cfg.copy()
    for key, rel in overrides.items():
        OmegaConf.update(cfg, key, str(ckpt / rel))
    again = build_model(cfg)
    report = again.load_checkpoint_state_dict(load_file(ckpt / "model.safetensors"))
    assert report.missing == [] and len(report.loaded) == len(state)
    tiny_model.eval(), again.eval()
    tokens = tiny_model.image_tokens(torch.randn(2, 3, 64, 64))
    decode = dict(num_beams=2, max_new_tokens=4, min_new_tokens=1)
    assert again.generate(tokens, **decode) == tiny_model.generate(tokens, **decode)
    torch.testing.assert_close(
        again.image_tokens(torch.ones(1, 3, 64, 64)),
        tiny_model.image_tokens(torch.ones(1, 3, 64, 64)),
    )


def test_checkpoint_load_errors_list_the_keys(tiny_model):
    with pytest.raises(KeyError, match="ift.bogus"):
        tiny_model.load_checkpoint_state_dict(
            {"ift.bogus": torch.zeros(1), "temp": torch.tensor(0.1)}
        )
    with pytest.raises(ValueError, match="no key"):
        tiny_model.load_checkpoint_state_dict({})
    with pytest.raises(ValueError, match="temp"):
        tiny_model.load_checkpoint_state_dict({"temp": torch.zeros(2)})
    report = tiny_model.load_checkpoint_state_dict({"temp": torch.tensor(0.1)})
    assert "query_tokens" in report.missing and report.loaded == ["temp"]


@pytest.mark.parametrize("how", ["flag", "llm: null"])
def test_model_without_llm_builds_for_stage_1(tiny_cfg, how):
    if how == "flag":
        model = build_model(tiny_cfg, with_llm=False)
    else:
        tiny_cfg.llm = None
        model = build_model(tiny_cfg)
    assert model.llm is None and not any(k.startswith("llm") for k in model.checkpoint_state_dict())
    with pytest.raises(RuntimeError, match="without its LM"):
        model.lm_loss(model.image_tokens(torch.randn(1, 3, 64, 64)), ["a"])


def test_flops_per_sample_is_positive_and_lm_costs_more(tiny_model):
    assert 0 < tiny_model.flops_per_sample("itc") < tiny_model.flops_per_sample("lm")
    with pytest.raises(ValueError, match="kind"):
        tiny_model.flops_per_sample("itm")


def test_losses_run_under_bf16_autocast(tiny_model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = tiny_model.image_tokens(torch.randn(2, 3, 64, 64))
        itc = tiny_model.itc_loss(tokens, CAPS[:2])["loss"]
        lm = tiny_model.lm_loss(tokens, CAPS[:2], prompt="a photo of ")["loss"]
    assert torch.isfinite(itc) and torch.isfinite(lm)
    (itc + lm).backward()
    assert tiny_model.query_tokens.grad is not None


def test_per_image_lm_loss_equals_the_loss_of_the_expanded_pairs(tiny_model):
    """Batching by image runs the query path once per image; loss and gradients must be those
    of the same (image, caption) pairs batched one by one."""
    set_trainable(tiny_model, _stage_patterns("pretrain2"))
    tiny_model.eval()  # no dropout: both paths see the same network
    features = tiny_model.encode_images(torch.randn(2, 3, 64, 64))
    references = [CAPS[:3], CAPS[3:]]
    paired = {"features": features[[0, 0, 0, 1]], "caption": CAPS}
    loss_pairs = tiny_model(paired, objective="lm", prompt="a photo of ")["loss"]
    grads_pairs = _grads_reached(tiny_model, loss_pairs)
    pair_grad = tiny_model.query_tokens.grad.clone()
    grouped = {"features": features, "references": references}
    loss_images = tiny_model(grouped, objective="lm", prompt="a photo of ")["loss"]
    assert _grads_reached(tiny_model, loss_images) == grads_pairs
    assert torch.allclose(loss_images, loss_pairs, atol=1e-6)
    assert torch.allclose(tiny_model.query_tokens.grad, pair_grad, atol=1e-6)


def test_model_lm_label_smoothing_reaches_both_prefix_lm_losses(tiny_cfg):
    tiny_cfg.model.lm_label_smoothing = 0.2
    model = build_model(tiny_cfg).eval()
    tokens = model.image_tokens(torch.randn(2, 3, 64, 64))
    prefix = model.lm_prefix(tokens)
    expected = model.llm.prefix_loss(prefix, CAPS[:2], "", label_smoothing=0.2)
    torch.testing.assert_close(model.lm_loss(tokens, CAPS[:2])["loss"], expected)
    per_image = model.lm_loss_per_image(tokens, [[CAPS[0]], [CAPS[1]]])["loss"]
    torch.testing.assert_close(per_image, expected)
    assert not torch.isclose(expected, model.llm.prefix_loss(prefix, CAPS[:2], ""))


def test_lm_flops_per_image_count_the_lm_once_per_caption(tiny_model):
    one, five = (tiny_model.flops_per_sample("lm", n) for n in (1, 5))
    lm_only = one - tiny_model.flops_per_sample("lm", 0)
    assert lm_only > 0 and five == pytest.approx(one + 4 * lm_only)
