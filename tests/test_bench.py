"""tools/bench.py: the tiny preset runs on the CPU and reports every figure in one JSON line;
BLIP-2 is built at our sizes (paper scale checked on the meta device, no compute)."""

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bita_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_tiny_preset_prints_one_json_line(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--preset", "tiny", "--batch", "2", "--warmup", "0", "--iters", "1"]
    profile = tmp_path / "profile.txt"
    rc = bench.main([*argv, "--new-tokens", "2", "--json", str(out), "--profile", str(profile)])

    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert rc == 0, result.get("errors")
    assert json.loads(out.read_text()) == result
    assert (result["preset"], result["device"], result["precision"]) == ("tiny", "cpu", "float32")
    # caption_eager leaves out the CUDA graph: on a CPU, "caption" already is that
    assert set(result["ours"]) == set(bench.PHASES) - {"caption_eager"}
    assert (
        set(result["theirs"])
        == set(result["ratio"])
        == {"pretrain2", "pretrain2_cached", "caption"}
    )
    flops = result["gflops_per_image"]
    assert flops["ours"]["pretrain2_cached"] < flops["ours"]["pretrain2"]  # no tower
    assert all(v > 0 for side in ("ours", "theirs") for v in result[side].values())
    assert result["batch"] == dict.fromkeys(bench.PHASES, 2)
    assert result["targets"] == {"ratio.pretrain2": 1.5}
    assert result["met"]["ratio.pretrain2"] == (result["ratio"]["pretrain2"] >= 1.5)
    assert result["lm_text_tokens"] > 20  # captions as long as the reference's 30 tokens
    assert "mfu" not in result  # no peak to compare with on a CPU
    assert any(line.startswith("| pretrain2 | 2 |") for line in lines)
    sections = [line for line in profile.read_text().splitlines() if line.startswith("## ")]
    assert len(sections) == len(result["ours"]) + len(result["theirs"])
    assert "## ours pretrain1" in sections and "## theirs caption" in sections


def test_bad_arguments_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "tiny", "--batch", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "huge"])


@pytest.fixture(scope="module")
def paper_models(bench, tmp_path_factory):
    """Paper-scale ours and theirs on the meta device: real shapes, no memory, no compute."""
    cfg = bench.compose_config(
        bench.PRESETS["paper"], bench.bench_tokenizers(tmp_path_factory.mktemp("tok"))
    )
    precision = bench.Precision.from_cfg(cfg.hardware)
    meta = torch.device("meta")
    ours = bench.build_ours(cfg, meta, precision, with_llm=True)
    spec = bench.their_spec(ours)
    return ours, spec, bench.build_theirs(spec, meta, precision)


def test_blip2_is_built_at_our_paper_sizes(paper_models):
    ours, spec, theirs = paper_models
    vision = theirs.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size) == (1024, 21, 14)
    assert spec.tower is None  # a ViT tower: BLIP-2 builds its own
    qformer = theirs.config.qformer_config
    assert (qformer.hidden_size, qformer.num_hidden_layers, qformer.encoder_hidden_size) == (
        768,
        12,
        1024,
    )
    assert theirs.config.num_query_tokens == 32
    lm = sum(p.numel() for p in theirs.language_model.parameters())
    assert lm == sum(p.numel() for p in ours.llm.parameters())
    assert 2.6e9 < lm < 2.7e9  # OPT-2.7B


def test_flops_estimate_is_the_models_own(bench, paper_models):
    """Our FLOPs estimate re-derived by the bench equals BITA.flops_per_sample, so BLIP-2's,
    computed by the same function, is comparable."""
    ours, _, theirs = paper_models
    shape = bench.our_flop_shape(ours)
    assert bench.lm_step_flops(shape) == pytest.approx(ours.flops_per_sample("lm"), rel=1e-9)
    theirs_flops = bench.lm_step_flops(bench.their_flop_shape(theirs, shape))
    # same tower and LM; BLIP-2 cross-attends every second layer but self-attends the queries
    assert 0.9 < theirs_flops / ours.flops_per_sample("lm") < 1.1


def test_gpu_precision_path_runs_at_tiny_size(bench, monkeypatch):
    """The paper preset's precision (hardware=gpu: fp32 trainable parts, frozen tower and LM in
    bf16, bf16 autocast) through both stacks, on the CPU at tiny sizes: dtype mismatches show
    here rather than on a scarce GPU lease."""
    tiny = bench.PRESETS["tiny"]
    mixed = replace(
        tiny,
        groups={**tiny.groups, "hardware": "gpu"},
        overrides=("encoder.dtype=bf16", "llm.dtype=bf16"),
    )
    monkeypatch.setitem(bench.PRESETS, "tiny_mixed", mixed)
    batch = dict.fromkeys(bench.PHASES, 2)
    settings = bench.Settings("tiny_mixed", torch.device("cpu"), batch, 0, 1, 2, 989.0)

    result = bench.run(settings)

    assert "errors" not in result, result.get("errors")
    assert result["precision"] == "float32+autocast:bfloat16"
    assert set(result["ours"]) == set(bench.PHASES) - {"caption_eager"}
    assert set(result["theirs"]) == {"pretrain2", "pretrain2_cached", "caption"}
