"""The authors' LAVIS checkpoints: key mapping both ways, and conversion to a checkpoint folder
that captions and evaluates (on a tiny stand-in of their key layout)."""

import json
import logging
import runpy
from pathlib import Path

import pytest
import torch
from PIL import Image
from stages.runner import bita_run

from bita.models.official import from_official, read_official, to_official

from .test_prefix_decoder import opt_lm

N_LAYERS = 2
TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _authors_state(hidden=64, enc=64, inter=128, llm=64, vocab=30523, queries=8, module="Fformer"):
    """A state dict in the authors' LAVIS layout (SPEC §6) with the tiny preset's sizes, as
    their stage-1 file holds it: with the unused MLM head, position ids and `itm_head` (their
    IFT's image–text matching head, never frozen, so LAVIS saves it). `module="IFformer"` names
    the IFT as their earlier code did."""
    b = f"{module}.bert."
    lin = lambda o, i: {"weight": torch.randn(o, i), "bias": torch.randn(o)}  # noqa: E731
    norm = lambda d: {"weight": torch.randn(d), "bias": torch.randn(d)}  # noqa: E731
    modules = {
        "ln_vision": norm(enc),
        "vision_proj": lin(256, hidden),
        "text_proj": lin(256, hidden),
        "opt_proj": lin(llm, hidden),
        f"{b}embeddings.LayerNorm": norm(hidden),
        f"{module}.cls.predictions.transform.dense": lin(hidden, hidden),
        "itm_head": lin(2, hidden),
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


def _unused(key: str) -> bool:
    """Keys of the authors' files that BITA drops: MLM head, position ids, ITM head."""
    return ".cls." in key or key.endswith("position_ids") or key.startswith("itm_head.")


def test_authors_layout_round_trips_through_the_model(tiny_model, tmp_path, caplog):
    """Fails on a converter that stops on `itm_head` (the KeyError of the released stage-1
    file) or loads it anywhere."""
    theirs = _authors_state()
    torch.save({"model": theirs}, tmp_path / "bita.pth")
    with caplog.at_level(logging.INFO, logger="bita.models.official"):
        ours = from_official(read_official(tmp_path / "bita.pth"))
    assert "itm_head.weight" in caplog.text and "ITM head" in caplog.text
    report = tiny_model.load_checkpoint_state_dict(ours)
    assert report.missing == [k for k in report.missing if k.startswith(("encoder.", "llm."))]
    torch.testing.assert_close(tiny_model.llm_proj.weight, theirs["opt_proj.weight"])
    torch.testing.assert_close(
        tiny_model.ift.layers[1].query_ffn.up.weight,
        theirs["Fformer.bert.encoder.layer.1.intermediate_query.dense.weight"],
    )
    own = {k: v for k, v in tiny_model.checkpoint_state_dict().items() if k in ours}
    back = to_official(own)
    assert set(back) == {k for k in theirs if not _unused(k)}
    for key, value in back.items():
        torch.testing.assert_close(value, theirs[key])


def test_earlier_ifformer_prefix_converts_like_the_released_one():
    """Fails on a converter that rejects the `IFformer.` module name of the authors' earlier
    code."""
    torch.manual_seed(0)
    released = from_official(_authors_state())
    torch.manual_seed(0)
    earlier_state = _authors_state(module="IFformer")
    assert any(k.startswith("IFformer.bert.encoder.") for k in earlier_state)
    earlier = from_official(earlier_state)
    assert released.keys() == earlier.keys()
    assert all(torch.equal(released[k], earlier[k]) for k in released)


def test_both_module_names_in_one_file_are_refused():
    mixed = _authors_state() | {"IFformer.bert.embeddings.LayerNorm.bias": torch.zeros(64)}
    with pytest.raises(ValueError, match="both 'Fformer.' and 'IFformer.'"):
        from_official(mixed)


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


def _convert_tool():
    return runpy.run_path(str(TOOLS / "convert_bita_checkpoint.py"), run_name="convert")


@pytest.fixture
def public_opt(tmp_path, caption_tokenizer) -> Path:
    """A tiny OPT with its tokenizer in a local folder: stands in for `facebook/opt-2.7b`, the
    frozen public LM that the authors' files do not hold."""
    lm = opt_lm(caption_tokenizer)
    folder = tmp_path / "opt"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


# The paper preset with its public parts swapped for offline ones of tiny size: EfficientNet-Lite0
# (pip weights, re-built like CLIP), the tiny IFT, and the local OPT folder above in the role of
# facebook/opt-2.7b (public, so not in the checkpoint).
def _stand_in_overrides(opt: Path) -> list[str]:
    return [
        "encoder=effnet_lite0",
        "qformer=tiny",
        f"llm.pretrained={opt}",
        f"llm.tokenizer={opt}",
        "llm.dtype=fp32",
        "hardware=cpu",
        "decode.num_beams=2",
        "decode.max_new_tokens=4",
        "decode.min_new_tokens=1",
    ]


@pytest.fixture
def converted(tmp_path, public_opt) -> tuple[Path, dict]:
    """A fake stage-2-style LAVIS file of the authors' earlier layout (`IFformer.`, `itm_head`)
    at stand-in sizes, converted to a bita checkpoint folder by the tool."""
    theirs = _authors_state(enc=1280, module="IFformer")
    torch.save({"model": theirs}, tmp_path / "authors.pth")
    folder = tmp_path / "converted"
    argv = ["to-bita", str(tmp_path / "authors.pth"), str(folder), *_stand_in_overrides(public_opt)]
    _convert_tool()["main"](argv)
    return folder, theirs


def test_converted_folder_captions_with_the_authors_weights(converted, tmp_path):
    """Fails on a converter that writes only model.safetensors (no config.yaml: nothing can
    load it) or stops on `IFformer.` / `itm_head`."""
    from bita.caption import Captioner, main

    folder, theirs = converted
    assert {p.name for p in folder.iterdir()} == {
        "model.safetensors",
        "config.yaml",
        "trainer_state.json",
    }
    captioner = Captioner.from_checkpoint(folder, device="cpu")
    model = captioner.model
    assert model.encoder.width == 1280 and model.llm.hidden_size == 64
    torch.testing.assert_close(model.llm_proj.weight, theirs["opt_proj.weight"])
    torch.testing.assert_close(
        model.ift.layers[0].cross_attn.key.weight,
        theirs["IFformer.bert.encoder.layer.0.crossattention.self.key.weight"],
    )
    torch.testing.assert_close(model.temp, theirs["temp"])
    image = tmp_path / "field.png"
    Image.new("RGB", (256, 256), (40, 140, 60)).save(image)
    out = tmp_path / "captions.jsonl"
    assert main(["--checkpoint", str(folder), str(image), "--out", str(out)]) == 0
    line = json.loads(out.read_text())
    assert line["image"] == str(image) and isinstance(line["caption"], str)


@pytest.mark.slow
def test_evaluate_stage_scores_a_converted_folder(converted, tmp_path):
    """`stage=evaluate init_from=` on the converted folder, as a user types it (a subprocess
    that decodes and scores the bundled demo's 31 val images: slow)."""
    folder, _ = converted
    bita_run(
        tmp_path,
        "stage=evaluate",
        f"init_from={folder}",
        "dataset=demo_mini",
        "tracking.enabled=false",
        "hardware.num_workers=0",
    )
    summary = json.loads(next((tmp_path / "runs").rglob("results/rsicd_val.json")).read_text())
    assert summary["counts"]["images"] == 31 and "CIDEr" in summary["metrics"]


def test_converted_folder_exports_back_to_the_authors_layout(converted, tmp_path):
    folder, theirs = converted
    _convert_tool()["main"](["to-official", str(folder), str(tmp_path / "back.pth")])
    back = read_official(tmp_path / "back.pth")
    released_names = {k.replace("IFformer.", "Fformer.", 1): v for k, v in theirs.items()}
    assert set(back) == {k for k in released_names if not _unused(k)}
    torch.testing.assert_close(back["opt_proj.weight"], theirs["opt_proj.weight"])


def test_convert_refuses_to_overwrite_a_folder(tmp_path):
    torch.save({"model": _authors_state()}, tmp_path / "bita.pth")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken exists"):
        _convert_tool()["main"](["to-bita", str(tmp_path / "bita.pth"), str(tmp_path / "taken")])
