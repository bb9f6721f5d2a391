"""COCO caption metrics through pycocoevalcap, exactly as the captioning papers compute them.

Scores must be comparable with published numbers, so this module adds nothing to the metric
code: it PTB-tokenises with pycocoevalcap's own tokenizer and calls its BLEU, METEOR, ROUGE-L,
CIDEr(-D) and (when its Stanford CoreNLP jars are present) SPICE scorers. What it does add:
input checks, a clear error when Java is missing, SPICE reported as unavailable (``None``,
never 0) offline, S_m, per-image CIDEr for the gallery, and shutting down METEOR's Java
process (pycocoevalcap leaves that to the garbage collector).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice as spice_module
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

log = logging.getLogger(__name__)

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
SM_PARTS = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_LIB = Path(spice_module.__file__).parent / "lib"  # where spice-1.0.jar looks for them
JAVA_HINT = (
    "pycocoevalcap's PTB tokenizer and METEOR run Java, but no `java` executable is on PATH; "
    "install a Java runtime, e.g. `sudo apt-get install default-jre-headless` (Debian/Ubuntu)"
)


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    spice_dir: str | Path | None = None,
) -> dict:
    """Score one caption per image against its references.

    Returns ``Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE`` (0–1 scale as pycocoevalcap computes
    them; SPICE is None when its CoreNLP jars are not available), ``S_m`` = mean of BLEU-4,
    METEOR, ROUGE-L and CIDEr, and ``per_image_CIDEr`` {image id: CIDEr}.
    ``spice_dir``: folder holding the Stanford CoreNLP 3.6.0 jars SPICE needs (SPICE would
    otherwise try to download them).
    """
    _check_inputs(predictions, references)
    require_java()
    gts, res = _tokenize(predictions, references)
    scores: dict = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update(zip(METRIC_NAMES[:4], bleu, strict=True))
    with _meteor() as meteor:
        scores["METEOR"], _ = meteor.compute_score(gts, res)
    scores["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    scores["CIDEr"], per_image = Cider().compute_score(gts, res)
    scores["SPICE"] = _spice(gts, res, spice_dir)
    scores = {name: _plain(value) for name, value in scores.items()}
    scores["S_m"] = sum(scores[name] for name in SM_PARTS) / len(SM_PARTS)
    scores["per_image_CIDEr"] = {key: float(v) for key, v in zip(gts, per_image, strict=True)}
    return scores


def require_java() -> None:
    """Fail early with an install hint: pycocoevalcap would die with a bare FileNotFoundError."""
    if shutil.which("java") is None:
        raise RuntimeError(JAVA_HINT)


def _check_inputs(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]):
    if not predictions:
        raise ValueError("score_captions: no predictions to score")
    missing = sorted(set(predictions) - set(references))
    extra = sorted(set(references) - set(predictions))
    if missing or extra:
        raise ValueError(
            "score_captions: predictions and references must cover the same images; "
            f"without references: {missing[:5]}, without a prediction: {extra[:5]}"
        )
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"score_captions: image {key!r} needs a non-empty list of references")
    for key, text in predictions.items():
        if not isinstance(text, str):
            raise ValueError(f"score_captions: prediction for {key!r} must be a str, got {text!r}")


def _tokenize(predictions, references) -> tuple[dict, dict]:
    """PTB-tokenise both sides, checking that no caption got lost on the way.

    The Java tokenizer gets one caption per line and the wrapper zips its output lines back to
    images, so a stray line break would silently shift every later caption; whitespace is
    therefore collapsed first (tokenization splits on it anyway, so scores are unchanged).
    """
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize(_as_coco(references))
    res = tokenizer.tokenize(_as_coco({key: [text] for key, text in predictions.items()}))
    expected_gts = {key: len(refs) for key, refs in references.items()}
    if _counts(gts) != expected_gts or _counts(res) != dict.fromkeys(predictions, 1):
        raise RuntimeError(
            "pycocoevalcap's PTB tokenizer returned fewer captions than it was given"
        )
    return gts, {key: res[key] for key in gts}


def _counts(captions: Mapping[str, Sequence[str]]) -> dict[str, int]:
    return {key: len(caps) for key, caps in captions.items()}


def _as_coco(captions: Mapping[str, Sequence[str]]) -> dict[str, list[dict[str, str]]]:
    return {
        key: [{"caption": " ".join(text.split())} for text in caps]
        for key, caps in captions.items()
    }


@contextlib.contextmanager
def _meteor() -> Iterator[Meteor]:
    """A METEOR scorer whose Java process is ended on exit, even after an error.

    pycocoevalcap ends it in ``__del__``, which first takes a lock that a failed
    ``compute_score`` never releases — the process would linger and the collector would hang.
    """
    meteor = Meteor()
    try:
        yield meteor
    finally:
        if meteor.lock.locked():
            meteor.lock.release()
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


@functools.cache
def _note_once(message: str) -> None:
    """Log a note once per process: a run scores several splits and epochs, and the same
    missing-SPICE note each time reads like a new problem."""
    log.warning(message)


def _spice(gts: dict, res: dict, spice_dir: str | Path | None) -> float | None:
    """SPICE when the CoreNLP jars can be found (never a download), else None with one log line."""
    missing = [jar for jar in SPICE_JARS if not (SPICE_LIB / jar).exists()]
    if missing and spice_dir is None:
        _note_once(
            "SPICE unavailable: set paths.spice to a folder holding "
            f"{' and '.join(SPICE_JARS)} (from stanford-corenlp-full-2015-12-09.zip); "
            "reporting SPICE as None, not 0"
        )
        return None
    if missing:
        source = Path(spice_dir)
        absent = [jar for jar in missing if not (source / jar).is_file()]
        if absent:
            _note_once(
                f"SPICE unavailable: {', '.join(absent)} not found in {source} (paths.spice); "
                "reporting SPICE as None"
            )
            return None
        for jar in missing:
            # SPICE's jar finds CoreNLP through its manifest class path (lib/ beside it).
            (SPICE_LIB / jar).symlink_to((source / jar).resolve())
    score, _ = spice_module.Spice().compute_score(gts, res)
    return float(score)


def _plain(value) -> float | None:
    return None if value is None else float(value)
