"""Image decoding shared by make_shards and the caption CLI: any common remote-sensing file to RGB.

PIL reads JPEG, PNG and 8-bit TIFF (grayscale, palette and CMYK included); TIFFs PIL cannot
read or reads with wider samples (16-bit, float, more than four bands, planar) go through
tifffile. Samples wider than 8 bits are stretched linearly between their 0.5th and 99.5th
percentile over all bands together, so a 12-bit sensor range fills 0-255 and the colour balance
between bands is kept; of more than three bands the first three are used, with a warning.

Size. Scenes far above Pillow's default limit (89 million pixels, refused outright above twice
that as a "decompression bomb") are ordinary in remote sensing, so the limit is raised, on
import, to ``MAX_PIXELS`` (one billion pixels, e.g. 31,623 x 31,623), which ``load_image``
enforces itself with a message naming the file. A caller that resizes anyway (the caption
CLI) passes ``reduce_to``: JPEGs then decode at 1/2, 1/4 or 1/8 scale (Pillow's draft mode,
DCT scaling) and wide TIFFs are subsampled before their stretch, never below twice
``reduce_to`` on either side. PNG and 8-bit TIFF decode at full size (3 bytes a pixel).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from bita.errors import UserError

JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_WIDE_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_STRETCH_PERCENTILES = (0.5, 99.5)
MAX_PIXELS = 1_000_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # load_image refuses larger images with its own message
_CEILING = "over bita's ceiling (bita.data.images.MAX_PIXELS)"


class ImageError(UserError, ValueError):
    """An image file that cannot be decoded: ``label`` names it, ``reason`` says why."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(f"{label}: {reason}")
        self.label, self.reason = label, reason

    def __reduce__(self):  # pickles (DataLoader workers) with both arguments
        return type(self), (self.label, self.reason)


def load_image(
    source: str | Path | bytes, *, name: str | None = None, reduce_to: int | None = None
) -> Image.Image:
    """Decode a file path or encoded bytes into an RGB PIL image; ``name`` labels errors.

    ``reduce_to``: the caller resizes to about this many pixels a side, so decode smaller
    where the format allows it (see the module docstring)."""
    label = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as err:
        raise ImageError(label, f"cannot read the file ({err.strerror or err})") from err
    try:
        return _decode(data, label, reduce_to)
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(label, f"damaged image data ({type(err).__name__}: {err})") from err


def _decode(data: bytes, label: str, reduce_to: int | None) -> Image.Image:
    if not data:
        raise ImageError(label, "empty file (0 bytes)")
    is_tiff = data[:4] in _TIFF_MAGICS
    if is_tiff and _tiff_is_wide(data):
        # PIL opens 16-bit RGB(A) TIFFs too, but keeps only each sample's high byte
        return _tiff_to_rgb(data, label, reduce_to)
    try:
        with _open(data, label) as image:
            if reduce_to:
                image.draft(None, (2 * reduce_to, 2 * reduce_to))  # JPEG only; others ignore it
            image.load()
            if not (is_tiff and image.mode in _WIDE_MODES):
                return _pil_to_rgb(image, label)
    except Exception:
        if not is_tiff:
            raise
    return _tiff_to_rgb(data, label, reduce_to)


def _open(data: bytes, label: str) -> Image.Image:
    """PIL's lazy open (header only), refusing what no reader knows and what is too large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageError(label, f"more than {MAX_PIXELS:,} pixels, {_CEILING}") from None
    except UnidentifiedImageError:
        raise ImageError(
            label,
            f"not an image: {len(data):,} bytes in no format PIL or tifffile reads "
            f"(JPEG, PNG, TIFF, ...); it starts with {data[:8]!r}",
        ) from None
    _check_pixels(image.width, image.height, label)
    return image


def _check_pixels(width: int, height: int, label: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(label, f"{width} x {height} = {width * height:,} pixels, {_CEILING}")


def _reduction(height: int, width: int, reduce_to: int | None) -> int:
    """The subsampling step that keeps both sides at least twice ``reduce_to``."""
    return max(1, min(height, width) // (2 * reduce_to)) if reduce_to else 1


def _pil_to_rgb(image: Image.Image, label: str) -> Image.Image:
    if image.mode in _WIDE_MODES:
        return _array_to_rgb(np.asarray(image), label)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    return image.convert("RGB")


def _tiff_is_wide(data: bytes) -> bool:
    """True when the first image's samples are wider than 8 bits (or not integers)."""
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            return tif.pages[0].dtype != np.uint8
    except Exception:
        return False


def _tiff_to_rgb(data: bytes, label: str, reduce_to: int | None = None) -> Image.Image:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            axes = series.axes
            _check_pixels(series.shape[axes.index("X")], series.shape[axes.index("Y")], label)
            array = series.asarray()
    except (tifffile.TiffFileError, ValueError) as err:
        raise ImageError(label, f"damaged or unsupported TIFF ({err})") from err
    # keep the first image of any stack (pages, time, z) and one band axis (samples, else channels)
    band = "S" if "S" in axes else "C"
    for axis in reversed(range(len(axes))):
        if axes[axis] not in ("Y", "X", band):
            array = np.take(array, 0, axis=axis)
    kept = [a for a in axes if a in ("Y", "X", band)]
    if band in kept:
        array = np.moveaxis(array, kept.index(band), -1)
    step = _reduction(array.shape[0], array.shape[1], reduce_to)
    return _array_to_rgb(array[::step, ::step], label)


def _array_to_rgb(array: np.ndarray, label: str) -> Image.Image:
    if array.ndim == 2:
        array = array[:, :, None]
    bands = array.shape[-1]
    if bands > 3:
        warnings.warn(f"{label}: {bands} bands; using the first three as RGB", stacklevel=4)
        array = array[:, :, :3]
    elif bands == 2:
        warnings.warn(f"{label}: 2 bands; using the first as grayscale", stacklevel=4)
        array = array[:, :, :1]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(_to_uint8(array))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    low, high = np.nanpercentile(values, _STRETCH_PERCENTILES)
    scaled = (np.nan_to_num(values, nan=low) - low) / max(high - low, 1e-12)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def encode_for_shard(path: Path) -> tuple[str, bytes]:
    """(extension, bytes) to store: a JPEG as is, anything else as the PNG of its RGB pixels.

    The file is fully decoded first so that unreadable images are caught at shard time; the
    PNG holds exactly the pixels ``load_image`` gives for the original, so training and the
    caption CLI see the same image.
    """
    data = path.read_bytes()
    image = load_image(data, name=str(path))
    if data.startswith(JPEG_MAGIC):
        return "jpg", data
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()
