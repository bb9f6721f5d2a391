"""`python -m bita.caption` and `bita.Captioner` on a real (tiny, random) checkpoint."""

import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from bita import caption
from bita.caption import Captioner, _as_rgb, build_parser, caption_files, expand_inputs, main
from bita.data.images import load_image

CONF = Path(__file__).resolve().parents[1] / "conf"
CAPTIONS = [
    "many cars are parked in a parking lot near a building",
    "a river runs through green fields and some trees",
    "an airport with two planes and a long runway",
]


@pytest.fixture
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture
def image_folder(tmp_path, shared_data) -> Path:
    """The mix a user's folder may hold: four readable images and two files that are not."""
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.new("RGB", (300, 200), (30, 120, 60)).save(folder / "a_field.jpg")
    (folder / "b_ucm.tif").write_bytes((shared_data / "ucm" / "images" / "1.tif").read_bytes())
    rng = np.random.default_rng(0)
    bands = rng.integers(0, 4096, (70, 90, 5), np.uint16)  # 12-bit samples, 5 bands
    tifffile.imwrite(
        folder / "c_16bit_5band.tif", bands, photometric="minisblack", planarconfig="contig"
    )
    Image.new("L", (33, 47), 128).save(folder / "d_gray.png")
    (folder / "e_notes.txt").write_text("not an image\n")
    (folder / "f_empty.jpg").write_bytes(b"")
    (folder / ".hidden.jpg").write_bytes(b"")
    return folder


def test_folder_gets_four_captions_and_two_named_errors(checkpoint, image_folder, tmp_path, caplog):
    out = tmp_path / "out" / "captions.jsonl"
    argv = ["--checkpoint", str(checkpoint), str(image_folder), "--out", str(out)]
    with caplog.at_level(logging.WARNING):
        code = main([*argv, "--batch-size", "3", "--num-beams", "1"])
    assert code == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    names = ["a_field.jpg", "b_ucm.tif", "c_16bit_5band.tif", "d_gray.png"]
    assert [line["image"] for line in lines] == [
        str(image_folder / name) for name in [*names, "e_notes.txt", "f_empty.jpg"]
    ]
    assert all(isinstance(line["caption"], str) and "error" not in line for line in lines[:4])
    for line in lines[4:]:
        assert set(line) == {"image", "error"}
        assert Path(line["image"]).name in line["error"]
    warned = [r.getMessage() for r in caplog.records if r.name == "py.warnings"]
    assert any("c_16bit_5band.tif: 5 bands; using the first three" in w for w in warned)


def test_stdout_lines_and_missing_path(checkpoint, image_folder, capsys):
    code = main(["--checkpoint", str(checkpoint), str(image_folder / "d_gray.png"), "nope.png"])
    assert code == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [sorted(line) for line in lines] == [["caption", "image"], ["error", "image"]]
    assert "nope.png" in lines[1]["error"]


def test_all_readable_exits_zero(checkpoint, image_folder, capsys):
    code = main(["--checkpoint", str(checkpoint), str(image_folder / "a_field.jpg")])
    assert code == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_bad_checkpoint_or_setting_is_a_usage_error(checkpoint, tmp_path, capsys):
    for argv in (
        ["--checkpoint", str(tmp_path)],
        ["--checkpoint", str(checkpoint), "--top-p", "2"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "x.jpg"])
        assert exit_info.value.code == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith(f"error: {tmp_path}: not a bita checkpoint folder")
    assert errors[1].startswith("error: decode.top_p=2.0 is invalid")
    assert len(errors) == 2


