"""CIDEr-D of sampled captions against their references, with a training corpus's n-gram
statistics: the reward of self-critical sequence training (Rennie et al., CVPR 2017).

pycocoevalcap's scorer takes its document frequencies from the set it scores, which suits
evaluation (the whole split at once) but not a reward over a few dozen images: n-grams the batch
happens to share would lose their weight. This subclass keeps pycocoevalcap's CIDEr-D formula
(clipped tf-idf cosine, Gaussian length penalty, x10) and swaps in the document frequencies and
size of the training references, as the SCST papers do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs

_WORD = re.compile(r"[a-z0-9]+")


def reward_tokens(text: str) -> str:
    """Lower-cased words, punctuation dropped: PTB tokenisation without the Java round trip,
    which a reward computed every step cannot afford (captions here are plain sentences)."""
    return " ".join(_WORD.findall(text.lower()))


class _Frequencies(dict):
    """Document frequencies; an n-gram the corpus lacks counts 0 without being added."""

    def __missing__(self, ngram: tuple) -> float:
        return 0.0


class _CorpusCiderScorer(CiderScorer):
    """pycocoevalcap's CIDEr-D scorer with fixed corpus statistics.

    `compute_cider` sets `ref_len` from the scored set; the property keeps the corpus value."""

    ref_len = property(lambda self: self._corpus_ref_len, lambda self, value: None)

    def __init__(self, document_frequency: _Frequencies, corpus_size: int) -> None:
        self._corpus_ref_len = float(np.log(float(corpus_size)))
        super().__init__()
        self.document_frequency = document_frequency


class CiderReward:
    """CIDEr-D of captions against references, idf from `corpus` (one reference list per image
    of the training split)."""

    def __init__(self, corpus: Sequence[Sequence[str]]) -> None:
        if not corpus:
            raise ValueError("CiderReward needs a non-empty corpus of reference lists")
        frequency = _Frequencies()
        for references in corpus:
            cooked = cook_refs([reward_tokens(r) for r in references])
            for ngram in {ngram for counts in cooked for ngram in counts}:
                frequency[ngram] = frequency[ngram] + 1
        self.document_frequency = frequency
        self.corpus_size = len(corpus)

    def __call__(
        self, captions: Sequence[str], references: Sequence[Sequence[str]]
    ) -> torch.Tensor:
        """One CIDEr-D per caption [N] (float32), `references[i]` being caption i's."""
        if len(captions) != len(references):
            raise ValueError(f"{len(captions)} captions but {len(references)} reference lists")
        scorer = _CorpusCiderScorer(self.document_frequency, self.corpus_size)
        for caption, refs in zip(captions, references, strict=True):
            if not refs:
                raise ValueError(f"caption {caption!r} has no references to score against")
            scorer += (reward_tokens(caption), [reward_tokens(r) for r in refs])
        return torch.tensor(scorer.compute_cider(), dtype=torch.float32)
