"""Caption text preprocessing of SPEC §2, shared by training, evaluation and the shard manifest."""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r'[.!"()*#:;~]')
_LETTER = re.compile(r"[^\W\d_]")


def clean_caption(text: str, max_words: int = 50) -> str:
    """Lower-case, blank out ``. ! " ( ) * # : ; ~``, collapse whitespace, keep ``max_words``."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


def usable_captions(raw_captions: list[str]) -> list[str]:
    """Cleaned captions that contain at least one letter.

    The official RSICD file holds placeholder sentences (`` .`` and ``1 .``); training on them
    teaches the LM to stop at once and scoring against them rewards nothing, so they are dropped
    from training targets and references (they stay verbatim in the shards and the manifest
    lists them).
    """
    cleaned = (clean_caption(text) for text in raw_captions)
    return [text for text in cleaned if _LETTER.search(text)]