def _one_line_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_out_as_a_folder_is_one_line(checkpoint, tmp_path, capsys):
    """Fault: `--out` naming a folder, once an IsADirectoryError traceback."""
    argv = ["--checkpoint", str(checkpoint), "x.jpg", "--out", str(tmp_path)]
    assert f"--out {tmp_path}: is a folder" in _one_line_error(argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(checkpoint, capsys):
    """Fault: `--device cuda` where no GPU is visible, once a torch traceback."""
    argv = ["--checkpoint", str(checkpoint), "x.jpg", "--device", "cuda"]
    assert "no CUDA device is visible" in _one_line_error(argv, capsys)


def test_a_truncated_checkpoint_is_one_line_naming_the_file(checkpoint, tmp_path, capsys):
    """Fault: a checkpoint whose model.safetensors was cut short (a bad copy), once a
    safetensors traceback that named no file."""
    damaged = shutil.copytree(checkpoint, tmp_path / "best")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = _one_line_error(["--checkpoint", str(damaged), "x.jpg"], capsys)
    assert f"{weights} cannot be read" in line


def test_python_api_takes_paths_and_pil_images(checkpoint, image_folder):
    captioner = Captioner.from_checkpoint(checkpoint, device="cpu", batch_size=2, num_beams=1)
    assert (captioner.settings.batch_size, captioner.settings.num_beams) == (2, 1)
    assert captioner.settings.max_new_tokens == 6  # from the checkpoint's decode config
    images = [image_folder / "a_field.jpg", Image.new("RGB", (20, 20)), Image.new("L", (9, 9))]
    captions = captioner.caption(images)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)


def test_wide_pil_images_are_rescaled_like_files(tmp_path):
    array = np.linspace(1000, 3000, 32 * 24, dtype=np.uint16).reshape(24, 32)
    tifffile.imwrite(tmp_path / "wide.tif", array)
    from_pil = np.asarray(_as_rgb(Image.fromarray(array)))
    assert np.array_equal(from_pil, np.asarray(load_image(tmp_path / "wide.tif")))
    assert from_pil.min() == 0 and from_pil.max() == 255


def test_expand_inputs_sorted_recursive_without_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "empty").mkdir()
    for name in ("b/2.png", "b/1.png", "0.jpg", ".cache/x.png", "b/.DS_Store"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert expand_inputs([tmp_path, tmp_path / "empty", "missing.tif"]) == [
        tmp_path / "0.jpg",
        tmp_path / "b" / "1.png",
        tmp_path / "b" / "2.png",
        tmp_path / "empty",
        Path("missing.tif"),
    ]


def test_decode_flags_default_to_checkpoint_config():
    args = build_parser().parse_args(
        ["--checkpoint", "c", "x.jpg", "--top-p", "0.5", "--do-sample"]
    )
    assert (args.top_p, args.do_sample, args.num_beams, args.prompt) == (0.5, True, None, None)


def test_import_bita_stays_light_and_exports_captioner():
    code = "import sys, bita; assert 'torch' not in sys.modules, 'import bita loaded torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    import bita

    assert bita.Captioner is Captioner
    with pytest.raises(AttributeError, match="no attribute 'Captionr'"):
        _ = bita.Captionr


def test_images_are_resized_one_by_one_as_read_and_jpegs_decode_in_draft(
    checkpoint, tmp_path, monkeypatch
):
    """Fault: a batch of three 2,000 x 2,000 JPEGs. Main decoded all three at full size before
    resizing any (16 images of 6,000 x 6,000 took 3.5 GB)."""
    for index in range(3):
        Image.new("RGB", (2000, 2000), (40 * index, 90, 60)).save(tmp_path / f"{index}.jpg")
    captioner = Captioner.from_checkpoint(checkpoint, device="cpu", batch_size=3, num_beams=1)
    events = []
    read, resize = caption.load_image, captioner.transform
    monkeypatch.setattr(
        caption, "load_image", lambda *a, **k: events.append("read") or read(*a, **k)
    )
    captioner.transform = lambda picture: events.append(picture.size) or resize(picture)
    lines = list(caption_files(captioner, sorted(tmp_path.glob("*.jpg")), io.StringIO()))
    assert all("caption" in line for line in lines)
    assert events[0::2] == ["read"] * 3
    size = captioner.model.preprocess.size
    assert all(2 * size <= side <= 1000 for sizes in events[1::2] for side in sizes)


def test_an_image_past_pillows_pixel_limit_is_captioned(checkpoint, tmp_path, capsys):
    """Fault: a 13,400 x 13,400 JPEG (180 million pixels). Main refused it as a decompression
    bomb (Pillow's default limit: 89 million pixels, refused above twice that)."""
    Image.new("L", (13400, 13400), 90).save(tmp_path / "scene.jpg", quality=10)
    argv = ["--checkpoint", str(checkpoint), str(tmp_path / "scene.jpg"), "--num-beams", "1"]
    assert main(argv) == 0
    assert "caption" in json.loads(capsys.readouterr().out)
