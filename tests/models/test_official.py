import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bita.models.official import from_official, read_official, to_official

N_LAYERS = 2
TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _authors_state(hidden=64, enc=64, inter=128, llm=64, vocab=30523, queries=8):
    """A state dict in the authors' LAVIS layout (SPEC §6) with the tiny preset's sizes."""
    b = "Fformer.bert."
    lin = lambda o, i: {"weight": torch.randn(o, i), "bias": torch.randn(o)}  # noqa: E731
    norm = lambda d: {"weight": torch.randn(d), "bias": torch.randn(d)}  # noqa: E731
    modules = {
        "ln_vision": norm(enc),
        "vision_proj": lin(256, hidden),
        "text_proj": lin(256, hidden),
        "opt_proj": lin(llm, hidden),
        f"{b}embeddings.LayerNorm": norm(hidden),
        "Fformer.cls.predictions.transform.dense": lin(hidden, hidden),
    }
    for n in range(N_LAYERS):
        layer = f"{b}encoder.layer.{n}."
        modules |= {
            layer + "fourier.output.LayerNorm": norm(hidden),
            layer + "crossattention.self.query": lin(hidden, hidden),
            layer + "crossattention.self.key": lin(hidden, enc),
            layer + "crossattention.self.value": lin(hidden, enc),
            layer + "crossattention.output.dense": lin(hidden, hidden),
            layer + "crossattention.output.LayerNorm": norm(hidden),
            layer + "intermediate.dense": lin(inter, hidden),
            layer + "output.dense": lin(hidden, inter),
            layer + "output.LayerNorm": norm(hidden),
            layer + "intermediate_query.dense": lin(inter, hidden),
            layer + "output_query.dense": lin(hidden, inter),
            layer + "output_query.LayerNorm": norm(hidden),
        }
    state = {f"{m}.{p}": t for m, params in modules.items() for p, t in params.items()}
    state |= {
        "query_tokens": torch.randn(1, queries, hidden),
        "temp": torch.tensor(0.07),
        f"{b}embeddings.word_embeddings.weight": torch.randn(vocab, hidden),
        f"{b}embeddings.position_embeddings.weight": torch.randn(64, hidden),
        f"{b}embeddings.position_ids": torch.arange(64)[None],
    }
    return state


def test_authors_layout_round_trips_through_the_model(tiny_model, tmp_path):
    theirs = _authors_state()
    torch.save({"model": theirs}, tmp_path / "bita.pth")
    ours = from_official(read_official(tmp_path / "bita.pth"))
    report = tiny_model.load_checkpoint_state_dict(ours)
    assert report.missing == [k for k in report.missing if k.startswith(("encoder.", "llm."))]
    torch.testing.assert_close(tiny_model.llm_proj.weight, theirs["opt_proj.weight"])
    torch.testing.assert_close(
        tiny_model.ift.layers[1].query_ffn.up.weight,
        theirs["Fformer.bert.encoder.layer.1.intermediate_query.dense.weight"],
    )
    own = {k: v for k, v in tiny_model.checkpoint_state_dict().items() if k in ours}
    back = to_official(own)
    dropped = {k for k in theirs if k.startswith("Fformer.cls.") or k.endswith("position_ids")}
    assert set(back) == set(theirs) - dropped
    for key, value in back.items():
        torch.testing.assert_close(value, theirs[key])


def test_more_layers_than_the_model_is_an_error_listing_them(tiny_model):
    theirs = _authors_state()
    theirs["Fformer.bert.encoder.layer.5.output.dense.weight"] = torch.randn(64, 128)
    with pytest.raises(KeyError, match="ift.layers.5.text_ffn.down.weight"):
        tiny_model.load_checkpoint_state_dict(from_official(theirs))


def test_unknown_official_key_is_an_error():
    with pytest.raises(KeyError, match="Fformer.bert.encoder.layer.0.attention.self.query.weight"):
        from_official(
            {
                "Fformer.bert.encoder.layer.0.attention.self.query.weight": torch.zeros(1),
                "temp": torch.tensor(0.1),
            }
        )
    with pytest.raises(ValueError, match="no key"):
        from_official({"Fformer.cls.predictions.bias": torch.zeros(1)})
    with pytest.raises(KeyError, match="encoder.body"):
        to_official({"encoder.body.visual.conv1.weight": torch.zeros(1)})


def test_convert_tool_round_trips_files(tmp_path):
    tool = runpy.run_path(str(TOOLS / "convert_bita_checkpoint.py"), run_name="convert")
    theirs = _authors_state()
    torch.save({"model": theirs}, tmp_path / "bita.pth")
    tool["main"](["to-bita", str(tmp_path / "bita.pth"), str(tmp_path / "model.safetensors")])
    assert load_file(tmp_path / "model.safetensors")["llm_proj.bias"].shape == (64,)
    tool["main"](["to-official", str(tmp_path / "model.safetensors"), str(tmp_path / "back.pth")])
    back = read_official(tmp_path / "back.pth")
    torch.testing.assert_close(back["opt_proj.weight"], theirs["opt_proj.weight"])
    assert not any(k.startswith("Fformer.cls") for k in back)
