"""Markdown tables of caption metrics, for the console and for experiment write-ups.

Papers print scores ×100 while pycocoevalcap computes them on 0–1; the table says which one it
shows so numbers are never compared across scales by mistake.
"""

from __future__ import annotations

from collections.abc import Mapping

from bita.eval.metrics import METRIC_NAMES

COLUMNS = (*METRIC_NAMES, "S_m")
HEADERS = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4"}


def metrics_table(rows: Mapping[str, Mapping[str, float | None]], *, percent: bool = False) -> str:
    """One row per result (label → metrics dict); SPICE None shows as "n/a", never 0."""
    scale = 100.0 if percent else 1.0
    unit = "×100" if percent else "0–1"
    header = [f"result ({unit})", *(HEADERS.get(name, name) for name in COLUMNS)]
    lines = [_row(header), _row(["---"] * len(header))]
    for label, metrics in rows.items():
        cells = [_cell(metrics.get(name), scale, percent) for name in COLUMNS]
        lines.append(_row([label, *cells]))
    return "\n".join(lines)


def caption_examples(captions: list[Mapping], count: int) -> str:
    """``count`` images spread over ``captions`` (``{filename, caption, references}`` records),
    one line each: file, generated caption, its first reference."""
    if count <= 0 or not captions:
        return ""
    step = max(1, len(captions) // count)
    chosen = captions[::step][:count]
    width = max(len(c["filename"]) for c in chosen)
    generated = max(len(c["caption"]) for c in chosen)
    return "\n".join(
        f"  {c['filename']:<{width}}  {c['caption']:<{generated}}  | {c['references'][0]}"
        for c in chosen
    )


def _cell(value: float | None, scale: float, percent: bool) -> str:
    if value is None:
        return "n/a"
    return f"{value * scale:.2f}" if percent else f"{value:.4f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
