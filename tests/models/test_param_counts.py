import pytest

from bita.models.build import count_parameters

# SPEC §1 sizes; meta-device builds, so no memory and no downloads
EXPECTED = {
    "ift_query_path": (85e6, 95e6),  # ≈ 90 M
    "ift_total": (160e6, 180e6),  # ≈ 170 M with the text side
    "llm": (2.6e9, 2.8e9),  # OPT-2.7B
    "encoder": (0.25e9, 0.31e9),  # ViT-L/14 first 21 of 24 blocks (all 24: 0.30 B)
}


def test_paper_scale_parameter_counts(compose):
    counts = count_parameters(compose("clip_vit_l14", "ift_base", "opt_2.7b"))
    print({k: f"{v / 1e6:.1f} M" for k, v in counts.items()})
    for part, (low, high) in EXPECTED.items():
        assert low <= counts[part] <= high, (part, counts[part])


@pytest.mark.parametrize("qformer", ["ift_small", "blip2_base"])
def test_other_qformers_build_on_meta(compose, qformer):
    counts = count_parameters(compose("effnet_lite0", qformer, "opt_2.7b"))
    assert counts["ift_total"] > counts["ift_query_path"] > 0
