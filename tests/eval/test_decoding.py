"""Decode settings follow SPEC §3 / the `decode` config; batched decoding passes them through."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bita.eval.decoding import DecodeSettings, decode_batches

from .fakes import CAPTIONS, FakeBITA, make_batches

CONFIG = Path(__file__).resolve().parents[2] / "conf" / "config.yaml"


def test_defaults_are_spec_and_config():
    settings = DecodeSettings()
    assert (settings.num_beams, settings.max_new_tokens, settings.min_new_tokens) == (5, 22, 5)
    assert settings.prompt == "a photo of "
    assert (settings.length_penalty, settings.repetition_penalty) == (1.0, 1.0)
    assert settings.do_sample is False
    assert DecodeSettings.from_config(OmegaConf.load(CONFIG).decode) == settings


def test_overrides_replace_config_and_none_keeps_it():
    settings = DecodeSettings.from_config(
        {"num_beams": 3, "length_penalty": 2}, num_beams=None, batch_size=4, temperature=1
    )
    assert settings.num_beams == 3
    assert settings.batch_size == 4
    assert settings.length_penalty == 2.0 and isinstance(settings.length_penalty, float)
    assert "batch_size" not in settings.generate_kwargs()
    assert settings.generate_kwargs()["prompt"] == "a photo of "


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"beams": 3}, r"unknown option\(s\) \['beams'\]"),
        ({"num_beams": 0}, "decode.num_beams=0 is invalid"),
        ({"min_new_tokens": 30}, "decode.min_new_tokens=30 is invalid"),
        ({"top_p": 1.5}, "decode.top_p=1.5 is invalid"),
        ({"num_beams": "5"}, "decode.num_beams='5': expected a int"),
        ({"do_sample": 1}, "decode.do_sample=1: expected a bool"),
        ({"num_beams": True}, "decode.num_beams=True: expected a int"),
        ({"rerank": "vote"}, "decode.rerank='vote' is invalid"),
        ({"rerank_neighbours": 0}, "decode.rerank_neighbours=0 is invalid"),
        ({"rerank": "mbr", "rerank_sharpness": -1.0}, "decode.rerank_sharpness=-1.0 is invalid"),
        ({"rerank": "consensus", "rerank_sharpness": 8}, r"rerank_sharpness=8.0 is invalid.*mbr"),
        ({"rerank": "consensus", "num_beams": 1}, "decode.rerank='consensus' is invalid"),
    ],
)
def test_bad_settings_name_the_option(values, message):
    with pytest.raises(ValueError, match=message):
        DecodeSettings.from_config(values)


def test_decode_batches_passes_settings_and_restores_training_mode():
    model = FakeBITA().train()
    settings = DecodeSettings(num_beams=2, max_new_tokens=7)
    records = list(decode_batches(model, make_batches([[0, 1], [2]]), settings))
    assert model.training
    assert model.calls == [settings.generate_kwargs()] * 2
    assert [r["caption"] for r in records] == CAPTIONS[:3]
    assert [r["image_id"] for r in records] == ["demo_0", "demo_1", "demo_2"]
    assert records[2]["filename"] == "img 2.png"
    assert records[1]["references"][0] == "many green trees grow in the forest"
    assert records[0]["image_bytes"].startswith(b"\x89PNG")
