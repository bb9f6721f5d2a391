"""The gallery page and the metrics table: ordering, escaping, embedded images, labelled scale."""

import base64
import re

from bita.eval.gallery import write_gallery
from bita.eval.tables import caption_examples, metrics_table

from .fakes import png_bytes


def record(index: int, caption: str, image_bytes: bytes | None = None) -> dict:
    return {
        "image_id": f"demo_{index}",
        "filename": f"{index}.png",
        "caption": caption,
        "references": [f"reference of {index}"],
        "image_bytes": png_bytes(index) if image_bytes is None else image_bytes,
    }


def test_gallery_orders_best_and_worst_and_escapes(tmp_path):
    records = [record(i, f"caption {i}") for i in range(4)]
    records[2]["caption"] = "<script>alert(1)</script>"
    cider = {"demo_0": 0.5, "demo_1": 2.0, "demo_2": 0.1, "demo_3": 1.0}
    path = write_gallery(records, cider, tmp_path / "g" / "page.html", size=2, title="t <x>")
    page = path.read_text()
    best, worst = page.split("Worst first")
    assert re.findall(r"demo_\d", best) == ["demo_1", "demo_3"]
    assert re.findall(r"demo_\d", worst) == ["demo_2", "demo_0"]
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "t &lt;x&gt;" in page
    thumbnails = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", page)
    assert len(thumbnails) == 4
    assert base64.b64decode(thumbnails[0]).startswith(b"\xff\xd8")  # a JPEG


def test_undecodable_image_does_not_sink_the_gallery(tmp_path):
    records = [record(0, "fine"), record(1, "broken", image_bytes=b"not an image")]
    page = write_gallery(
        records, {"demo_0": 1.0, "demo_1": 0.0}, tmp_path / "p.html", size=2, title="t"
    ).read_text()
    assert page.count("data:image/jpeg;base64,") == 2  # demo_0 in both sections
    assert "image not shown" in page


def test_table_labels_scale_and_shows_missing_spice():
    metrics = {"Bleu_1": 0.8, "Bleu_4": 0.456789, "CIDEr": 2.5, "SPICE": None, "S_m": 0.9}
    plain = metrics_table({"rsicd val": metrics})
    header, rule, row = plain.splitlines()
    assert "(0–1)" in header and "BLEU-4" in header and "SPICE" in header
    assert "| rsicd val |" in row and "0.4568" in row and "2.5000" in row and "n/a" in row
    percent = metrics_table({"rsicd val": metrics}, percent=True)
    assert "(×100)" in percent and "45.68" in percent and "250.00" in percent


def test_caption_examples_spread_over_the_split_beside_a_reference():
    captions = [
        {"filename": f"{i}.jpg", "caption": f"caption {i}", "references": [f"ref {i}", "other"]}
        for i in range(10)
    ]
    lines = caption_examples(captions, 3).splitlines()
    assert lines == [
        "  0.jpg  caption 0  | ref 0",
        "  3.jpg  caption 3  | ref 3",
        "  6.jpg  caption 6  | ref 6",
    ]
    assert caption_examples(captions, 0) == "" and caption_examples([], 3) == ""
