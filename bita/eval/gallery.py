"""A self-contained HTML page of generated vs reference captions, best and worst CIDEr first.

Scores say how good a captioner is on average; the gallery shows what its captions look like
and where it fails. Thumbnails are embedded as base64 JPEG so the single file opens anywhere,
including as an MLflow artifact in `mlflow ui`.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bita.data.images import load_image

THUMBNAIL_PX = 192

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 1em; }
.card { display: flex; gap: 0.8em; border: 1px solid #ccc; border-radius: 6px; padding: 0.6em; }
.card img { width: PXpx; height: PXpx; object-fit: contain; background: #eee; }
.generated { font-weight: bold; margin: 0.2em 0; }
.refs { margin: 0.2em 0; padding-left: 1.2em; color: #555; font-size: 0.9em; }
.meta { color: #777; font-size: 0.8em; }
""".replace("PX", str(THUMBNAIL_PX))


def write_gallery(
    records: Sequence[Mapping[str, Any]],
    per_image_cider: Mapping[str, float],
    path: str | Path,
    *,
    size: int,
    title: str,
    summary: str = "",
) -> Path:
    """Write the gallery of ``size`` best and ``size`` worst images by per-image CIDEr.

    ``records`` hold ``image_id``, ``filename``, ``caption``, ``references``, ``image_bytes``.
    """
    sections = [
        ("Best first", _ranked(records, per_image_cider, best=True)[:size]),
        ("Worst first", _ranked(records, per_image_cider, best=False)[:size]),
    ]
    body = "".join(_section(name, chosen, per_image_cider) for name, chosen in sections)
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(summary)}</p>{body}</body></html>"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _ranked(records, cider: Mapping[str, float], *, best: bool) -> list[Mapping[str, Any]]:
    """By CIDEr (ties by image id, so the page is the same on every run)."""
    sign = -1 if best else 1
    return sorted(
        records, key=lambda record: (sign * cider[record["image_id"]], record["image_id"])
    )


def _section(name: str, records: Sequence[Mapping[str, Any]], cider: Mapping[str, float]) -> str:
    cards = "".join(_card(record, cider[record["image_id"]]) for record in records)
    return f"<h2>{html.escape(name)} ({len(records)})</h2><div class='grid'>{cards}</div>"


def _card(record: Mapping[str, Any], cider: float) -> str:
    refs = "".join(f"<li>{html.escape(ref)}</li>" for ref in record["references"])
    return (
        f"<div class='card'>{_thumbnail(record)}<div>"
        f"<p class='generated'>{html.escape(record['caption'])}</p><ol class='refs'>{refs}</ol>"
        f"<p class='meta'>CIDEr {cider:.3f} · {html.escape(str(record['image_id']))} · "
        f"{html.escape(str(record['filename']))}</p></div></div>"
    )


def _thumbnail(record: Mapping[str, Any]) -> str:
    """An <img> with the image inlined; an undecodable image must not sink the whole gallery."""
    try:
        image = load_image(record["image_bytes"])
    except (OSError, ValueError) as err:
        return f"<p class='meta'>image not shown: {html.escape(str(err))}</p>"
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    alt = html.escape(str(record["filename"]), quote=True)
    return f"<img src='data:image/jpeg;base64,{data}' alt='{alt}'>"
