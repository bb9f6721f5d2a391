import json

import pytest

from bita.data.annotations import AnnotationError, first_per_class, read_annotations


def write(tmp_path, data):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def karpathy_item(**overrides):
    item = {"filename": "a_1.jpg", "imgid": 7, "split": "train", "sentences": [{"raw": "x ."}]}
    return {**item, **overrides}


def test_reads_karpathy_layout(tmp_path):
    path = write(tmp_path, {"images": [karpathy_item(label="Airport")]})
    (record,) = read_annotations(path, "rsicd")
    assert (record.dataset, record.split, record.image_id) == ("rsicd", "train", "7")
    assert (record.filename, record.scene, record.captions) == ("a_1.jpg", "Airport", ["x ."])


def test_reads_nwpu_per_class_layout(tmp_path):
    item = {"filename": "beach_1.jpg", "imgid": 3, "split": "test", "raw": "a", "raw_1": "b"}
    (record,) = read_annotations(write(tmp_path, {"beach": [item]}), "nwpu")
    assert record.filename == "beach/beach_1.jpg"
    assert (record.scene, record.split, record.captions) == ("beach", "test", ["a", "b"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"annotations": 3}, "unknown annotation layout"),
        ({"images": [karpathy_item(split="dev")]}, "images[0]: field 'split' is 'dev'"),
        ({"images": [{"imgid": 1, "split": "val", "sentences": []}]}, "missing field 'filename'"),
        ({"images": [karpathy_item(sentences=[{"tokens": []}])]}, "sentences[0]: missing field"),
        ({"images": [karpathy_item(imgid="4.5")]}, "field 'imgid' is '4.5'"),
        ({"images": [karpathy_item(), karpathy_item()]}, "'7' appears twice"),
        ({"beach": [{"filename": "b.jpg", "imgid": 1, "split": "val"}]}, "['beach'][0]"),
    ],
)
def test_bad_annotations_name_file_record_and_field(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(AnnotationError) as caught:
        read_annotations(path, "x")
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_first_per_class_samples_each_class_per_split(tmp_path):
    items = [
        karpathy_item(imgid=i, label=f"c{i % 2}", split="train" if i < 6 else "val")
        for i in range(10)
    ]
    records = read_annotations(write(tmp_path, {"images": items}), "x")
    chosen = first_per_class(records, {"train": 2, "val": 1})
    assert [r.image_id for r in chosen] == ["0", "1", "2", "3", "6", "7"]
