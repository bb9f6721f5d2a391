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
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, precook
from scipy import sparse

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

    def pairwise(self, captions: Sequence[str]) -> np.ndarray:
        """``S[i, j]``: CIDEr-D of caption i against caption j as its only reference [M, M].

        The same numbers as ``__call__`` (tested), computed as sparse products: consensus over
        the ~1,400 captions of an RSICD scene class needs two million pairs, which
        pycocoevalcap's per-pair Python loop takes minutes for. Its clipped numerator
        ``sum_g min(h_g, r_g) r_g`` over tf-idf weights ``tf * idf`` is written as
        ``sum_t sum_g [tf_h >= t] idf_g * [tf_r >= t] tf_r idf_g``, one product per count t.
        """
        counts = [precook(reward_tokens(caption)) for caption in captions]
        if not counts:
            return np.zeros((0, 0))
        log_corpus = float(np.log(float(self.corpus_size)))
        # pycocoevalcap's "length" is the caption's bigram count (its n-gram index 1)
        lengths = np.array([sum(tf for g, tf in c.items() if len(g) == 2) for c in counts])
        penalty = np.exp(
            -((lengths[:, None] - lengths[None, :]) ** 2) / (2 * CiderScorer().sigma ** 2)
        )
        total = np.zeros((len(counts), len(counts)))
        for n in range(1, 5):
            tf, idf = self._term_frequencies(counts, n, log_corpus)
            weights = tf.multiply(idf).tocsr()
            norms = np.sqrt(np.asarray(weights.multiply(weights).sum(axis=1))).ravel()
            numerator = np.zeros_like(total)
            for t in range(1, int(tf.max()) + 1 if tf.nnz else 1):
                present = (tf >= t).astype(np.float64)
                numerator += (present.multiply(idf) @ present.multiply(weights).T).toarray()
            denominator = np.outer(norms, norms)
            cosine = np.divide(numerator, denominator, out=numerator, where=denominator > 0)
            total += cosine * penalty
        return total / 4 * 10.0

    def consensus(self, captions: Sequence[str]) -> np.ndarray:
        """Each caption's mean CIDEr-D against all the others [M] (0 for a lone caption): how
        much a caption says what the others say, as consensus reranking (Devlin et al. 2015)
        scores candidates. Identical token sequences are scored once and weighted by their
        count; a caption's own copy is left out."""
        if len(captions) < 2:
            return np.zeros(len(captions))
        tokens = [reward_tokens(caption) for caption in captions]
        slot: dict[str, int] = {}
        which = [slot.setdefault(t, len(slot)) for t in tokens]
        counts = np.bincount(which).astype(np.float64)
        pairs = self.pairwise([captions[tokens.index(t)] for t in slot])
        score = (pairs @ counts - np.diag(pairs)) / (len(captions) - 1)
        return score[which]

    def _term_frequencies(
        self, counts: list[dict], n: int, log_corpus: float
    ) -> tuple[sparse.csr_matrix, np.ndarray]:
        """Term frequencies of the n-grams of order n [captions, n-grams] and their idf row."""
        columns: dict[tuple, int] = {}
        rows, cols, values = [], [], []
        for row, caption in enumerate(counts):
            for ngram, tf in caption.items():
                if len(ngram) == n:
                    rows.append(row)
                    cols.append(columns.setdefault(ngram, len(columns)))
                    values.append(float(tf))
        matrix = sparse.csr_matrix((values, (rows, cols)), shape=(len(counts), len(columns)))
        frequency = np.array([self.document_frequency[g] for g in columns], dtype=np.float64)
        idf = log_corpus - np.log(np.maximum(1.0, frequency))
        return matrix, idf[None, :]
