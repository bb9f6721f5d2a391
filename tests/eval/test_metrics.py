"""score_captions must give pycocoevalcap's own numbers, clean up Java, and never fake SPICE."""

import json
import logging
import subprocess

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from bita.eval import metrics
from bita.eval.metrics import score_captions

N_IMAGES = 50


def rsicd_val_sample(shared_data):
    """50 real RSICD val images; each 'prediction' is another image's first caption."""
    images = json.loads((shared_data / "rsicd" / "dataset_rsicd.json").read_text())["images"]
    val = [image for image in images if image["split"] == "val"][:N_IMAGES]
    ids = [f"rsicd_{image['imgid']}" for image in val]
    references = {
        key: [s["raw"] for s in image["sentences"]] for key, image in zip(ids, val, strict=True)
    }
    predictions = {key: val[(i + 7) % N_IMAGES]["sentences"][0]["raw"] for i, key in enumerate(ids)}
    return predictions, references


def direct_pycocoevalcap(predictions, references):
    """The canonical COCO caption evaluation code path, called by hand."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in predictions.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    scores = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], bleu, strict=True))
    scores["METEOR"], _ = meteor.compute_score(gts, res)
    del meteor
    scores["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    scores["CIDEr"], per_image = Cider().compute_score(gts, res)
    return scores, dict(zip(gts, per_image, strict=True))


class PopenSpy(subprocess.Popen):
    started: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        PopenSpy.started.append(self)


@pytest.mark.slow  # two METEOR start-ups, ~16 s
def test_equals_pycocoevalcap_on_real_rsicd_val(shared_data, monkeypatch, caplog):
    predictions, references = rsicd_val_sample(shared_data)
    expected, expected_per_image = direct_pycocoevalcap(predictions, references)

    monkeypatch.setattr(subprocess, "Popen", PopenSpy)
    PopenSpy.started.clear()
    with caplog.at_level(logging.WARNING, logger="bita.eval.metrics"):
        scores = score_captions(predictions, references)
    print({k: v for k, v in scores.items() if k != "per_image_CIDEr"})

    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-12), name
    assert scores["S_m"] == pytest.approx(
        (expected["Bleu_4"] + expected["METEOR"] + expected["ROUGE_L"] + expected["CIDEr"]) / 4
    )
    assert scores["per_image_CIDEr"] == pytest.approx(expected_per_image, abs=1e-12)
    assert 0 < scores["Bleu_4"] < scores["Bleu_1"] < 1
    # Tokenizer (2 runs) and METEOR started Java; none may outlive the call.
    assert len(PopenSpy.started) == 3
    assert all(process.poll() is not None for process in PopenSpy.started)
    if not all((metrics.SPICE_LIB / jar).exists() for jar in metrics.SPICE_JARS):
        assert scores["SPICE"] is None
        assert sum("SPICE unavailable" in r.getMessage() for r in caplog.records) == 1


def test_java_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install default-jre-headless"):
        score_captions({"a": "a plane"}, {"a": ["a plane on the runway"]})


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ({}, {}, "no predictions"),
        ({"a": "x"}, {"b": ["x"]}, "same images"),
        ({"a": "x"}, {"a": []}, "non-empty list"),
        ({"a": "x"}, {"a": "x"}, "non-empty list"),
        ({"a": None}, {"a": ["x"]}, "must be a str"),
    ],
)
def test_bad_inputs_are_named(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        score_captions(predictions, references)


@pytest.fixture
def empty_spice_lib(tmp_path, monkeypatch):
    lib = tmp_path / "pycocoevalcap_spice_lib"
    lib.mkdir()
    monkeypatch.setattr(metrics, "SPICE_LIB", lib)
    return lib


@pytest.mark.parametrize("configured", [False, True])
def test_spice_unavailable_is_none_not_zero(empty_spice_lib, tmp_path, caplog, configured):
    """Scored again and again (every epoch, every split), the note is logged once."""
    metrics._note_once.cache_clear()
    spice_dir = tmp_path / "corenlp" if configured else None
    with caplog.at_level(logging.WARNING, logger="bita.eval.metrics"):
        for _ in range(3):
            assert metrics._spice({"a": ["x"]}, {"a": ["x"]}, spice_dir) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert lines[0].startswith("SPICE unavailable:")
    assert "stanford-corenlp-3.6.0-models.jar" in lines[0]


def test_spice_uses_configured_jars(empty_spice_lib, tmp_path, monkeypatch):
    corenlp = tmp_path / "corenlp"
    corenlp.mkdir()
    for jar in metrics.SPICE_JARS:
        (corenlp / jar).write_bytes(b"jar")

    class FakeSpice:
        def compute_score(self, gts, res):
            return 0.25, []

    monkeypatch.setattr(metrics.spice_module, "Spice", FakeSpice)
    assert metrics._spice({"a": ["x"]}, {"a": ["x"]}, corenlp) == 0.25
    for jar in metrics.SPICE_JARS:
        assert (empty_spice_lib / jar).resolve() == (corenlp / jar).resolve()
