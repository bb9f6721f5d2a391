"""evaluate(): decode with a fake model, score, write results, captions and gallery."""

import contextlib
import io
import json
import re

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from bita.eval import evaluate as evaluate_module
from bita.eval.decoding import DecodeSettings
from bita.eval.evaluate import evaluate

from .fakes import CAPTIONS, REFERENCES, FakeBITA, make_batches


class RecordingTracker:
    def __init__(self):
        self.metrics: list[tuple[dict, int | None]] = []
        self.artifacts: list = []

    def log_metrics(self, metrics, *, step):
        self.metrics.append((metrics, step))

    def log_artifact(self, path, artifact_path=None):
        assert path.exists()
        assert artifact_path == "results"
        self.artifacts.append(path)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One real evaluation (Java runs once for the module): 6 images, image 3 delivered twice."""
    out_dir = tmp_path_factory.mktemp("run")
    tracker = RecordingTracker()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        metrics = evaluate(
            FakeBITA(),
            make_batches([[0, 1, 2], [3, 4], [5, 3]]),
            decode={"num_beams": 2, "batch_size": 3},
            out_dir=out_dir,
            dataset="demo",
            split="val",
            checkpoint="runs/x/checkpoints/best",
            gallery_size=2,
            tracker=tracker,
            step=7,
        )
    summary = json.loads((out_dir / "results" / "demo_val.json").read_text())
    assert summary["metrics"] == metrics
    return summary, out_dir / "results", tracker, stdout.getvalue()


def test_results_file_holds_metrics_settings_checkpoint_counts(evaluated):
    summary, _, _, _ = evaluated
    metrics = summary["metrics"]
    assert set(metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L"} | {
        "CIDEr",
        "SPICE",
        "S_m",
    }
    assert 0 < metrics["Bleu_4"] < metrics["Bleu_1"] <= 1
    parts = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
    assert metrics["S_m"] == pytest.approx(sum(metrics[k] for k in parts) / 4)
    assert summary["decoding"] == DecodeSettings(num_beams=2, batch_size=3).to_dict()
    assert summary["checkpoint"] == "runs/x/checkpoints/best"
    assert summary["counts"] == {"images": 6, "references": 12, "duplicates_dropped": 1}


def test_captions_file_lists_each_image_once(evaluated):
    _, results, _, _ = evaluated
    captions = json.loads((results / "demo_val_captions.json").read_text())
    assert captions == [
        {
            "image_id": f"demo_{i}",
            "filename": f"img {i}.png",
            "caption": CAPTIONS[i],
            "references": REFERENCES[i],
        }
        for i in range(6)
    ]


def test_gallery_is_self_contained_best_and_worst_first(evaluated):
    _, results, _, _ = evaluated
    page = (results / "demo_val_gallery.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 4
    assert "src='http" not in page and 'src="http' not in page
    best, worst = page.split("Worst first")
    # Images 1 and 5 repeat a reference verbatim; 2 and 3 got each other's captions.
    assert re.findall(r"· (demo_\d) ·", best) == ["demo_1", "demo_5"]
    assert re.findall(r"· (demo_\d) ·", worst) == ["demo_2", "demo_3"]
    assert "a beach with blue sea water" in best


def test_tracker_gets_metrics_and_every_file(evaluated):
    summary, results, tracker, _ = evaluated
    ((metrics, step),) = tracker.metrics
    assert step == 7
    assert metrics["demo/val/CIDEr"] == summary["metrics"]["CIDEr"]
    assert all(value is not None for value in metrics.values())
    assert sorted(p.name for p in tracker.artifacts) == sorted(summary["files"].values())
    assert {p.parent for p in tracker.artifacts} == {results}


def test_table_is_printed(evaluated):
    summary, _, _, stdout = evaluated
    assert "| demo val |" in stdout
    assert f"{summary['metrics']['CIDEr']:.4f}" in stdout


def fake_scores(predictions, references, spice_dir=None):
    """Exact-match rate: cheap and deterministic, for tests that are not about the metrics."""
    per_image = {k: float(p in references[k]) for k, p in predictions.items()}
    mean = sum(per_image.values()) / len(per_image)
    names = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
    return {**dict.fromkeys(names, mean), "SPICE": None, "S_m": mean, "per_image_CIDEr": per_image}


def test_gallery_size_zero_writes_no_gallery(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_module, "score_captions", fake_scores)
    evaluate(
        FakeBITA(),
        make_batches([[0, 1]]),
        decode=None,
        out_dir=tmp_path,
        dataset="ucm",
        split="test",
        checkpoint=None,
        gallery_size=0,
    )
    summary = json.loads((tmp_path / "results" / "ucm_test.json").read_text())
    assert summary["files"] == {"results": "ucm_test.json", "captions": "ucm_test_captions.json"}
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted(
        summary["files"].values()
    )


def test_no_images_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="rsicd/val: the batches held no images"):
        evaluate(
            FakeBITA(),
            [],
            decode=None,
            out_dir=tmp_path,
            dataset="rsicd",
            split="val",
            checkpoint=None,
            gallery_size=4,
        )


def _rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    evaluate_module.score_captions = fake_scores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        shards = [[[0, 1], [2]], [[3, 4], [5, 0]]]  # image 0 reaches both ranks
        metrics = evaluate(
            FakeBITA(),
            make_batches(shards[rank]),
            decode=None,
            out_dir=out_dir,
            dataset="demo",
            split="val",
            checkpoint=None,
            gallery_size=1,
        )
        with open(f"{out_dir}/summary.rank{rank}.json", "w") as file:
            json.dump(metrics, file)
    finally:
        dist.destroy_process_group()


def test_two_ranks_score_every_image_once_on_rank0(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    metrics = [json.loads((tmp_path / f"summary.rank{r}.json").read_text()) for r in range(2)]
    assert metrics[0] == metrics[1]
    assert metrics[0]["CIDEr"] == 0.5  # exact-match rate: images 0, 1 and 5 repeat a reference
    summary = json.loads((tmp_path / "results" / "demo_val.json").read_text())
    assert summary["counts"] == {"images": 6, "references": 12, "duplicates_dropped": 1}
    captions = json.loads((tmp_path / "results" / "demo_val_captions.json").read_text())
    assert [c["image_id"] for c in captions] == [f"demo_{i}" for i in range(6)]


def _evaluate_with_expected(out_dir, **kwargs):
    from bita.eval.evaluate import ExpectedImages

    return evaluate(
        FakeBITA(),
        make_batches([[0, 1], [2]]),  # image 3 of the split failed to decode
        decode=None,
        out_dir=out_dir,
        dataset="demo",
        split="val",
        checkpoint=None,
        gallery_size=0,
        expected=ExpectedImages(4, lambda: [f"demo_{i}" for i in range(4)]),
        **kwargs,
    )


def test_images_not_scored_are_counted_named_and_fail_unless_allowed(tmp_path, monkeypatch):
    """Fault: a split image that cannot be decoded, once scored away with only a log warning
    (30 of 31 RSICD-demo val images); the results must say so and the stage must fail."""
    monkeypatch.setattr(evaluate_module, "score_captions", fake_scores)
    with pytest.raises(Exception, match=r"scored 3 of 4 images; not scored: demo_3.*allow_missing"):
        _evaluate_with_expected(tmp_path / "strict")
    summary = json.loads((tmp_path / "strict/results/demo_val.json").read_text())
    assert summary["counts"]["images"] == 3 and summary["counts"]["images_expected"] == 4
    assert summary["skipped_images"] == ["demo_3"]

    metrics = _evaluate_with_expected(tmp_path / "lenient", allow_missing=True)
    assert metrics["CIDEr"] == pytest.approx(2 / 3)  # images 0 and 1 repeat a reference
    summary = json.loads((tmp_path / "lenient/results/demo_val.json").read_text())
    assert summary["skipped_images"] == ["demo_3"]


def test_a_complete_split_lists_no_keys(tmp_path, monkeypatch):
    from bita.eval.evaluate import ExpectedImages

    monkeypatch.setattr(evaluate_module, "score_captions", fake_scores)

    def never():
        raise AssertionError("keys are listed only when images are missing")

    evaluate(
        FakeBITA(),
        make_batches([[0, 1, 2]]),
        decode=None,
        out_dir=tmp_path,
        dataset="demo",
        split="val",
        checkpoint=None,
        gallery_size=0,
        expected=ExpectedImages(3, never),
        selection={"checkpoint": "best"},
    )
    summary = json.loads((tmp_path / "results/demo_val.json").read_text())
    assert summary["skipped_images"] == [] and summary["selection"] == {"checkpoint": "best"}
