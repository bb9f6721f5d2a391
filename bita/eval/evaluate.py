"""Decode a split, score it, and write the results, the captions and the gallery.

Used by the evaluate stage and by fine-tune validation. Under torch.distributed every rank
decodes its share of the images; rank 0 gathers, scores once and writes; every rank returns
the same result so checkpoint selection agrees across ranks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from bita.errors import UserError
from bita.eval.decoding import DecodeSettings, decode_batches
from bita.eval.gallery import write_gallery
from bita.eval.metrics import score_captions
from bita.eval.tables import metrics_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpectedImages:
    """What the split holds: `count` images by its manifest, and `keys()` that lists them
    (read from the shards only when fewer images were scored, to name the ones left out)."""

    count: int
    keys: Callable[[], Iterable[str]]


class IncompleteEvaluationError(UserError):
    """Fewer images were scored than the split holds, and `eval.allow_missing` is false."""


def evaluate(
    model,
    batches: Iterable[Mapping[str, Any]],
    *,
    decode: DecodeSettings | Mapping[str, Any] | None,
    out_dir: str | Path,
    dataset: str,
    split: str,
    checkpoint: str | Path | None,
    gallery_size: int,
    tracker=None,
    spice_dir: str | Path | None = None,
    step: int = 0,
    expected: ExpectedImages | None = None,
    allow_missing: bool = False,
    selection: Mapping[str, Any] | None = None,
) -> dict[str, float | None]:
    """Caption every image of ``batches`` (eval batches), score, write, log; return the metrics.

    Returns ``Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE`` (None when unavailable) and ``S_m``,
    the same on every rank. Writes ``out_dir/results/<dataset>_<split>.json`` (metrics,
    decoding settings, checkpoint, counts, file names), ``<dataset>_<split>_captions.json``
    (``[{image_id, filename, caption, references}]``) and ``<dataset>_<split>_gallery.html``
    (``gallery_size`` best and worst images; 0 = no gallery). ``decode`` is the `decode`
    config section; ``spice_dir`` is `paths.spice`; ``step`` is the tracker step of the
    metrics (e.g. the fine-tune epoch); files are logged under the artifact folder `results`.

    With ``expected``, the results also record the split's image count and the keys of any
    image not scored (an image that failed to decode); a shortfall then fails unless
    ``allow_missing`` (`eval.allow_missing`), after the results are written. ``selection``
    (which checkpoint was scored and why) is recorded as it is.
    """
    if gallery_size < 0:
        raise ValueError(f"eval.gallery_size={gallery_size}: expected >= 0")
    settings = decode if isinstance(decode, DecodeSettings) else DecodeSettings.from_config(decode)
    records = _gather_to_rank0(list(decode_batches(model, batches, settings)))
    if records is None:
        return _receive_from_rank0()
    try:
        summary = _score_and_write(
            records,
            settings=settings,
            out_dir=Path(out_dir),
            dataset=dataset,
            split=split,
            checkpoint=checkpoint,
            gallery_size=gallery_size,
            spice_dir=spice_dir,
            expected=expected,
            selection=selection,
        )
        _log_to_tracker(tracker, summary, Path(out_dir), step)
        _check_complete(summary, Path(out_dir), allow_missing)
    except Exception as err:
        _send_from_rank0({"error": f"{type(err).__name__}: {err}"})
        raise
    _send_from_rank0(summary["metrics"])
    return summary["metrics"]


def results_path(out_dir: str | Path, dataset: str, split: str) -> Path:
    """Where `evaluate` writes the results JSON of ``dataset``'s ``split`` (it names the other
    files under ``files``)."""
    return Path(out_dir) / "results" / f"{dataset}_{split}.json"


def _score_and_write(
    records: list[dict[str, Any]],
    *,
    settings: DecodeSettings,
    out_dir: Path,
    dataset: str,
    split: str,
    checkpoint: str | Path | None,
    gallery_size: int,
    spice_dir: str | Path | None,
    expected: ExpectedImages | None,
    selection: Mapping[str, Any] | None,
) -> dict[str, Any]:
    unique = _drop_duplicates(records)
    if not unique:
        raise ValueError(f"evaluate {dataset}/{split}: the batches held no images")
    predictions = {record["image_id"]: record["caption"] for record in unique}
    references = {record["image_id"]: record["references"] for record in unique}
    assert len(predictions) == len(references) == len(unique), "image ids must be unique"
    scores = score_captions(predictions, references, spice_dir=spice_dir)
    per_image_cider = scores.pop("per_image_CIDEr")

    results_file = results_path(out_dir, dataset, split)
    results_dir, stem = results_file.parent, results_file.stem
    results_dir.mkdir(parents=True, exist_ok=True)
    files = {"results": results_file.name, "captions": f"{stem}_captions.json"}
    captions = [
        {key: record[key] for key in ("image_id", "filename", "caption", "references")}
        for record in sorted(unique, key=lambda record: record["image_id"])
    ]
    _write_json(results_dir / files["captions"], captions)
    if gallery_size:
        files["gallery"] = f"{stem}_gallery.html"
        write_gallery(
            unique,
            per_image_cider,
            results_dir / files["gallery"],
            size=gallery_size,
            title=f"BITA captions: {dataset} {split}",
            summary=_gallery_summary(scores, len(unique), checkpoint),
        )
    summary = {
        "dataset": dataset,
        "split": split,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "metrics": scores,
        "decoding": settings.to_dict(),
        "counts": {
            "images": len(unique),
            "references": sum(len(refs) for refs in references.values()),
            "duplicates_dropped": len(records) - len(unique),
        },
        "files": files,
    }
    if expected is not None:
        summary["counts"]["images_expected"] = expected.count
        summary["skipped_images"] = _not_scored(expected, predictions)
    if selection is not None:
        summary["selection"] = dict(selection)
    _write_json(results_dir / files["results"], summary)
    print(metrics_table({f"{dataset} {split}": scores}))
    return summary


def _not_scored(expected: ExpectedImages, scored: Mapping[str, Any]) -> list[str]:
    """Keys of the split's images that were not scored (listed only when some are missing)."""
    if len(scored) >= expected.count:
        return []
    return sorted(set(expected.keys()) - set(scored))


