"""Caption your own images with a trained checkpoint.

    python -m bita.caption --checkpoint runs/.../checkpoints/best photos/ scene.tif \
        [--out captions.jsonl] [--batch-size 16] [--num-beams 3] [--device cpu]

Writes one JSON line per image, ``{"image": path, "caption": text}``; a file that cannot be
read as an image gets ``{"image": path, "error": why}`` and the others still get captions.
Exit code 0 when every image got a caption, 1 otherwise. Folders are expanded recursively in
sorted order (hidden files skipped). Python API::

    from bita import Captioner
    captions = Captioner.from_checkpoint("runs/.../checkpoints/best").caption(["a.jpg"])
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image

from bita.data.images import load_image
from bita.data.transforms import eval_transform
from bita.engine.checkpoint import load_model
from bita.errors import UserError, reports_user_errors
from bita.eval.decoding import DecodeSettings, caption_images

ImageInput = str | Path | Image.Image


class Captioner:
    """A loaded model plus its eval transform and decoding settings.

    Images are decoded one at a time and resized as they are read, so a batch holds model
    inputs, never full-resolution pictures; ``reduce_to`` (the model's input size) lets JPEGs
    decode at a fraction of their size (bita.data.images).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        transform,
        settings: DecodeSettings,
        *,
        reduce_to: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.transform = transform
        self.settings = settings
        self.reduce_to = reduce_to

    @classmethod
    def from_checkpoint(
        cls, checkpoint_dir: str | Path, *, device: str | None = None, **decode_overrides
    ) -> Captioner:
        """Load ``checkpoint_dir`` (a `checkpoints/{best,last}` folder of a run).

        Decoding follows the checkpoint's `decode` config unless overridden by keyword
        (``num_beams=3``, ``batch_size=8``, ...).
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {device!r}: no CUDA device is visible (use cpu)")
        model, cfg = load_model(checkpoint_dir, device=device)
        settings = DecodeSettings.from_config(cfg.get("decode"), **decode_overrides)
        preprocess = model.preprocess
        transform = eval_transform(preprocess.size, preprocess.mean, preprocess.std)
        return cls(model, transform, settings, reduce_to=preprocess.size)

    def caption(self, images: Sequence[ImageInput]) -> list[str]:
        """One caption per image (paths or PIL images), in order, batched by `batch_size`."""
        captions: list[str] = []
        for start in range(0, len(images), self.settings.batch_size):
            chunk = images[start : start + self.settings.batch_size]
            captions.extend(self.caption_pixels([self.pixels(image) for image in chunk]))
        return captions

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """The model input of one image: decoded (smaller where the format allows), resized
        and normalised; the decoded picture is freed before the next one is read."""
        return self.transform(_as_rgb(image, self.reduce_to))

    def caption_pixels(self, pixels: Sequence[torch.Tensor]) -> list[str]:
        """Captions of model inputs made by `pixels`, as one batch."""
        return caption_images(self.model, torch.stack(list(pixels)), self.settings)


def _as_rgb(image: ImageInput, reduce_to: int | None = None) -> Image.Image:
    """RGB via `load_image`, also for in-memory images, so 16-bit or multi-band PIL images get
    the same rescaling as files instead of PIL's clipping `convert("RGB")`."""
    if not isinstance(image, Image.Image):
        return load_image(image, reduce_to=reduce_to)
    if image.mode == "RGB":
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    return load_image(buffer.getvalue())


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders replaced by their non-hidden files (recursive, sorted).

    Missing paths and empty folders are kept as they are so they get an error line.
    """
    expanded: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            expanded.append(path)
            continue
        files = sorted(
            child
            for child in path.rglob("*")
            if child.is_file() and not any(p.startswith(".") for p in child.relative_to(path).parts)
        )
        expanded.extend(files or [path])
    return expanded


def _pixels(captioner: Captioner, path: Path) -> torch.Tensor:
    if path.is_dir():
        raise ValueError(f"{path}: folder holds no files")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    return captioner.pixels(path)


def caption_files(
    captioner: Captioner, paths: Sequence[Path], out: TextIO
) -> Iterator[dict[str, str]]:
    """Caption ``paths`` chunk by chunk, writing (and yielding) one JSON line per path in order.

    Any failure to read one file becomes that file's error line: a user's folder of photos
    should not be lost to one broken file.
    """
    for start in range(0, len(paths), captioner.settings.batch_size):
        chunk = paths[start : start + captioner.settings.batch_size]
        lines: list[dict[str, str]] = []
        loaded: list[tuple[dict[str, str], torch.Tensor]] = []
        for path in chunk:
            line = {"image": str(path)}
            try:
                loaded.append((line, _pixels(captioner, path)))
            except Exception as err:  # whatever makes one file unreadable: report it, go on
                line["error"] = str(err) or type(err).__name__
            lines.append(line)
        captions = captioner.caption_pixels([pixels for _, pixels in loaded]) if loaded else []
        for (line, _), caption in zip(loaded, captions, strict=True):
            line["caption"] = caption
        for line in lines:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
            yield line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bita.caption",
        description="Caption images (JPEG/PNG/TIFF, incl. 16-bit and multi-band) with a BITA "
        "checkpoint; one JSON line per image.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint folder (config.yaml + weights)"
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--out", type=Path, help="write JSON lines here instead of stdout")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    decode = parser.add_argument_group("decoding (default: the checkpoint's `decode` config)")
    for field in dataclasses.fields(DecodeSettings):
        flag = "--" + field.name.replace("_", "-")
        kind = type(field.default)
        if kind is bool:
            decode.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            decode.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper())
    return parser


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    if args.out is not None and args.out.is_dir():
        raise UserError(
            f"--out {args.out}: is a folder; give the file to write, e.g. {args.out}/captions.jsonl"
        )
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(DecodeSettings)}
    try:
        captioner = Captioner.from_checkpoint(args.checkpoint, device=args.device, **overrides)
    except (
        OSError
    ) as err:  # unreadable files, weights that cannot be fetched: the message says which
        raise UserError(str(err)) from err
    paths = expand_inputs(args.inputs)
    if args.out is None:
        lines = list(caption_files(captioner, paths, sys.stdout))
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", encoding="utf-8") as out:
            lines = list(caption_files(captioner, paths, out))
    failed = sum("error" in line for line in lines)
    logging.getLogger("bita.caption").info("%d captioned, %d failed", len(lines) - failed, failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
