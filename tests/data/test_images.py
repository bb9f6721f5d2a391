import io
import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from bita.data import images
from bita.data.images import ImageError, encode_for_shard, load_image

from .conftest import jpeg_bytes


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def tiff(array: np.ndarray, **kw) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kw)
    return buffer.getvalue()


def test_jpeg_and_png_decode_to_rgb():
    assert load_image(jpeg_bytes(0)).mode == "RGB"
    rgba = Image.new("RGBA", (5, 4), (10, 20, 30, 40))
    assert load_image(encoded(rgba, "PNG")).getpixel((0, 0)) == (10, 20, 30)


def test_grayscale_palette_and_cmyk_become_rgb():
    assert load_image(encoded(Image.new("L", (4, 4), 77), "PNG")).getpixel((1, 1)) == (77,) * 3
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert load_image(encoded(palette, "PNG")).getpixel((0, 0)) == (200, 100, 50)
    cmyk = load_image(encoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"))
    red, green, blue = cmyk.getpixel((0, 0))
    assert red > 200 and green < 60 and blue < 60


def test_16bit_tiff_is_stretched_to_full_8bit_range():
    gray = np.linspace(100, 4000, 64 * 64).astype(np.uint16).reshape(64, 64)
    image = load_image(tiff(gray))
    assert image.mode == "RGB" and image.size == (64, 64)
    values = np.asarray(image)
    assert values.min() == 0 and values.max() == 255
    assert (values[..., 0] == values[..., 2]).all()
    rgb16 = np.stack([gray, gray // 2, gray // 4], axis=-1)
    red, green, blue = np.asarray(load_image(tiff(rgb16))).reshape(-1, 3).mean(0)
    assert red > green > blue


def test_multiband_tiff_uses_first_three_bands_with_warning():
    bands = np.zeros((5, 8, 8), dtype=np.uint8)
    bands[0], bands[1], bands[2], bands[4] = 10, 20, 30, 250
    with pytest.warns(UserWarning, match="5 bands; using the first three"):
        image = load_image(tiff(bands, photometric="minisblack", planarconfig="separate"))
    assert image.getpixel((3, 3)) == (10, 20, 30)


def test_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(jpeg_bytes(1)[:150])
    with pytest.raises(ImageError, match="broken.jpg"):
        load_image(broken)
    with pytest.raises(ImageError, match="nothere.tif"):
        load_image(tmp_path / "nothere.tif")
    with pytest.raises(ImageError, match="sample_7"):
        load_image(b"not an image", name="sample_7")


def test_encode_for_shard_keeps_jpeg_and_converts_tiff_to_lossless_png(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(2))
    assert encode_for_shard(tmp_path / "a.jpg") == ("jpg", jpeg_bytes(2))
    ramp = (np.arange(16 * 16 * 3, dtype=np.uint16).reshape(16, 16, 3) * 50).astype(np.uint16)
    (tmp_path / "b.tif").write_bytes(tiff(ramp))
    extension, data = encode_for_shard(tmp_path / "b.tif")
    assert extension == "png" and data.startswith(b"\x89PNG")
    assert np.array_equal(np.asarray(load_image(data)), np.asarray(load_image(tmp_path / "b.tif")))


@pytest.mark.parametrize("bands", [3, 4])
def test_sixteen_bit_rgb_tiff_is_stretched_not_truncated(tmp_path, bands):
    """PIL reads 16-bit RGB(A) TIFFs but keeps only the high byte: 12-bit data came out black."""
    path = tmp_path / f"rgb{bands}.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 4096, (40, 50, bands), dtype=np.uint16))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        pixels = np.asarray(load_image(path))
    assert pixels.shape == (40, 50, 3) and pixels.max() == 255 and pixels.mean() > 100


def test_decode_errors_say_what_is_wrong(tmp_path):
    """Faults: an empty file, a text file, a cut JPEG. Main said `cannot identify image file
    <_io.BytesIO object at 0x...>` for the first two."""
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("shopping list\n")
    (tmp_path / "cut.jpg").write_bytes(jpeg_bytes(3)[:400])
    messages = {}
    for name in ("empty.jpg", "notes.jpg", "cut.jpg"):
        with pytest.raises(ImageError) as caught:
            load_image(tmp_path / name)
        messages[name] = str(caught.value)
    assert messages["empty.jpg"] == f"{tmp_path / 'empty.jpg'}: empty file (0 bytes)"
    assert messages["notes.jpg"].startswith(f"{tmp_path / 'notes.jpg'}: not an image: 14 bytes")
    assert "it starts with b'shopping'" in messages["notes.jpg"]
    assert messages["cut.jpg"].startswith(f"{tmp_path / 'cut.jpg'}: damaged image data")
    assert caught.value.label == str(tmp_path / "cut.jpg")
    assert caught.value.reason.startswith("damaged image data")


def test_images_past_pillows_limit_load_up_to_the_stated_ceiling(monkeypatch):
    """Pillow's own limit (89 million pixels, refused above twice that) is raised to bita's
    ceiling, which load_image states when it refuses an image."""
    assert Image.MAX_IMAGE_PIXELS == images.MAX_PIXELS >= 1_000_000_000
    monkeypatch.setattr(images, "MAX_PIXELS", 24 * 24 - 1)
    with pytest.raises(ImageError, match=r"24 x 24 = 576 pixels, over bita's ceiling"):
        load_image(jpeg_bytes(0), name="scene")


def test_reduce_to_decodes_jpegs_in_draft_and_subsamples_wide_tiffs():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (640, 960, 3), np.uint8))
    assert load_image(encoded(big, "JPEG"), reduce_to=64).size == (240, 160)  # 1/4 scale
    assert load_image(encoded(big, "JPEG"), reduce_to=200).size == (960, 640)  # would be < 400
    assert load_image(encoded(big, "PNG"), reduce_to=64).size == (960, 640)  # no draft for PNG
    wide = np.random.default_rng(1).integers(0, 4096, (640, 960, 3), np.uint16)
    assert load_image(tiff(wide), reduce_to=64).size == (192, 128)  # every 5th sample