def _check_complete(summary: Mapping[str, Any], out_dir: Path, allow_missing: bool) -> None:
    """Fail on a shortfall unless allowed; either way the count is in the results file."""
    counts = summary["counts"]
    if "images_expected" not in counts or counts["images"] >= counts["images_expected"]:
        return
    skipped = summary["skipped_images"]
    more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    shown = ", ".join(skipped[:10]) + more if skipped else "keys unreadable (a damaged shard)"
    message = (
        f"evaluate {summary['dataset']}/{summary['split']}: scored {counts['images']} of "
        f"{counts['images_expected']} images; not scored: {shown} (results in "
        f"{out_dir / 'results' / summary['files']['results']}; warnings above say why)"
    )
    if not allow_missing:
        raise IncompleteEvaluationError(
            f"{message}. Fix or rebuild the shards, or set eval.allow_missing=true to accept a "
            "score over the images that could be read"
        )
    log.warning("%s; eval.allow_missing=true, so the score stands", message)


def _gallery_summary(scores: Mapping[str, float | None], images: int, checkpoint) -> str:
    shown = ", ".join(
        f"{name} {scores[name]:.4f}"
        for name in ("CIDEr", "Bleu_4", "S_m")
        if scores[name] is not None
    )
    return f"{images} images · {shown} (0–1 scale) · checkpoint {checkpoint}"


def _drop_duplicates(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the first record per image id, so no image is scored twice.

    The eval loader promises every image exactly once; a duplicate means a loader or sharding
    bug, which is logged loudly instead of silently weighting images twice.
    """
    unique: dict[str, dict[str, Any]] = {}
    for record in records:
        unique.setdefault(record["image_id"], record)
    if len(unique) != len(records):
        log.warning(
            "evaluate: %d duplicate image(s) among %d decoded; each image is scored once",
            len(records) - len(unique),
            len(records),
        )
    return list(unique.values())


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _log_to_tracker(tracker, summary: Mapping[str, Any], out_dir: Path, step: int) -> None:
    if tracker is None:
        return
    prefix = f"{summary['dataset']}/{summary['split']}"
    metrics = {f"{prefix}/{k}": v for k, v in summary["metrics"].items() if v is not None}
    tracker.log_metrics(metrics, step=step)
    for name in summary["files"].values():
        tracker.log_artifact(out_dir / "results" / name, artifact_path="results")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_to_rank0(records: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """All ranks' records on rank 0 (None elsewhere); a no-op in a single process."""
    if not _distributed():
        return records
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    return [record for rank_records in gathered for record in rank_records]


def _send_from_rank0(message: dict[str, Any]) -> None:
    """Share rank 0's metrics (or its failure) so other ranks neither hang nor disagree."""
    if _distributed():
        dist.broadcast_object_list([message], src=0)


def _receive_from_rank0() -> dict[str, Any]:
    box = [None]
    dist.broadcast_object_list(box, src=0)
    if "error" in box[0]:
        raise RuntimeError(f"evaluation failed on rank 0: {box[0]['error']}")
    return box[0]
